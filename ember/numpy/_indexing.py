"""Indexing: ``x[idx]``, ``x.at[idx].set/add/...``, ``x[idx] = v``, take and friends.

Semantics are NumPy's (basic, advanced and boolean indexing, with advanced results placed where
NumPy places them), with two deliberate differences, shared with JAX and MLX:

- results are values, never views: ``y = x[1:]`` then ``x[1] = 0`` leaves ``y`` unchanged;
- ``x[idx] = v`` rebinds ``x`` to an updated copy, and under ``jit`` an out-of-range traced index
  is clamped (reads) or dropped (writes) because a compiled program cannot raise. Concrete
  out-of-range indices raise ``IndexError`` as in NumPy.

Boolean masks need concrete values (the result's shape depends on them), so they are not
allowed under ``jit``: use ``where`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ember import dtypes
from ember.core.array import Array, Tracer
from ember.core.trace import GraphTracer, aval_of, to_array
from ember.errors import EmberError, ShapeError, TracerError, op_error, user_frame
from ember.numpy._core import broadcast_shapes, promote_args, value
from ember.ops import elementwise as ew
from ember.ops import structural as st
from ember.ops.indexing import gather, scatter

__all__ = ["take", "take_along_axis",
           "put_along_axis", "put", "compress", "extract", "choose", "select"]


class IndexOutOfRangeError(EmberError, IndexError):
    """A concrete index outside the array (NumPy raises ``IndexError`` too)."""


# --- parsing ---------------------------------------------------------------------------------

@dataclass
class _Parsed:
    """An index split into what each axis of the (None-expanded) operand gets."""

    entries: list[tuple[str, Any]]  # per axis: ("slice", slice) | ("int", int) | ("array", a)
    new_axes: list[int]             # positions of None, in the expanded operand


def _is_int_scalar(i: Any) -> bool:
    return isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_))


def _parse(shape: tuple[int, ...], index: Any) -> _Parsed:
    if not isinstance(index, tuple):
        index = (index,)
    expanded: list[Any] = []
    for i in index:
        if isinstance(i, (list,)) or (isinstance(i, np.ndarray)):
            i = value(i) if not (isinstance(i, list) and not i) else to_array(np.zeros(0, np.int64))
        expanded.append(i)
    consumed = sum(_axes_used(i) for i in expanded if i is not Ellipsis and i is not None)
    if sum(i is Ellipsis for i in expanded) > 1:
        raise op_error(IndexOutOfRangeError, "getitem", "an index can only have a single ellipsis")
    if consumed > len(shape):
        raise op_error(IndexOutOfRangeError, "getitem", f"too many indices for array: array is "
                       f"{len(shape)}-dimensional, but {consumed} were indexed")
    out: list[Any] = []
    for i in expanded:
        if i is Ellipsis:
            out.extend([slice(None)] * (len(shape) - consumed))
        else:
            out.append(i)
    if not any(i is Ellipsis for i in expanded):
        out.extend([slice(None)] * (len(shape) - consumed))
    entries, new_axes = [], []
    for i in out:
        if i is None:
            new_axes.append(len(entries))
            entries.append(("slice", slice(None)))
        elif isinstance(i, slice):
            entries.append(("slice", i))
        elif _is_int_scalar(i):
            entries.append(("int", int(i)))
        elif _is_concrete_bool_scalar(i):
            # NumPy: a 0-d boolean index adds an axis of length 1 (True) or 0 (False).
            new_axes.append(len(entries))
            entries.append(("array", to_array(np.zeros(int(bool(i)), np.int64))))
        else:
            arr = value(i)
            if aval_of(arr).dtype == dtypes.bool_:
                entries.extend(("array", a) for a in _mask_to_indices(arr))
            elif dtypes.is_int(aval_of(arr).dtype):
                entries.append(("array", arr))
            else:
                raise op_error(IndexOutOfRangeError, "getitem", "only integers, slices, ellipsis, "
                               f"None and integer or boolean arrays are valid indices, got "
                               f"{aval_of(arr).dtype} array")
    return _Parsed(entries, new_axes)


def _is_concrete_bool_scalar(i: Any) -> bool:
    if isinstance(i, (bool, np.bool_)):
        return True
    aval = getattr(i, "aval", None)
    return (aval is not None and aval.dtype == dtypes.bool_ and aval.ndim == 0
            and not isinstance(i, Tracer))


def _axes_used(i: Any) -> int:
    if isinstance(i, (bool, np.bool_)):
        return 0
    aval = getattr(i, "aval", None)
    if aval is not None and aval.dtype == dtypes.bool_:
        return max(aval.ndim, 1) if aval.ndim else 0
    return 1


def _mask_to_indices(mask: Any) -> list[Any]:
    if isinstance(mask, Tracer):
        raise TracerError(
            "boolean mask indexing needs concrete values: its result's shape depends on the "
            f"mask ({aval_of(mask)}).\n  at {user_frame()}\n"
            "Under jit use ember.numpy.where(mask, x, other) or x.at[mask]... with a fixed-size "
            "alternative.")
    host = np.asarray(mask.to_numpy())
    if host.ndim == 0:
        raise op_error(IndexOutOfRangeError, "getitem", "0-d boolean indices are not supported")
    return [to_array(a.astype(np.int64)) for a in np.nonzero(host)]


# --- reading ---------------------------------------------------------------------------------

def _with_new_axes(x: Any, parsed: _Parsed) -> Any:
    if not parsed.new_axes:
        return x
    shape = list(aval_of(x).shape)
    for pos in parsed.new_axes:
        shape.insert(pos, 1)
    return st.reshape(x, shape)


def _static_slice(x: Any, axis: int, s: slice) -> Any:
    for bound in (s.start, s.stop, s.step):
        if isinstance(bound, Tracer):
            raise TracerError(f"slice bounds must be static under jit, got a traced bound.\n"
                              f"  at {user_frame()}\nUse ember.lax.dynamic_slice(x, starts, "
                              "sizes) for a window at a traced position.")
    n = aval_of(x).shape[axis]
    start, stop, step = slice(*(None if b is None else int(b) for b in
                                (s.start, s.stop, s.step))).indices(n)
    count = len(range(start, stop, step))
    nd = aval_of(x).ndim
    lo, hi, strides = [0] * nd, list(aval_of(x).shape), [1] * nd
    if step > 0:
        lo[axis], hi[axis], strides[axis] = start, start + max(count - 1, 0) * step + \
            (1 if count else 0), step
        return st.slice(x, lo, hi, strides)
    if count == 0:
        hi[axis] = lo[axis] = 0
        return st.slice(x, lo, hi)
    last = start + (count - 1) * step
    lo[axis], hi[axis], strides[axis] = last, start + 1, -step
    return st.rev(st.slice(x, lo, hi, strides), (axis,))


def _check_int(i: int, n: int, axis: int) -> int:
    if not -n <= i < n:
        raise op_error(IndexOutOfRangeError, "getitem", f"index {i} is out of bounds for axis "
                       f"{axis} with size {n}")
    return i % n


def _normalize_index_array(idx: Any, n: int, axis: int) -> Any:
    """Wrap negative indices; check bounds now when the indices are concrete."""
    if not isinstance(idx, Tracer):
        host = np.asarray(idx.to_numpy())
        if host.size and (host.min() < -n or host.max() >= n):
            bad = host[(host < -n) | (host >= n)].flat[0]
            raise op_error(IndexOutOfRangeError, "getitem", f"index {bad} is out of bounds for "
                           f"axis {axis} with size {n}")
        return to_array(np.where(host < 0, host + n, host).astype(np.int64))
    idx = ew.convert(idx, dtypes.int64)
    zero = ew.zeros_like(idx)
    return ew.select(ew.lt(idx, zero), ew.add(idx, ew.full_like(idx, n)), idx)


def getitem(x: Any, index: Any) -> Any:
    """``x[index]`` with NumPy semantics (results are copies)."""
    x = value(x)
    if isinstance(index, Tracer) and aval_of(index).shape == () and \
            dtypes.is_int(aval_of(index).dtype):
        index = (index,)
    parsed = _parse(aval_of(x).shape, index)
    x = _with_new_axes(x, parsed)
    entries = parsed.entries
    has_array = any(kind == "array" for kind, _ in entries)
    if has_array:  # ints join the advanced indices (NumPy's rule), as 0-d arrays
        entries = [("array", to_array(np.int64(v))) if kind == "int" else (kind, v)
                   for kind, v in entries]
    # Basic indices first: slices on their axes, static ints dropped afterwards.
    drop = []
    for axis, (kind, v) in enumerate(entries):
        if kind == "slice":
            x = _static_slice(x, axis, v)
        elif kind == "int":
            n = aval_of(x).shape[axis]
            i = _check_int(v, n, axis)
            x = st.index_in_dim(x, i, axis, keepdims=True)
            drop.append(axis)
    if not has_array:
        return st.squeeze(x, tuple(drop)) if drop else x
    return _advanced(x, entries)


def _advanced(x: Any, entries: list[tuple[str, Any]]) -> Any:
    adv_axes = [a for a, (kind, _) in enumerate(entries) if kind == "array"]
    shape = aval_of(x).shape
    idxs = [_normalize_index_array(entries[a][1], shape[a], a) for a in adv_axes]
    bshape = broadcast_shapes("getitem", *[aval_of(i).shape for i in idxs])
    idxs = [st.broadcast_to_shape(i, bshape) for i in idxs]
    rest = [a for a in range(len(shape)) if a not in adv_axes]
    moved = st.transpose(x, adv_axes + rest)
    stacked = st.concatenate([st.reshape(i, (*bshape, 1)) for i in idxs], len(bshape))
    out = gather(moved, stacked)
    adjacent = adv_axes == list(range(adv_axes[0], adv_axes[0] + len(adv_axes)))
    if adjacent and adv_axes[0] > 0:
        # NumPy keeps the result of adjacent advanced indices where they stood.
        nb, first = len(bshape), adv_axes[0]
        n_out = aval_of(out).ndim
        perm = list(range(nb, nb + first)) + list(range(nb)) + list(range(nb + first, n_out))
        out = st.transpose(out, perm)
    return out


# --- writing ---------------------------------------------------------------------------------

def _box(shape: tuple[int, ...], index: Any) -> tuple[list[Any], list[int], list[int]] | None:
    """For an index made of ints (static or traced) and unit-step slices: the window's start
    per axis, its size, and the axes that ints remove. None for anything else."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is None or isinstance(i, (list, np.ndarray)) for i in index):
        return None
    if sum(i is Ellipsis for i in index) > 1:
        return None
    used = sum(1 for i in index if i is not Ellipsis)
    if used > len(shape):
        return None
    full: list[Any] = []
    for i in index:
        if i is Ellipsis:
            full.extend([slice(None)] * (len(shape) - used))
        else:
            full.append(i)
    full.extend([slice(None)] * (len(shape) - len(full)))
    starts, sizes, dropped = [], [], []
    for axis, (i, n) in enumerate(zip(full, shape)):
        if isinstance(i, slice):
            if any(isinstance(b, Tracer) for b in (i.start, i.stop, i.step)):
                return None
            lo, hi, step = i.indices(n)
            if step != 1:
                return None
            starts.append(lo)
            sizes.append(max(hi - lo, 0))
        elif _is_int_scalar(i):
            starts.append(_check_int(int(i), n, axis))
            sizes.append(1)
            dropped.append(axis)
        elif isinstance(i, Array) and aval_of(i).shape == () and \
                dtypes.is_int(aval_of(i).dtype):
            starts.append(_normalize_index_array(i, n, axis))
            sizes.append(1)
            dropped.append(axis)
        else:
            return None
    return starts, sizes, dropped


