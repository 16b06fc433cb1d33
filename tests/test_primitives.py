"""Every registered primitive, eager and under jit, against NumPy, for every valid dtype.

The specs live in ``primitive_specs.py``; ``test_every_primitive_has_a_spec`` fails when a new
primitive is registered without one.
"""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pytest
from helpers import ALL, FLOATS, NUMBERS, assert_close, bf16, rand
from hypothesis import given, settings
from hypothesis import strategies as hst
from primitive_specs import NOT_COVERED_HERE, SPECS, cases, make_args

import ember
import ember.numpy as enp
from ember import dtypes
from ember import ops as lax
from ember.core.primitive import REGISTRY


def _import_all_of_ember():
    """Import every ember module, so every primitive anywhere is in the registry."""
    for info in pkgutil.walk_packages(ember.__path__, "ember."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as e:  # optional dependency (cupy, mpi4py...) missing
            if (e.name or "").startswith("ember"):
                raise


def test_every_primitive_has_a_spec():
    _import_all_of_ember()
    covered = {s.name for s in SPECS}
    missing = sorted(name for name in REGISTRY
                     if name not in covered and not name.startswith(NOT_COVERED_HERE))
    assert not missing, f"primitives without a test spec in primitive_specs.py: {missing}"


def _run(spec, args):
    # One program per case on the NumPy backend, the reference; the compiled backend runs the
    # same cases batched into few programs (tests/test_cpu_backend.py), one compile per batch.
    ember_args = [enp.asarray(a) for a in args]
    return spec.fn(*ember_args), ember.jit(spec.fn, backend="numpy")(*ember_args)


@pytest.mark.parametrize("spec,dtype,shape", cases())
def test_primitive_matches_numpy(spec, dtype, shape):
    rng = np.random.default_rng(0)
    args = make_args(spec, rng, dtype, shape)
    expected = spec.ref(*args)
    eager, jitted = _run(spec, args)
    assert_close(eager, expected, dtype, err_msg="(eager)")
    assert_close(jitted, expected, dtype, err_msg="(jit)")


# --- behaviours a table of cases cannot express ----------------------------------------------

def test_result_types_follow_the_abstract_rule():
    """The abstract rule and the implementation agree on dtype and shape for every case."""
    rng = np.random.default_rng(1)
    for spec in SPECS:
        for dt in spec.dtypes[:1]:
            args = make_args(spec, rng, dt, spec.shapes[0])
            out = spec.fn(*[enp.asarray(a) for a in args])
            lowered = ember.jit(spec.fn).lower(*[enp.asarray(a) for a in args])
            outs = out if isinstance(out, list) else [out]
            for o, aval in zip(outs, lowered.graph.out_avals):
                assert (o.shape, o.dtype) == (aval.shape, aval.dtype), spec.case_id


@pytest.mark.parametrize("op", ["add", "mul", "max", "select"])
def test_weak_type_propagates_only_when_all_operands_are_weak(op):
    weak = enp.asarray(2.0)
    weak = ember.Array(weak._buffer, weak.aval.update(weak=True))
    strong = enp.asarray(3.0)
    fn = getattr(lax, op)
    if op == "select":
        pred = enp.asarray(True)
        assert fn(pred, weak, weak).weak_type
        assert not fn(pred, weak, strong).weak_type
    else:
        assert fn(weak, weak).weak_type
        assert not fn(weak, strong).weak_type


@pytest.mark.parametrize("fn,args,match", [
    (lax.add, (np.ones(3), np.ones(4)), r"add: operands must have equal shapes.*\(3,\).*\(4,\)"),
    (lax.add, (np.ones(3), np.ones(3, np.float32)), r"add: operands must have equal dtypes"),
    (lax.exp, (np.ones(3, np.int32),), r"exp: needs a floating or complex dtype, got int32"),
    (lambda x: lax.reduce_sum(x, (2,)), (np.ones((2, 3)),), r"reduce_sum: axis 2 is out"),
    (lambda x: lax.reshape(x, (4,)), (np.ones((2, 3)),), r"reshape: cannot reshape .*\(2, 3\)"),
    (lambda x, y: lax.dot_general(x, y, ((1,), (0,))), (np.ones((2, 3)), np.ones((4, 5))),
     r"dot_general: shapes \(2, 3\) and \(4, 5\) not aligned"),
    (lambda x: lax.transpose(x, (0, 0)), (np.ones((2, 3)),), r"transpose: axes \(0, 0\)"),
    (lambda x: lax.slice(x, (0,), (5,)), (np.ones(3),), r"slice: bounds"),
    (lambda x, i: lax.gather(x, i), (np.ones(3), np.zeros((2, 1), np.float32)),
     r"gather: indices must be integers"),
    (lambda x: lax.argmax(x, 0), (np.ones((0, 2)),), r"argmax: attempt to get argmax"),
    (lambda x: lax.top_k(x, 4), (np.ones(3),), r"top_k: k=4"),
    (lambda x: lax.reduce_max(x, (0,)), (np.ones((0, 2)),), r"reduce_max: zero-size array"),
    (lambda x: lax.reduce_sum(x, (0,)), (np.ones(2, bool),), r"reduce_sum: cannot sum bool"),
    (lambda a, b: lax.concatenate([a, b], 0), (np.ones((2, 3)), np.ones((2, 4))),
     r"concatenate: all dimensions except axis 0 must match"),
])
def test_bad_operands_raise_ember_errors_naming_the_op(fn, args, match):
    ember_args = [enp.asarray(a) for a in args]
    for runner in (fn, ember.jit(fn)):
        with pytest.raises(ember.EmberError, match=match) as info:
            runner(*ember_args)
        assert "test_primitives.py" in str(info.value)


def test_dynamic_slice_with_traced_starts_under_jit():
    x = np.arange(30.0).reshape(5, 6)
    f = ember.jit(lambda x, i: lax.dynamic_slice(x, [i, i], (2, 2)))
    for i in (-1, 0, 2, 4, 10):
        j = int(np.clip(i, 0, 3))
        k = int(np.clip(i, 0, 4))
        np.testing.assert_array_equal(f(enp.asarray(x), enp.asarray(i)), x[j:j + 2, k:k + 2])
    assert f.trace_count == 1


def test_scatter_and_gather_are_inverse_for_unique_indices():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 3))
    idx = np.array([[4], [0], [2]])
    rows = lax.gather(enp.asarray(x), enp.asarray(idx))
    back = lax.scatter(enp.zeros_like(enp.asarray(x)), enp.asarray(idx), rows, "set")
    expected = np.zeros_like(x)
    expected[[4, 0, 2]] = x[[4, 0, 2]]
    np.testing.assert_array_equal(back, expected)


