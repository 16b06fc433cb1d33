"""Matrix factorisations and triangular solves: the linear algebra that cannot be composed.

``cholesky``, ``lu``, ``det``, ``qr``, ``eigh``, ``eig``, ``svd`` and ``triangular_solve`` work on
stacks of
matrices: the last two axes hold the matrix and every leading axis is a batch axis, so a vmap
rule only moves the mapped axis to the front. The NumPy implementations call LAPACK through
``numpy.linalg`` (LU is written out, since NumPy does not expose it).

JVPs are the standard matrix-calculus formulas, written with primitives so that they are linear
in the tangent (reverse mode transposes them) and differentiable again. Complex matrices use
the conjugate transpose where real ones use the transpose (Hermitian ``eigh``, unitary ``qr``
and ``svd``); the derivatives follow JAX's convention for complex numbers. Only
``triangular_solve`` is linear in an operand, so only it has a transpose rule. Where a formula
divides by a difference of eigenvalues or singular values, repeated ones give non-finite
derivatives, as in JAX and PyTorch.

Failures are values, not exceptions, as on accelerators and in JAX (a compiled program cannot
raise halfway): a matrix that is not positive definite has a NaN Cholesky factor, a singular
one an LU factor with a zero pivot, and a singular triangular system a NaN solution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ember import dtypes
from ember.core.primitive import Primitive
from ember.core.trace import UndefinedPrimal, Zero, aval_of, to_array
from ember.errors import DTypeError, ShapeError, UnsupportedError, op_error
from ember.ir.types import ArrayType
from ember.ops import elementwise as ew
from ember.ops import structural as st
from ember.ops.indexing import take_along_axis
from ember.ops.linalg import dot_general
from ember.ops.reduce import reduce_prod, reduce_sum

__all__ = ["cholesky", "det", "eig", "eigh", "lu", "lu_solve", "permutation_sign", "permute_rows",
           "qr", "svd", "triangular_solve"]

_DTYPES = (dtypes.float32, dtypes.float64, dtypes.complex64, dtypes.complex128)


# --- shape/dtype rules -----------------------------------------------------------------------

def _check_matrix(op: str, x: ArrayType, square: bool = False) -> None:
    if x.ndim < 2:
        raise op_error(ShapeError, op, f"needs a matrix or a stack of matrices (at least 2 "
                       f"dimensions), got shape {x.shape}")
    if square and x.shape[-1] != x.shape[-2]:
        raise op_error(ShapeError, op, f"needs square matrices in the last two dimensions, got "
                       f"shape {x.shape}")
    if x.dtype not in _DTYPES:
        raise op_error(DTypeError, op, f"needs {', '.join(map(str, _DTYPES))}, got {x.dtype}")


# --- helpers the rules share -----------------------------------------------------------------

def _mT(x: Any) -> Any:
    """Swap the last two axes."""
    nd = aval_of(x).ndim
    return st.transpose(x, (*range(nd - 2), nd - 1, nd - 2))


def _is_complex(x: Any) -> bool:
    return dtypes.is_complex(aval_of(x).dtype)


def _H(x: Any) -> Any:
    """Conjugate transpose of each matrix (the transpose of a real one)."""
    return ew.conj(_mT(x)) if _is_complex(x) else _mT(x)


def _real(x: Any) -> Any:
    return ew.real(x) if _is_complex(x) else x


def _like(x: Any, other: Any) -> Any:
    """``x`` (real) in ``other``'s dtype, to multiply complex matrices by real factors."""
    dt = aval_of(other).dtype
    return x if aval_of(x).dtype == dt else ew.convert(x, dt)


def _mm(a: Any, b: Any) -> Any:
    """Matrix product of two stacks with equal leading (batch) dimensions."""
    nd = aval_of(a).ndim
    batch = tuple(range(nd - 2))
    return dot_general(a, b, ((nd - 1,), (nd - 2,)), (batch, batch))


def _constant(host: np.ndarray, like: Any) -> Any:
    """A constant matrix broadcast over the leading dimensions of ``like``."""
    shape = aval_of(like).shape
    nd = len(shape)
    return st.broadcast_in_dim(to_array(host), shape, (nd - 2, nd - 1))


def _tri(x: Any, lower: bool, k: int = 0) -> Any:
    """Lower (``tril(x, k)``) or upper (``triu(x, k)``) triangle, the rest zero."""
    m, n = aval_of(x).shape[-2:]
    keep = np.tri(m, n, k, dtype=bool) if lower else ~np.tri(m, n, k - 1, dtype=bool)
    return ew.select(_constant(keep, x), x, ew.zeros_like(x))


