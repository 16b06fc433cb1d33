"""``ember.numpy.linalg``: the array API's ``linalg`` extension (2023.12) with NumPy's names.

Factorisations bind the primitives of :mod:`ember.ops.decompositions`; everything else is
composed from them, so gradients, ``jit`` and ``vmap`` come for free: ``slogdet``, ``solve`` and
``inv`` from ``lu`` and triangular solves, ``pinv``, ``matrix_rank``, ``svdvals``, ``lstsq``,
``cond`` and the spectral norms from ``svd``, ``eigvalsh`` from ``eigh``, ``eigvals`` from
``eig``. Every function takes stacks of matrices in the last two axes. Integer inputs compute in
float64 and half precision in float32 (rounded back), since LAPACK has neither. Complex matrices
work wherever NumPy's do: Hermitian ``eigh``, unitary ``qr`` and ``svd``, with real eigenvalues,
singular values and ``logabsdet``.

Like JAX, and unlike NumPy, a failed factorisation does not raise: it gives NaN (``cholesky`` of
a matrix that is not positive definite, ``solve``/``inv`` of a singular one). Symmetric inputs
of ``cholesky``, ``eigh`` and ``eigvalsh`` are symmetrised, ``(x + x^H) / 2``, where NumPy reads
the lower triangle (``UPLO='L'`` asks for that): the same for a symmetric ``x``, and it makes
their gradients symmetric.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import numpy as np

from ember import dtypes
from ember.core.trace import aval_of
from ember.errors import EmberValueError, ShapeError, op_error
from ember.numpy._core import broadcast_shapes, float_dtype, normalize_axis_arg, promote_args, value
from ember.numpy._creation import eye, tril, triu
from ember.numpy._linalg import matmul, matrix_transpose, outer, tensordot, vecdot
from ember.numpy._math import conj, where
from ember.numpy._reductions import max as max_
from ember.numpy._reductions import min as min_
from ember.numpy._reductions import sum as sum_
from ember.numpy._shape import expand_dims, moveaxis
from ember.numpy._shape_more import diagonal as diagonal_
from ember.ops import decompositions as dec
from ember.ops import elementwise as ew
from ember.ops import structural as st
from ember.ops.reduce import reduce_prod, reduce_sum

__all__ = ["cholesky", "cond", "cross", "det", "diagonal", "eig", "eigh", "eigvals", "eigvalsh",
           "inv", "lstsq", "matmul", "multi_dot", "matrix_norm", "matrix_power", "matrix_rank",
           "matrix_transpose", "norm", "outer", "pinv", "qr", "slogdet", "solve", "svd", "svdvals",
           "tensordot", "tensorinv", "tensorsolve", "trace", "vecdot", "vector_norm", "EigResult",
           "EighResult", "QRResult", "SlogdetResult", "SVDResult"]


class EigResult(NamedTuple):
    eigenvalues: Any
    eigenvectors: Any


class EighResult(NamedTuple):
    eigenvalues: Any
    eigenvectors: Any


class QRResult(NamedTuple):
    Q: Any
    R: Any


class SlogdetResult(NamedTuple):
    sign: Any
    logabsdet: Any


class SVDResult(NamedTuple):
    U: Any
    S: Any
    Vh: Any


# --- operands --------------------------------------------------------------------------------

def _matrices(op: str, x: Any, square: bool = False) -> tuple[Any, np.dtype]:
    """``x`` as a stack of matrices in a dtype LAPACK computes in, and the result dtype."""
    v = value(x)
    shape, dt = aval_of(v).shape, aval_of(v).dtype
    if len(shape) < 2:
        raise op_error(ShapeError, op, f"needs a matrix or a stack of matrices (at least 2 "
                       f"dimensions), got shape {shape}")
    if square and shape[-1] != shape[-2]:
        raise op_error(ShapeError, op, f"needs square matrices in the last two dimensions, got "
                       f"shape {shape}")
    out = dt if dtypes.is_inexact(dt) else dtypes.float64
    compute = dtypes.float32 if out in (dtypes.float16, dtypes.bfloat16) else out
    return ew.convert(v, compute), out


def _cast(x: Any, dtype: np.dtype) -> Any:
    return x if aval_of(x).dtype == dtype else ew.convert(x, dtype)


def _adjoint(x: Any) -> Any:
    return conj(matrix_transpose(x))


def _eye_like(a: Any) -> Any:
    """Identity matrices shaped and typed like the stack ``a``."""
    shape = aval_of(a).shape
    return st.broadcast_to_shape(eye(shape[-2], shape[-1], dtype=aval_of(a).dtype), shape)


# --- factorisations --------------------------------------------------------------------------

def cholesky(x: Any, /, *, upper: bool = False) -> Any:
    """Cholesky factor of a Hermitian positive-definite ``x``: lower ``L`` with ``x = L L^H``
    (``upper=True``: ``U = L^H``). NaN for a matrix that is not positive definite."""
    a, out = _matrices("cholesky", x, square=True)
    low = dec.cholesky(a)
    return _cast(_adjoint(low) if upper else low, out)


def qr(x: Any, /, *, mode: str = "reduced") -> Any:
    """``QRResult(Q, R)`` with ``x = Q @ R``; ``mode`` is 'reduced', 'complete' or 'r' (R only,
    as NumPy)."""
    if mode not in ("reduced", "complete", "r"):
        raise op_error(EmberValueError, "qr", f"mode={mode!r} is not one of 'reduced', "
                       "'complete', 'r'")
    a, out = _matrices("qr", x)
    q, r = dec.qr(a, full_matrices=mode == "complete")
    if mode == "r":
        return _cast(r, out)
    return QRResult(_cast(q, out), _cast(r, out))


def _from_triangle(op: str, a: Any, uplo: str | None) -> Any:
    """The Hermitian matrix NumPy's ``UPLO`` names: built from the lower ('L') or upper ('U')
    triangle of ``a``; ``None`` keeps ``a`` (the primitives use ``(a + a^H) / 2``, as JAX)."""
    if uplo is None:
        return a
    if uplo not in ("L", "U"):
        raise op_error(EmberValueError, op, f"UPLO={uplo!r} is not one of 'L', 'U', None")
    tri = tril(a) if uplo == "L" else triu(a)
    strict = tril(a, -1) if uplo == "L" else triu(a, 1)
    return ew.add(tri, _adjoint(strict))


def eigh(x: Any, /, UPLO: str | None = None) -> EighResult:  # noqa: N803
    """``EighResult(eigenvalues, eigenvectors)`` of a Hermitian ``x``: real eigenvalues
    ascending, eigenvectors as columns. Gradients need distinct eigenvalues. ``UPLO='L'`` or
    ``'U'`` reads one triangle, as NumPy (whose default is 'L')."""
    a, out = _matrices("eigh", x, square=True)
    w, v = dec.eigh(_from_triangle("eigh", a, UPLO))
    return EighResult(_cast(w, dtypes.real_dtype(out)), _cast(v, out))


def eigvalsh(x: Any, /, UPLO: str | None = None) -> Any:  # noqa: N803
    """Eigenvalues of a Hermitian ``x``, ascending (``UPLO`` as in :func:`eigh`)."""
    return eigh(x, UPLO).eigenvalues


def eig(x: Any, /) -> EigResult:
    """``EigResult(eigenvalues, eigenvectors)`` of a general square ``x``: unit-norm right
    eigenvectors as columns. Always complex, where NumPy returns real arrays when all
    eigenvalues happen to be real (a dtype that would depend on the data). Gradients need
    distinct eigenvalues."""
    a, out = _matrices("eig", x, square=True)
    w, v = dec.eig(a)
    out = dtypes.complex_dtype(out)
    return EigResult(_cast(w, out), _cast(v, out))


def eigvals(x: Any, /) -> Any:
    """Eigenvalues of a general square ``x``, complex (see :func:`eig`)."""
    return eig(x).eigenvalues


def svd(x: Any, /, full_matrices: bool = True, compute_uv: bool = True,
        hermitian: bool = False) -> Any:
    """``SVDResult(U, S, Vh)`` with ``x = U[..., :k] * S @ Vh[..., :k, :]`` and ``S``
    descending (``compute_uv=False``: ``S`` only, as NumPy). Gradients need distinct non-zero
    singular values, and ``full_matrices=False`` for a non-square ``x``. ``hermitian`` is
    NumPy's hint that ``x`` is Hermitian; the general SVD serves either way."""
    a, out = _matrices("svd", x)
    u, s, vh = dec.svd(a, full_matrices=bool(full_matrices) and compute_uv)
    s = _cast(s, dtypes.real_dtype(out))
    if not compute_uv:
        return s
    return SVDResult(_cast(u, out), s, _cast(vh, out))


