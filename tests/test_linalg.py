"""``ember.numpy.linalg`` against NumPy (values, dtypes, stacks, errors) and the gradients of
the composed functions (det, slogdet, inv, solve, pinv...) against finite differences.

The factorisation primitives themselves are covered by the spec tables (``specs_linalg``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close, check, numeric_grad

import ember
import ember.numpy as enp
from ember import ops as lax

LA = enp.linalg
RNG = np.random.default_rng(7)


def _general(*shape):
    return RNG.uniform(-2, 2, size=shape)


def _spd(*shape):
    a = RNG.uniform(-1, 1, size=shape)
    return a @ np.swapaxes(a, -1, -2) + shape[-1] * np.eye(shape[-1])


def _sym(*shape):
    a = RNG.uniform(-2, 2, size=shape)
    return a + np.swapaxes(a, -1, -2)


def _rank_deficient(*shape):
    """Rank 2, whatever the shape."""
    *batch, m, n = shape
    return RNG.normal(size=(*batch, m, 2)) @ RNG.normal(size=(*batch, 2, n))


def _sign_free(w, v):
    weights = np.arange(1.0, v.shape[-1] + 1).astype(v.dtype)
    return w, (v * weights) @ v.mT


def _phase_free(w, v):
    """Eigenvalues and ``|V|``: LAPACK fixes each eigenvector's phase; both sides call it."""
    return w, abs(v)