def _eye(x: Any) -> Any:
    m, n = aval_of(x).shape[-2:]
    return _constant(np.eye(m, n, dtype=aval_of(x).dtype), x)


def _diag(x: Any) -> Any:
    """The main diagonal of each square matrix, as a vector."""
    return reduce_sum(ew.mul(x, _eye(x)), (aval_of(x).ndim - 1,))


def _per_matrix(v: Any, like: Any) -> Any:
    """One value per matrix (``v`` has the batch shape) broadcast over each matrix of ``like``."""
    shape = aval_of(like).shape
    return st.broadcast_in_dim(v, shape, tuple(range(len(shape) - 2)))


def _row(v: Any, like: Any) -> Any:
    """A vector ``v[..., j]`` broadcast along rows: entry ``(i, j)`` is ``v[..., j]``."""
    shape = aval_of(like).shape
    nd = len(shape)
    return st.broadcast_in_dim(v, shape, (*range(nd - 2), nd - 1))


def _col(v: Any, like: Any) -> Any:
    """A vector ``v[..., i]`` broadcast along columns: entry ``(i, j)`` is ``v[..., i]``."""
    shape = aval_of(like).shape
    nd = len(shape)
    return st.broadcast_in_dim(v, shape, tuple(range(nd - 1)))


def _inverse_gaps(values: Any, like: Any, f: Callable[[Any], Any]) -> Any:
    """``F[i, j] = 1 / (f(v_j) - f(v_i))`` off the diagonal and 0 on it, in ``like``'s dtype."""
    fv = f(values)
    gaps = ew.sub(_row(fv, like), _col(fv, like))
    eye = _eye(gaps)
    inverse = ew.mul(ew.div(ew.full_like(gaps, 1), ew.add(gaps, eye)),
                     ew.sub(ew.full_like(eye, 1), eye))
    return _like(inverse, like)


def _symmetrize(x: Any) -> Any:
    """The Hermitian part ``(x + x^H) / 2``."""
    return ew.mul(ew.add(x, _H(x)), ew.full_like(x, 0.5))


def _imaginary_diagonal(x: Any) -> Any:
    """``i * imag(diag(x))`` as a diagonal matrix: the part of ``x`` a gauge (phase) choice
    removes from a complex factorisation."""
    return ew.mul(ew.mul(ew.sub(x, ew.conj(x)), ew.full_like(x, 0.5)), _eye(x))


def _batch_leading(prim: Primitive) -> Callable[..., Any]:
    """vmap rule: move the mapped axis to the front (a new leading batch axis) and bind again."""
    def rule(args, dims, **params):
        size = next(aval_of(a).shape[d] for a, d in zip(args, dims) if d is not None)
        moved = []
        for a, d in zip(args, dims):
            if d is None:
                shape = aval_of(a).shape
                kept = tuple(range(1, len(shape) + 1))
                moved.append(st.broadcast_in_dim(a, (size, *shape), kept))
            else:
                moved.append(st.moveaxis(a, d, 0))
        out = prim.bind(*moved, **params)
        return out, ([0] * len(out) if prim.multiple_results else 0)
    return rule


def _nan_on_failure(fn: Callable[..., Any], *xs: np.ndarray) -> np.ndarray:
    """``fn`` on whole stacks; if LAPACK rejects a matrix, NaN for that matrix only.

    The result is shaped like the last operand, whose batch dimensions all operands share.
    """
    try:
        return fn(*xs)
    except np.linalg.LinAlgError:
        pass
    out = np.full(xs[-1].shape, np.nan, dtype=xs[-1].dtype)
    for i in np.ndindex(out.shape[:-2]):
        try:
            out[i] = fn(*(x[i] for x in xs))
        except np.linalg.LinAlgError:
            pass
    return out


def _declare(name: str, multiple_results: bool = False) -> Primitive:
    prim = Primitive(name, kind="library", multiple_results=multiple_results)
    prim.def_batch(_batch_leading(prim))
    return prim


# --- triangular_solve ------------------------------------------------------------------------

triangular_solve_p = _declare("triangular_solve")