def svdvals(x: Any, /) -> Any:
    """Singular values of ``x``, descending."""
    return svd(x, full_matrices=False, compute_uv=False)


# --- determinants and solves (from LU) -------------------------------------------------------

def det(x: Any, /) -> Any:
    """Determinant. Its gradient is the cofactor matrix, also at a singular ``x`` (except a
    rank n-1 one whose LU meets its zero pivot before the last step)."""
    a, out = _matrices("det", x, square=True)
    return _cast(dec.det(a), out)


def slogdet(x: Any, /) -> SlogdetResult:
    """``SlogdetResult(sign, logabsdet)`` from the diagonal of ``lu(x)``, with
    ``det = sign * exp(logabsdet)``; a singular matrix gives ``(0, -inf)``. For complex ``x``
    the sign is ``det / |det|`` and has a derivative."""
    a, out = _matrices("slogdet", x, square=True)
    packed, perm = dec.lu(a)
    d = diagonal_(packed, 0, -2, -1)
    sign = dec.permutation_sign(perm, aval_of(a).dtype)
    last = (aval_of(d).ndim - 1,)
    size = ew.abs(d)
    if dtypes.is_complex(aval_of(d).dtype):
        nonzero = ew.ne(size, ew.zeros_like(size))
        safe = ew.convert(where(nonzero, size, ew.full_like(size, 1)), aval_of(d).dtype)
        phase = where(nonzero, ew.div(d, safe), ew.zeros_like(d))
    else:
        phase = ew.sign(d)
    sign = ew.mul(sign, reduce_prod(phase, last))
    logabsdet = reduce_sum(ew.log(size), last)
    return SlogdetResult(_cast(sign, out), _cast(logabsdet, dtypes.real_dtype(out)))