def test_sort_is_stable_and_puts_nan_last():
    x = np.array([3.0, np.nan, 1.0, 3.0, -np.inf, np.inf])
    np.testing.assert_array_equal(lax.sort(enp.asarray(x)), np.sort(x))
    np.testing.assert_array_equal(lax.argsort(enp.asarray(np.array([2, 1, 2, 1]))),
                                  [1, 3, 0, 2])
    np.testing.assert_array_equal(lax.argsort(enp.asarray(np.array([2, 1, 2, 1])),
                                              descending=True), [0, 2, 1, 3])


def test_threefry_matches_numpy_reference_on_random_input():
    from ember.ops.random_bits import threefry_numpy

    rng = np.random.default_rng(3)
    k0, k1, x0, x1 = (rng.integers(0, 2**32, size=(4, 5), dtype=np.uint32) for _ in range(4))
    a, b = ember.jit(lambda *a: lax.threefry2x32(*a))(*[enp.asarray(v) for v in
                                                         (k0, k1, x0, x1)])
    ra, rb = threefry_numpy(k0, k1, x0, x1)
    np.testing.assert_array_equal(a, ra)
    np.testing.assert_array_equal(b, rb)


# --- property-based: elementwise binary ops through the NumPy layer (broadcasting) -----------

_BINARY = {
    "add": (enp.add, np.add), "subtract": (enp.subtract, np.subtract),
    "multiply": (enp.multiply, np.multiply), "maximum": (enp.maximum, np.maximum),
    "minimum": (enp.minimum, np.minimum), "less": (enp.less, np.less),
    "equal": (enp.equal, np.equal), "greater_equal": (enp.greater_equal, np.greater_equal),
}

_shapes = hst.lists(hst.integers(1, 3), min_size=0, max_size=3).map(tuple)


def _broadcastable(draw, shape):
    """A shape that broadcasts with ``shape``: some axes dropped from the left or set to 1."""
    drop = draw(hst.integers(0, len(shape)))
    tail = shape[drop:]
    return tuple(1 if draw(hst.booleans()) else n for n in tail)


@settings(max_examples=60, deadline=None)
@given(data=hst.data(), op=hst.sampled_from(sorted(_BINARY)),
       dt=hst.sampled_from([d for d in NUMBERS if d != dtypes.bfloat16]))