# (id, ember function, NumPy reference, inputs)
VALUE_CASES = [
    ("det", LA.det, np.linalg.det, [_general(4, 4)]),
    ("det-stack", LA.det, np.linalg.det, [_general(2, 3, 3, 3)]),
    ("det-empty", LA.det, np.linalg.det, [_general(2, 0, 0)]),
    ("slogdet", lambda x: tuple(LA.slogdet(x)), lambda x: tuple(np.linalg.slogdet(x)),
     [_general(3, 4, 4)]),
    ("inv", LA.inv, np.linalg.inv, [_general(2, 4, 4)]),
    ("solve-matrix", LA.solve, np.linalg.solve, [_general(4, 4), _general(4, 2)]),
    ("solve-vector", LA.solve, np.linalg.solve, [_general(2, 4, 4), _general(4)]),
    ("solve-broadcast", LA.solve, np.linalg.solve, [_general(2, 1, 3, 3), _general(4, 3, 2)]),
    ("solve-stack-b", LA.solve, np.linalg.solve, [_general(3, 3), _general(5, 3, 1)]),
    ("cholesky", LA.cholesky, np.linalg.cholesky, [_spd(2, 4, 4)]),
    ("cholesky-upper", lambda x: LA.cholesky(x, upper=True),
     lambda x: np.linalg.cholesky(x, upper=True), [_spd(4, 4)]),
    ("qr-reduced", lambda x: tuple(LA.qr(x)), lambda x: tuple(np.linalg.qr(x)),
     [_general(2, 5, 3)]),
    ("qr-complete", lambda x: tuple(LA.qr(x, mode="complete")),
     lambda x: tuple(np.linalg.qr(x, mode="complete")), [_general(5, 3)]),
    ("qr-r", lambda x: LA.qr(x, mode="r"), lambda x: np.linalg.qr(x, mode="r"),
     [_general(3, 5)]),
    ("eigh", lambda x: tuple(LA.eigh(x)), lambda x: tuple(np.linalg.eigh(x)), [_sym(2, 4, 4)]),
    ("eigvalsh", LA.eigvalsh, np.linalg.eigvalsh, [_sym(3, 5, 5)]),
    # LAPACK reads the other triangle for 'U', so the eigenvectors may differ in sign: compare
    # sum_i c_i v_i v_i^T, which does not depend on the signs.
    *[(f"eigh-uplo-{u}", lambda x, u=u: _sign_free(*LA.eigh(x, UPLO=u)),
       lambda x, u=u: _sign_free(*np.linalg.eigh(x, UPLO=u)), [_general(2, 4, 4)])
      for u in "LU"],
    ("eigvalsh-uplo", lambda x: LA.eigvalsh(x, "U"), lambda x: np.linalg.eigvalsh(x, "U"),
     [_general(4, 4)]),
    ("pinv-rcond", lambda x: LA.pinv(x, 0.3), lambda x: np.linalg.pinv(x, 0.3), [_general(4, 4)]),
    # NumPy's hermitian=True hint (an eigh-based algorithm there) gives the same results.
    ("pinv-hermitian", lambda x: LA.pinv(x, hermitian=True),
     lambda x: np.linalg.pinv(x, hermitian=True), [_sym(2, 4, 4)]),
    ("matrix_rank-hermitian", lambda x: LA.matrix_rank(x, hermitian=True),
     lambda x: np.linalg.matrix_rank(x, hermitian=True), [(lambda a: a @ a.T)(_general(4, 2))]),
    ("svd-hermitian", lambda x: LA.svd(x, hermitian=True, compute_uv=False),
     lambda x: np.linalg.svd(x, hermitian=True, compute_uv=False), [_sym(3, 3)]),
    ("eig", lambda x: _phase_free(*LA.eig(x)),
     lambda x: _phase_free(*(v.astype(np.result_type(v, np.complex64))
                             for v in np.linalg.eig(x))), [_general(2, 4, 4)]),
    ("eigvals", LA.eigvals, lambda x: np.linalg.eigvals(x).astype(np.result_type(x, np.complex64)),
     [_general(5, 5)]),
    ("svd", lambda x: tuple(LA.svd(x)), lambda x: tuple(np.linalg.svd(x)), [_general(2, 5, 3)]),
    ("svd-reduced", lambda x: tuple(LA.svd(x, full_matrices=False)),
     lambda x: tuple(np.linalg.svd(x, full_matrices=False)), [_general(3, 5)]),
    ("svdvals", LA.svdvals, np.linalg.svdvals, [_general(2, 3, 6)]),
    ("pinv-tall", LA.pinv, np.linalg.pinv, [_general(2, 5, 3)]),
    ("pinv-rank-deficient", LA.pinv, lambda x: np.linalg.pinv(x, rtol=None),
     [_rank_deficient(4, 5)]),
    ("pinv-rtol", lambda x: LA.pinv(x, rtol=0.5), lambda x: np.linalg.pinv(x, rtol=0.5),
     [_general(4, 4)]),
    ("matrix_rank", LA.matrix_rank, np.linalg.matrix_rank, [_rank_deficient(3, 5, 4)]),
    ("matrix_rank-full", LA.matrix_rank, np.linalg.matrix_rank, [_general(4, 6)]),
    ("matrix_rank-rtol", lambda x: LA.matrix_rank(x, rtol=np.array([0.0, 0.9])),
     lambda x: np.linalg.matrix_rank(x, rtol=np.array([0.0, 0.9])), [_general(2, 4, 4)]),
    ("matrix_rank-tol", lambda x: LA.matrix_rank(x, 1.0),
     lambda x: np.linalg.matrix_rank(x, 1.0), [_general(4, 4)]),
    *[(f"matrix_power-{n}", lambda x, n=n: LA.matrix_power(x, n),
       lambda x, n=n: np.linalg.matrix_power(x, n), [_spd(2, 3, 3) / 3])
      for n in (-3, -1, 0, 1, 2, 5)],
    ("cross", LA.cross, np.linalg.cross, [_general(4, 3), _general(2, 1, 3)]),
    ("cross-axis", lambda a, b: LA.cross(a, b, axis=-2),
     lambda a, b: np.cross(a, b, axis=-2), [_general(2, 3, 4), _general(3, 4)]),
    *[(f"diagonal-{k}", lambda x, k=k: LA.diagonal(x, offset=k),
       lambda x, k=k: np.linalg.diagonal(x, offset=k), [_general(2, 3, 4)]) for k in (-1, 0, 2)],
    ("trace", lambda x: LA.trace(x, offset=1), lambda x: np.linalg.trace(x, offset=1),
     [_general(2, 3, 4)]),
    ("vecdot", LA.vecdot, np.linalg.vecdot, [_general(2, 3), _general(4, 1, 3)]),
    ("vecdot-axis", lambda a, b: LA.vecdot(a, b, axis=0),
     lambda a, b: np.linalg.vecdot(a, b, axis=0), [_general(3, 2), _general(3, 2)]),
    *[(f"matrix_norm-{o}", lambda x, o=o: LA.matrix_norm(x, ord=o, keepdims=k),
       lambda x, o=o: np.linalg.matrix_norm(x, ord=o, keepdims=k), [_general(2, 3, 4)])
      for o in ("fro", "nuc", 1, -1, 2, -2, np.inf, -np.inf) for k in (False, True)],
    *[(f"cond-{p}", lambda x, p=p: LA.cond(x, p), lambda x, p=p: np.linalg.cond(x, p),
       [_general(2, 4, 4)]) for p in (None, 2, -2, "fro", "nuc", 1, -1, np.inf, -np.inf)],
    ("lstsq-tall", lambda a, b: tuple(LA.lstsq(a, b)), lambda a, b: tuple(np.linalg.lstsq(a, b)),
     [_general(6, 3), _general(6, 2)]),
    ("lstsq-vector", lambda a, b: tuple(LA.lstsq(a, b)),
     lambda a, b: tuple(np.linalg.lstsq(a, b)), [_general(5, 3), _general(5)]),
    # NumPy leaves the residuals empty for wide or rank-deficient a: compare the rest.
    ("lstsq-wide", lambda a, b: (lambda x, _, r, s: (x, r, s))(*LA.lstsq(a, b)),
     lambda a, b: (lambda x, _, r, s: (x, r, s))(*np.linalg.lstsq(a, b)),
     [_general(3, 5), _general(3, 2)]),
    ("lstsq-rank-deficient", lambda a, b: (lambda x, _, r, s: (x, r, s))(*LA.lstsq(a, b, 1e-5)),
     lambda a, b: (lambda x, _, r, s: (x, r, s))(*np.linalg.lstsq(a, b, 1e-5)),
     [_rank_deficient(5, 4), _general(5)]),
    ("tensorinv", LA.tensorinv, np.linalg.tensorinv, [_general(4, 6, 8, 3)]),
    ("tensorinv-ind1", lambda x: LA.tensorinv(x, ind=1), lambda x: np.linalg.tensorinv(x, ind=1),
     [_general(6, 2, 3)]),
    ("tensorsolve", LA.tensorsolve, np.linalg.tensorsolve,
     [_general(6, 4, 2, 3, 4), _general(6, 4)]),
    ("tensorsolve-axes", lambda a, b: LA.tensorsolve(a, b, axes=(1,)),
     lambda a, b: np.linalg.tensorsolve(a, b, axes=(1,)), [_general(6, 2, 4, 12), _general(6, 4)]),
    ("multi_dot", lambda *xs: LA.multi_dot(xs), lambda *xs: np.linalg.multi_dot(xs),
     [_general(3), _general(3, 6), _general(6, 2), _general(2, 4), _general(4)]),
    ("multi_dot-two", lambda *xs: LA.multi_dot(xs), lambda *xs: np.linalg.multi_dot(xs),
     [_general(2, 3), _general(3, 4)]),
    ("norm-nuc-axes", lambda x: LA.norm(x, "nuc", (2, 0)),
     lambda x: np.linalg.norm(x, "nuc", (2, 0)), [_general(3, 2, 4)]),
    ("norm-2-keepdims", lambda x: LA.norm(x, 2, (0, 1), keepdims=True),
     lambda x: np.linalg.norm(x, 2, (0, 1), keepdims=True), [_general(3, 4)]),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,fn,ref,inputs", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_matches_numpy(name, fn, ref, inputs, dtype):
    tol = (2e-4, 2e-5) if dtype == np.float32 else (1e-9, 1e-11)
    check(fn, ref, *[x.astype(dtype) for x in inputs], rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("fn,ref,x,out_dtype", [
    (LA.det, np.linalg.det, np.array([[1, 2], [3, 4]], np.int32), np.float64),
    (LA.inv, np.linalg.inv, np.array([[2, 1], [1, 3]], np.int8), np.float64),
    (LA.eigvalsh, np.linalg.eigvalsh, np.array([[2, 1], [1, 3]], np.int64), np.float64),
    (LA.svdvals, np.linalg.svdvals, np.array([[2, 1], [1, 3]], np.uint8), np.float64),
    (lambda x: LA.matrix_power(x, 3), lambda x: np.linalg.matrix_power(x, 3),
     np.array([[2, 1], [1, 3]], np.int32), np.int32),
    (lambda x: LA.trace(x), np.linalg.trace, np.array([[2, 1], [1, 3]], np.int8), np.int64),
    (LA.matrix_rank, np.linalg.matrix_rank, np.array([[2, 1], [4, 2]], np.int32), np.int64),
])
def test_result_dtypes_follow_numpy(fn, ref, x, out_dtype):
    out = fn(enp.asarray(x))
    assert out.dtype == out_dtype
    np.testing.assert_allclose(np.asarray(out), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [LA.det, LA.inv, LA.cholesky, LA.eigvalsh, LA.svdvals, LA.pinv])
def test_half_precision_computes_in_float32_and_keeps_its_dtype(fn):
    x = _spd(3, 3).astype(np.float16)
    out = fn(enp.asarray(x))
    assert out.dtype == np.float16
    expected = fn(enp.asarray(x.astype(np.float32)))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected), rtol=2e-3,
                               atol=2e-3)


