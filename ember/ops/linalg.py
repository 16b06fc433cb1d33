"""``dot_general``: the one contraction primitive that matmul, einsum and tensordot lower to.

Output axes are ordered: batch axes, then the free axes of ``lhs``, then those of ``rhs`` (each
in increasing order). Half-precision products accumulate in float32, as on accelerators.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ember import dtypes
from ember.core.primitive import Primitive
from ember.core.trace import UndefinedPrimal, Zero, aval_of
from ember.errors import ShapeError, op_error
from ember.ir.types import ArrayType
from ember.ops import elementwise as ew
from ember.ops import structural as st
from ember.ops._checks import normalize_axes, same_dtypes

__all__ = ["dot_general"]

Dims = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]

dot_general_p = Primitive("dot_general", kind="contraction")


def _free(ndim: int, contract: Sequence[int], batch: Sequence[int]) -> list[int]:
    return [i for i in range(ndim) if i not in contract and i not in batch]


@dot_general_p.def_abstract_eval
def _dot_rule(lhs: ArrayType, rhs: ArrayType, *, dims: Dims) -> ArrayType:
    (lc, rc), (lb, rb) = dims
    same_dtypes("dot_general", (lhs, rhs))
    for side, aval, axes in (("lhs", lhs, lc + lb), ("rhs", rhs, rc + rb)):
        normalize_axes(f"dot_general ({side})", axes, aval.ndim)
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise op_error(ShapeError, "dot_general", f"unpaired dimensions in {dims}")
    for a, b in zip(lc + lb, rc + rb):
        if lhs.shape[a] != rhs.shape[b]:
            raise op_error(ShapeError, "dot_general",
                           f"shapes {lhs.shape} and {rhs.shape} not aligned: dimension {a} of "
                           f"lhs ({lhs.shape[a]}) != dimension {b} of rhs ({rhs.shape[b]})")
    shape = (tuple(lhs.shape[i] for i in lb)
             + tuple(lhs.shape[i] for i in _free(lhs.ndim, lc, lb))
             + tuple(rhs.shape[i] for i in _free(rhs.ndim, rc, rb)))
    return ArrayType(shape, lhs.dtype, weak=lhs.weak and rhs.weak)


def _dot_impl(lhs, rhs, *, dims):
    (lc, rc), (lb, rb) = dims
    lf, rf = _free(lhs.ndim, lc, lb), _free(rhs.ndim, rc, rb)
    out_dtype = lhs.dtype
    if out_dtype in (dtypes.float16, dtypes.bfloat16):
        lhs, rhs = lhs.astype(np.float32), rhs.astype(np.float32)
    if not lb:
        a, b = _as_matrix(lhs, lc), _as_matrix(rhs, rc)
        if a is not None and b is not None:
            # A matrix product in disguise (a linear layer on [batch, length, features], or its
            # weight gradient): hand BLAS 2-D views, transposed where needed, and no copies.
            out = np.matmul(a, b.T).reshape([lhs.shape[i] for i in lf] +
                                             [rhs.shape[i] for i in rf])
            return out.astype(out_dtype, copy=False)
    bshape = [lhs.shape[i] for i in lb]
    lfs, rfs = [lhs.shape[i] for i in lf], [rhs.shape[i] for i in rf]
    k = int(np.prod([lhs.shape[i] for i in lc], dtype=np.int64))
    a = np.transpose(lhs, (*lb, *lf, *lc)).reshape(
        (int(np.prod(bshape, dtype=np.int64)), int(np.prod(lfs, dtype=np.int64)), k))
    b = np.transpose(rhs, (*rb, *rc, *rf)).reshape(
        (a.shape[0], k, int(np.prod(rfs, dtype=np.int64))))
    out = np.matmul(a, b).reshape((*bshape, *lfs, *rfs))
    return out.astype(out_dtype, copy=False)


def _as_matrix(x, contract):
    """``x`` as a 2-D ``[free, contracted]`` view when the contracted axes are its leading or
    trailing axes in order (else None)."""
    n, k = x.ndim, len(contract)
    size = int(np.prod([x.shape[i] for i in contract], dtype=np.int64))
    free = int(np.prod([d for i, d in enumerate(x.shape) if i not in contract], dtype=np.int64))
    if tuple(contract) == tuple(range(n - k, n)):
        return x.reshape(free, size)
    if tuple(contract) == tuple(range(k)):
        return x.reshape(size, free).T
    return None


dot_general_p.def_impl(_dot_impl)


def dot_general(lhs: Any, rhs: Any, contracting: tuple[Sequence[int], Sequence[int]],
                batch: tuple[Sequence[int], Sequence[int]] = ((), ())) -> Any:
    """Contract ``lhs`` and ``rhs`` over ``contracting`` axes, batched over ``batch`` axes."""
    dims = ((tuple(int(i) for i in contracting[0]), tuple(int(i) for i in contracting[1])),
            (tuple(int(i) for i in batch[0]), tuple(int(i) for i in batch[1])))
    return dot_general_p.bind(lhs, rhs, dims=dims)


@dot_general_p.def_jvp
def _dot_jvp(primals, tangents, *, dims):
    (x, y), (tx, ty) = primals, tangents
    out = dot_general_p.bind(x, y, dims=dims)
    terms = []
    if not isinstance(tx, Zero):
        terms.append(dot_general_p.bind(tx, y, dims=dims))
    if not isinstance(ty, Zero):
        terms.append(dot_general_p.bind(x, ty, dims=dims))
    return out, ew._tangent_or_zero(out, *terms)


def _transpose_operand(ct, other, dims, ndim, swap):
    """Cotangent of one operand of a dot: contract ``ct`` with the other operand."""
    (lc, rc), (lb, rb) = dims
    if swap:  # the operand is rhs: mirror the roles
        lc, rc, lb, rb = rc, lc, rb, lb
    other_ndim = aval_of(other).ndim
    nb = len(lb)
    free = _free(ndim, lc, lb)
    other_free = _free(other_ndim, rc, rb)
    if swap:
        ct_other_free = list(range(nb, nb + len(other_free)))
    else:
        ct_other_free = list(range(nb + len(free), nb + len(free) + len(other_free)))
    out = dot_general(ct, other, (ct_other_free, other_free), (list(range(nb)), rb))
    # out axes: batch, this operand's free axes, then its contracted axes in the order of
    # the other operand's (sorted) contracted axes.
    source = list(lb) + free + [lc[rc.index(r)] for r in sorted(rc)]
    return st.transpose(out, [source.index(i) for i in range(ndim)])


@dot_general_p.def_transpose
def _dot_transpose(ct, x, y, *, dims):
    if isinstance(ct, Zero):
        return [Zero(x.aval) if isinstance(x, UndefinedPrimal) else None,
                Zero(y.aval) if isinstance(y, UndefinedPrimal) else None]
    if isinstance(x, UndefinedPrimal):
        return [_transpose_operand(ct, y, dims, x.aval.ndim, swap=False), None]
    return [None, _transpose_operand(ct, x, dims, y.aval.ndim, swap=True)]


@dot_general_p.def_batch
def _dot_batch(args, bdims, *, dims):
    (x, y), (bx, by) = args, bdims
    (lc, rc), (lb, rb) = dims
    shift = lambda axes: tuple(a + 1 for a in axes)  # noqa: E731
    if bx is not None and by is not None:
        x, y = st.moveaxis(x, bx, 0), st.moveaxis(y, by, 0)
        new = ((shift(lc), shift(rc)), ((0, *shift(lb)), (0, *shift(rb))))
        return dot_general_p.bind(x, y, dims=new), 0
    if bx is not None:
        x = st.moveaxis(x, bx, 0)
        new = ((shift(lc), rc), (shift(lb), rb))
        return dot_general_p.bind(x, y, dims=new), len(lb)
    y = st.moveaxis(y, by, 0)
    new = ((lc, shift(rc)), (lb, shift(rb)))
    n_lfree = len(_free(aval_of(x).ndim, lc, lb))
    return dot_general_p.bind(x, y, dims=new), len(lb) + n_lfree