@triangular_solve_p.def_abstract_eval
def _triangular_solve_rule(a: ArrayType, b: ArrayType, *, lower: bool, transpose_a: bool
                           ) -> ArrayType:
    _check_matrix("triangular_solve", a, square=True)
    _check_matrix("triangular_solve", b)
    if a.dtype != b.dtype:
        raise op_error(DTypeError, "triangular_solve", f"operands must have equal dtypes, got "
                       f"{a.dtype} and {b.dtype}")
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise op_error(ShapeError, "triangular_solve", f"a {a.shape} and b {b.shape} do not fit: "
                       "b needs a's batch dimensions and as many rows as a")
    return ArrayType(b.shape, b.dtype)


def _triangular_solve_impl(a, b, *, lower, transpose_a):
    tri = np.tril(a) if lower else np.triu(a)
    if transpose_a:
        tri = np.swapaxes(tri, -1, -2)
    return _nan_on_failure(np.linalg.solve, tri, b)


triangular_solve_p.def_impl(_triangular_solve_impl)


def triangular_solve(a: Any, b: Any, lower: bool, transpose_a: bool = False) -> Any:
    """Solve ``op(a) @ x = b`` for ``x``, where ``op(a)`` is ``a`` or its transpose and only the
    ``lower`` (or upper) triangle of ``a`` is read."""
    return triangular_solve_p.bind(a, b, lower=bool(lower), transpose_a=bool(transpose_a))


@triangular_solve_p.def_jvp
def _triangular_solve_jvp(primals, tangents, *, lower, transpose_a):
    (a, b), (ta, tb) = primals, tangents
    out = triangular_solve(a, b, lower, transpose_a)
    if isinstance(ta, Zero) and isinstance(tb, Zero):
        return out, Zero(out.aval)
    # d(A^-1 B) = A^-1 (dB - dA A^-1 B): one more solve of the combined right-hand side.
    rhs = ew.instantiate(tb)
    if not isinstance(ta, Zero):
        dta = _tri(ta, lower)
        rhs = ew.sub(rhs, _mm(_mT(dta) if transpose_a else dta, out))
    return out, triangular_solve(a, rhs, lower, transpose_a)


@triangular_solve_p.def_transpose
def _triangular_solve_transpose(ct, a, b, *, lower, transpose_a):
    assert not isinstance(a, UndefinedPrimal), "triangular_solve is linear in b only"
    if isinstance(ct, Zero):
        return [None, Zero(b.aval)]
    return [None, triangular_solve(a, ct, lower, not transpose_a)]


# --- cholesky --------------------------------------------------------------------------------

cholesky_p = _declare("cholesky")


@cholesky_p.def_abstract_eval
def _cholesky_rule(x: ArrayType) -> ArrayType:
    _check_matrix("cholesky", x, square=True)
    return ArrayType(x.shape, x.dtype)


def _hermitian_part(x):
    return (x + np.conj(np.swapaxes(x, -1, -2))) / 2


def _cholesky_impl(x):
    return _nan_on_failure(np.linalg.cholesky, _hermitian_part(x))


cholesky_p.def_impl(_cholesky_impl)


def cholesky(x: Any) -> Any:
    """Lower Cholesky factor ``L`` of ``(x + x^H) / 2`` (symmetrised, so its gradient is
    symmetric); NaN where that matrix is not positive definite."""
    return cholesky_p.bind(x)


@cholesky_p.def_jvp
def _cholesky_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    low = cholesky(x)
    if isinstance(t, Zero):
        return low, Zero(low.aval)
    # dL = L Phi(L^-1 dA L^-H), Phi = lower triangle with the diagonal halved. L^-1 dA L^-H is
    # Hermitian, so it equals L^-1 (L^-1 dA)^H: two triangular solves.
    inner = triangular_solve(low, _H(triangular_solve(low, _symmetrize(t), lower=True)),
                             lower=True)
    n = aval_of(x).shape[-1]
    phi = np.tri(n, n, -1, dtype=aval_of(x).dtype) + 0.5 * np.eye(n, dtype=aval_of(x).dtype)
    return low, _mm(low, ew.mul(inner, _constant(phi, inner)))


# --- lu --------------------------------------------------------------------------------------

lu_p = _declare("lu", multiple_results=True)


@lu_p.def_abstract_eval
def _lu_rule(x: ArrayType) -> list[ArrayType]:
    _check_matrix("lu", x, square=True)
    return [ArrayType(x.shape, x.dtype), ArrayType(x.shape[:-1], dtypes.int32)]