def solve(x1: Any, x2: Any, /) -> Any:
    """Solve ``x1 @ x = x2``. ``x2`` of shape ``(M,)`` is one vector; otherwise it is a stack of
    ``(M, K)`` matrices whose batch dimensions broadcast with ``x1``'s (array API, NumPy 2)."""
    a, out_a = _matrices("solve", x1, square=True)
    b = value(x2)
    sa, sb = aval_of(a).shape, aval_of(b).shape
    vector = len(sb) == 1
    if not sb or sb[-1 if vector else -2] != sa[-1]:
        raise op_error(ShapeError, "solve", f"x2 of shape {sb} does not fit x1 of shape {sa}: "
                       f"x2 needs {sa[-1]} rows (shape ({sa[-1]},) or (..., {sa[-1]}, K))")
    out = dtypes.result_type(out_a, aval_of(b).dtype)
    compute = aval_of(a).dtype if out in (dtypes.float16, dtypes.bfloat16) else out
    a, b = ew.convert(a, compute), ew.convert(b, compute)
    if vector:
        b = st.reshape(b, (sb[0], 1))
    batch = broadcast_shapes("solve", sa[:-2], aval_of(b).shape[:-2])
    b = st.broadcast_to_shape(b, (*batch, *aval_of(b).shape[-2:]))
    if batch and int(np.prod(sa[:-2], dtype=np.int64)) == 1:
        x = _solve_columns(st.reshape(a, sa[-2:]), b)
    else:
        x = dec.lu_solve(*dec.lu(st.broadcast_to_shape(a, (*batch, *sa[-2:]))), b)
    if vector:
        x = st.reshape(x, (*batch, sa[-1]))
    return _cast(x, out)