_COMBINE = {"add": ew.add, "multiply": ew.mul, "min": ew.min, "max": ew.max}
_SCATTER_MODE = {"set": "set", "add": "add", "multiply": "mul", "min": "min", "max": "max"}


def _update(x: Any, index: Any, v: Any, how: str) -> Any:
    x = value(x)
    aval = aval_of(x)
    (upd,) = promote_args("at", v, dtype=aval.dtype)
    box = _box(aval.shape, index)
    if box is not None:
        starts, sizes, dropped = box
        region_shape = [s for a, s in enumerate(sizes) if a not in dropped]
        upd = st.broadcast_to_shape(_check_update_shape(upd, region_shape), region_shape)
        upd = st.reshape(upd, sizes)
        if how != "set":
            current = st.dynamic_slice(x, starts, sizes)
            upd = _COMBINE[how](current, upd)
        return st.dynamic_update_slice(x, upd, starts)
    # General case: find which flat positions the index selects, then scatter there.
    positions = st.reshape(st.iota(dtypes.int64, (aval.size,), 0), aval.shape)
    picked = getitem(positions, index)
    pshape = aval_of(picked).shape
    upd = st.broadcast_to_shape(_check_update_shape(upd, pshape), pshape)
    flat = st.reshape(x, (aval.size,))
    n = aval_of(picked).size
    out = scatter(flat, st.reshape(picked, (n, 1)), st.reshape(upd, (n,)), _SCATTER_MODE[how])
    return st.reshape(out, aval.shape)