_LU_BLOCK = 32


def _lu_impl(x):
    """Blocked right-looking elimination with partial pivoting, vectorised over the stack.

    Each panel of ``_LU_BLOCK`` columns is eliminated column by column (row swaps apply to
    whole rows, as LAPACK's getrf does); the rest of the matrix is then updated with one
    triangular solve and one matrix product, so most of the work runs in BLAS. A zero pivot (a
    singular matrix) is left in place: U's diagonal shows an exact 0, so ``slogdet`` gives
    ``(0, -inf)``.
    """
    n = x.shape[-1]
    a = np.array(x, copy=True).reshape(int(np.prod(x.shape[:-2])), n, n)
    perm = np.tile(np.arange(n, dtype=np.int32), (a.shape[0], 1))
    stack = np.arange(a.shape[0])
    for j0 in range(0, n, _LU_BLOCK):
        j1 = min(j0 + _LU_BLOCK, n)
        for k in range(j0, j1):
            p = k + np.argmax(np.abs(a[:, k:, k]), axis=1)
            # Swap rows k and p (fancy indexing on the right copies, so this is safe).
            a[stack, k], a[stack, p] = a[stack, p], a[stack, k]
            perm[stack, k], perm[stack, p] = perm[stack, p], perm[stack, k]
            pivot = a[:, k, k][:, None]
            np.divide(a[:, k + 1:, k], pivot, out=a[:, k + 1:, k], where=pivot != 0)
            a[:, k + 1:, k + 1:j1] -= a[:, k + 1:, k, None] * a[:, k, None, k + 1:j1]
        if j1 < n:
            unit_lower = np.tril(a[:, j0:j1, j0:j1], -1) + np.eye(j1 - j0, dtype=a.dtype)
            a[:, j0:j1, j1:] = np.linalg.solve(unit_lower, a[:, j0:j1, j1:])
            a[:, j1:, j1:] -= a[:, j1:, j0:j1] @ a[:, j0:j1, j1:]
    return [a.reshape(x.shape), perm.reshape(x.shape[:-1])]


lu_p.def_impl(_lu_impl)


def lu(x: Any) -> tuple[Any, Any]:
    """LU factorisation with partial pivoting: ``(lu, perm)`` with ``x[..., perm, :] = L @ U``,
    ``L`` unit lower triangular (strictly below the diagonal of ``lu``) and ``U`` its upper
    triangle. ``perm`` is int32."""
    packed, perm = lu_p.bind(x)
    return packed, perm


def permute_rows(x: Any, perm: Any) -> Any:
    """``x[..., perm, :]`` for a stack of row permutations ``perm``."""
    shape = aval_of(x).shape
    nd = len(shape)
    index = st.broadcast_in_dim(perm, shape, tuple(range(nd - 1)))
    return take_along_axis(x, index, nd - 2)


def lu_solve(packed: Any, perm: Any, b: Any) -> Any:
    """Solve ``a @ x = b`` given ``lu(a)``; ``b`` is ``(..., n, k)`` with ``a``'s batch dims."""
    low = ew.add(_tri(packed, True, -1), _eye(packed))
    # The upper solve reads only the upper triangle of ``packed``, which is U.
    return triangular_solve(packed, triangular_solve(low, permute_rows(b, perm), lower=True),
                            lower=False)


@lu_p.def_jvp
def _lu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    packed, perm = lu(x)
    tangent_perm = Zero(perm.aval)
    if isinstance(t, Zero):
        return [packed, perm], [Zero(packed.aval), tangent_perm]
    # P dA = dL U + L dU. With X = L^-1 P dA U^-1: dL = L tril(X, -1), dU = triu(X) U.
    low = ew.add(_tri(packed, True, -1), _eye(packed))
    up = _tri(packed, False)
    y = triangular_solve(low, permute_rows(t, perm), lower=True)
    x_ = _mT(triangular_solve(up, _mT(y), lower=False, transpose_a=True))  # X = Y U^-1
    d = ew.add(_mm(low, _tri(x_, True, -1)), _mm(_tri(x_, False), up))
    return [packed, perm], [d, tangent_perm]