def test_results_are_named_tuples_also_under_jit():
    x = enp.asarray(_sym(3, 3))
    for run in (LA.eigh, ember.jit(LA.eigh)):
        res = run(x)
        assert isinstance(res, LA.EighResult)
        assert res.eigenvalues.shape == (3,) and res.eigenvectors.shape == (3, 3)
    assert LA.svd(x).Vh.shape == (3, 3) and LA.qr(x).R.shape == (3, 3)
    assert LA.slogdet(x).logabsdet.shape == ()


def test_multi_dot_multiplies_in_the_cheapest_order():
    a, b, c = enp.ones((10, 100)), enp.ones((100, 5)), enp.ones((5, 50))
    graph = ember.jit(lambda *xs: LA.multi_dot(xs)).lower(a, b, c).graph.graph
    products = [e.outputs[0].aval.shape for e in graph.eqns if e.prim.name == "dot_general"]
    assert products == [(10, 5), (10, 50)]  # (a @ b) @ c: 7,500 multiplications, not 75,000


@pytest.mark.parametrize("n", [5, 70])  # 70: several blocks of the blocked elimination
def test_lu_pivots_like_lapack(n):
    """The row permutation is LAPACK's partial pivoting (via torch.linalg.lu_factor)."""
    x = _general(3, n, n)
    packed, perm = lax.lu(enp.asarray(x))
    ref_lu, pivots = torch.linalg.lu_factor(torch.from_numpy(x))
    ref_perm = np.tile(np.arange(n), (3, 1))
    for b in range(3):
        for i, p in enumerate(pivots[b].numpy() - 1):  # LAPACK pivots: swap row i with row p
            ref_perm[b, [i, p]] = ref_perm[b, [p, i]]
    assert perm.dtype == np.int32
    np.testing.assert_array_equal(perm, ref_perm)
    np.testing.assert_allclose(packed, ref_lu.numpy(), rtol=1e-10, atol=1e-10)