def test_binary_broadcasting_matches_numpy(data, op, dt):
    shape = data.draw(_shapes)
    other = _broadcastable(data.draw, shape)
    if data.draw(hst.booleans()):
        shape, other = other, shape
    rng = np.random.default_rng(data.draw(hst.integers(0, 2**16)))
    a, b = rand(rng, shape, dt), rand(rng, other, dt)
    ours, theirs = _BINARY[op]
    expected = theirs(a, b)
    assert_close(ours(enp.asarray(a), enp.asarray(b)), expected, dt)
    assert_close(ember.jit(ours)(enp.asarray(a), enp.asarray(b)), expected, dt)


@settings(max_examples=40, deadline=None)
@given(data=hst.data(), dt=hst.sampled_from(ALL))
def test_reductions_with_negative_axes_match_numpy(data, dt):
    shape = data.draw(hst.lists(hst.integers(1, 4), min_size=1, max_size=3).map(tuple))
    axis = data.draw(hst.integers(-len(shape), len(shape) - 1))
    rng = np.random.default_rng(data.draw(hst.integers(0, 2**16)))
    x = rand(rng, shape, dt)
    assert_close(enp.max(enp.asarray(x), axis=axis), np.max(x, axis=axis), dt)
    assert_close(ember.jit(lambda v: enp.min(v, axis=axis))(enp.asarray(x)),
                 np.min(x, axis=axis), dt)
    if dt in FLOATS:
        assert_close(enp.sum(enp.asarray(x), axis=axis),
                     np.sum(x.astype(np.float64), axis=axis).astype(dt), dt)


# --- nextafter: exact, bit for bit -----------------------------------------------------------

def _nextafter_by_bits(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The standard's definition on the bit patterns: one step of the integer that orders
    floats of one sign; from zero, the smallest subnormal with the sign of ``y``."""
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize]
    xf, yf = x.astype(np.float64), y.astype(np.float64)
    bits = x.view(uint).astype(np.int64)
    away_from_zero = (xf < yf) == (xf > 0)
    stepped = np.where(away_from_zero, bits + 1, bits - 1)
    tiny = np.where(yf > 0, 1, 1 | (1 << (8 * x.dtype.itemsize - 1)))
    out = np.where(xf == 0, tiny, stepped).astype(uint).view(x.dtype)
    return np.where(xf == yf, y, np.where(np.isnan(xf) | np.isnan(yf), np.nan, out)).astype(
        x.dtype)


@pytest.mark.parametrize("dt", FLOATS, ids=lambda d: d.name)
def test_nextafter_is_exact_in_every_float_dtype(dt):
    rng = np.random.default_rng(4)
    x = rand(rng, (64,), dt)
    y = rand(rng, (64,), dt)
    x[:6] = np.array([0.0, -0.0, 1.0, np.inf, np.nan, 2.0]).astype(dt)
    y[:6] = np.array([-1.0, 1.0, 1.0, 0.0, 1.0, np.inf]).astype(dt)
    expected = _nextafter_by_bits(x, y)
    for fn in (lax.nextafter, ember.jit(lax.nextafter), enp.nextafter):
        got = np.asarray(fn(enp.asarray(x), enp.asarray(y)))
        assert got.dtype == dt
        np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))
    assert enp.nextafter(1, 2).dtype == np.float64  # integers are computed in float
    assert float(enp.nextafter(1, 2)) == 1 + np.finfo(np.float64).eps


def test_nextafter_has_the_derivative_of_its_first_operand():
    x = enp.asarray(np.array([0.5, -2.0]))
    gx, gy = ember.grad(lambda a, b: enp.sum(enp.nextafter(a, b) * 3.0), (0, 1))(x, x + 1)
    np.testing.assert_array_equal(gx, [3.0, 3.0])
    np.testing.assert_array_equal(gy, [0.0, 0.0])


# --- the test helpers themselves -------------------------------------------------------------

def test_integer_and_bool_results_compare_exactly_whatever_the_input_dtype():
    """A bfloat16 input's loose tolerance must not hide an off-by-one index or a flipped bool."""
    x = bf16([1.0, 3.0, 2.0, 2.5])
    index = enp.argmax(enp.asarray(x))
    assert_close(index, np.int64(1), dtype=dtypes.bfloat16)
    with pytest.raises(AssertionError):
        assert_close(np.int64(100), np.int64(101), dtype=dtypes.bfloat16)
    with pytest.raises(AssertionError):
        assert_close(np.array([True, False]), np.array([True, True]), dtype=dtypes.bfloat16)
    with pytest.raises(AssertionError):
        assert_close(np.array([7], np.int32), np.array([8], np.int32), rtol=0.5)
    assert_close(np.array([1.0], np.float32), np.array([1.01], np.float32),
                 dtype=dtypes.bfloat16)  # floats keep the input dtype's tolerance
