"""Type promotion (NumPy 2 / NEP 50 with weak Python scalars), bfloat16 rules, finfo/iinfo."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
from helpers import ALL, COMPLEX

import ember
import ember.numpy as enp
from ember import dtypes

NON_BF16 = [d for d in ALL + COMPLEX if d != dtypes.bfloat16]
SCALARS = [True, False, 1, -1, 0, 2.5, -0.0, 1j, 2 - 0.5j]


@pytest.mark.parametrize("a,b", list(itertools.product(NON_BF16, NON_BF16)),
                         ids=lambda d: d.name)
def test_promotion_table_matches_numpy(a, b):
    expected = np.result_type(a, b)
    assert enp.result_type(a, b) == expected
    assert enp.promote_types(a, b) == expected
    x = enp.ones((2,), a)
    y = enp.ones((2,), b)
    assert enp.result_type(x, y) == expected
    if dtypes.is_complex(expected):  # maximum is not defined on complex
        assert enp.multiply(x, y).dtype == expected
    elif a != dtypes.bool_ or b != dtypes.bool_:
        assert enp.maximum(x, y).dtype == expected
    assert (x == y).dtype == dtypes.bool_


@pytest.mark.parametrize("dt", NON_BF16, ids=lambda d: d.name)
@pytest.mark.parametrize("scalar", SCALARS, ids=repr)
def test_weak_python_scalars_match_numpy(dt, scalar):
    host = np.ones((3,), dt)
    x = enp.asarray(host)
    expected = np.result_type(host, scalar)
    assert enp.result_type(x, scalar) == expected
    if dt == dtypes.bool_ and not isinstance(scalar, bool):
        expected_sum = (host + scalar)
    elif dt == dtypes.bool_:
        expected_sum = host | scalar
    else:
        if isinstance(scalar, int) and not isinstance(scalar, bool) and scalar < 0 \
                and dt.kind == "u":
            pytest.skip("NumPy raises for negative Python ints with unsigned arrays")
        expected_sum = host + scalar
    for fn in (lambda v: enp.add(v, scalar), lambda v: v + scalar, lambda v: scalar + v,
               ember.jit(lambda v: v + scalar)):
        out = fn(x)
        assert out.dtype == expected_sum.dtype
        np.testing.assert_array_equal(np.asarray(out), expected_sum)


@pytest.mark.parametrize("scalars,expected", [
    ((1, 2), np.int64), ((1, 2.0), np.float64), ((True, 1), np.int64), ((True, False), np.bool_),
    ((2.0, True), np.float64), ((1j, 2.0), np.complex128), ((True, 1j), np.complex128),
])
def test_scalar_only_promotion(scalars, expected):
    assert enp.result_type(*scalars) == expected
    assert enp.add(*scalars).dtype == expected


def test_python_int_out_of_range_for_array_dtype_raises():
    x = enp.ones((2,), enp.uint8)
    with pytest.raises(ember.EmberError, match="300") as info:
        x + 300
    assert "test_dtypes.py" in str(info.value)


def test_weak_scalar_keeps_half_precision_and_under_jit():
    for dt in (enp.float16, enp.bfloat16, enp.int8):
        x = enp.ones((2,), dt)
        assert (x * 2).dtype == dt
        assert ember.jit(lambda v: v * 2 + 1)(x).dtype == dt
    assert (enp.ones((2,), enp.int8) * 1.5).dtype == np.float64


@pytest.mark.parametrize("other,expected", [
    (dtypes.bfloat16, dtypes.bfloat16), (dtypes.float16, dtypes.float32),
    (dtypes.float32, dtypes.float32), (dtypes.float64, dtypes.float64),
    (dtypes.bool_, dtypes.bfloat16), (dtypes.int8, dtypes.bfloat16),
    (dtypes.uint8, dtypes.bfloat16), (dtypes.int16, dtypes.float32),
    (dtypes.int32, dtypes.float64), (dtypes.int64, dtypes.float64),
    (dtypes.complex64, dtypes.complex64), (dtypes.complex128, dtypes.complex128),
], ids=lambda d: getattr(d, "name", str(d)))
def test_bfloat16_promotion(other, expected):
    assert enp.result_type(dtypes.bfloat16, other) == expected
    assert enp.result_type(other, dtypes.bfloat16) == expected
    x = enp.ones((2,), dtypes.bfloat16)
    y = enp.ones((2,), other)
    assert (x + y).dtype == expected
    if not dtypes.is_complex(expected):
        assert enp.maximum(x, y).dtype == expected


def test_bfloat16_with_weak_scalars():
    x = enp.asarray(np.array([1.5, -2.0], ml_dtypes.bfloat16))
    assert (x * 1j).dtype == dtypes.complex64  # like float16: no complex32
    for s in (1, 2.5, True):
        out = x + s
        assert out.dtype == dtypes.bfloat16
        np.testing.assert_array_equal(np.asarray(out, np.float32),
                                      (np.array([1.5, -2.0], np.float32) + s).astype(
                                          ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("dt", dtypes.FLOATING, ids=lambda d: d.name)
def test_finfo(dt):
    ours, ref = enp.finfo(dt), ml_dtypes.finfo(dt)
    for attr in ("eps", "max", "min", "tiny", "bits", "resolution"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    if dt != dtypes.bfloat16:
        assert ours.eps == np.finfo(dt).eps
    assert enp.finfo(enp.bfloat16).eps == 2.0 ** -7
    assert enp.finfo("float32").max == np.finfo(np.float32).max


@pytest.mark.parametrize("dt", COMPLEX, ids=lambda d: d.name)
def test_finfo_of_complex_describes_its_real_components(dt):
    real = dtypes.real_dtype(dt)
    assert real == {dtypes.complex64: dtypes.float32, dtypes.complex128: dtypes.float64}[dt]
    ours = enp.finfo(dt)
    expected = (np.finfo(dt).eps, np.finfo(dt).max, real.itemsize * 8)
    assert (ours.eps, ours.max, ours.bits) == expected


@pytest.mark.parametrize("dt", dtypes.INTEGER, ids=lambda d: d.name)
def test_iinfo(dt):
    assert enp.iinfo(dt).min == np.iinfo(dt).min
    assert enp.iinfo(dt).max == np.iinfo(dt).max
    assert enp.iinfo(dt).bits == np.iinfo(dt).bits


def test_unsupported_dtypes_raise():
    for bad in (np.complex256, "U3", object):
        with pytest.raises(ember.DTypeError):
            enp.dtype(bad)
    with pytest.raises(ember.DTypeError):
        enp.finfo(np.int32)
    with pytest.raises(ember.DTypeError):
        enp.iinfo(np.float32)


def test_dtype_predicates():
    assert enp.isdtype(enp.float32, "real floating")
    assert enp.isdtype(enp.bfloat16, "real floating")
    assert enp.isdtype(enp.uint8, "unsigned integer")
    assert not enp.isdtype(enp.uint8, "signed integer")
    assert enp.isdtype(enp.int8, ("bool", "integral"))
    assert not enp.isdtype(enp.bool_, "numeric")
    assert enp.isdtype(enp.complex64, "complex floating")
    assert enp.isdtype(enp.complex128, ("numeric", "bool"))
    assert not enp.isdtype(enp.complex64, "real floating")
    assert not enp.isdtype(enp.float64, "complex floating")
    assert enp.issubdtype(enp.float16, np.floating)
    assert enp.can_cast(enp.int8, enp.int16)
    assert not enp.can_cast(enp.float32, enp.int32)
    assert enp.can_cast(enp.bfloat16, enp.float32)


def test_array_dtypes_from_host_values():
    assert enp.asarray([1, 2]).dtype == np.int64
    assert enp.asarray([1.0, 2]).dtype == np.float64
    assert enp.asarray([True]).dtype == np.bool_
    assert enp.asarray(np.float32(1)).dtype == np.float32
    assert not enp.asarray(1.0).weak_type
    assert enp.asarray(np.ones(2, ml_dtypes.bfloat16)).dtype == dtypes.bfloat16
    assert enp.asarray([1, 2j]).dtype == np.complex128
    assert enp.asarray(np.ones(2, np.complex64)).dtype == np.complex64
    assert enp.asarray(1j).dtype == np.complex128 and not enp.asarray(1j).weak_type


def test_ir_printer_names_complex_dtypes():
    x = enp.ones((2,), enp.float32)
    text = str(ember.jit(lambda v: v * 1j + enp.ones((2,), enp.complex128)).lower(x))
    assert "c64[2]" in text and "c128[2]" in text