# --- failures are values ---------------------------------------------------------------------

def test_cholesky_of_a_non_positive_definite_matrix_is_nan_for_that_matrix_only():
    x = np.stack([_spd(3, 3), -np.eye(3)])
    for run in (LA.cholesky, ember.jit(LA.cholesky)):
        out = np.asarray(run(enp.asarray(x)))
        np.testing.assert_allclose(out[0], np.linalg.cholesky(x[0]), rtol=1e-12)
        assert np.isnan(out[1]).all()


def test_singular_matrices():
    x = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 5.0]])
    assert float(LA.det(enp.asarray(x))) == 0.0
    sign, logabsdet = LA.slogdet(enp.asarray(x))
    assert float(sign) == 0.0 and float(logabsdet) == -np.inf
    assert int(LA.matrix_rank(enp.asarray(x))) == 2
    assert not np.isfinite(np.asarray(LA.inv(enp.asarray(x)))).all()


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,args,match", [
    (LA.det, [np.ones((2, 3))], r"det: needs square matrices .*\(2, 3\)"),
    (LA.inv, [np.ones(3)], r"inv: needs a matrix or a stack of matrices .*\(3,\)"),
    (LA.cholesky, [np.ones((4, 3, 2))], r"cholesky: needs square matrices .*\(4, 3, 2\)"),
    (LA.eigh, [np.ones((2, 3))], r"eigh: needs square"),
    (LA.slogdet, [np.ones((2, 3))], r"slogdet: needs square"),
    (LA.svd, [np.ones(3)], r"svd: needs a matrix"),
    (LA.solve, [np.ones((3, 3)), np.ones((4, 2))], r"solve: x2 of shape \(4, 2\) does not fit"),
    (LA.solve, [np.ones((2, 3, 3)), np.ones((4, 3, 1))],
     r"solve: operands could not be broadcast .*\(2,\) \(4,\)"),
    (LA.cross, [np.ones((2, 3)), np.ones((2, 2))], r"cross: needs vectors of 3 elements"),
    (LA.vecdot, [np.ones((2, 3)), np.ones((2, 1))], r"vecdot: vectors along axis -1 must have"),
    (lambda x: LA.matrix_norm(x, ord=3), [np.ones((2, 2))], r"matrix_norm: ord=3 is not"),
    (lambda x: LA.qr(x, mode="raw"), [np.ones((2, 2))], r"qr: mode='raw'"),
    (lambda x: LA.eigh(x, "X"), [np.ones((2, 2))], r"eigh: UPLO='X' is not"),
    (lambda x: LA.multi_dot([x]), [np.ones((2, 2))], r"multi_dot: needs at least two arrays"),
    (LA.tensorinv, [np.ones((2, 3, 4))], r"tensorinv: the first 2 axes of shape \(2, 3, 4\)"),
    (LA.tensorsolve, [np.ones((2, 3, 4)), np.ones(2)], r"tensorsolve: a of shape \(2, 3, 4\)"),
    (lambda a, b, c: LA.multi_dot([a, b, c]), [np.ones((2, 2)), np.ones(2), np.ones((2, 2))],
     r"multi_dot: needs 2-D arrays .*\(2,\)"),
    (lambda x: LA.matrix_power(x, 1.5), [np.ones((2, 2))], r"matrix_power: n must be an int"),
    (LA.lstsq, [np.ones((2, 4, 3)), np.ones(4)], r"lstsq: needs a of shape \(M, N\) .*\(2, 4, 3\)"),
    (LA.lstsq, [np.ones((4, 3)), np.ones(3)], r"lstsq: needs a of shape .*\(4, 3\) and \(3,\)"),
    (lambda x: LA.matrix_power(x, 2), [np.ones((2, 3))], r"matrix_power: needs square"),
    (lambda a, b: lax.triangular_solve(a, b, True), [np.ones((3, 3)), np.ones((2, 3))],
     r"triangular_solve: a \(3, 3\) and b \(2, 3\) do not fit"),
    (lambda a: lax.cholesky(a), [np.ones((3, 3), np.int32)],
     r"cholesky: needs float32, float64, complex64, complex128, got int32"),
])
def test_bad_input_raises_an_ember_error_naming_the_function(fn, args, match):
    ember_args = [enp.asarray(a) for a in args]
    for run in (fn, ember.jit(fn)):
        with pytest.raises(ember.EmberError, match=match) as info:
            run(*ember_args)
        assert "test_linalg.py" in str(info.value)