def _solve_columns(a: Any, b: Any) -> Any:
    """One matrix ``a`` for a stack ``b``: factor ``a`` once and solve every column of the
    stack as one ``(M, batch * K)`` right-hand side."""
    shape = aval_of(b).shape
    nd = len(shape)
    columns = st.transpose(b, (nd - 2, *range(nd - 2), nd - 1))
    width = int(np.prod(shape, dtype=np.int64)) // shape[-2] if shape[-2] else 0
    x = dec.lu_solve(*dec.lu(a), st.reshape(columns, (shape[-2], width)))
    x = st.reshape(x, aval_of(columns).shape)
    return st.transpose(x, (*range(1, nd - 1), 0, nd - 1))


def tensorinv(a: Any, ind: int = 2) -> Any:
    """``numpy.linalg.tensorinv``: the inverse of ``a`` seen as a matrix whose rows are its
    first ``ind`` axes, shaped ``a.shape[ind:] + a.shape[:ind]``."""
    x = value(a)
    shape = aval_of(x).shape
    rows = int(np.prod(shape[:ind], dtype=np.int64))
    if ind <= 0 or rows != int(np.prod(shape[ind:], dtype=np.int64)):
        raise op_error(ShapeError, "tensorinv", f"the first {ind} axes of shape {shape} must "
                       "hold as many elements as the rest (ind > 0)")
    return st.reshape(inv(st.reshape(x, (rows, rows))), (*shape[ind:], *shape[:ind]))


def tensorsolve(a: Any, b: Any, axes: Any = None) -> Any:
    """``numpy.linalg.tensorsolve``: ``x`` with ``tensordot(a, x, x.ndim) == b``; ``axes`` of
    ``a`` are first moved to the end."""
    x, y = value(a), value(b)
    if axes is not None:
        x = moveaxis(x, tuple(axes), tuple(range(-len(tuple(axes)), 0)))
    shape, rhs = aval_of(x).shape, aval_of(y).shape
    rows = int(np.prod(rhs, dtype=np.int64))
    unknown = shape[len(rhs):]
    if int(np.prod(shape[:len(rhs)], dtype=np.int64)) != rows or \
            int(np.prod(unknown, dtype=np.int64)) != rows:
        raise op_error(ShapeError, "tensorsolve", f"a of shape {shape} does not fit b of shape "
                       f"{rhs}: a's first {len(rhs)} axes and the rest must each hold b.size "
                       "elements")
    solution = solve(st.reshape(x, (rows, rows)), st.reshape(y, (rows,)))
    return st.reshape(solution, unknown)


def inv(x: Any, /) -> Any:
    """Inverse of each square matrix (NaN/inf for a singular one)."""
    a, out = _matrices("inv", x, square=True)
    return _cast(dec.lu_solve(*dec.lu(a), _eye_like(a)), out)


def matrix_power(x: Any, n: int, /) -> Any:
    """``x`` multiplied by itself ``n`` times, by repeated squaring; ``n < 0`` inverts first,
    ``n == 0`` gives identity matrices. The dtype is kept for ``n >= 0`` (as NumPy)."""
    try:
        power = operator.index(n)
    except TypeError:
        raise op_error(EmberValueError, "matrix_power", f"n must be an integer, got "
                       f"{type(n).__name__}") from None
    a = value(x)
    shape = aval_of(a).shape
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise op_error(ShapeError, "matrix_power", f"needs square matrices in the last two "
                       f"dimensions, got shape {shape}")
    if power == 0:
        return _eye_like(a)
    if power < 0:
        a, power = inv(a), -power
    result = None
    while True:
        if power & 1:
            result = a if result is None else matmul(result, a)
        power >>= 1
        if not power:
            return result
        a = matmul(a, a)


# --- from svd --------------------------------------------------------------------------------

def _cutoff(op: str, s: Any, shape: tuple[int, ...], rtol: Any) -> Any:
    """``rtol * largest singular value`` per matrix, keeping a last axis to compare ``s``."""
    if rtol is None:
        rtol = max(shape[-2:]) * float(np.finfo(aval_of(s).dtype).eps)
    tol = value(rtol)
    if aval_of(tol).ndim:  # one tolerance per matrix of the stack
        tol = expand_dims(tol, -1)
    largest = max_(s, axis=-1, keepdims=True) if aval_of(s).shape[-1] else s
    return ew.mul(*promote_args(op, largest, ew.convert(tol, aval_of(s).dtype)))