def permutation_sign(perm: Any, dtype: Any) -> Any:
    """+1 or -1 per permutation: the parity of its inversions (pairs i < j, perm_i > perm_j)."""
    n = aval_of(perm).shape[-1]
    shape = (*aval_of(perm).shape, n)
    nd = len(shape)
    earlier = st.broadcast_in_dim(perm, shape, tuple(range(nd - 1)))  # (i, j) -> perm_i
    later = st.broadcast_in_dim(perm, shape, (*range(nd - 2), nd - 1))  # (i, j) -> perm_j
    inverted = ew.and_(ew.gt(earlier, later), _constant(~np.tri(n, n, 0, dtype=bool), earlier))
    count = reduce_sum(ew.convert(inverted, dtypes.int32), (nd - 2, nd - 1))
    odd = ew.convert(ew.rem(count, ew.full_like(count, 2)), dtype)
    return ew.sub(ew.full_like(odd, 1), ew.add(odd, odd))


# --- det -------------------------------------------------------------------------------------

det_p = _declare("det")


@det_p.def_abstract_eval
def _det_rule(x: ArrayType) -> ArrayType:
    _check_matrix("det", x, square=True)
    return ArrayType(x.shape[:-2], x.dtype)


def _det_impl(x):
    with np.errstate(all="ignore"):  # overflow is inf, as in a compiled kernel
        return np.asarray(np.linalg.det(x), dtype=x.dtype)


det_p.def_impl(_det_impl)


def det(x: Any) -> Any:
    """Determinant of each square matrix (LAPACK's LU on the NumPy backend)."""
    return det_p.bind(x)


def _adjugate(x: Any) -> Any:
    """``adj(x) = det(x) x^-1``, finite also where ``x`` is singular.

    From ``P x = L U`` with ``U = [[U1, u], [0, u_nn]]``: ``det(x) U^-1`` equals ``U'^-1`` applied
    after scaling all rows but the last by ``det(x)``, where ``U'`` is ``U`` with ``u_nn``
    replaced by ``1 / (sign(P) det(U1))``; no step divides by ``u_nn``, so a zero last pivot
    (the usual rank n-1 case) is fine. Where ``U1`` is singular too the adjugate is taken as 0:
    right for rank n-2 or less, wrong only for a rank n-1 matrix whose zero pivot comes early
    (JAX has the same limit).
    """
    n = aval_of(x).shape[-1]
    if n <= 1:
        return ew.full_like(x, 1)
    packed, perm = lu(x)
    d = _diag(packed)
    last = aval_of(d).ndim - 1
    leading = st.slice(d, [0] * (last + 1), (*aval_of(d).shape[:-1], n - 1))
    lead = ew.mul(permutation_sign(perm, aval_of(x).dtype), reduce_prod(leading, (last,)))
    full = ew.mul(lead, st.index_in_dim(d, n - 1, last))  # det(x)
    invertible = ew.ne(lead, ew.zeros_like(lead))
    safe = ew.select(invertible, lead, ew.full_like(lead, 1))
    corner = np.zeros((n, n), dtype=bool)
    corner[-1, -1] = True
    up = ew.select(_constant(corner, packed), _per_matrix(ew.div(ew.full_like(safe, 1), safe),
                                                          packed), packed)
    low = ew.add(_tri(packed, True, -1), _eye(packed))
    y = triangular_solve(low, permute_rows(_eye(packed), perm), lower=True)  # L^-1 P
    above_last = np.ones((n, n), dtype=bool)
    above_last[-1] = False
    y = ew.select(_constant(above_last, y), ew.mul(y, _per_matrix(full, y)), y)
    adj = triangular_solve(up, y, lower=False)
    return ew.select(_per_matrix(invertible, adj), adj, ew.zeros_like(adj))


@det_p.def_jvp
def _det_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    out = det(x)
    if isinstance(t, Zero):
        return out, Zero(out.aval)
    # d det(A) = trace(adj(A) dA), with the adjugate also defined for singular A.
    nd = aval_of(x).ndim
    return out, reduce_sum(ew.mul(_mT(_adjugate(x)), t), (nd - 2, nd - 1))


# --- eigh ------------------------------------------------------------------------------------

eigh_p = _declare("eigh", multiple_results=True)


@eigh_p.def_abstract_eval
def _eigh_rule(x: ArrayType) -> list[ArrayType]:
    _check_matrix("eigh", x, square=True)
    return [ArrayType(x.shape[:-1], dtypes.real_dtype(x.dtype)), ArrayType(x.shape, x.dtype)]


def _eigh_impl(x):
    w, v = np.linalg.eigh(_hermitian_part(x))
    return [w, v]


