"""Reductions (sum, max, min, prod, argmax, argmin) and cumulative scans along one axis.

Sums and products accept complex numbers; the order-based ones (max, min, argmax, cummax...)
refuse them, since complex numbers have no order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ember import dtypes
from ember.core.primitive import Primitive
from ember.core.trace import Zero, aval_of
from ember.errors import DTypeError, ShapeError, op_error
from ember.ir.types import ArrayType
from ember.ops import elementwise as ew
from ember.ops import structural as st
from ember.ops._checks import normalize_axes, normalize_axis

__all__ = ["reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin",
           "cumsum", "cumprod", "cummax", "cummin"]


_ORDERED = ("reduce_max", "reduce_min", "argmax", "argmin", "cummax", "cummin")


def _check_dtype(name: str, dtype: np.dtype) -> None:
    if name in ("reduce_sum", "cumsum") and dtype == dtypes.bool_:
        raise op_error(DTypeError, name, "cannot sum bool values; cast first")
    if name in _ORDERED and dtypes.is_complex(dtype):
        raise op_error(DTypeError, name, f"is not defined on complex numbers, got {dtype} "
                       "(they have no order: apply it to real(x), imag(x) or abs(x))")


def _reduce_rule(name: str):
    def rule(x: ArrayType, *, axes: tuple[int, ...]) -> ArrayType:
        normalize_axes(name, axes, x.ndim)
        _check_dtype(name, x.dtype)
        return ArrayType(tuple(n for i, n in enumerate(x.shape) if i not in axes), x.dtype,
                         weak=x.weak)
    return rule


def _reduce_batch(prim):
    def rule(args, dims, *, axes):
        x = st.moveaxis(args[0], dims[0], 0)
        return prim.bind(x, axes=tuple(a + 1 for a in axes)), 0
    return rule


def _declare_reduce(name: str, np_fn) -> Primitive:
    prim = Primitive(name, kind="reduction")
    prim.def_abstract_eval(_reduce_rule(name))

    def impl(x, *, axes):
        if x.size == 0 and np_fn in (np.max, np.min) and any(x.shape[a] == 0 for a in axes):
            raise op_error(ShapeError, name, f"zero-size array to reduction over axes {axes} "
                           "which has no identity")
        return np_fn(x, axis=axes)

    prim.def_impl(impl)
    prim.def_batch(_reduce_batch(prim))
    return prim


def _keep_shape(in_shape, axes):
    return tuple(1 if i in axes else n for i, n in enumerate(in_shape))


def _expand_back(y, in_shape, axes):
    """Broadcast a reduced value back to the operand's shape."""
    kept = [i for i in range(len(in_shape)) if i not in axes]
    return st.broadcast_in_dim(y, in_shape, kept)


reduce_sum_p = _declare_reduce("reduce_sum", np.sum)


@reduce_sum_p.def_jvp
def _sum_jvp(primals, tangents, *, axes):
    out = reduce_sum_p.bind(primals[0], axes=axes)
    t = tangents[0]
    return out, Zero(out.aval) if isinstance(t, Zero) else reduce_sum_p.bind(t, axes=axes)


@reduce_sum_p.def_transpose
def _sum_transpose(ct, x, *, axes):
    if isinstance(ct, Zero):
        return [Zero(x.aval)]
    return [_expand_back(ct, x.aval.shape, axes)]


def reduce_sum(x: Any, axes: Sequence[int]) -> Any:
    axes = tuple(int(a) for a in axes)
    return reduce_sum_p.bind(x, axes=axes) if axes else x


def _extremum(name: str, np_fn):
    prim = _declare_reduce(name, np_fn)

    @prim.def_jvp
    def jvp(primals, tangents, *, axes):
        (x,), (t,) = primals, tangents
        out = prim.bind(x, axes=axes)
        if isinstance(t, Zero):
            return out, Zero(out.aval)
        # Ties share the tangent equally (mean over the positions that attain the extremum).
        at = ew.convert(ew.eq(x, _expand_back(out, x.aval.shape, axes)), x.aval.dtype)
        count = reduce_sum(at, axes)
        return out, ew.div(reduce_sum(ew.mul(t, at), axes), count)

    def fn(x: Any, axes: Sequence[int]) -> Any:
        axes = tuple(int(a) for a in axes)
        return prim.bind(x, axes=axes) if axes else x

    fn.__name__ = name
    fn.prim = prim  # type: ignore[attr-defined]
    return fn


reduce_max = _extremum("reduce_max", np.max)
reduce_min = _extremum("reduce_min", np.min)

reduce_prod_p = _declare_reduce("reduce_prod", np.prod)


@reduce_prod_p.def_jvp
def _prod_jvp(primals, tangents, *, axes):
    (x,), (t,) = primals, tangents
    out = reduce_prod_p.bind(x, axes=axes)
    if isinstance(t, Zero):
        return out, Zero(out.aval)
    # d prod / d x_j = product of all the other elements, computed without dividing (so zeros
    # in x are handled): exclusive products from the left times those from the right.
    shape = x.aval.shape
    kept = [i for i in range(len(shape)) if i not in axes]
    perm = kept + list(axes)
    n = int(np.prod([shape[a] for a in axes], dtype=np.int64))
    flat_shape = (*[shape[i] for i in kept], n)
    xs = st.reshape(st.transpose(x, perm), flat_shape)
    ts = st.reshape(st.transpose(t, perm), flat_shape)
    one = ew.full_like(st.index_in_dim(xs, 0, -1, keepdims=True) if n else xs, 1)
    left = cumprod(st.concatenate([one, st.slice(xs, [0] * len(flat_shape),
                                                 (*flat_shape[:-1], max(n - 1, 0)))], -1)
                   if n else xs, -1)
    right = cumprod(st.concatenate([st.slice(xs, (*[0] * (len(flat_shape) - 1), 1),
                                             flat_shape), one], -1) if n else xs, -1,
                    reverse=True)
    others = ew.mul(left, right)
    return out, reduce_sum(ew.mul(ts, others), (len(flat_shape) - 1,))