def _check_update_shape(upd: Any, target: list[int] | tuple[int, ...]) -> Any:
    """NumPy accepts a value that broadcasts to the region once leading 1s are dropped."""
    shape = aval_of(upd).shape
    extra = len(shape) - len(target)
    core = shape[extra:] if extra > 0 else shape
    ok = all(d == 1 for d in shape[:max(extra, 0)]) and \
        all(c in (1, t) for c, t in zip(reversed(core), reversed(tuple(target))))
    if not ok:
        raise op_error(ShapeError, "setitem", f"could not broadcast a value of shape {shape} "
                       f"into the indexed region of shape {tuple(target)}")
    return st.reshape(upd, core) if extra > 0 else upd


def at_set(x: Any, index: Any, v: Any) -> Any:
    return _update(x, index, v, "set")


class _IndexedUpdate:
    """``x.at[index]``: functional updates that return a new array."""

    __slots__ = ("array", "index")

    def __init__(self, array: Any, index: Any):
        self.array = array
        self.index = index

    def get(self) -> Any:
        return getitem(self.array, self.index)

    def set(self, values: Any) -> Any:
        return _update(self.array, self.index, values, "set")

    def add(self, values: Any) -> Any:
        return _update(self.array, self.index, values, "add")

    def subtract(self, values: Any) -> Any:
        from ember.numpy._math import negative

        return _update(self.array, self.index, negative(values), "add")

    def multiply(self, values: Any) -> Any:
        return _update(self.array, self.index, values, "multiply")

    def divide(self, values: Any) -> Any:
        from ember.numpy._math import reciprocal

        return _update(self.array, self.index, reciprocal(values), "multiply")

    def min(self, values: Any) -> Any:
        return _update(self.array, self.index, values, "min")

    def max(self, values: Any) -> Any:
        return _update(self.array, self.index, values, "max")