eigh_p.def_impl(_eigh_impl)


def eigh(x: Any) -> tuple[Any, Any]:
    """Eigenvalues (ascending, real) and eigenvectors (columns) of ``(x + x^H) / 2``."""
    w, v = eigh_p.bind(x)
    return w, v


@eigh_p.def_jvp
def _eigh_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    w, v = eigh(x)
    if isinstance(t, Zero):
        return [w, v], [Zero(w.aval), Zero(v.aval)]
    # With M = V^H dA V: dw = diag(M), dV = V (F * M), F[i, j] = 1 / (w_j - w_i) off the diagonal.
    m = _mm(_H(v), _mm(_symmetrize(t), v))
    return [w, v], [_real(_diag(m)), _mm(v, ew.mul(_inverse_gaps(w, m, lambda e: e), m))]


# --- eig -------------------------------------------------------------------------------------

eig_p = _declare("eig", multiple_results=True)


@eig_p.def_abstract_eval
def _eig_rule(x: ArrayType) -> list[ArrayType]:
    _check_matrix("eig", x, square=True)
    out = dtypes.complex_dtype(x.dtype)
    return [ArrayType(x.shape[:-1], out), ArrayType(x.shape, out)]


def _eig_impl(x):
    w, v = np.linalg.eig(x)
    out = dtypes.complex_dtype(x.dtype)
    return [w.astype(out, copy=False), v.astype(out, copy=False)]


eig_p.def_impl(_eig_impl)


def eig(x: Any) -> tuple[Any, Any]:
    """Eigenvalues and right eigenvectors (unit-norm columns) of a general square ``x``, always
    complex (NumPy returns real arrays when every eigenvalue happens to be real)."""
    w, v = eig_p.bind(x)
    return w, v


@eig_p.def_jvp
def _eig_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    w, v = eig(x)
    if isinstance(t, Zero):
        return [w, v], [Zero(w.aval), Zero(v.aval)]
    # With M = V^-1 dA V: dw = diag(M) and dV = V (F * M), F[i, j] = 1 / (w_j - w_i) off the
    # diagonal; then remove from each dv_j its real part along v_j, which keeps |v_j| = 1.
    m = lu_solve(*lu(v), _mm(_like(t, v), v))
    dv = _mm(v, ew.mul(_inverse_gaps(w, m, lambda e: e), m))
    along = _real(reduce_sum(ew.mul(ew.conj(v), dv), (aval_of(v).ndim - 2,)))
    dv = ew.sub(dv, ew.mul(v, _like(_row(along, v), v)))
    return [w, v], [_diag(m), dv]


# --- svd -------------------------------------------------------------------------------------

svd_p = _declare("svd", multiple_results=True)


@svd_p.def_abstract_eval
def _svd_rule(x: ArrayType, *, full_matrices: bool) -> list[ArrayType]:
    _check_matrix("svd", x)
    *batch, m, n = x.shape
    k = min(m, n)
    cols_u, rows_vh = (m, n) if full_matrices else (k, k)
    return [ArrayType((*batch, m, cols_u), x.dtype),
            ArrayType((*batch, k), dtypes.real_dtype(x.dtype)),
            ArrayType((*batch, rows_vh, n), x.dtype)]


def _svd_impl(x, *, full_matrices):
    u, s, vh = np.linalg.svd(x, full_matrices=full_matrices)
    return [u, s, vh]


svd_p.def_impl(_svd_impl)


def svd(x: Any, full_matrices: bool = True) -> tuple[Any, Any, Any]:
    """``(U, S, Vh)`` with ``x = U[..., :k] * S @ Vh[..., :k, :]``, ``S`` descending."""
    u, s, vh = svd_p.bind(x, full_matrices=bool(full_matrices))
    return u, s, vh