def matrix_rank(x: Any, /, tol: Any = None, hermitian: bool = False, *, rtol: Any = None
                ) -> Any:
    """Number of singular values above ``tol`` (absolute) or ``rtol * largest`` (default
    ``rtol = max(M, N) * eps``), as int64. ``hermitian`` as in :func:`svd`."""
    a, _ = _matrices("matrix_rank", x)
    s = svdvals(a)
    cutoff = value(tol) if tol is not None else _cutoff("matrix_rank", s, aval_of(a).shape, rtol)
    if tol is not None and aval_of(cutoff).ndim:
        cutoff = expand_dims(cutoff, -1)
    big = ew.gt(*promote_args("matrix_rank", s, cutoff))
    return sum_(big, axis=-1, dtype=dtypes.int64)


def _svd_inverse(op: str, a: Any, rtol: Any) -> tuple[Any, Any, Any, Any]:
    """The pseudo-inverse of ``a`` as two factors, ``V / S`` and ``U^H`` (singular values at
    most ``rtol * largest`` count as zero), plus ``S`` and the mask of those kept."""
    u, s, vh = dec.svd(a, full_matrices=False)
    keep = ew.gt(*promote_args(op, s, _cutoff(op, s, aval_of(a).shape, rtol)))
    # Divide only where kept, so a zero singular value gives no inf (nor a NaN gradient).
    one = ew.full_like(s, 1)
    s_inv = where(keep, ew.div(one, where(keep, s, one)), ew.zeros_like(s))
    v = _adjoint(vh)
    nd = aval_of(v).ndim
    s_inv = ew.convert(s_inv, aval_of(v).dtype)
    scaled = ew.mul(v, st.broadcast_in_dim(s_inv, aval_of(v).shape, (*range(nd - 2), nd - 1)))
    return scaled, _adjoint(u), s, keep


def pinv(x: Any, /, rcond: Any = None, hermitian: bool = False, *, rtol: Any = None) -> Any:
    """Moore-Penrose pseudo-inverse from the SVD: singular values at most ``rtol * largest``
    (default ``max(M, N) * eps``) count as zero. ``rcond`` is NumPy's older name for ``rtol``;
    ``hermitian`` as in :func:`svd`."""
    a, out = _matrices("pinv", x)
    scaled, u_h, _, _ = _svd_inverse("pinv", a, rtol if rcond is None else rcond)
    return _cast(matmul(scaled, u_h), out)


def lstsq(a: Any, b: Any, rcond: Any = None) -> tuple[Any, Any, Any, Any]:
    """``numpy.linalg.lstsq``: ``(x, residuals, rank, s)`` for the ``x`` minimising
    ``|b - a @ x|``, from the SVD (singular values at most ``rcond * largest`` count as zero,
    default ``max(M, N) * eps`` of the input's precision). ``a`` is one ``(M, N)`` matrix, ``b``
    is ``(M,)`` or ``(M, K)``; ``rank`` is int32, as NumPy's. Unlike NumPy, ``residuals``
    (shape ``(K,)``, ``(1,)`` for a vector ``b``) is always computed: NumPy returns it empty for
    rank-deficient or wide ``a``, a shape that would depend on the data."""
    m, out_a = _matrices("lstsq", a)
    rhs = value(b)
    sa, sb = aval_of(m).shape, aval_of(rhs).shape
    if len(sa) != 2 or len(sb) not in (1, 2) or sb[0] != sa[0]:
        raise op_error(ShapeError, "lstsq", f"needs a of shape (M, N) and b of shape (M,) or "
                       f"(M, K), got {sa} and {sb}")
    out = dtypes.result_type(out_a, aval_of(rhs).dtype)
    compute = aval_of(m).dtype if out in (dtypes.float16, dtypes.bfloat16) else out
    m, rhs = ew.convert(m, compute), ew.convert(rhs, compute)
    columns = st.reshape(rhs, (sa[0], 1)) if len(sb) == 1 else rhs
    scaled, u_h, s, keep = _svd_inverse("lstsq", m, rcond)
    x = matmul(scaled, matmul(u_h, columns))
    residual = ew.abs(ew.sub(columns, matmul(m, x)))
    real = dtypes.real_dtype(out)
    return (_cast(st.reshape(x, (sa[1],)) if len(sb) == 1 else x, out),
            _cast(sum_(ew.mul(residual, residual), axis=0), real),
            sum_(keep, axis=-1, dtype=dtypes.int32), _cast(s, real))