@pytest.mark.parametrize("fn,shape,match", [
    (lambda x: LA.svd(x).U, (4, 3), r"svd: the derivative of svd\(full_matrices=True\)"),
    (lambda x: LA.qr(x, mode="complete").Q, (4, 3), r"qr: the derivative of qr\(mode='complete'"),
])
def test_undefined_derivatives_raise(fn, shape, match):
    with pytest.raises(ember.UnsupportedError, match=match):
        ember.grad(lambda x: enp.sum(fn(x)))(enp.asarray(_general(*shape)))


# --- gradients of the composed functions ----------------------------------------------------

GRAD_CASES = [
    ("det", LA.det, [_general(3, 3)]),
    ("det-stack", LA.det, [_general(2, 4, 4)]),
    ("slogdet", lambda x: LA.slogdet(x).logabsdet, [_general(2, 3, 3)]),
    ("inv", LA.inv, [_general(3, 3) + 3 * np.eye(3)]),
    ("solve", LA.solve, [_general(3, 3) + 3 * np.eye(3), _general(2, 3, 2)]),
    ("solve-vector", LA.solve, [_general(3, 3) + 3 * np.eye(3), _general(3)]),
    ("pinv", LA.pinv, [_general(4, 3)]),
    ("pinv-wide", LA.pinv, [_general(2, 3, 5)]),
    ("matrix_power", lambda x: LA.matrix_power(x, -2), [_spd(3, 3)]),
    ("matrix_power-3", lambda x: LA.matrix_power(x, 3), [_general(3, 3)]),
    ("cholesky-upper", lambda x: LA.cholesky(x, upper=True), [_spd(3, 3)]),
    ("eigvalsh", LA.eigvalsh, [_sym(4, 4)]),
    ("eigvals", lambda x: enp.real(LA.eigvals(x)), [_spd(4, 4) @ _spd(4, 4)]),
    ("svdvals", LA.svdvals, [_general(3, 5)]),
    ("matrix_norm-nuc", lambda x: LA.matrix_norm(x, ord="nuc"), [_general(4, 3)]),
    ("matrix_norm-2", lambda x: LA.matrix_norm(x, ord=2), [_general(2, 3, 3)]),
    ("cross", LA.cross, [_general(2, 3), _general(3)]),
    ("lstsq", lambda a, b: LA.lstsq(a, b)[0], [_general(5, 3), _general(5, 2)]),
    ("cond", LA.cond, [_general(3, 3)]),
    ("vecdot", LA.vecdot, [_general(2, 3), _general(3)]),
]