class _At:
    __slots__ = ("array",)

    def __init__(self, array: Any):
        self.array = array

    def __getitem__(self, index: Any) -> _IndexedUpdate:
        return _IndexedUpdate(self.array, index)


def at_property(self: Any) -> _At:
    return _At(self)


def rebind(target: Any, new: Any) -> None:
    """Make the array object ``target`` hold ``new``'s value (``x[i] = v`` on an Array)."""
    if type(target) is not type(new) or (isinstance(target, Tracer) and
                                         target._trace is not new._trace):
        raise TracerError(
            "x[idx] = v cannot store a traced value into an array that was created outside "
            f"the traced function.\n  at {user_frame()}\nWrite x = x.at[idx].set(v) instead.")
    for cls in type(new).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if slot != "__weakref__" and hasattr(new, slot):
                setattr(target, slot, getattr(new, slot))
    if isinstance(target, GraphTracer):
        builder = target._trace.builder
        builder.vars[id(target)] = builder.vars[id(new)]
        builder.tracers.append(new)


# --- take and friends ------------------------------------------------------------------------

def take(a: Any, indices: Any, axis: int | None = None, mode: str | None = None) -> Any:
    x = value(a)
    if axis is None:
        x = st.reshape(x, (aval_of(x).size,))
        axis = 0
    nd = aval_of(x).ndim
    axis = axis % nd
    return getitem(x, (slice(None),) * axis + (value(indices),))


