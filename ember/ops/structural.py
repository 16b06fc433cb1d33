"""Structural primitives: they move, copy or select elements without arithmetic.

``copy``, ``broadcast_in_dim``, ``reshape``, ``transpose``, ``slice``, ``pad``, ``concatenate``,
``rev``, ``dynamic_slice``, ``dynamic_update_slice`` and ``iota``. All are linear in their array
operand, so each has a transpose rule, which is what reverse-mode differentiation runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ember import dtypes
from ember.core.primitive import Primitive
from ember.core.trace import UndefinedPrimal, Zero, aval_of
from ember.errors import DTypeError, ShapeError, op_error
from ember.ir.types import ArrayType
from ember.ops._checks import normalize_axis, same_dtypes

__all__ = [
    "copy", "broadcast_in_dim", "reshape", "transpose", "moveaxis", "expand_dims", "squeeze",
    "slice", "index_in_dim", "pad", "concatenate", "rev", "dynamic_slice", "dynamic_update_slice",
    "iota", "broadcast_to_shape",
]


def _linear_zero(ct, operand):
    return [Zero(operand.aval)] if isinstance(ct, Zero) else None


def _linear_jvp(prim):
    """JVP of a primitive linear in its first operand (the rest are not differentiated)."""
    def jvp(primals, tangents, **params):
        out = prim.bind(*primals, **params)
        t = tangents[0]
        if isinstance(t, Zero):
            return out, Zero(out.aval)
        return out, prim.bind(t, *primals[1:], **params)
    return jvp


# --- copy ------------------------------------------------------------------------------------

copy_p = Primitive("copy", kind="elementwise")
copy_p.def_abstract_eval(lambda x: x)
# Buffers are immutable, so a copy can share its operand's buffer: what makes it a copy is that
# it is a new value (a new Array, or a new tracer under a transformation), which ``x[i] = v`` on
# one of them can rebind without touching the other.
copy_p.def_impl(lambda x: x)
copy_p.def_jvp(_linear_jvp(copy_p))
copy_p.def_transpose(lambda ct, x: [ct])
copy_p.def_batch(lambda args, dims: (copy_p.bind(*args), dims[0]))


def copy(x: Any) -> Any:
    """A new value equal to ``x``."""
    return copy_p.bind(x)


# --- broadcast_in_dim ------------------------------------------------------------------------

broadcast_in_dim_p = Primitive("broadcast_in_dim", kind="movement")


@broadcast_in_dim_p.def_abstract_eval
def _broadcast_rule(x: ArrayType, *, shape: tuple[int, ...], dims: tuple[int, ...]) -> ArrayType:
    if len(dims) != x.ndim or any(not 0 <= d < len(shape) for d in dims) or \
            list(dims) != sorted(set(dims)):
        raise op_error(ShapeError, "broadcast_in_dim", f"bad dims {dims} for {x.shape} -> {shape}")
    for size, d in zip(x.shape, dims):
        if size not in (1, shape[d]):
            raise op_error(ShapeError, "broadcast_in_dim",
                           f"cannot broadcast {x.shape} to {shape}")
    return ArrayType(tuple(shape), x.dtype, weak=x.weak)


def _broadcast_impl(x, *, shape, dims):
    expanded = np.reshape(x, [x.shape[dims.index(i)] if i in dims else 1
                              for i in range(len(shape))])
    return np.broadcast_to(expanded, shape)


broadcast_in_dim_p.def_impl(_broadcast_impl)
broadcast_in_dim_p.def_jvp(_linear_jvp(broadcast_in_dim_p))


@broadcast_in_dim_p.def_transpose
def _broadcast_transpose(ct, x, *, shape, dims):
    if isinstance(ct, Zero):
        return [Zero(x.aval)]
    from ember.ops.reduce import reduce_sum

    new_axes = tuple(i for i in range(len(shape)) if i not in dims)
    expanded = tuple(j for j, d in enumerate(dims) if x.aval.shape[j] == 1 and shape[d] != 1)
    out = reduce_sum(ct, axes=new_axes + tuple(dims[j] for j in expanded))
    return [reshape(out, x.aval.shape) if expanded else out]


@broadcast_in_dim_p.def_batch
def _broadcast_batch(args, dims_, *, shape, dims):
    (x,), (bd,) = args, dims_
    x = moveaxis(x, bd, 0)
    return broadcast_in_dim(x, (x.shape[0], *shape), (0, *(d + 1 for d in dims))), 0


def broadcast_in_dim(x: Any, shape: Sequence[int], dims: Sequence[int]) -> Any:
    """Broadcast ``x`` to ``shape``; axis ``i`` of ``x`` becomes axis ``dims[i]``."""
    shape, dims = tuple(int(s) for s in shape), tuple(int(d) for d in dims)
    if aval_of(x).shape == shape and dims == tuple(range(len(shape))):
        return x
    return broadcast_in_dim_p.bind(x, shape=shape, dims=dims)


def broadcast_to_shape(x: Any, shape: Sequence[int]) -> Any:
    """NumPy-style (right-aligned) broadcast."""
    nd = aval_of(x).ndim
    return broadcast_in_dim(x, shape, tuple(range(len(shape) - nd, len(shape))))


# --- reshape ---------------------------------------------------------------------------------

reshape_p = Primitive("reshape", kind="movement")


@reshape_p.def_abstract_eval
def _reshape_rule(x: ArrayType, *, shape: tuple[int, ...]) -> ArrayType:
    if int(np.prod(shape, dtype=np.int64)) != x.size:
        raise op_error(ShapeError, "reshape", f"cannot reshape array of shape {x.shape} "
                       f"(size {x.size}) into shape {shape}")
    return ArrayType(tuple(shape), x.dtype, weak=x.weak)


reshape_p.def_impl(lambda x, *, shape: np.reshape(x, shape))
reshape_p.def_jvp(_linear_jvp(reshape_p))
reshape_p.def_transpose(lambda ct, x, *, shape: _linear_zero(ct, x) or
                        [reshape(ct, x.aval.shape)])


@reshape_p.def_batch
def _reshape_batch(args, dims, *, shape):
    x = moveaxis(args[0], dims[0], 0)
    return reshape(x, (x.shape[0], *shape)), 0


def reshape(x: Any, shape: Sequence[int]) -> Any:
    shape = tuple(int(s) for s in shape)
    if aval_of(x).shape == shape:
        return x
    return reshape_p.bind(x, shape=shape)


def expand_dims(x: Any, axis: int) -> Any:
    shape = list(aval_of(x).shape)
    shape.insert(axis, 1)
    return reshape(x, shape)


def squeeze(x: Any, axes: Sequence[int]) -> Any:
    shape = aval_of(x).shape
    return reshape(x, [s for i, s in enumerate(shape) if i not in axes])


# --- transpose -------------------------------------------------------------------------------

transpose_p = Primitive("transpose", kind="movement")


@transpose_p.def_abstract_eval
def _transpose_rule(x: ArrayType, *, perm: tuple[int, ...]) -> ArrayType:
    if sorted(perm) != list(range(x.ndim)):
        raise op_error(ShapeError, "transpose", f"axes {perm} are not a permutation of "
                       f"the {x.ndim} axes of an array of shape {x.shape}")
    return ArrayType(tuple(x.shape[p] for p in perm), x.dtype, weak=x.weak)


transpose_p.def_impl(lambda x, *, perm: np.transpose(x, perm))
transpose_p.def_jvp(_linear_jvp(transpose_p))
transpose_p.def_transpose(lambda ct, x, *, perm: _linear_zero(ct, x) or
                          [transpose(ct, tuple(np.argsort(perm)))])


@transpose_p.def_batch
def _transpose_batch(args, dims, *, perm):
    x = moveaxis(args[0], dims[0], 0)
    return transpose(x, (0, *(p + 1 for p in perm))), 0


def transpose(x: Any, perm: Sequence[int]) -> Any:
    perm = tuple(int(p) for p in perm)
    if perm == tuple(range(len(perm))):
        return x
    return transpose_p.bind(x, perm=perm)


def moveaxis(x: Any, src: int, dst: int) -> Any:
    nd = aval_of(x).ndim
    src, dst = src % nd, dst % nd
    if src == dst:
        return x
    perm = [i for i in range(nd) if i != src]
    perm.insert(dst, src)
    return transpose(x, perm)


# --- slice -----------------------------------------------------------------------------------

slice_p = Primitive("slice", kind="movement")


@slice_p.def_abstract_eval
def _slice_rule(x: ArrayType, *, start: tuple[int, ...], limit: tuple[int, ...],
                strides: tuple[int, ...]) -> ArrayType:
    if not len(start) == len(limit) == len(strides) == x.ndim:
        raise op_error(ShapeError, "slice", f"needs {x.ndim} bounds for shape {x.shape}")
    for s, e, d, n in zip(start, limit, strides, x.shape):
        if not (0 <= s <= e <= n) or d < 1:
            raise op_error(ShapeError, "slice", f"bounds {start}:{limit}:{strides} do not fit "
                           f"shape {x.shape}")
    shape = tuple(max(0, -(-(e - s) // d)) for s, e, d in zip(start, limit, strides))
    return ArrayType(shape, x.dtype, weak=x.weak)


def _slice_impl(x, *, start, limit, strides):
    return x[tuple(np.s_[s:e:d] for s, e, d in zip(start, limit, strides))]


slice_p.def_impl(_slice_impl)
slice_p.def_jvp(_linear_jvp(slice_p))


@slice_p.def_transpose
def _slice_transpose(ct, x, *, start, limit, strides):
    if isinstance(ct, Zero):
        return [Zero(x.aval)]
    shape = x.aval.shape
    lo = start
    hi = tuple(n - (s + (c - 1) * d + 1) if c else n - s
               for n, s, c, d in zip(shape, start, ct.aval.shape, strides))
    interior = tuple(d - 1 for d in strides)
    return [pad(ct, _scalar_of(ct), lo, hi, interior)]


def _scalar_of(x):
    from ember.core.trace import to_array

    return to_array(np.zeros((), aval_of(x).dtype))


@slice_p.def_batch
def _slice_batch(args, dims, *, start, limit, strides):
    x = moveaxis(args[0], dims[0], 0)
    n = aval_of(x).shape[0]
    return slice(x, (0, *start), (n, *limit), (1, *strides)), 0


def slice(x: Any, start: Sequence[int], limit: Sequence[int],  # noqa: A001
          strides: Sequence[int] | None = None) -> Any:
    """Static slice ``x[start:limit:strides]`` on every axis."""
    start, limit = tuple(int(s) for s in start), tuple(int(e) for e in limit)
    strides = tuple(int(d) for d in strides) if strides else (1,) * len(start)
    if start == (0,) * len(start) and limit == aval_of(x).shape and set(strides) <= {1}:
        return x
    return slice_p.bind(x, start=start, limit=limit, strides=strides)


def index_in_dim(x: Any, i: int, axis: int = 0, keepdims: bool = False) -> Any:
    """``x`` at static position ``i`` along ``axis``."""
    shape = aval_of(x).shape
    start = [0] * len(shape)
    limit = list(shape)
    start[axis], limit[axis] = i, i + 1
    out = slice(x, start, limit)
    return out if keepdims else squeeze(out, (axis,))


# --- pad -------------------------------------------------------------------------------------

pad_p = Primitive("pad", kind="movement")


@pad_p.def_abstract_eval
def _pad_rule(x: ArrayType, value: ArrayType, *, lo: tuple[int, ...], hi: tuple[int, ...],
              interior: tuple[int, ...]) -> ArrayType:
    if value.shape != ():
        raise op_error(ShapeError, "pad", f"padding value must be a scalar, got {value.shape}")
    same_dtypes("pad", (x, value))
    if not len(lo) == len(hi) == len(interior) == x.ndim or min(interior, default=0) < 0:
        raise op_error(ShapeError, "pad", f"bad padding {lo}/{hi}/{interior} for {x.shape}")
    shape = tuple(lo_ + hi_ + n + max(n - 1, 0) * i
                  for n, lo_, hi_, i in zip(x.shape, lo, hi, interior))
    if min(shape, default=0) < 0:
        raise op_error(ShapeError, "pad", f"padding {lo}/{hi} removes more than {x.shape}")
    return ArrayType(shape, x.dtype, weak=x.weak)


def _pad_impl(x, value, *, lo, hi, interior):
    shape = [n + max(n - 1, 0) * i for n, i in zip(x.shape, interior)]
    spread = np.full(shape, value, dtype=x.dtype)
    spread[tuple(np.s_[::i + 1] for i in interior)] = x
    pos_lo = [max(v, 0) for v in lo]
    pos_hi = [max(v, 0) for v in hi]
    out = np.pad(spread, list(zip(pos_lo, pos_hi)), constant_values=value)
    crop = tuple(np.s_[-min(a, 0): out.shape[k] + min(b, 0)]
                 for k, (a, b) in enumerate(zip(lo, hi)))
    return out[crop]


pad_p.def_impl(_pad_impl)


@pad_p.def_jvp
def _pad_jvp(primals, tangents, **params):
    x, value = primals
    tx, tv = tangents
    out = pad_p.bind(x, value, **params)
    if isinstance(tx, Zero) and isinstance(tv, Zero):
        return out, Zero(out.aval)
    from ember.ops.elementwise import instantiate

    return out, pad_p.bind(instantiate(tx), instantiate(tv), **params)


@pad_p.def_transpose
def _pad_transpose(ct, x, value, *, lo, hi, interior):
    if isinstance(ct, Zero):
        return [Zero(x.aval) if isinstance(x, UndefinedPrimal) else None,
                Zero(value.aval) if isinstance(value, UndefinedPrimal) else None]
    from ember.ops.elementwise import sub
    from ember.ops.reduce import reduce_sum

    # Undo negative padding by padding the cotangent back, then slice out the interior.
    unpadded = pad(ct, _scalar_of(ct), [max(-a, 0) for a in lo], [max(-b, 0) for b in hi],
                   [0] * len(lo))
    shape = aval_of(unpadded).shape
    start = [max(a, 0) for a in lo]
    limit = [n - max(b, 0) for n, b in zip(shape, hi)]
    t_x = slice(unpadded, start, limit, [i + 1 for i in interior])
    t_value = None
    if isinstance(value, UndefinedPrimal):
        t_value = sub(reduce_sum(ct, tuple(range(ct.aval.ndim))),
                      reduce_sum(t_x, tuple(range(ct.aval.ndim))))
    return [t_x if isinstance(x, UndefinedPrimal) else None, t_value]


@pad_p.def_batch
def _pad_batch(args, dims, *, lo, hi, interior):
    x, value = args
    bx, bv = dims
    if bv is not None:
        from ember.ops.batching import batch_by_loop

        return batch_by_loop(pad_p, args, dims, lo=lo, hi=hi, interior=interior)
    x = moveaxis(x, bx, 0)
    return pad(x, value, (0, *lo), (0, *hi), (0, *interior)), 0


def pad(x: Any, value: Any, lo: Sequence[int], hi: Sequence[int],
        interior: Sequence[int] | None = None) -> Any:
    """Pad with ``value``: ``lo``/``hi`` elements at each end (negative crops), ``interior``
    elements between neighbours."""
    interior = tuple(interior) if interior is not None else (0,) * len(lo)
    return pad_p.bind(x, value, lo=tuple(int(v) for v in lo), hi=tuple(int(v) for v in hi),
                      interior=tuple(int(v) for v in interior))


# --- concatenate -----------------------------------------------------------------------------

concatenate_p = Primitive("concatenate", kind="movement")


@concatenate_p.def_abstract_eval
def _concatenate_rule(*xs: ArrayType, axis: int) -> ArrayType:
    if not xs:
        raise op_error(ShapeError, "concatenate", "needs at least one array")
    same_dtypes("concatenate", xs)
    first = xs[0]
    for x in xs:
        if x.ndim != first.ndim or any(a != b for i, (a, b) in
                                       enumerate(zip(x.shape, first.shape)) if i != axis):
            raise op_error(ShapeError, "concatenate", "all dimensions except axis "
                           f"{axis} must match, got " + ", ".join(str(x.shape) for x in xs))
    shape = list(first.shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    return ArrayType(tuple(shape), first.dtype, weak=all(x.weak for x in xs))


concatenate_p.def_impl(lambda *xs, axis: np.concatenate(xs, axis=axis))


@concatenate_p.def_jvp
def _concatenate_jvp(primals, tangents, *, axis):
    out = concatenate_p.bind(*primals, axis=axis)
    if all(isinstance(t, Zero) for t in tangents):
        return out, Zero(out.aval)
    from ember.ops.elementwise import instantiate

    return out, concatenate_p.bind(*[instantiate(t) for t in tangents], axis=axis)


@concatenate_p.def_transpose
def _concatenate_transpose(ct, *xs, axis):
    outs, offset = [], 0
    for x in xs:
        n = x.aval.shape[axis]
        if isinstance(x, UndefinedPrimal):
            if isinstance(ct, Zero):
                outs.append(Zero(x.aval))
            else:
                start = [0] * x.aval.ndim
                limit = list(ct.aval.shape)
                start[axis], limit[axis] = offset, offset + n
                outs.append(slice(ct, start, limit))
        else:
            outs.append(None)
        offset += n
    return outs


@concatenate_p.def_batch
def _concatenate_batch(args, dims, *, axis):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = []
    for a, d in zip(args, dims):
        if d is None:
            shape = aval_of(a).shape
            moved.append(broadcast_in_dim(a, (size, *shape), tuple(range(1, len(shape) + 1))))
        else:
            moved.append(moveaxis(a, d, 0))
    return concatenate(moved, axis + 1), 0


def concatenate(xs: Sequence[Any], axis: int) -> Any:
    xs = list(xs)
    if len(xs) == 1:
        return xs[0]
    axis = normalize_axis("concatenate", int(axis), aval_of(xs[0]).ndim)
    return concatenate_p.bind(*xs, axis=axis)


# --- rev -------------------------------------------------------------------------------------

rev_p = Primitive("rev", kind="movement")


@rev_p.def_abstract_eval
def _rev_rule(x: ArrayType, *, axes: tuple[int, ...]) -> ArrayType:
    return x


rev_p.def_impl(lambda x, *, axes: np.flip(x, axes) if axes else x)
rev_p.def_jvp(_linear_jvp(rev_p))
rev_p.def_transpose(lambda ct, x, *, axes: _linear_zero(ct, x) or [rev(ct, axes)])


@rev_p.def_batch
def _rev_batch(args, dims, *, axes):
    x = moveaxis(args[0], dims[0], 0)
    return rev(x, tuple(a + 1 for a in axes)), 0


def rev(x: Any, axes: Sequence[int]) -> Any:
    """Reverse the order of elements along ``axes``."""
    axes = tuple(int(a) for a in axes)
    return rev_p.bind(x, axes=axes) if axes else x


# --- dynamic_slice / dynamic_update_slice ----------------------------------------------------

def _check_starts(op: str, x: ArrayType, starts: Sequence[ArrayType]) -> None:
    if len(starts) != x.ndim:
        raise op_error(ShapeError, op, f"needs {x.ndim} start indices for shape {x.shape}, "
                       f"got {len(starts)}")
    for s in starts:
        if s.shape != () or not dtypes.is_int(s.dtype):
            raise op_error(DTypeError, op, f"start indices must be integer scalars, got {s}")


def _clamped_starts(shape, sizes, starts):
    # As in XLA: starts are clamped so the window stays inside the array.
    return tuple(int(np.clip(int(s), 0, n - k)) for s, n, k in zip(starts, shape, sizes))


dynamic_slice_p = Primitive("dynamic_slice", kind="indexing")


@dynamic_slice_p.def_abstract_eval
def _dynamic_slice_rule(x: ArrayType, *starts: ArrayType, sizes: tuple[int, ...]) -> ArrayType:
    _check_starts("dynamic_slice", x, starts)
    if len(sizes) != x.ndim or any(not 0 <= k <= n for k, n in zip(sizes, x.shape)):
        raise op_error(ShapeError, "dynamic_slice", f"slice sizes {sizes} do not fit {x.shape}")
    return ArrayType(tuple(sizes), x.dtype, weak=x.weak)


def _dynamic_slice_impl(x, *starts, sizes):
    begin = _clamped_starts(x.shape, sizes, starts)
    return x[tuple(np.s_[b: b + k] for b, k in zip(begin, sizes))]


dynamic_slice_p.def_impl(_dynamic_slice_impl)
dynamic_slice_p.def_jvp(_linear_jvp(dynamic_slice_p))


@dynamic_slice_p.def_transpose
def _dynamic_slice_transpose(ct, x, *starts, sizes):
    if isinstance(ct, Zero):
        return [Zero(x.aval)] + [None] * len(starts)
    from ember.ops.elementwise import zeros_like

    return [dynamic_update_slice(zeros_like(x), ct, starts)] + [None] * len(starts)


@dynamic_slice_p.def_batch
def _dynamic_slice_batch(args, dims, *, sizes):
    if any(d is not None for d in dims[1:]):
        from ember.ops.batching import batch_by_loop

        return batch_by_loop(dynamic_slice_p, args, dims, sizes=sizes)
    x = moveaxis(args[0], dims[0], 0)
    zero = np.zeros((), aval_of(args[1]).dtype) if len(args) > 1 else np.zeros((), np.int64)
    return dynamic_slice_p.bind(x, zero, *args[1:], sizes=(aval_of(x).shape[0], *sizes)), 0


def dynamic_slice(x: Any, starts: Sequence[Any], sizes: Sequence[int]) -> Any:
    """The window of ``sizes`` at traced ``starts`` (clamped to stay in bounds)."""
    from ember.core.trace import to_array

    starts = [s if hasattr(s, "aval") else to_array(np.asarray(s, np.int64)) for s in starts]
    return dynamic_slice_p.bind(x, *starts, sizes=tuple(int(k) for k in sizes))


dynamic_update_slice_p = Primitive("dynamic_update_slice", kind="indexing")


@dynamic_update_slice_p.def_abstract_eval
def _dus_rule(x: ArrayType, update: ArrayType, *starts: ArrayType) -> ArrayType:
    _check_starts("dynamic_update_slice", x, starts)
    same_dtypes("dynamic_update_slice", (x, update))
    if update.ndim != x.ndim or any(u > n for u, n in zip(update.shape, x.shape)):
        raise op_error(ShapeError, "dynamic_update_slice",
                       f"update of shape {update.shape} does not fit in {x.shape}")
    return x


def _dus_into(out, update, starts):
    begin = _clamped_starts(out.shape, update.shape, starts)
    out[tuple(np.s_[b: b + k] for b, k in zip(begin, update.shape))] = update
    return out


def _dus_impl(x, update, *starts):
    return _dus_into(x.copy(), update, starts)


def _dus_inplace(x, update, *starts):
    # A donated buffer may still be read-only (a broadcast from ``zeros``): copy it then.
    return _dus_into(x if x.flags.writeable else x.copy(), update, starts)


dynamic_update_slice_p.def_impl(_dus_impl)
dynamic_update_slice_p.def_inplace_impl(_dus_inplace)


@dynamic_update_slice_p.def_jvp
def _dus_jvp(primals, tangents):
    x, update, *starts = primals
    tx, tu = tangents[:2]
    out = dynamic_update_slice_p.bind(x, update, *starts)
    if isinstance(tx, Zero) and isinstance(tu, Zero):
        return out, Zero(out.aval)
    from ember.ops.elementwise import instantiate

    return out, dynamic_update_slice_p.bind(instantiate(tx), instantiate(tu), *starts)


@dynamic_update_slice_p.def_transpose
def _dus_transpose(ct, x, update, *starts):
    rest = [None] * len(starts)
    if isinstance(ct, Zero):
        return [Zero(x.aval) if isinstance(x, UndefinedPrimal) else None,
                Zero(update.aval) if isinstance(update, UndefinedPrimal) else None] + rest
    from ember.ops.elementwise import zeros_like

    t_x = t_u = None
    if isinstance(x, UndefinedPrimal):
        t_x = dynamic_update_slice_p.bind(ct, zeros_like(update), *starts)
    if isinstance(update, UndefinedPrimal):
        t_u = dynamic_slice_p.bind(ct, *starts, sizes=update.aval.shape)
    return [t_x, t_u] + rest


@dynamic_update_slice_p.def_batch
def _dus_batch(args, dims):
    if any(d is not None for d in dims[2:]):
        from ember.ops.batching import batch_by_loop

        return batch_by_loop(dynamic_update_slice_p, args, dims)
    x, update = args[:2]
    size = next(aval_of(a).shape[d] for a, d in zip(args, dims) if d is not None)
    moved = []
    for a, d in zip((x, update), dims[:2]):
        if d is None:
            shape = aval_of(a).shape
            moved.append(broadcast_in_dim(a, (size, *shape), tuple(range(1, len(shape) + 1))))
        else:
            moved.append(moveaxis(a, d, 0))
    zero = np.zeros((), aval_of(args[2]).dtype) if len(args) > 2 else np.zeros((), np.int64)
    return dynamic_update_slice_p.bind(*moved, zero, *args[2:]), 0


def dynamic_update_slice(x: Any, update: Any, starts: Sequence[Any]) -> Any:
    """``x`` with ``update`` written at traced ``starts`` (clamped to stay in bounds)."""
    from ember.core.trace import to_array

    starts = [s if hasattr(s, "aval") else to_array(np.asarray(s, np.int64)) for s in starts]
    return dynamic_update_slice_p.bind(x, update, *starts)


# --- iota ------------------------------------------------------------------------------------

iota_p = Primitive("iota", kind="generator")


@iota_p.def_abstract_eval
def _iota_rule(*, dtype: np.dtype, shape: tuple[int, ...], dimension: int) -> ArrayType:
    normalize_axis("iota", dimension, len(shape))
    return ArrayType(tuple(shape), dtype)


def _iota_impl(*, dtype, shape, dimension):
    ramp = np.arange(shape[dimension], dtype=dtype)
    view = [1] * len(shape)
    view[dimension] = shape[dimension]
    return np.broadcast_to(ramp.reshape(view), shape)


iota_p.def_impl(_iota_impl)
iota_p.def_jvp(lambda primals, tangents, **p: (lambda y: (y, Zero(y.aval)))(iota_p.bind(**p)))


def iota(dtype: Any, shape: Sequence[int], dimension: int = 0) -> Any:
    """Integers counting up along ``dimension``, broadcast over ``shape``."""
    return iota_p.bind(dtype=dtypes.canonicalize(dtype), shape=tuple(int(s) for s in shape),
                       dimension=int(dimension))
