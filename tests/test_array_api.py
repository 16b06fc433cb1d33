"""The array API standard (2023.12) surface of ``ember.numpy``, against NumPy 2's own
implementation of it: introspection and devices, ``astype``, ``cumulative_sum``/``prod`` with
``include_initial``, ``diff``, ``unique_*``, ``searchsorted``'s edge cases, and the signatures
(keyword names, positional-only and keyword-only markers) the public suite checks."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from helpers import assert_close, check, numeric_grad, rand

import ember
import ember.numpy as enp
from ember.errors import EmberValueError, ShapeError, TracerError

RNG = np.random.default_rng(7)


# --- namespace, inspection and devices --------------------------------------------------------

def test_version_and_namespace():
    assert enp.__array_api_version__ == "2023.12"
    x = enp.ones(3)
    assert x.__array_namespace__() is enp
    for version in ("2021.12", "2022.12", "2023.12"):
        assert x.__array_namespace__(api_version=version) is enp
    with pytest.raises(EmberValueError, match=r"__array_namespace__: unsupported api_version "
                       r"'1999.01'.*\n  at .*test_array_api.py"):
        x.__array_namespace__(api_version="1999.01")


def test_traced_arrays_have_the_namespace_too():
    seen = []
    ember.jit(lambda x: seen.append(x.__array_namespace__()) or x)(enp.ones(2))
    assert seen == [enp]


def test_inspection_namespace():
    info = enp.__array_namespace_info__()
    assert info.capabilities() == {"boolean indexing": True, "data-dependent shapes": True}
    devices = info.devices()
    assert isinstance(devices, list) and info.default_device() in devices
    assert enp.ones(1).device == info.default_device()
    assert info.default_dtypes() == {"real floating": enp.float64,
                                     "complex floating": np.complex128,
                                     "integral": enp.int64, "indexing": enp.int64}
    assert info.default_dtypes(device=devices[0]) == info.default_dtypes()


KINDS = [None, "bool", "signed integer", "unsigned integer", "integral", "real floating",
         "complex floating", "numeric", ("bool", "real floating"),
         ("signed integer", "complex floating")]


@pytest.mark.parametrize("kind", KINDS)
def test_inspection_dtypes_match_numpy(kind):
    ours = enp.__array_namespace_info__().dtypes(kind=kind)
    theirs = np.__array_namespace_info__().dtypes(kind=kind)
    assert list(ours) == list(theirs)
    assert all(ours[name] == theirs[name] for name in theirs)


def test_every_listed_dtype_makes_arrays_on_every_device():
    info = enp.__array_namespace_info__()
    for device in info.devices():
        for name, dt in info.dtypes(device=device).items():
            x = enp.empty(2, dtype=dt, device=device)
            assert x.dtype == np.dtype(name) and x.device == device


def test_inspection_dtypes_refuses_unknown_kind():
    with pytest.raises(EmberValueError, match="unknown kind 'float'"):
        enp.__array_namespace_info__().dtypes(kind="float")


CREATION = {
    "zeros": lambda device: enp.zeros((2, 3), device=device),
    "ones": lambda device: enp.ones(2, device=device),
    "empty": lambda device: enp.empty(2, device=device),
    "full": lambda device: enp.full(2, 7, device=device),
    "zeros_like": lambda device: enp.zeros_like(enp.ones(2), device=device),
    "ones_like": lambda device: enp.ones_like(enp.ones(2), device=device),
    "empty_like": lambda device: enp.empty_like(enp.ones(2), device=device),
    "full_like": lambda device: enp.full_like(enp.ones(2), 3, device=device),
    "arange": lambda device: enp.arange(4, device=device),
    "linspace": lambda device: enp.linspace(0, 1, 5, device=device),
    "eye": lambda device: enp.eye(3, device=device),
    "astype": lambda device: enp.astype(enp.ones(2), enp.int32, device=device),
}


@pytest.mark.parametrize("name", list(CREATION))
def test_device_argument(name):
    cpu = enp.__array_namespace_info__().default_device()
    results = [CREATION[name](device) for device in (None, cpu, str(cpu), cpu.platform)]
    for r in results:
        assert r.device == cpu
        assert_close(r, results[0])
    with pytest.raises(EmberValueError, match=fr"{name}: unsupported device 'tpu:3'; ember "
                       r"arrays live on cpu:0\n  at .*test_array_api.py"):
        CREATION[name]("tpu:3")


def test_to_device():
    x = enp.arange(5)
    y = x.to_device(x.device)
    assert y.device == x.device
    assert_close(y, np.arange(5))
    with pytest.raises(EmberValueError, match="to_device: unsupported device 'cuda:0'"):
        x.to_device("cuda:0")
    with pytest.raises(EmberValueError, match="to_device: streams are not supported"):
        x.to_device(x.device, stream=1)


# --- astype ----------------------------------------------------------------------------------

CASTS = [(np.float64, np.int32), (np.int64, np.float32), (np.float32, np.bool_),
         (np.bool_, np.uint8), (np.int16, np.uint16), (np.uint8, np.int8),
         (np.float32, np.float64)]


@pytest.mark.parametrize(("src", "dst"), CASTS)
def test_astype_function_and_method(src, dst):
    x = rand(RNG, (3, 4), src, low=-100, high=100)
    check(lambda a: enp.astype(a, dst), lambda a: a.astype(dst), x)
    check(lambda a: enp.astype(a, dst, copy=False), lambda a: a.astype(dst), x)
    check(lambda a: a.astype(dst), lambda a: a.astype(dst), x)


def test_astype_by_name_and_errors():
    assert enp.astype(enp.ones(2), "float32").dtype == np.float32
    with pytest.raises(ember.errors.DTypeError, match="not a dtype"):
        enp.astype(enp.ones(2), "not-a-dtype")


# --- cumulative_sum / cumulative_prod --------------------------------------------------------

SCAN_CASES = [
    ((5,), {}), ((5,), {"include_initial": True}), ((3, 4), {"axis": 0}),
    ((3, 4), {"axis": -1, "include_initial": True}), ((2, 0, 3), {"axis": 1}),
    ((2, 0, 3), {"axis": 1, "include_initial": True}), ((0,), {"include_initial": True}),
    ((), {}), ((), {"include_initial": True}),
]


@pytest.mark.parametrize("name", ["cumulative_sum", "cumulative_prod"])
@pytest.mark.parametrize(("shape", "kw"), SCAN_CASES)
def test_cumulative_matches_numpy(name, shape, kw):
    x = rand(RNG, shape, np.float64)
    check(lambda a: getattr(enp, name)(a, **kw), lambda a: getattr(np, name)(a, **kw), x)


@pytest.mark.parametrize("name", ["cumulative_sum", "cumulative_prod"])
@pytest.mark.parametrize(("dtype", "kw"), [(np.uint8, {}), (np.int32, {}), (np.bool_, {}),
                                           (np.int8, {"dtype": np.float32}),
                                           (np.float32, {"dtype": np.float64}),
                                           (np.uint16, {"include_initial": True})])
def test_cumulative_dtypes_match_numpy(name, dtype, kw):
    x = rand(RNG, (6,), dtype, low=0, high=3)
    check(lambda a: getattr(enp, name)(a, **kw), lambda a: getattr(np, name)(a, **kw), x)


def test_cumulative_sum_needs_an_axis_beyond_1d():
    with pytest.raises(ShapeError, match=r"cumulative_sum: axis is required for an array of "
                       r"shape \(2, 3\)"):
        enp.cumulative_sum(enp.ones((2, 3)))
    # NumPy's cumsum keeps flattening.
    assert_close(enp.cumsum(np.ones((2, 3))), np.cumsum(np.ones((2, 3))))


@pytest.mark.parametrize("name", ["cumulative_sum", "cumulative_prod"])
def test_cumulative_grad_with_initial(name):
    x = RNG.uniform(0.5, 2.0, size=(3, 4))
    w = RNG.normal(size=(3, 5))

    def f(a):
        return enp.sum(getattr(enp, name)(a, axis=1, include_initial=True) * w)

    g = ember.grad(f)(enp.asarray(x))
    assert_close(g, numeric_grad(lambda a: f(enp.asarray(a)), x), rtol=1e-6, atol=1e-8)


# --- diff ------------------------------------------------------------------------------------

DIFF_CASES = [
    {}, {"n": 2}, {"n": 0}, {"n": 6}, {"axis": 0}, {"axis": -2, "n": 2},
    {"prepend": 0.5}, {"append": [[1.0], [2.0], [3.0]]}, {"prepend": 1, "append": 2, "n": 3},
    {"axis": 0, "prepend": np.zeros((2, 5))},
]


@pytest.mark.parametrize("kw", DIFF_CASES)
def test_diff_matches_numpy(kw):
    x = rand(RNG, (3, 5), np.float32)
    check(lambda a: enp.diff(a, **kw), lambda a: np.diff(a, **kw), x)


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int16, np.int64, np.float64])
def test_diff_dtypes_match_numpy(dtype):
    check(lambda a: enp.diff(a, n=2), lambda a: np.diff(a, n=2), rand(RNG, (7,), dtype, 0, 50))


def test_diff_grad_and_errors():
    x = RNG.normal(size=(4, 3))
    w = RNG.normal(size=(2, 3))

    def f(a):
        return enp.sum(enp.diff(a, n=2, axis=0) * w)

    assert_close(ember.grad(f)(enp.asarray(x)), numeric_grad(lambda a: f(enp.asarray(a)), x),
                 rtol=1e-6, atol=1e-8)
    with pytest.raises(EmberValueError, match="diff: order must be a non-negative integer"):
        enp.diff(enp.ones(3), n=-1)
    with pytest.raises(ShapeError, match="diff: input must be at least 1-d"):
        enp.diff(enp.asarray(1.0))


# --- unique_* --------------------------------------------------------------------------------

UNIQUE_INPUTS = {
    "ints": np.array([[3, 1, 3], [2, 1, 1]], np.int16),
    "nan and signed zeros": np.array([np.nan, 0.0, -0.0, 2.0, np.nan, 2.0]),
    "float32": rand(RNG, (4, 3), np.float32, low=-2, high=2).round(),
    "bool": np.array([True, False, True]),
    "empty": np.zeros((0, 3)),
    "0-d": np.array(5.0),
}


def _assert_unique_equal(ours, theirs):
    assert type(ours).__name__ == type(theirs).__name__
    assert ours._fields == theirs._fields
    for a, e in zip(ours, theirs):
        e = np.asarray(e)
        assert_close(a, e.astype(np.int64) if e.dtype == np.intp else e)


@pytest.mark.parametrize("name", list(UNIQUE_INPUTS))
def test_unique_functions_match_numpy(name):
    x = UNIQUE_INPUTS[name]
    for fn in ("unique_all", "unique_counts", "unique_inverse"):
        _assert_unique_equal(getattr(enp, fn)(enp.asarray(x)), getattr(np, fn)(x))
    # NumPy's unique_values may return any order (the standard allows it); ours is sorted.
    assert_close(enp.unique_values(enp.asarray(x)), np.sort(np.unique_values(x)))


def test_unique_nans_are_distinct_and_need_concrete_values():
    x = enp.asarray([np.nan, np.nan, 1.0])
    assert enp.unique_counts(x).counts.tolist() == [1, 1, 1]
    assert enp.unique_all(x).inverse_indices.tolist() == [1, 2, 0]
    with pytest.raises(TracerError, match="unique_values needs concrete values"):
        ember.jit(enp.unique_values)(x)


# --- searchsorted ----------------------------------------------------------------------------

SORTED = np.array([-np.inf, -1.0, 0.0, 0.0, 2.5, np.inf, np.nan, np.nan])
QUERIES = np.array([[-np.inf, 0.0, np.nan], [3.0, np.inf, -7.0]])


@pytest.mark.parametrize("side", ["left", "right"])
def test_searchsorted_special_values(side):
    check(lambda a, v: enp.searchsorted(a, v, side=side),
          lambda a, v: np.searchsorted(a, v, side=side), SORTED, QUERIES)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [np.int8, np.uint32, np.float32])
def test_searchsorted_sorter_and_dtypes(side, dtype):
    a = rand(RNG, (9,), dtype, low=0, high=20)
    v = rand(RNG, (2, 3), dtype, low=0, high=20)
    order = np.argsort(a, kind="stable")
    check(lambda x, y, s: enp.searchsorted(x, y, side=side, sorter=s),
          lambda x, y, s: np.searchsorted(x, y, side=side, sorter=s), a, v, order)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 16, 33])
def test_searchsorted_binary_search_with_duplicates(n):
    a = np.sort(RNG.integers(0, 5, size=n)).astype(np.float64)
    if n >= 4:
        a[-(n // 4):] = np.nan  # NaNs sort last
    v = np.array([-1.0, 0.0, 1.0, 2.5, 4.0, 5.0, np.nan])
    for side in ("left", "right"):
        check(lambda x, y: enp.searchsorted(x, y, side=side),
              lambda x, y: np.searchsorted(x, y, side=side), a, v)


@pytest.mark.parametrize(("a", "v"), [(np.zeros(0), np.array([1.0, -1.0])),
                                      (np.arange(4.0), np.zeros((0, 2))),
                                      (np.arange(4), np.array(2))])
def test_searchsorted_empty_and_scalar(a, v):
    for side in ("left", "right"):
        check(lambda x, y: enp.searchsorted(x, y, side=side),
              lambda x, y: np.searchsorted(x, y, side=side), a, v)


def test_searchsorted_errors():
    with pytest.raises(EmberValueError, match="searchsorted: side must be 'left' or 'right'"):
        enp.searchsorted(enp.arange(3), 1, side="middle")
    with pytest.raises(EmberValueError, match=r"searchsorted: a must be 1-d, got shape \(2, 2\)"):
        enp.searchsorted(enp.ones((2, 2)), 1)


# --- signatures ------------------------------------------------------------------------------

# The keyword arguments the standard names for each function, and whether it requires them to
# be keyword-only ("kw") or allows them positionally too ("any"); the public suite checks the
# same: a name that is missing or a positional-only parameter the standard passes by keyword
# breaks portable code.
KEYWORDS = {
    "astype": {"copy": "kw", "device": "kw"},
    "cumulative_sum": {"axis": "kw", "dtype": "kw", "include_initial": "kw"},
    "cumulative_prod": {"axis": "kw", "dtype": "kw", "include_initial": "kw"},
    "searchsorted": {"side": "any", "sorter": "any"},
    "reshape": {"shape": "any", "copy": "any"},
    "diff": {"axis": "any", "n": "any", "prepend": "any", "append": "any"},
    "arange": {"stop": "any", "step": "any", "dtype": "any", "device": "any"},
    "linspace": {"num": "any", "dtype": "any", "device": "any", "endpoint": "any"},
    "eye": {"k": "any", "dtype": "any", "device": "any"},
    **{f: {"dtype": "any", "device": "any"} for f in ("zeros", "ones", "empty", "full",
                                                       "zeros_like", "ones_like",
                                                       "empty_like", "full_like")},
}


@pytest.mark.parametrize("name", list(KEYWORDS))
def test_signatures_have_the_standard_keywords(name):
    params = inspect.signature(getattr(enp, name)).parameters
    for kw, how in KEYWORDS[name].items():
        assert kw in params, f"{name} lacks {kw}="
        allowed = {inspect.Parameter.KEYWORD_ONLY}
        if how == "any":
            allowed.add(inspect.Parameter.POSITIONAL_OR_KEYWORD)
        assert params[kw].kind in allowed, f"{name}: {kw} is {params[kw].kind}"


@pytest.mark.parametrize("name", ["unique_all", "unique_counts", "unique_inverse",
                                  "unique_values", "astype", "cumulative_sum"])
def test_array_arguments_are_positional_only(name):
    first = next(iter(inspect.signature(getattr(enp, name)).parameters.values()))
    assert first.kind is inspect.Parameter.POSITIONAL_ONLY


def test_method_signatures():
    params = inspect.signature(enp.ndarray.to_device).parameters
    assert params["device"].kind is inspect.Parameter.POSITIONAL_ONLY
    assert params["stream"].kind is inspect.Parameter.KEYWORD_ONLY
    params = inspect.signature(enp.ndarray.__array_namespace__).parameters
    assert params["api_version"].kind is inspect.Parameter.KEYWORD_ONLY


def test_reshape_accepts_copy():
    assert_close(enp.reshape(enp.arange(6), (2, 3), copy=True), np.arange(6).reshape(2, 3))
    assert_close(enp.reshape(enp.arange(6), (3, 2), copy=False), np.arange(6).reshape(3, 2))


@pytest.mark.parametrize("k", [0, 3, -2, 11, -29, 2**70, -(2**70)])
def test_eye_and_tri_take_any_offset(k):
    clipped = max(-40, min(k, 40))  # NumPy's tri overflows on the huge ones; eye does not
    check(lambda: enp.eye(29, 11, k=k, dtype=enp.uint16),
          lambda: np.eye(29, 11, k=k, dtype=np.uint16))
    check(lambda: enp.tri(4, 6, k=k), lambda: np.tri(4, 6, k=clipped))


@pytest.mark.parametrize("kind", ["bool", "signed integer", "unsigned integer", "integral",
                                  "real floating", "complex floating", "numeric",
                                  ("bool", "complex floating"), np.int8, np.float64])
def test_isdtype_matches_numpy(kind):
    for dt in (np.bool_, np.int8, np.uint64, np.float32, np.float64, np.complex64):
        assert enp.isdtype(dtype=dt, kind=kind) == np.isdtype(np.dtype(dt), kind), (dt, kind)


def test_scans_and_searchsorted_under_vmap():
    x = RNG.normal(size=(3, 5))
    out = ember.vmap(lambda r: enp.cumulative_sum(r, include_initial=True))(enp.asarray(x))
    assert_close(out, np.cumulative_sum(x, axis=1, include_initial=True))
    a = np.sort(RNG.normal(size=(3, 6)), axis=1)
    v = RNG.normal(size=(3, 4))
    out = ember.vmap(lambda p, q: enp.searchsorted(p, q, side="right"))(enp.asarray(a),
                                                                        enp.asarray(v))
    assert_close(out, np.stack([np.searchsorted(p, q, side="right") for p, q in zip(a, v)]))
    out = ember.vmap(lambda r: enp.diff(r, prepend=0.0))(enp.asarray(x))
    assert_close(out, np.diff(x, axis=1, prepend=0.0))


# --- special cases the public suite found -----------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_signbit_reads_the_sign_bit_of_zeros_and_nans(dtype):
    x = np.array([-np.nan, np.nan, -0.0, 0.0, -2.0, 2.0, -np.inf, np.inf]).astype(
        enp.dtype(dtype))
    want = np.array([True, False, True, False, True, False, True, False])
    check(enp.signbit, lambda a: want, x)
    assert_close(enp.copysign(enp.ones(8), enp.asarray(x)), np.where(want, -1.0, 1.0))


@pytest.mark.parametrize("index", [True, False, np.bool_(True), (Ellipsis, True), (0, False),
                                   (True, 1)], ids=str)
def test_zero_d_boolean_indices_add_an_axis(index):
    x = np.arange(6.0).reshape(2, 3)
    got = enp.asarray(x)[index]
    assert_close(got, x[index])
    assert_close(enp.asarray(x)[enp.asarray(np.bool_(False))], x[np.bool_(False)])
    y = enp.asarray(x)
    y[index] = -1.0
    want = x.copy()
    want[index] = -1.0
    assert_close(y, want)