def take_along_axis(arr: Any, indices: Any, axis: int | None) -> Any:
    x, idx = value(arr), value(indices)
    if axis is None:
        x = st.reshape(x, (aval_of(x).size,))
        axis = 0
    nd = aval_of(x).ndim
    if aval_of(idx).ndim != nd:
        raise op_error(ShapeError, "take_along_axis", f"indices ({aval_of(idx).shape}) and arr "
                       f"({aval_of(x).shape}) must have the same number of dimensions")
    axis = axis % nd
    shape = broadcast_shapes("take_along_axis", tuple(n for i, n in enumerate(aval_of(x).shape)
                                                      if i != axis),
                             tuple(n for i, n in enumerate(aval_of(idx).shape) if i != axis))
    full = list(shape)
    full.insert(axis, aval_of(idx).shape[axis])
    idx = st.broadcast_to_shape(idx, full)
    xfull = list(shape)
    xfull.insert(axis, aval_of(x).shape[axis])
    x = st.broadcast_to_shape(x, xfull)
    idx = _normalize_index_array(idx, aval_of(x).shape[axis], axis)
    from ember.ops.indexing import take_along_axis as take_along

    return take_along(x, idx, axis)


def put_along_axis(arr: Any, indices: Any, values: Any, axis: int | None,
                   mode: str = "set") -> Any:
    """Functional ``numpy.put_along_axis``: returns the updated array."""
    x, idx = value(arr), value(indices)
    nd = aval_of(x).ndim
    axis = axis % nd if axis is not None else None
    if axis is None:
        return put_along_axis(st.reshape(x, (aval_of(x).size,)), idx, values, 0, mode)
    shape = aval_of(idx).shape
    index = tuple(idx if d == axis else st.broadcast_in_dim(
        st.iota(dtypes.int64, (shape[d],), 0), shape, (d,)) for d in range(nd))
    return _update(x, index, values, mode)


def put(a: Any, ind: Any, v: Any, mode: str = "raise") -> Any:
    """Functional ``numpy.put``: returns a copy with flat positions ``ind`` set to ``v``."""
    x = value(a)
    flat = st.reshape(x, (aval_of(x).size,))
    return st.reshape(at_set(flat, value(ind), v), aval_of(x).shape)


def compress(condition: Any, a: Any, axis: int | None = None) -> Any:
    cond = value(condition)
    x = value(a)
    if axis is None:
        x = st.reshape(x, (aval_of(x).size,))
        axis = 0
    return take(x, _mask_to_indices(cond)[0], axis)


def extract(condition: Any, arr: Any) -> Any:
    x = value(arr)
    return getitem(st.reshape(x, (aval_of(x).size,)),
                   st.reshape(value(condition), (aval_of(value(condition)).size,)))


def choose(a: Any, choices: Any) -> Any:
    from ember.numpy._math import where

    idx = value(a)
    choices = list(choices)
    out = value(choices[-1])
    for k in range(len(choices) - 2, -1, -1):
        out = where(idx == k, choices[k], out)
    return out


def select(condlist: Any, choicelist: Any, default: Any = 0) -> Any:
    from ember.numpy._math import where

    out = value(default)
    for cond, choice in reversed(list(zip(condlist, choicelist))):
        out = where(cond, choice, out)
    return out
