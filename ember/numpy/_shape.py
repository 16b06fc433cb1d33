"""Shape manipulation: reshape, transpose, moveaxis, swapaxes, expand_dims, squeeze,
broadcast_to/arrays, concatenate, stack, split, tile, repeat, flip, roll, pad, ravel, diagonal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ember.core.trace import aval_of
from ember.errors import EmberValueError, ShapeError, op_error
from ember.numpy._core import broadcast_shapes, normalize_axis_arg, value
from ember.ops import structural as st

__all__ = ["reshape", "ravel", "transpose", "permute_dims", "moveaxis", "swapaxes",
           "expand_dims", "squeeze", "broadcast_to", "broadcast_arrays", "broadcast_shapes",
           "concatenate", "concat", "stack", "hstack", "vstack", "dstack", "column_stack",
           "split", "array_split", "atleast_1d", "atleast_2d", "atleast_3d", "shape", "ndim",
           "size"]


def reshape(a: Any, shape: Any = None, order: str = "C", *, newshape: Any = None,
            copy: bool | None = None) -> Any:
    """Reshape; one dimension may be -1. Only C order is supported. Arrays are values, so
    ``copy`` (the array API's) never changes the result."""
    if order != "C":
        raise op_error(EmberValueError, "reshape", "only order='C' is supported")
    shape = newshape if shape is None else shape
    x = value(a)
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    shape = [int(s) for s in shape]
    size = aval_of(x).size
    if shape.count(-1) > 1:
        raise op_error(ShapeError, "reshape", "can only specify one unknown dimension")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
        if known == 0 or size % known:
            raise op_error(ShapeError, "reshape", f"cannot reshape array of size {size} into "
                           f"shape {tuple(shape)}")
        shape[shape.index(-1)] = size // known
    return st.reshape(x, shape)


def ravel(a: Any, order: str = "C") -> Any:
    return reshape(a, (-1,), order)


def transpose(a: Any, axes: Sequence[int] | None = None) -> Any:
    x = value(a)
    nd = aval_of(x).ndim
    if axes is None:
        return st.transpose(x, tuple(reversed(range(nd))))
    if len(axes) != nd:
        raise op_error(ShapeError, "transpose", f"axes {tuple(axes)} don't match an array of "
                       f"{nd} dimensions")
    return st.transpose(x, normalize_axis_arg("transpose", tuple(axes), nd))


def permute_dims(a: Any, /, axes: Sequence[int]) -> Any:
    return transpose(a, axes)


def moveaxis(a: Any, source: Any, destination: Any) -> Any:
    x = value(a)
    nd = aval_of(x).ndim
    src = normalize_axis_arg("moveaxis", source, nd)
    dst = normalize_axis_arg("moveaxis", destination, nd)
    if len(src) != len(dst):
        raise op_error(ShapeError, "moveaxis", "source and destination must have the same "
                       "number of elements")
    order = [i for i in range(nd) if i not in src]
    for d, s in sorted(zip(dst, src)):
        order.insert(d, s)
    return st.transpose(x, order)


def swapaxes(a: Any, axis1: int, axis2: int) -> Any:
    x = value(a)
    nd = aval_of(x).ndim
    i, j = normalize_axis_arg("swapaxes", axis1, nd)[0], normalize_axis_arg("swapaxes", axis2,
                                                                            nd)[0]
    perm = list(range(nd))
    perm[i], perm[j] = perm[j], perm[i]
    return st.transpose(x, perm)


def expand_dims(a: Any, axis: Any) -> Any:
    x = value(a)
    axes = axis if isinstance(axis, (list, tuple)) else (axis,)
    nd = aval_of(x).ndim + len(axes)
    axes = normalize_axis_arg("expand_dims", tuple(axes), nd)
    it = iter(aval_of(x).shape)
    return st.reshape(x, [1 if i in axes else next(it) for i in range(nd)])


def squeeze(a: Any, axis: Any = None) -> Any:
    x = value(a)
    shape = aval_of(x).shape
    if axis is None:
        axes = tuple(i for i, n in enumerate(shape) if n == 1)
    else:
        axes = normalize_axis_arg("squeeze", axis, len(shape))
        for ax in axes:
            if shape[ax] != 1:
                raise op_error(ShapeError, "squeeze", f"cannot select an axis to squeeze out "
                               f"which has size not equal to one (axis {ax} of {shape})")
    return st.squeeze(x, axes)


def broadcast_to(a: Any, shape: Any) -> Any:
    x = value(a)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    src = aval_of(x).shape
    if len(src) > len(shape) or broadcast_shapes("broadcast_to", src, shape) != shape:
        raise op_error(ShapeError, "broadcast_to", f"cannot broadcast shape {src} to {shape}")
    return st.broadcast_to_shape(x, shape)


def broadcast_arrays(*args: Any) -> list[Any]:
    vals = [value(a) for a in args]
    shape = broadcast_shapes("broadcast_arrays", *[aval_of(v).shape for v in vals])
    return [st.broadcast_to_shape(v, shape) for v in vals]


def concatenate(arrays: Sequence[Any], axis: int | None = 0, dtype: Any = None) -> Any:
    if not len(arrays):
        raise op_error(EmberValueError, "concatenate", "need at least one array to concatenate")
    vals = [value(a) for a in arrays]
    if axis is None:
        vals = [st.reshape(v, (aval_of(v).size,)) for v in vals]
        axis = 0
    ndims = {aval_of(v).ndim for v in vals}
    if len(ndims) > 1:
        raise op_error(ShapeError, "concatenate", "all the input arrays must have the same "
                       "number of dimensions, got shapes "
                       + ", ".join(str(aval_of(v).shape) for v in vals))
    nd = ndims.pop()
    if nd == 0:
        raise op_error(ShapeError, "concatenate", "zero-dimensional arrays cannot be "
                       "concatenated")
    ax = normalize_axis_arg("concatenate", axis, nd)[0]
    vals = _common_dtype("concatenate", vals, dtype)
    return st.concatenate(vals, ax)


concat = concatenate


def _common_dtype(op: str, vals: list[Any], dtype: Any) -> list[Any]:
    from ember import dtypes
    from ember.ops import elementwise as ew

    dt = dtypes.canonicalize(dtype) if dtype is not None else dtypes.result_type(*vals)
    return [ew.convert(v, dt) for v in vals]


def stack(arrays: Sequence[Any], axis: int = 0, dtype: Any = None) -> Any:
    if not len(arrays):
        raise op_error(EmberValueError, "stack", "need at least one array to stack")
    vals = [value(a) for a in arrays]
    shapes = {aval_of(v).shape for v in vals}
    if len(shapes) > 1:
        raise op_error(ShapeError, "stack", "all input arrays must have the same shape, got "
                       + ", ".join(str(aval_of(v).shape) for v in vals))
    nd = aval_of(vals[0]).ndim + 1
    ax = normalize_axis_arg("stack", axis, nd)[0]
    vals = _common_dtype("stack", vals, dtype)
    return st.concatenate([st.expand_dims(v, ax) for v in vals], ax)


def atleast_1d(*arys: Any) -> Any:
    out = [reshape(value(a), (1,)) if aval_of(value(a)).ndim == 0 else value(a) for a in arys]
    return out[0] if len(out) == 1 else out


def atleast_2d(*arys: Any) -> Any:
    out = []
    for a in arys:
        x = value(a)
        nd = aval_of(x).ndim
        out.append(reshape(x, (1, 1)) if nd == 0 else
                   st.expand_dims(x, 0) if nd == 1 else x)
    return out[0] if len(out) == 1 else out


def atleast_3d(*arys: Any) -> Any:
    out = []
    for a in arys:
        x = value(a)
        s = aval_of(x).shape
        out.append(reshape(x, (1, 1, 1)) if len(s) == 0 else reshape(x, (1, s[0], 1))
                   if len(s) == 1 else reshape(x, (*s, 1)) if len(s) == 2 else x)
    return out[0] if len(out) == 1 else out


def hstack(tup: Sequence[Any], dtype: Any = None) -> Any:
    arrs = [atleast_1d(a) for a in tup]
    return concatenate(arrs, 0 if aval_of(arrs[0]).ndim == 1 else 1, dtype)


def vstack(tup: Sequence[Any], dtype: Any = None) -> Any:
    return concatenate([atleast_2d(a) for a in tup], 0, dtype)


def dstack(tup: Sequence[Any]) -> Any:
    return concatenate([atleast_3d(a) for a in tup], 2)


def column_stack(tup: Sequence[Any]) -> Any:
    cols = []
    for a in tup:
        x = value(a)
        cols.append(reshape(x, (-1, 1)) if aval_of(x).ndim < 2 else x)
    return concatenate(cols, 1)


def array_split(ary: Any, indices_or_sections: Any, axis: int = 0) -> list[Any]:
    x = value(ary)
    shape = aval_of(x).shape
    ax = normalize_axis_arg("array_split", axis, len(shape))[0]
    n = shape[ax]
    if isinstance(indices_or_sections, (int, np.integer)):
        sections = int(indices_or_sections)
        if sections <= 0:
            raise op_error(EmberValueError, "split", "number of sections must be larger than 0")
        each, extra = divmod(n, sections)
        sizes = [each + 1] * extra + [each] * (sections - extra)
        bounds = list(np.cumsum([0] + sizes))
    else:
        bounds = [0] + [min(max(int(i) if i >= 0 else n + int(i), 0), n)
                        for i in indices_or_sections] + [n]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        start = [0] * len(shape)
        limit = list(shape)
        start[ax], limit[ax] = int(lo), int(max(hi, lo))
        out.append(st.slice(x, start, limit))
    return out


def split(ary: Any, indices_or_sections: Any, axis: int = 0) -> list[Any]:
    if isinstance(indices_or_sections, (int, np.integer)):
        x = value(ary)
        n = aval_of(x).shape[normalize_axis_arg("split", axis, aval_of(x).ndim)[0]]
        if n % int(indices_or_sections):
            raise op_error(EmberValueError, "split", f"array split does not result in an equal "
                           f"division: {n} into {indices_or_sections}")
    return array_split(ary, indices_or_sections, axis)


def shape(a: Any) -> tuple[int, ...]:
    return aval_of(value(a)).shape


def ndim(a: Any) -> int:
    return aval_of(value(a)).ndim


def size(a: Any, axis: int | None = None) -> int:
    s = aval_of(value(a)).shape
    return int(np.prod(s, dtype=np.int64)) if axis is None else s[axis]


