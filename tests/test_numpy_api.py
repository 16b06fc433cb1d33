"""``ember.numpy`` against NumPy: math, reductions, creation, shapes, linalg, indexing, sorting,
conversion/printing/DLPack, and the errors users see. Every comparison runs eagerly and jitted."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close, check, rand

import ember
import ember.numpy as enp
from ember import dtypes

RNG = np.random.default_rng(0)
A = RNG.normal(size=(3, 4))
B = RNG.normal(size=(4,))
P = RNG.uniform(0.5, 2.0, size=(3, 4))
IA = RNG.integers(-5, 6, size=(3, 4))
C3 = RNG.normal(size=(2, 3, 4))


# --- math ------------------------------------------------------------------------------------

UNARY = ["exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "cbrt", "square",
         "reciprocal", "sin", "cos", "tan", "arctan", "sinh", "cosh", "tanh", "arcsinh",
         "floor", "ceil", "trunc", "rint", "fix", "negative", "positive", "abs", "absolute",
         "fabs", "sign", "deg2rad", "rad2deg", "signbit", "isfinite", "isnan", "isinf",
         "logical_not", "sinc"]


@pytest.mark.parametrize("name", UNARY)
@pytest.mark.parametrize("data", ["float", "int", "f32"])
def test_unary_math(name, data):
    if name == "reciprocal" and data == "int":
        pytest.skip("deliberate difference (as JAX): reciprocal of integers is a float")
    x = {"float": P, "int": np.abs(IA) + 1, "f32": P.astype(np.float32)}[data]
    if name in ("signbit",):
        x = np.concatenate([x.ravel(), [-0.0 if x.dtype.kind == "f" else 0, -1]])
    check(getattr(enp, name), getattr(np, name), x, dtype=np.float32 if data == "f32" else None)


BINARY = ["add", "subtract", "multiply", "divide", "true_divide", "floor_divide", "remainder",
          "mod", "fmod", "power", "maximum", "minimum", "fmax", "fmin", "arctan2", "hypot",
          "logaddexp", "logaddexp2", "copysign", "heaviside", "equal", "not_equal", "less",
          "less_equal", "greater", "greater_equal", "logical_and", "logical_or", "logical_xor",
          "float_power"]


@pytest.mark.parametrize("name", BINARY)
def test_binary_math_with_broadcasting(name):
    x = A * 3
    y = np.where(np.abs(B) < 0.2, 0.5, B)  # no division by ~0
    check(getattr(enp, name), getattr(np, name), x, y)
    check(lambda u: getattr(enp, name)(u, 1.5), lambda u: getattr(np, name)(u, 1.5), x)


@pytest.mark.parametrize("name", ["add", "subtract", "multiply", "floor_divide", "remainder",
                                  "fmod", "maximum", "minimum", "bitwise_and", "bitwise_or",
                                  "bitwise_xor", "left_shift", "right_shift", "power"])
def test_integer_binary_math(name):
    x = IA.astype(np.int32)
    y = np.array([1, 2, 3, 4], np.int32) if name not in ("subtract",) else -np.arange(4)
    if name == "right_shift":
        x = x * 8
    check(getattr(enp, name), getattr(np, name), x, y)


def test_fmod_and_remainder_signs():
    x = np.array([-7.0, 7.0, -7.5, 7.5, 0.0])
    y = np.array([3.0, -3.0, 2.0, -2.0, 2.0])
    check(enp.fmod, np.fmod, x, y)
    check(enp.remainder, np.remainder, x, y)
    check(lambda a, b: enp.divmod(a, b), lambda a, b: list(np.divmod(a, b)), x, y)


def test_special_values():
    x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1.0])
    for name in ("isnan", "isinf", "isfinite", "signbit", "sign", "abs"):
        check(getattr(enp, name), getattr(np, name), x)
    check(lambda v: enp.nan_to_num(v), np.nan_to_num, x)
    check(lambda v: enp.logaddexp(v, v), lambda v: np.logaddexp(v, v), x[:2])
    check(lambda v: enp.maximum(v, 0.0), lambda v: np.maximum(v, 0.0), x)
    check(lambda v: enp.fmax(v, 0.5), lambda v: np.fmax(v, 0.5), x)


def test_clip_where_round_isclose():
    check(lambda v: enp.clip(v, -0.5, 0.5), lambda v: np.clip(v, -0.5, 0.5), A)
    check(lambda v: enp.clip(v, max=0.1), lambda v: np.clip(v, None, 0.1), A)
    check(lambda c, v: enp.where(c, v, -v), lambda c, v: np.where(c, v, -v), A > 0, A)
    check(lambda v: enp.where(v > 0, v, 0), lambda v: np.where(v > 0, v, 0), A)
    check(lambda v: enp.round(v, 2), lambda v: np.round(v, 2), A)
    check(lambda v: enp.round(v), np.round, np.array([0.5, 1.5, 2.5, -0.5]))
    check(lambda v: enp.round(v, -1), lambda v: np.round(v, -1),
          np.array([15, 25, -15, -25, 14, 16, 0]))
    check(lambda v: enp.round(v, -2), lambda v: np.round(v, -2),
          np.array([150, 250, -50, 49, 51], np.int16))
    check(lambda a, b: enp.isclose(a, b), np.isclose, A, A + 1e-9)
    assert bool(enp.allclose(enp.asarray(A), A + 1e-9))
    assert bool(enp.array_equal(enp.asarray(IA), IA))
    assert not bool(enp.array_equal(enp.asarray(IA), IA[:2]))


def test_bool_arithmetic_follows_numpy():
    m = A > 0
    check(enp.add, np.add, m, m.T[:3, :3].repeat(2, 1)[:, :4] if False else ~m)
    check(enp.multiply, np.multiply, m, ~m)
    check(lambda v: v + 1, lambda v: v + 1, m)
    check(lambda v: ~v, lambda v: ~v, m)
    with pytest.raises(ember.EmberError, match="subtract"):
        enp.subtract(enp.asarray(m), enp.asarray(m))


def test_operators_and_reflected_operators():
    x = enp.asarray(A)
    np.testing.assert_allclose(2.0 - x, 2.0 - A)
    np.testing.assert_allclose(2.0 / (x + 5), 2.0 / (A + 5))
    np.testing.assert_allclose(2.0 ** x, 2.0 ** A)
    np.testing.assert_allclose(x ** 2, A ** 2)
    np.testing.assert_allclose(-x, -A)
    np.testing.assert_allclose(abs(x), abs(A))
    np.testing.assert_allclose(x @ x.T, A @ A.T)
    np.testing.assert_allclose(A @ x.T, A @ A.T)
    np.testing.assert_array_equal(7 // enp.asarray(IA + 10), 7 // (IA + 10))
    np.testing.assert_array_equal(7 % enp.asarray(IA + 10), 7 % (IA + 10))


# --- reductions ------------------------------------------------------------------------------

REDUCTIONS = ["sum", "prod", "mean", "var", "std", "max", "min", "amax", "amin", "all", "any",
              "ptp", "count_nonzero", "nansum", "nanmax", "nanmin", "nanmean", "median"]


@pytest.mark.parametrize("name", REDUCTIONS)
@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2), (-1, -3)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reductions(name, axis, keepdims):
    x = C3 if name not in ("all", "any", "count_nonzero") else C3 > 0
    if name == "median" and isinstance(axis, tuple):
        pytest.skip("numpy median with a tuple axis: not supported by ember")
    ours, ref = getattr(enp, name), getattr(np, name)
    check(lambda v: ours(v, axis=axis, keepdims=keepdims),
          lambda v: ref(v, axis=axis, keepdims=keepdims), x)


@pytest.mark.parametrize("dt", [np.int8, np.uint8, np.int32, np.bool_, np.float16, np.float32])
def test_reduction_dtypes_match_numpy(dt):
    x = rand(RNG, (3, 5), dt, 0, 5)
    for name in ("sum", "prod", "max", "min", "mean", "cumsum"):
        if name in ("prod", "max", "min") and dt == np.bool_ and name == "prod":
            continue
        ours, ref = getattr(enp, name), getattr(np, name)
        check(lambda v: ours(v, axis=0), lambda v: ref(v, axis=0), x,
              rtol=2e-3 if dt == np.float16 else None, atol=2e-3 if dt == np.float16 else None)
    check(lambda v: enp.sum(v, dtype=enp.float32), lambda v: np.sum(v, dtype=np.float32), x)
    check(lambda v: enp.mean(v, axis=1, dtype=enp.float64),
          lambda v: np.mean(v, axis=1, dtype=np.float64), x)


def test_reductions_misc():
    check(lambda v: enp.argmax(v), np.argmax, A)
    check(lambda v: enp.argmin(v, axis=-1), lambda v: np.argmin(v, axis=-1), A)
    check(lambda v: enp.argmax(v, axis=0, keepdims=True),
          lambda v: np.argmax(v, axis=0, keepdims=True), A)
    check(lambda v: enp.var(v, ddof=1), lambda v: np.var(v, ddof=1), A)
    check(lambda v: enp.cumsum(v), np.cumsum, A)
    check(lambda v: enp.cumprod(v, axis=-1), lambda v: np.cumprod(v, axis=-1), P)
    check(lambda v: enp.logsumexp(v, axis=1),
          lambda v: np.log(np.sum(np.exp(v), axis=1)), A)
    check(lambda v: enp.average(v, axis=1, weights=np.arange(1.0, 5.0)),
          lambda v: np.average(v, axis=1, weights=np.arange(1.0, 5.0)), A)
    check(lambda v: enp.sum(v, axis=0, where=v > 0), lambda v: np.sum(v, axis=0, where=v > 0), A)
    check(lambda v: enp.max(v, axis=0, initial=0.5), lambda v: np.max(v, axis=0, initial=0.5), A)
    check(lambda v: enp.sum(v, axis=1), lambda v: np.sum(v, axis=1), np.zeros((0, 3)))
    check(lambda v: enp.mean(v), np.mean, np.float64(3.0))
    check(lambda v: enp.max(v, axis=0, initial=-1.0),
          lambda v: np.max(v, axis=0, initial=-1.0), np.zeros((0, 3)))
    check(lambda v: enp.all(v, axis=0), lambda v: np.all(v, axis=0), np.zeros((0, 3), bool))
    nanny = np.array([[1.0, np.nan, 3.0], [np.nan, np.nan, 2.0]])
    for name in ("nansum", "nanmax", "nanmin"):
        check(lambda v, n=name: getattr(enp, n)(v, axis=1),
              lambda v, n=name: getattr(np, n)(v, axis=1), nanny)


def test_reduction_of_empty_without_identity_raises():
    with pytest.raises(ember.EmberError, match="max") as info:
        enp.max(enp.zeros((0, 3)), axis=0)
    assert "test_numpy_api.py" in str(info.value)


# --- creation --------------------------------------------------------------------------------

def test_creation():
    assert_close(enp.zeros((2, 3)), np.zeros((2, 3)))
    assert_close(enp.ones(3, enp.int8), np.ones(3, np.int8))
    assert_close(enp.full((2,), 7), np.full((2,), 7))
    assert_close(enp.full((2,), 7.5, enp.float32), np.full((2,), 7.5, np.float32))
    assert_close(enp.full((2, 2), np.array([1, 2])), np.full((2, 2), np.array([1, 2])))
    assert_close(enp.empty((2,)).shape, (2,))
    assert_close(enp.zeros_like(enp.asarray(IA)), np.zeros_like(IA))
    assert_close(enp.ones_like(A, dtype=enp.float32), np.ones_like(A, dtype=np.float32))
    assert_close(enp.full_like(IA, 2.7), np.full_like(IA, 2.7))
    for args in [(5,), (1, 7, 2), (0.5, 3.0, 0.5), (5, 1, -1), (3, 3)]:
        assert_close(enp.arange(*args), np.arange(*args))
    assert_close(enp.arange(4, dtype=enp.float32), np.arange(4, dtype=np.float32))
    for kw in [{}, {"endpoint": False}, {"num": 1}, {"num": 0}, {"dtype": np.int64}]:
        assert_close(enp.linspace(2.0, 3.0, **{"num": 5, **kw}),
                     np.linspace(2.0, 3.0, **{"num": 5, **kw}))
    assert_close(enp.logspace(0, 2, 3), np.logspace(0, 2, 3))
    for k in (-1, 0, 2):
        assert_close(enp.eye(3, 4, k=k), np.eye(3, 4, k=k))
        assert_close(enp.tri(3, 4, k=k), np.tri(3, 4, k=k))
        check(lambda v, k=k: enp.tril(v, k), lambda v, k=k: np.tril(v, k), C3)
        check(lambda v, k=k: enp.triu(v, k), lambda v, k=k: np.triu(v, k), C3)
        check(lambda v, k=k: enp.diag(v, k), lambda v, k=k: np.diag(v, k), B)
    assert_close(enp.identity(2, enp.int32), np.identity(2, np.int32))
    for indexing in ("xy", "ij"):
        for sparse in (False, True):
            assert_close(enp.meshgrid(np.arange(3), np.arange(2.0), np.arange(4),
                                      indexing=indexing, sparse=sparse),
                         np.meshgrid(np.arange(3), np.arange(2.0), np.arange(4),
                                     indexing=indexing, sparse=sparse))
    assert_close(enp.array([[1, 2]], ndmin=3), np.array([[1, 2]], ndmin=3))
    assert_close(enp.array([1, 2], dtype=enp.float16), np.array([1, 2], np.float16))
    assert_close(enp.frombuffer(np.arange(3.0).tobytes()), np.arange(3.0))


def test_array_from_nested_list_of_traced_values():
    f = ember.jit(lambda a, b: enp.array([[a, b], [b, a]]))
    assert_close(f(enp.asarray(1.0), enp.asarray(2.0)), np.array([[1.0, 2.0], [2.0, 1.0]]))


# --- shape manipulation ----------------------------------------------------------------------

SHAPE_CASES = [
    (lambda m: m.reshape(4, 6), lambda v: v.reshape(4, 6)),
    (lambda m: m.reshape(-1, 3), lambda v: v.reshape(-1, 3)),
    (lambda m: m.ravel(), lambda v: v.ravel()),
    (lambda m: m.transpose(), lambda v: v.transpose()),
    (lambda m: m.transpose(1, 0, 2), lambda v: v.transpose(1, 0, 2)),
    (lambda m: m.T, lambda v: v.T),
    (lambda m: m.mT, lambda v: v.mT),
    (lambda m: m.swapaxes(0, -1), lambda v: v.swapaxes(0, -1)),
    ("moveaxis", ((0, 1), (-1, 0))),
    ("moveaxis", (0, -1)),
    ("expand_dims", ((0, -1),)),
    ("expand_dims", (1,)),
    ("squeeze", ()),
    ("broadcast_to", ((3, 2, 3, 4),)),
    ("atleast_1d", ()), ("atleast_2d", ()), ("atleast_3d", ()),
    ("split", (2, 2)), ("array_split", (3, -1)), ("split", ([1, 3], 1)),
    ("permute_dims", ((2, 0, 1),)),
]


@pytest.mark.parametrize("case", range(len(SHAPE_CASES)))
def test_shape_ops(case):
    ours, ref = SHAPE_CASES[case]
    x = C3 if case != 12 else C3[:, None, :1]
    if isinstance(ours, str):
        args = ref
        check(lambda v: getattr(enp, ours)(v, *args), lambda v: getattr(np, ours)(v, *args), x)
    else:
        check(ours, ref, x)


@pytest.mark.parametrize("name", ["concatenate", "stack", "hstack", "vstack", "dstack",
                                  "column_stack"])
def test_joining(name):
    xs = [A, A * 2, A.astype(np.float32)]
    check(lambda a, b, c: getattr(enp, name)([a, b, c]),
          lambda a, b, c: getattr(np, name)([a, b, c]), *xs)
    if name in ("concatenate", "stack"):
        check(lambda a, b, c: getattr(enp, name)([a, b, c], axis=-1),
              lambda a, b, c: getattr(np, name)([a, b, c], axis=-1), *xs)
    check(lambda a, b: getattr(enp, name)([a, b]), lambda a, b: getattr(np, name)([a, b]),
          B, B + 1)


def test_shape_errors_name_the_op_and_shapes():
    for fn, match in [
        (lambda: enp.reshape(enp.asarray(A), (5, 5)), r"reshape.*\(3, 4\).*\(5, 5\)"),
        (lambda: enp.concatenate([enp.asarray(A), enp.asarray(B)]), r"concatenate.*\(3, 4\)"),
        (lambda: enp.stack([enp.asarray(A), enp.asarray(A.T)]), r"stack.*\(3, 4\).*\(4, 3\)"),
        (lambda: enp.broadcast_to(enp.asarray(A), (4, 4)), r"broadcast_to.*\(3, 4\)"),
        (lambda: enp.squeeze(enp.asarray(A), 0), r"squeeze"),
        (lambda: enp.moveaxis(enp.asarray(A), 3, 0), r"moveaxis: axis 3 is out of bounds"),
    ]:
        with pytest.raises(ember.EmberError, match=match) as info:
            fn()
        assert "test_numpy_api.py" in str(info.value)


# --- linalg ----------------------------------------------------------------------------------

MATMUL_SHAPES = [((3, 4), (4, 5)), ((4,), (4,)), ((4,), (4, 5)), ((3, 4), (4,)),
                 ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (5, 4, 2)),
                 ((4,), (2, 4, 5)), ((2, 3, 4), (4,)), ((0, 4), (4, 2)), ((3, 0), (0, 2))]


@pytest.mark.parametrize("sa,sb", MATMUL_SHAPES)
def test_matmul(sa, sb):
    a, b = RNG.normal(size=sa), RNG.normal(size=sb)
    check(enp.matmul, np.matmul, a, b)
    check(lambda x, y: x @ y, lambda x, y: x @ y, a, b)
    if len(sb) <= 2 or len(sa) <= 2:
        check(enp.dot, np.dot, a, b)


def test_products():
    check(enp.dot, np.dot, C3, RNG.normal(size=(3, 4, 2)))
    check(enp.dot, np.dot, A, 2.0)
    check(enp.vdot, np.vdot, A, A)
    check(enp.inner, np.inner, A, RNG.normal(size=(2, 4)))
    check(enp.outer, np.outer, A, B)
    check(lambda x, y: enp.vecdot(x, y), lambda x, y: np.vecdot(x, y), C3, B)
    check(lambda x, y: enp.vecdot(x, y, axis=0), lambda x, y: np.vecdot(x, y, axis=0),
          A, A[:, :1])
    for axes in (1, 2, ([0, 2], [1, 0]), (-1, 0)):
        y = RNG.normal(size=(4, 2, 3)) if not isinstance(axes, int) or axes == 1 else \
            RNG.normal(size=(3, 4, 5))
        if axes == (-1, 0):
            y = RNG.normal(size=(4, 2))
        check(lambda u, v, a=axes: enp.tensordot(u, v, axes=a),
              lambda u, v, a=axes: np.tensordot(u, v, axes=a), C3, y)
    check(enp.kron, np.kron, A[:2, :2], A[:3, :2])
    check(enp.matrix_transpose, lambda v: np.swapaxes(v, -1, -2), C3)
    check(enp.matmul, np.matmul, IA.astype(np.int32), IA.T.astype(np.int32))
    check(enp.matmul, np.matmul, A.astype(np.float32), B)


@pytest.mark.parametrize("ord_,axis", [(None, None), (2, None), (1, 1), (np.inf, -1),
                                       (-np.inf, 0), (0, 1), (3, 1), ("fro", (0, 1)),
                                       (1, (0, 1)), (np.inf, (0, 1)), (None, (1, 0))])
def test_norm(ord_, axis):
    x = A if ord_ != 2 or axis is not None else B
    check(lambda v: enp.linalg.norm(v, ord_, axis), lambda v: np.linalg.norm(v, ord_, axis), x)
    check(lambda v: enp.linalg.norm(v, ord_, axis, keepdims=True),
          lambda v: np.linalg.norm(v, ord_, axis, keepdims=True), x)


def test_matmul_errors():
    for a, b in [((3, 4), (5, 6)), ((4,), (5,)), ((2, 3, 4), (3, 4, 5))]:
        for runner in (enp.matmul, ember.jit(enp.matmul)):
            with pytest.raises(ember.ShapeError, match="matmul") as info:
                runner(enp.ones(a), enp.ones(b))
            assert str(a) in str(info.value) and str(b) in str(info.value)
            assert "test_numpy_api.py" in str(info.value)


# --- indexing --------------------------------------------------------------------------------

X = np.arange(60.0).reshape(3, 4, 5)
INDICES = [
    1, -1, (0, 2), (-1, -2, -3), slice(1, None), slice(None, None, -1), slice(-2, 0, -1),
    (slice(None), slice(None, None, 2)), (Ellipsis, 1), (None, 1), (1, None, Ellipsis, None),
    (slice(3, 1),), (slice(None, None, -2), 2, slice(1, 4)),
    [0, 2], [[0, 1], [2, 2]], ([0, 2], [1, 3]), (slice(None), [3, 0, -1]),
    (slice(None), [0, 1], [2, 3]), ([0, 1], slice(None), [2, 3]), (1, [0, 3], slice(None)),
    (Ellipsis, [4, 0]), ([[0], [2]], [1, 2, 3]), (np.array([True, False, True]),),
    X[..., 0] > 20, (slice(None), np.array([True, False, True, False])),
    (None, [0, -1], Ellipsis, 2), np.array(1), (np.int64(2), slice(None)), [],
    (slice(None), [1, 0], None),
]


@pytest.mark.parametrize("case", range(len(INDICES)))
def test_getitem_matches_numpy(case):
    index = INDICES[case]
    expected = X[index]
    ours = enp.asarray(X)[index]
    assert_close(ours, expected)
    has_mask = any(np.asarray(i).dtype == bool for i in
                   (index if isinstance(index, tuple) else (index,))
                   if isinstance(i, (np.ndarray, list)) and np.asarray(i).size)
    if not has_mask:
        assert_close(ember.jit(lambda v: v[index])(enp.asarray(X)), expected)


def test_getitem_with_traced_indices():
    f = ember.jit(lambda v, i: v[i])
    for i in (0, 2, -1):
        assert_close(f(enp.asarray(X), enp.asarray(i)), X[i])
    g = ember.jit(lambda v, i: v[:, i])
    idx = np.array([[0, -1], [3, 1]])
    assert_close(g(enp.asarray(X), enp.asarray(idx)), X[:, idx])


def test_index_errors():
    x = enp.asarray(X)
    for index, match in [(3, "index 3 is out of bounds for axis 0 with size 3"),
                         ((0, 0, 0, 0), "too many indices"),
                         ([0, 7], "index 7 is out of bounds"),
                         (1.5, "only integers")]:
        for runner in (lambda v: v[index], ember.jit(lambda v: v[index])):
            with pytest.raises(IndexError, match=match) as info:
                runner(x)
            assert isinstance(info.value, ember.EmberError)
            assert "test_numpy_api.py" in str(info.value)


def test_boolean_mask_under_jit_raises_a_clear_error():
    with pytest.raises(ember.TracerError, match="boolean mask"):
        ember.jit(lambda v: v[v > 3])(enp.asarray(X))


UPDATE_INDICES = [1, (0, 2), slice(1, 3), (slice(None), 1, slice(2, 4)), (Ellipsis, 0),
                  [0, 2], ([0, 2], [1, 1]), (slice(None, None, 2), 0), (slice(None), [3, 0]),
                  X > 30, (-1, -1, -1), (1, slice(None, None, -1))]


@pytest.mark.parametrize("case", range(len(UPDATE_INDICES)))
@pytest.mark.parametrize("how", ["set", "add", "multiply", "min", "max"])
def test_at_updates_match_numpy(case, how):
    index = UPDATE_INDICES[case]
    region = X[index]
    vals = RNG.normal(size=region.shape[-1:] if region.ndim else ()) * 10
    expected = X.copy()
    if how == "set":
        expected[index] = vals
    else:
        ufunc = {"add": np.add, "multiply": np.multiply, "min": np.minimum, "max": np.maximum}
        target = expected[index]
        expected[index] = ufunc[how](target, vals)

    def update(v, u):
        return getattr(v.at[index], how)(u)

    assert_close(update(enp.asarray(X), enp.asarray(vals)), expected)
    if not isinstance(index, np.ndarray):
        assert_close(ember.jit(update)(enp.asarray(X), enp.asarray(vals)), expected)


def test_at_with_repeated_indices_accumulates():
    x = np.zeros(5)
    idx = np.array([1, 1, 3, 1])
    expected = x.copy()
    np.add.at(expected, idx, 1.0)
    assert_close(enp.asarray(x).at[idx].add(1.0), expected)
    assert_close(enp.asarray(x).at[idx].subtract(1.0), -expected)
    assert_close(enp.asarray(np.ones(3)).at[0].divide(4.0), np.array([0.25, 1.0, 1.0]))
    assert_close(enp.asarray(X).at[1].get(), X[1])


def test_setitem_rebinds_and_earlier_slices_are_unchanged():
    x = enp.asarray(X)
    view = x[1:]
    row = x[0]
    x[0] = -1.0
    x[1, 2:4] += 100.0
    x[X > 50] = 0.0
    expected = X.copy()
    expected[0] = -1.0
    expected[1, 2:4] += 100.0
    expected[X > 50] = 0.0
    assert_close(x, expected)
    assert_close(view, X[1:])
    assert_close(row, X[0])


def test_setitem_inside_jit():
    def f(v, i):
        v = v * 1.0
        v[i] = 0.0
        v[:, 1] = v[:, 1] + 1
        return v

    expected = X.copy()
    expected[2] = 0.0
    expected[:, 1] += 1
    assert_close(ember.jit(f)(enp.asarray(X), enp.asarray(2)), expected)


def test_setitem_shape_error():
    x = enp.asarray(X)
    with pytest.raises(ember.ShapeError, match=r"setitem.*\(3,\).*\(4, 5\)") as info:
        x[0] = enp.ones(3)
    assert "test_numpy_api.py" in str(info.value)


def test_take_and_friends():
    idx = np.array([[0, 2], [1, -1]])
    check(lambda v: enp.take(v, idx, axis=1), lambda v: np.take(v, idx, axis=1), X)
    check(lambda v: enp.take(v, idx), lambda v: np.take(v, idx), X)
    along = RNG.integers(0, 4, size=(3, 2, 5))
    check(lambda v, i: enp.take_along_axis(v, i, 1),
          lambda v, i: np.take_along_axis(v, i, 1), X, along)
    check(lambda v, i: enp.take_along_axis(v, i, -1),
          lambda v, i: np.take_along_axis(v, i, -1), A, np.argsort(A, -1))
    expected = X.copy()
    np.put_along_axis(expected, along, -7.0, 1)
    check(lambda v, i: enp.put_along_axis(v, i, -7.0, 1), lambda v, i: expected, X, along)
    expected = A.copy()
    np.put(expected, [0, 5], [9.0, 8.0])
    check(lambda v: enp.put(v, np.array([0, 5]), np.array([9.0, 8.0])), lambda v: expected, A)
    assert_close(enp.compress(np.array([True, False, True]), enp.asarray(A), axis=0),
                 np.compress([True, False, True], A, axis=0))
    assert_close(enp.extract(A > 0, enp.asarray(A)), np.extract(A > 0, A))
    check(lambda c: enp.choose(c, [A, -A, A * 2]), lambda c: np.choose(c, [A, -A, A * 2]),
          RNG.integers(0, 3, size=A.shape))
    check(lambda v: enp.select([v > 1, v < -1], [v, -v], 0.5),
          lambda v: np.select([v > 1, v < -1], [v, -v], 0.5), A)


# --- sorting and searching -------------------------------------------------------------------

@pytest.mark.parametrize("axis", [-1, 0, None])
def test_sort_argsort(axis):
    x = RNG.integers(0, 4, size=(3, 5)).astype(np.float64)
    check(lambda v: enp.sort(v, axis=axis), lambda v: np.sort(v, axis=axis), x)
    check(lambda v: enp.argsort(v, axis=axis),
          lambda v: np.argsort(v, axis=axis, kind="stable"), x)
    check(lambda v: enp.sort(v, axis=axis, descending=True),
          lambda v: np.flip(np.sort(v, axis=axis), axis if axis is not None else 0), x)
    check(lambda v: enp.argsort(v, axis=axis, descending=True),
          lambda v: np.argsort(-v, axis=axis, kind="stable"), x)


def test_searchsorted_nonzero_unique_top_k():
    a = np.array([1.0, 2.0, 2.0, 3.0, 5.0])
    v = np.array([[0.0, 2.0], [2.5, 9.0]])
    for side in ("left", "right"):
        check(lambda x, y, s=side: enp.searchsorted(x, y, side=s),
              lambda x, y, s=side: np.searchsorted(x, y, side=s), a, v)
    check(lambda x: enp.searchsorted(x, 2.0), lambda x: np.searchsorted(x, 2.0), a)
    sorter = np.array([4, 0, 3, 1, 2])
    assert_close(enp.searchsorted(enp.asarray(a[::-1].copy()), enp.asarray(v),
                                  sorter=np.argsort(a[::-1])),
                 np.searchsorted(a[::-1], v, sorter=np.argsort(a[::-1])))
    _ = sorter
    m = A > 0
    assert_close(enp.nonzero(enp.asarray(m)), np.nonzero(m))
    assert_close(enp.asarray(m).nonzero(), np.nonzero(m))
    assert_close(enp.where(enp.asarray(m)), np.nonzero(m))
    assert_close(enp.argwhere(enp.asarray(m)), np.argwhere(m))
    assert_close(enp.flatnonzero(enp.asarray(m)), np.flatnonzero(m))
    x = np.array([3, 1, 3, 2, 1, 1])
    assert_close(enp.unique(enp.asarray(x)), np.unique(x))
    assert_close(enp.unique(enp.asarray(x), return_index=True, return_inverse=True,
                            return_counts=True),
                 [r.astype(np.int64) if r.dtype != x.dtype else r for r in
                  np.unique(x, return_index=True, return_inverse=True, return_counts=True)])
    vals, idx = enp.top_k(enp.asarray(A), 2)
    order = np.argsort(-A, axis=-1, kind="stable")[:, :2]
    assert_close(vals, np.take_along_axis(A, order, -1))
    assert_close(idx, order)
    with pytest.raises(ember.TracerError, match="nonzero"):
        ember.jit(enp.nonzero)(enp.asarray(m))
    with pytest.raises(ember.TracerError, match="unique"):
        ember.jit(enp.unique)(enp.asarray(x))


# --- conversion, printing, DLPack ------------------------------------------------------------

@pytest.mark.parametrize("value", [
    A, IA, A > 0, np.float32(1.5), np.zeros((0, 2)), np.arange(3, dtype=np.uint8),
    np.array(2.0), np.arange(2000.0), np.array([1e-8, 1e8])])
def test_repr_and_str_like_numpy(value):
    x = enp.asarray(value)
    host = np.asarray(value)
    assert str(x) == str(host)
    assert repr(x) == repr(host).replace("array(", "Array(").replace("\n      ", "\n      ")


def test_conversion_protocols():
    x = enp.asarray(A)
    assert np.asarray(x).dtype == np.float64
    np.testing.assert_array_equal(np.asarray(x), A)
    np.testing.assert_array_equal(np.array(x, dtype=np.float32), A.astype(np.float32))
    assert enp.asarray(A)[0, 1].item() == A[0, 1]
    assert isinstance(enp.asarray(IA)[0, 0].item(), int)
    assert enp.asarray(IA).tolist() == IA.tolist()
    assert float(enp.asarray(2.5)) == 2.5 and int(enp.asarray(3)) == 3
    assert [1, 2, 3][enp.asarray(1)] == 2
    assert len(x) == 3 and [r.shape for r in x] == [(4,)] * 3
    assert f"{enp.asarray(2.5):.2f}" == "2.50"
    with pytest.raises(TypeError):
        {x: 1}  # noqa: B018  (arrays are unhashable)


def test_dlpack_both_ways():
    x = enp.asarray(A)
    back = np.from_dlpack(x)
    np.testing.assert_array_equal(back, A)
    y = enp.from_dlpack(A.astype(np.float32))
    assert y.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(y), A.astype(np.float32))
    torch = pytest.importorskip("torch")
    t = torch.from_dlpack(enp.asarray(IA))
    assert t.tolist() == IA.tolist()
    np.testing.assert_array_equal(np.asarray(enp.from_dlpack(torch.arange(4))), np.arange(4))


def test_traced_values_refuse_concrete_conversion():
    for fn in (lambda v: float(v[0, 0]), lambda v: v.item(), lambda v: bool(v[0, 0] > 0),
               lambda v: np.asarray(v), lambda v: v.tolist()):
        with pytest.raises(ember.TracerError, match="test_numpy_api.py"):
            ember.jit(fn)(enp.asarray(A))


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,args,match", [
    (enp.add, (np.ones((2, 3)), np.ones((4,))), r"add: operands could not be broadcast "
                                                 r"together with shapes \(2, 3\) \(4,\)"),
    (enp.matmul, (np.ones((2, 3)), np.ones((2, 3))), r"matmul: .*\(2, 3\) @ \(2, 3\)"),
    (enp.bitwise_and, (np.ones(2), np.ones(2)), r"bitwise_and: only defined for integer"),
    (enp.left_shift, (np.ones(2), np.ones(2)), r"left_shift: only defined for integer"),
    (lambda x: enp.sum(x, axis=3), (np.ones((2, 3)),), r"sum: axis 3 is out of bounds"),
    (lambda x: enp.transpose(x, (0,)), (np.ones((2, 3)),), r"transpose: axes \(0,\)"),
    (lambda x: x.reshape(4), (np.ones((2, 3)),), r"reshape: cannot reshape .*\(2, 3\)"),
    (lambda x: enp.power(x, -1), (np.arange(3),), r"power: integers to negative"),
])
def test_errors_name_the_op_and_the_users_line(fn, args, match):
    ember_args = [enp.asarray(a) for a in args]
    for runner in (fn, ember.jit(fn)):
        with pytest.raises(ember.EmberError, match=match) as info:
            runner(*ember_args)
        assert "test_numpy_api.py" in str(info.value)


def test_unsupported_inputs_raise_dtype_errors():
    with pytest.raises(ember.DTypeError, match="asarray"):
        enp.asarray(np.ones(2, np.clongdouble))
    with pytest.raises(ember.DTypeError, match="asarray"):
        enp.asarray(["a"])
    with pytest.raises(ember.DTypeError):
        enp.asarray([[1], [1, 2]])
    assert enp.asarray(np.ones(2, dtypes.bfloat16)).dtype == dtypes.bfloat16