@svd_p.def_jvp
def _svd_jvp(primals, tangents, *, full_matrices):
    (x,), (t,) = primals, tangents
    u, s, vh = svd(x, full_matrices)
    if isinstance(t, Zero):
        return [u, s, vh], [Zero(u.aval), Zero(s.aval), Zero(vh.aval)]
    m, n = aval_of(x).shape[-2:]
    if full_matrices and m != n:
        raise op_error(UnsupportedError, "svd", f"the derivative of svd(full_matrices=True) of "
                       f"a {m}x{n} matrix is not defined (the extra singular vectors are not "
                       "unique); use full_matrices=False")
    v = _H(vh)
    dp = _mm(_H(u), _mm(t, v))  # U^H dA V, k x k
    sj = _like(_row(s, dp), dp)  # s_j in column j
    si = _like(_col(s, dp), dp)  # s_i in row i
    f = _inverse_gaps(s, dp, lambda v: ew.mul(v, v))
    dps = ew.mul(dp, sj)  # dP S
    sdp = ew.mul(si, dp)  # S dP
    inner_u = ew.mul(f, ew.add(dps, _H(dps)))
    if _is_complex(dp):  # the phase of each pair of singular vectors: put it all on U
        inner_u = ew.add(inner_u, ew.div(_imaginary_diagonal(dp), sj))
    du = _mm(u, inner_u)
    dv = _mm(v, ew.mul(f, ew.add(sdp, _H(sdp))))
    # Directions outside the span of U (tall) or V (wide): (I - U U^H) dA V / S and its mirror.
    if m > n:
        dav = _mm(t, v)
        du = ew.add(du, ew.div(ew.sub(dav, _mm(u, _mm(_H(u), dav))), _like(_row(s, dav), dav)))
    if n > m:
        dau = _mm(_H(t), u)
        dv = ew.add(dv, ew.div(ew.sub(dau, _mm(v, _mm(vh, dau))), _like(_row(s, dau), dau)))
    return [u, s, vh], [du, _real(_diag(dp)), _H(dv)]


# --- qr --------------------------------------------------------------------------------------

qr_p = _declare("qr", multiple_results=True)


@qr_p.def_abstract_eval
def _qr_rule(x: ArrayType, *, full_matrices: bool) -> list[ArrayType]:
    _check_matrix("qr", x)
    *batch, m, n = x.shape
    k = m if full_matrices else min(m, n)
    return [ArrayType((*batch, m, k), x.dtype), ArrayType((*batch, k, n), x.dtype)]


def _qr_impl(x, *, full_matrices):
    q, r = np.linalg.qr(x, mode="complete" if full_matrices else "reduced")
    return [q, r]


qr_p.def_impl(_qr_impl)


def qr(x: Any, full_matrices: bool = False) -> tuple[Any, Any]:
    """``(Q, R)`` with ``x = Q @ R``, ``Q`` orthonormal columns, ``R`` upper triangular with a
    real diagonal."""
    q, r = qr_p.bind(x, full_matrices=bool(full_matrices))
    return q, r


@qr_p.def_jvp
def _qr_jvp(primals, tangents, *, full_matrices):
    (x,), (t,) = primals, tangents
    q, r = qr(x, full_matrices)
    if isinstance(t, Zero):
        return [q, r], [Zero(q.aval), Zero(r.aval)]
    *batch, m, n = aval_of(x).shape
    if full_matrices and m > n:
        raise op_error(UnsupportedError, "qr", f"the derivative of qr(mode='complete') of a "
                       f"{m}x{n} matrix is not defined (the extra columns of Q are not unique); "
                       "use mode='reduced'")
    # A wide matrix [A1 A2] factors as Q [R1 Q^H A2]: differentiate the square part, then
    # R2 = Q^H A2 by the product rule.
    k = min(m, n)
    lead = [0] * len(batch)
    r1 = st.slice(r, [*lead, 0, 0], [*batch, k, k])
    t1 = st.slice(t, [*lead, 0, 0], [*batch, m, k])
    # With C = Q^H dA R^-1: Q^H dQ = Omega, skew-Hermitian, from C's strict lower triangle (and,
    # for complex x, the imaginary part of its diagonal, which keeps R's diagonal real).
    dx_rinv = _mT(triangular_solve(r1, _mT(t1), lower=False, transpose_a=True))
    c = _mm(_H(q), dx_rinv)
    low = _tri(c, True, -1)
    omega = ew.sub(low, _H(low))
    if _is_complex(c):
        omega = ew.add(omega, _imaginary_diagonal(c))
    dq = ew.add(_mm(q, ew.sub(omega, c)), dx_rinv)
    dr = _mm(ew.sub(c, omega), r1)
    if n > m:
        x2 = st.slice(x, [*lead, 0, m], [*batch, m, n])
        t2 = st.slice(t, [*lead, 0, m], [*batch, m, n])
        dr2 = ew.add(_mm(_H(dq), x2), _mm(_H(q), t2))
        dr = st.concatenate([dr, dr2], len(batch) + 1)
    return [q, r], [dq, dr]