def cond(x: Any, p: Any = None) -> Any:
    """Condition number (``numpy.linalg.cond``): largest over smallest singular value for
    ``p`` None or 2 (-2: the inverse ratio), else ``norm(x, p) * norm(inv(x), p)``."""
    if p in (None, 2, -2):
        s = svdvals(x)
        last = aval_of(s).ndim - 1
        big = st.index_in_dim(s, 0, last)
        small = st.index_in_dim(s, aval_of(s).shape[-1] - 1, last)
        return ew.div(small, big) if p == -2 else ew.div(big, small)
    return ew.mul(matrix_norm(x, ord=p), matrix_norm(inv(x), ord=p))


# --- products and structure ------------------------------------------------------------------

def multi_dot(arrays: Any, *, out: Any = None) -> Any:
    """``numpy.linalg.multi_dot``: the product of a chain of matrices, multiplied in the order
    that needs the fewest scalar multiplications (chosen from the shapes, as NumPy). The first
    array may be 1-D (a row vector) and the last 1-D (a column vector)."""
    if out is not None:
        raise op_error(EmberValueError, "multi_dot", "out= is not supported (arrays are values)")
    xs = [value(a) for a in arrays]
    if len(xs) < 2:
        raise op_error(EmberValueError, "multi_dot", f"needs at least two arrays, got {len(xs)}")
    shapes = [aval_of(x).shape for x in xs]
    inner = [i for i, sh in enumerate(shapes) if len(sh) != 2 and 0 < i < len(xs) - 1]
    if inner or len(shapes[0]) not in (1, 2) or len(shapes[-1]) not in (1, 2):
        raise op_error(ShapeError, "multi_dot", f"needs 2-D arrays (1-D allowed first and last), "
                       f"got shapes {shapes}")
    # dims[i], dims[i + 1]: the shape of the i-th matrix (a vector end counts as one row/column).
    dims = [shapes[0][0] if len(shapes[0]) == 2 else 1] + [sh[-1] if len(sh) == 2 else 1
                                                            for sh in shapes]
    n = len(xs)
    cost = [[0] * n for _ in range(n)]
    split = [[0] * n for _ in range(n)]
    for length in range(1, n):
        for i in range(n - length):
            j = i + length
            cost[i][j], split[i][j] = min(
                (cost[i][k] + cost[k + 1][j] + dims[i] * dims[k + 1] * dims[j + 1], k)
                for k in range(i, j))

    def product(i: int, j: int) -> Any:
        if i == j:
            return xs[i]
        k = split[i][j]
        return matmul(product(i, k), product(k + 1, j))

    return product(0, n - 1)


def cross(x1: Any, x2: Any, /, *, axis: int = -1) -> Any:
    """Cross product of 3-vectors along ``axis``; the other axes broadcast."""
    a, b = value(x1), value(x2)
    moved = []
    for v in (a, b):
        shape = aval_of(v).shape
        (ax,) = normalize_axis_arg("cross", axis, len(shape))
        if shape[ax] != 3:
            raise op_error(ShapeError, "cross", f"needs vectors of 3 elements along axis {axis}, "
                           f"got shapes {aval_of(a).shape} and {aval_of(b).shape}")
        moved.append(moveaxis(v, ax, -1))
    a, b = promote_args("cross", *moved)
    nd = aval_of(a).ndim
    ai = [st.index_in_dim(a, i, nd - 1) for i in range(3)]
    bi = [st.index_in_dim(b, i, nd - 1) for i in range(3)]
    parts = [ew.sub(ew.mul(ai[(i + 1) % 3], bi[(i + 2) % 3]),
                    ew.mul(ai[(i + 2) % 3], bi[(i + 1) % 3])) for i in range(3)]
    out = st.concatenate([st.expand_dims(p, nd - 1) for p in parts], nd - 1)
    return moveaxis(out, -1, axis if axis < 0 else min(axis, nd - 1))