def reduce_prod(x: Any, axes: Sequence[int]) -> Any:
    axes = tuple(int(a) for a in axes)
    return reduce_prod_p.bind(x, axes=axes) if axes else x


# --- argmax / argmin -------------------------------------------------------------------------

def _arg_extremum(name: str, np_fn):
    prim = Primitive(name, kind="reduction")

    @prim.def_abstract_eval
    def rule(x: ArrayType, *, axis: int, index_dtype: np.dtype) -> ArrayType:
        normalize_axis(name, axis, x.ndim)
        _check_dtype(name, x.dtype)
        if x.shape[axis] == 0:
            raise op_error(ShapeError, name, f"attempt to get {name} of an empty sequence")
        return ArrayType(tuple(n for i, n in enumerate(x.shape) if i != axis), index_dtype)

    prim.def_impl(lambda x, *, axis, index_dtype: np_fn(x, axis=axis))
    prim.def_jvp(lambda primals, tangents, **p: (lambda y: (y, Zero(y.aval)))(
        prim.bind(*primals, **p)))

    @prim.def_batch
    def batch(args, dims, *, axis, index_dtype):
        x = st.moveaxis(args[0], dims[0], 0)
        return prim.bind(x, axis=axis + 1, index_dtype=index_dtype), 0

    def fn(x: Any, axis: int, index_dtype: Any = dtypes.int64) -> Any:
        return prim.bind(x, axis=int(axis), index_dtype=dtypes.canonicalize(index_dtype))

    fn.__name__ = name
    fn.prim = prim  # type: ignore[attr-defined]
    return fn


argmax = _arg_extremum("argmax", np.argmax)
argmin = _arg_extremum("argmin", np.argmin)


# --- cumulative ops --------------------------------------------------------------------------

def _cumulative(name: str, np_fn):
    prim = Primitive(name, kind="cumulative")

    @prim.def_abstract_eval
    def rule(x: ArrayType, *, axis: int, reverse: bool) -> ArrayType:
        normalize_axis(name, axis, x.ndim)
        _check_dtype(name, x.dtype)
        return x

    def impl(x, *, axis, reverse):
        if reverse:
            return np.flip(np_fn(np.flip(x, axis), axis=axis), axis)
        return np_fn(x, axis=axis)

    prim.def_impl(impl)

    @prim.def_batch
    def batch(args, dims, *, axis, reverse):
        x = st.moveaxis(args[0], dims[0], 0)
        return prim.bind(x, axis=axis + 1, reverse=reverse), 0

    def fn(x: Any, axis: int, reverse: bool = False) -> Any:
        axis = normalize_axis(name, int(axis), aval_of(x).ndim)
        return prim.bind(x, axis=axis, reverse=bool(reverse))

    fn.__name__ = name
    fn.prim = prim  # type: ignore[attr-defined]
    return fn


cumsum = _cumulative("cumsum", np.cumsum)
cumprod = _cumulative("cumprod", np.cumprod)
cummax = _cumulative("cummax", np.maximum.accumulate)
cummin = _cumulative("cummin", np.minimum.accumulate)


@cumsum.prim.def_jvp
def _cumsum_jvp(primals, tangents, *, axis, reverse):
    out = cumsum(primals[0], axis, reverse)
    t = tangents[0]
    return out, Zero(out.aval) if isinstance(t, Zero) else cumsum(t, axis, reverse)


@cumsum.prim.def_transpose
def _cumsum_transpose(ct, x, *, axis, reverse):
    return [Zero(x.aval) if isinstance(ct, Zero) else cumsum(ct, axis, not reverse)]


@cumprod.prim.def_jvp
def _cumprod_jvp(primals, tangents, *, axis, reverse):
    (x,), (t,) = primals, tangents
    out = cumprod(x, axis, reverse)
    if isinstance(t, Zero):
        return out, Zero(out.aval)
    # d out_i = sum_{j <= i} t_j * prod_{k <= i, k != j} x_k  =  out_i * cumsum(t / x)_i.
    # Exact for non-zero x; at an exact zero of x the derivative is not defined by this form.
    return out, ew.mul(out, cumsum(ew.div(t, x), axis, reverse))


def _cum_extremum_jvp(prim):
    def jvp(primals, tangents, *, axis, reverse):
        (x,), (t,) = primals, tangents
        out = prim.bind(x, axis=axis, reverse=reverse)
        if isinstance(t, Zero):
            return out, Zero(out.aval)
        from ember.ops.indexing import take_along_axis

        # The tangent at i is the tangent of the element that holds the running extremum.
        shape = x.aval.shape
        positions = st.iota(dtypes.int64, shape, axis)
        if reverse:
            positions = ew.sub(ew.full_like(positions, shape[axis] - 1), positions)
        holder = ew.select(ew.eq(x, out), positions, ew.zeros_like(positions))
        source = cummax(holder, axis, reverse)
        if reverse:
            source = ew.sub(ew.full_like(source, shape[axis] - 1), source)
        return out, take_along_axis(t, source, axis)
    return jvp


cummax.prim.def_jvp(_cum_extremum_jvp(cummax.prim))
cummin.prim.def_jvp(_cum_extremum_jvp(cummin.prim))