@pytest.mark.parametrize("name,fn,inputs", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradients_match_finite_differences(name, fn, inputs):
    weights = RNG.normal(size=np.shape(fn(*[enp.asarray(x) for x in inputs])))

    def loss(*xs):
        return enp.sum(fn(*xs) * weights)

    argnums = tuple(range(len(inputs)))
    grads = ember.grad(loss, argnums)(*[enp.asarray(x) for x in inputs])
    jitted = ember.jit(ember.grad(loss, argnums))(*[enp.asarray(x) for x in inputs])
    for i, (g, gj) in enumerate(zip(grads, jitted)):
        def f(x, i=i):
            args = [enp.asarray(v) for v in inputs]
            args[i] = enp.asarray(x)
            return loss(*args)

        np.testing.assert_allclose(g, numeric_grad(f, inputs[i]), rtol=1e-6, atol=1e-7)
        assert_close(gj, np.asarray(g), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,fn,x", [
    ("logabsdet", lambda a: LA.slogdet(a).logabsdet, _general(3, 3) + 3 * np.eye(3)),
    ("inv", lambda a: enp.sum(LA.inv(a) ** 2), _general(3, 3) + 3 * np.eye(3)),
    ("eigvalsh", lambda a: enp.sum(LA.eigvalsh(a) ** 3), _sym(3, 3)),
    ("cholesky", lambda a: enp.sum(LA.cholesky(a) ** 3), _spd(3, 3)),
    ("qr", lambda a: enp.sum(LA.qr(a).R ** 3), _general(4, 3)),
    ("svdvals", lambda a: enp.sum(LA.svdvals(a) ** 3), _general(3, 4)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_second_derivatives_forward_over_reverse(name, fn, x):
    """The jvp rules are written with differentiable primitives, so Hessians work."""
    v = RNG.normal(size=x.shape)
    g = ember.grad(fn)
    _, hvp = ember.jvp(g, (enp.asarray(x),), (enp.asarray(v),))
    eps = 1e-5
    fd = (np.asarray(g(enp.asarray(x + eps * v))) - np.asarray(g(enp.asarray(x - eps * v)))) \
        / (2 * eps)
    np.testing.assert_allclose(hvp, fd, rtol=1e-5, atol=1e-6)


def test_gradients_of_repeated_eigenvalues_and_singular_values_stay_finite():
    """Only eigenvectors and singular vectors divide by gaps; grad skips them when unused."""
    eye = enp.asarray(np.eye(3))
    weights = enp.asarray([1.0, 2.0, 3.0])
    np.testing.assert_allclose(ember.grad(lambda a: enp.sum(LA.eigvalsh(a) * weights))(eye),
                               np.diag([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(ember.grad(lambda a: LA.matrix_norm(a, ord="nuc"))(eye), np.eye(3))


def _cofactors(x):
    n = x.shape[-1]
    return np.array([[(-1) ** (i + j) * np.linalg.det(np.delete(np.delete(x, i, 0), j, 1))
                      for j in range(n)] for i in range(n)])


@pytest.mark.parametrize("x", [
    np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 5.0]]),  # rank 2
    np.outer([1.0, 2.0, 3.0], [1.0, -1.0, 2.0]),  # rank 1: the cofactors are all 0
    _rank_deficient(4, 2) @ _general(2, 4),
    np.array([[2.0, 1.0], [4.0, 2.0]]) * (1 + 2j),
], ids=["rank-2", "rank-1", "rank-2-of-4", "complex"])
def test_gradient_of_det_at_singular_matrices_is_the_cofactor_matrix(x):
    # det is holomorphic, so grad of Re(det) is d det/dx itself (JAX's convention).
    real_det = lambda a: enp.real(LA.det(a))  # noqa: E731
    for run in (ember.grad(real_det), ember.jit(ember.grad(real_det))):
        np.testing.assert_allclose(run(enp.asarray(x)), _cofactors(x), atol=1e-12)


def test_gradient_of_det_is_det_times_inverse_transpose():
    x = _general(4, 4)
    np.testing.assert_allclose(ember.grad(LA.det)(enp.asarray(x)),
                               np.linalg.det(x) * np.linalg.inv(x).T, rtol=1e-10)


def test_gradients_through_symmetrised_inputs_are_symmetric():
    x = enp.asarray(_spd(4, 4))
    for fn in (lambda a: enp.sum(LA.eigvalsh(a) ** 3), lambda a: enp.sum(LA.cholesky(a))):
        g = np.asarray(ember.grad(fn)(x))
        np.testing.assert_allclose(g, g.T, rtol=1e-12)


def test_vmap_of_composed_functions_matches_a_loop():
    xs = _general(3, 4, 4)
    bs = _general(3, 4)
    for fn in (LA.det, LA.inv, LA.pinv, lambda a: LA.slogdet(a).logabsdet):
        np.testing.assert_allclose(ember.vmap(fn)(enp.asarray(xs)),
                                   np.stack([np.asarray(fn(enp.asarray(x))) for x in xs]),
                                   rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ember.vmap(LA.solve, in_axes=(0, 0))(enp.asarray(xs),
                                                                     enp.asarray(bs)),
                               np.linalg.solve(xs, bs[..., None])[..., 0], rtol=1e-10)


# --- complex matrices ------------------------------------------------------------------------

def _complex(*shape):
    return _general(*shape) + 1j * _general(*shape)


def _hermitian(*shape):
    a = _complex(*shape)
    return a + np.conj(np.swapaxes(a, -1, -2))


def _hpd(*shape):
    a = _complex(*shape)
    return a @ np.conj(np.swapaxes(a, -1, -2)) + 2 * shape[-1] * np.eye(shape[-1])


COMPLEX_CASES = [
    ("det", LA.det, np.linalg.det, [_complex(2, 4, 4)]),
    ("slogdet", lambda x: tuple(LA.slogdet(x)), lambda x: tuple(np.linalg.slogdet(x)),
     [_complex(3, 3)]),
    ("inv", LA.inv, np.linalg.inv, [_complex(2, 3, 3)]),
    ("solve", LA.solve, np.linalg.solve, [_complex(3, 3), _complex(2, 3, 2)]),
    ("cholesky-upper", lambda x: LA.cholesky(x, upper=True),
     lambda x: np.linalg.cholesky(x, upper=True), [_hpd(2, 3, 3)]),
    ("qr", lambda x: tuple(LA.qr(x)), lambda x: tuple(np.linalg.qr(x)), [_complex(4, 3)]),
    ("eigh", lambda x: tuple(LA.eigh(x)), lambda x: tuple(np.linalg.eigh(x)),
     [_hermitian(2, 3, 3)]),
    ("eigvalsh", LA.eigvalsh, np.linalg.eigvalsh, [_hermitian(4, 4)]),
    ("svd", lambda x: tuple(LA.svd(x)), lambda x: tuple(np.linalg.svd(x)), [_complex(3, 5)]),
    ("svdvals", LA.svdvals, np.linalg.svdvals, [_complex(2, 4, 3)]),
    ("pinv", LA.pinv, np.linalg.pinv, [_complex(4, 3)]),
    ("matrix_rank", LA.matrix_rank, np.linalg.matrix_rank, [_complex(3, 3)]),
    ("matrix_power", lambda x: LA.matrix_power(x, -2),
     lambda x: np.linalg.matrix_power(x, -2), [_hpd(3, 3) / 6]),
    ("cross", LA.cross, np.linalg.cross, [_complex(2, 3), _complex(3)]),
    ("vecdot-conjugates-x1", LA.vecdot, np.linalg.vecdot, [_complex(2, 3), _complex(3)]),
    ("vdot-conjugates-a", enp.vdot, np.vdot, [_complex(2, 3), _complex(2, 3)]),
    *[(f"matrix_norm-{o}", lambda x, o=o: LA.matrix_norm(x, ord=o),
       lambda x, o=o: np.linalg.matrix_norm(x, ord=o), [_complex(2, 3, 4)])
      for o in ("fro", "nuc", 1, 2, -np.inf)],
]


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
@pytest.mark.parametrize("name,fn,ref,inputs", COMPLEX_CASES, ids=[c[0] for c in COMPLEX_CASES])
def test_complex_matches_numpy(name, fn, ref, inputs, dtype):
    tol = (2e-4, 2e-5) if dtype == np.complex64 else (1e-9, 1e-11)
    check(fn, ref, *[x.astype(dtype) for x in inputs], rtol=tol[0], atol=tol[1])


COMPLEX_GRAD_CASES = [
    ("det", LA.det, _complex(3, 3)),
    ("slogdet-logabsdet", lambda x: LA.slogdet(x).logabsdet, _complex(2, 3, 3)),
    ("slogdet-sign", lambda x: LA.slogdet(x).sign, _complex(3, 3)),
    ("inv", LA.inv, _complex(3, 3) + 3 * np.eye(3)),
    ("solve", lambda x: LA.solve(x, np.arange(3.0)), _complex(3, 3) + 3 * np.eye(3)),
    ("pinv", LA.pinv, _complex(3, 2)),
    ("cholesky", LA.cholesky, _hpd(3, 3)),
    ("eigvalsh", LA.eigvalsh, _hermitian(3, 3)),
    ("eigvals", LA.eigvals, _complex(3, 3)),
    ("svdvals", LA.svdvals, _complex(2, 3)),
]


@pytest.mark.parametrize("name,fn,x", COMPLEX_GRAD_CASES, ids=[c[0] for c in COMPLEX_GRAD_CASES])
def test_complex_gradients_follow_jax_convention(name, fn, x):
    """For real ``f(z)``, ``grad`` is ``df/dRe(z) - i df/dIm(z)`` (JAX's convention)."""
    shape = np.shape(fn(enp.asarray(x)))
    weights = RNG.normal(size=shape) + 1j * RNG.normal(size=shape)

    def loss(z):
        return enp.sum(enp.real(fn(z) * weights))

    g = np.asarray(ember.grad(loss)(enp.asarray(x)))
    d_re = numeric_grad(lambda re: loss(enp.asarray(re + 1j * x.imag)), x.real)
    d_im = numeric_grad(lambda im: loss(enp.asarray(x.real + 1j * im)), x.imag)
    np.testing.assert_allclose(g, d_re - 1j * d_im, rtol=1e-6, atol=1e-7)