def diagonal(x: Any, /, *, offset: int = 0) -> Any:
    """The ``offset`` diagonal of each matrix (last two axes)."""
    return diagonal_(x, offset, -2, -1)


def trace(x: Any, /, *, offset: int = 0, dtype: Any = None) -> Any:
    """Sum of the ``offset`` diagonal of each matrix (last two axes). Small integers sum in
    int64 (uint64 if unsigned), as the array API and NumPy."""
    return sum_(diagonal(x, offset=offset), axis=-1, dtype=dtype)


# --- norms -----------------------------------------------------------------------------------

def vector_norm(x: Any, /, *, axis: Any = None, keepdims: bool = False, ord: Any = 2) -> Any:
    v = value(x)
    v = ew.convert(v, float_dtype(aval_of(v).dtype))
    a = ew.abs(v)
    if ord == 2:
        return ew.sqrt(sum_(ew.mul(a, a), axis, keepdims=keepdims))
    if ord == 1:
        return sum_(a, axis, keepdims=keepdims)
    if ord in (np.inf, float("inf")):
        return max_(a, axis, keepdims=keepdims)
    if ord in (-np.inf, float("-inf")):
        return min_(a, axis, keepdims=keepdims)
    if ord == 0:
        return sum_(ew.convert(ew.ne(a, ew.zeros_like(a)), aval_of(a).dtype), axis,
                    keepdims=keepdims)
    p = ew.full_like(a, ord)
    s = sum_(ew.pow(a, p), axis, keepdims=keepdims)
    return ew.pow(s, ew.full_like(s, 1.0 / ord))


_MATRIX_ORDS = ("fro", "nuc", 1, -1, 2, -2, np.inf, -np.inf)


def matrix_norm(x: Any, /, *, keepdims: bool = False, ord: Any = "fro") -> Any:
    """Matrix norms of the array API: 'fro', 'nuc' (sum of singular values), 1 / -1 (largest /
    smallest absolute column sum), inf / -inf (rows), 2 / -2 (largest / smallest singular
    value)."""
    v = value(x)
    if ord in ("fro", None):
        return vector_norm(v, axis=(-2, -1), keepdims=keepdims)
    if ord not in _MATRIX_ORDS:
        raise op_error(EmberValueError, "matrix_norm", f"ord={ord!r} is not one of 'fro', "
                       "'nuc', 1, -1, 2, -2, inf, -inf")
    if ord in ("nuc", 2, -2):
        a, out = _matrices("matrix_norm", v)
        s = svdvals(a)
        pick = sum_ if ord == "nuc" else max_ if ord == 2 else min_
        result = _cast(pick(s, axis=-1), dtypes.real_dtype(out))
        return expand_dims(result, (-2, -1)) if keepdims else result
    a = ew.abs(ew.convert(v, float_dtype(aval_of(v).dtype)))
    pick = max_ if ord > 0 else min_
    # ord 1 sums each column (over rows, axis -2) and picks among columns; inf the reverse.
    summed, picked = (-2, -1) if abs(ord) == 1 else (-1, -2)
    sums = sum_(a, summed, keepdims=keepdims)
    return pick(sums, picked if keepdims else -1, keepdims=keepdims)


def norm(x: Any, ord: Any = None, axis: Any = None, keepdims: bool = False) -> Any:
    """``numpy.linalg.norm``: vector norms over one axis, matrix norms over two."""
    v = value(x)
    nd = aval_of(v).ndim
    if axis is None and ord is None:
        return vector_norm(v, axis=None, keepdims=keepdims)
    axes = normalize_axis_arg("norm", axis, nd) if axis is not None else tuple(range(nd))
    if len(axes) == 1:
        return vector_norm(v, axis=axes, keepdims=keepdims, ord=2 if ord is None else ord)
    if len(axes) == 2:
        out = matrix_norm(moveaxis(v, axes, (-2, -1)), ord="fro" if ord is None else ord)
        return expand_dims(out, tuple(sorted(axes))) if keepdims else out
    raise op_error(EmberValueError, "norm", f"improper number of dimensions to norm: {axes}")
