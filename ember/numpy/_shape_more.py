"""More shape functions: tile, repeat, flip, roll, pad, diagonal, rot90, unstack, diff.

Each is written with the structural primitives (slice, rev, concatenate, broadcast, reshape,
pad), so results are exact, gradients are those primitives' transpose rules, and the jitted
graph stays readable. Index patterns that are known when tracing (the periodic extensions of
``pad``, a static ``roll``) are cut into contiguous runs and assembled from slices rather than
lowered to a gather; only data-dependent selections (``repeat`` with traced counts, ``roll``
with a traced shift) use ``gather``/``dynamic_slice``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ember import dtypes
from ember.core.array import Tracer
from ember.core.trace import aval_of, to_array
from ember.errors import (
    EmberValueError,
    ShapeError,
    TracerError,
    UnsupportedError,
    op_error,
    user_frame,
)
from ember.numpy._core import asarray, normalize_axis_arg, value
from ember.ops import elementwise as ew
from ember.ops import indexing as ix
from ember.ops import reduce as rd
from ember.ops import structural as st

__all__ = ["tile", "repeat", "flip", "fliplr", "flipud", "roll", "pad", "diagonal", "rot90",
           "unstack", "diff"]


# --- helpers ---------------------------------------------------------------------------------

def _axis(op: str, axis: int, ndim: int) -> int:
    return normalize_axis_arg(op, int(axis), ndim)[0]


def _static_ints(op: str, what: str, x: Any) -> np.ndarray:
    """``x`` as a NumPy integer array; it must be known when tracing (it decides shapes)."""
    if isinstance(x, Tracer):
        raise TracerError(f"{op}: {what} decides the result's shape, so it must be a concrete "
                          f"value, not a traced one ({x.aval}).\n  at {user_frame()}")
    host = np.asarray(x.to_numpy() if hasattr(x, "to_numpy") else x)
    if host.size and host.dtype.kind not in "iub":
        raise op_error(EmberValueError, op, f"{what} must be integers, got {host.dtype}")
    return host.astype(np.int64)


def _slice_axis(x: Any, axis: int, start: int, stop: int) -> Any:
    shape = aval_of(x).shape
    lo, hi = [0] * len(shape), list(shape)
    lo[axis], hi[axis] = start, stop
    return st.slice(x, lo, hi)


def _broadcast_axis(x: Any, axis: int, n: int) -> Any:
    """Stretch a size-1 ``axis`` of ``x`` to ``n``."""
    shape = list(aval_of(x).shape)
    shape[axis] = n
    return st.broadcast_in_dim(x, shape, tuple(range(len(shape))))


def _take_static(x: Any, index: np.ndarray, axis: int) -> Any:
    """``x`` indexed by the known 1-d ``index`` along ``axis``, built from slices.

    The index is cut into runs that step by +1 (a slice), -1 (a reversed slice) or 0 (a
    broadcast element); the runs are concatenated. Periodic or mirrored patterns need only a
    few runs, which is why pad and roll use this instead of a gather.
    """
    pieces, i, n = [], 0, len(index)
    while i < n:
        step = int(index[i + 1] - index[i]) if i + 1 < n else 1
        if step not in (-1, 0, 1):
            step = 1
        j = i + 1
        while j < n and index[j] - index[j - 1] == step:
            j += 1
        first, last = int(index[i]), int(index[j - 1])
        if step == 0:
            pieces.append(_broadcast_axis(_slice_axis(x, axis, first, first + 1), axis, j - i))
        elif step == 1:
            pieces.append(_slice_axis(x, axis, first, last + 1))
        else:
            pieces.append(st.rev(_slice_axis(x, axis, last, first + 1), (axis,)))
        i = j
    if not pieces:
        return _slice_axis(x, axis, 0, 0)
    return pieces[0] if len(pieces) == 1 else st.concatenate(pieces, axis)


def _gather_axis(x: Any, index: Any, axis: int) -> Any:
    """``x`` indexed along ``axis`` by a 1-d integer array (traced or not)."""
    moved = st.moveaxis(x, axis, 0)
    n = aval_of(index).shape[0]
    out = ix.gather(moved, st.reshape(index, (n, 1)))
    return st.moveaxis(out, 0, axis)


# --- tile and repeat -------------------------------------------------------------------------

def tile(A: Any, reps: int | Sequence[int]) -> Any:  # noqa: N803  (NumPy's argument name)
    """Repeat the whole of ``A`` ``reps`` times along each axis (one broadcast + reshape)."""
    x = value(A)
    reps = [int(r) for r in np.atleast_1d(_static_ints("tile", "reps", reps))]
    if any(r < 0 for r in reps):
        raise op_error(EmberValueError, "tile", f"negative repetitions are not allowed: {reps}")
    shape = list(aval_of(x).shape)
    nd = max(len(shape), len(reps))
    shape = [1] * (nd - len(shape)) + shape
    reps = [1] * (nd - len(reps)) + reps
    x = st.reshape(x, shape)
    # Axis k of x becomes axis 2k+1 of (r0, n0, r1, n1, ...); merging each pair tiles it.
    spread = st.broadcast_in_dim(x, [d for r, n in zip(reps, shape) for d in (r, n)],
                                 tuple(range(1, 2 * nd, 2)))
    return st.reshape(spread, [r * n for r, n in zip(reps, shape)])


def repeat(a: Any, repeats: Any, axis: int | None = None, *,
           total_repeat_length: int | None = None) -> Any:
    """Repeat each element of ``a`` (``numpy.repeat``).

    ``repeats`` is a scalar or one count per element along ``axis``. The output length depends
    on the counts, so per-element counts must be concrete unless ``total_repeat_length`` fixes
    it (as in JAX): longer totals are cut, shorter ones repeat the last element.
    """
    x = value(a)
    if axis is None:
        x = st.reshape(x, (aval_of(x).size,))
        axis = 0
    shape = aval_of(x).shape
    axis = _axis("repeat", axis, len(shape))
    n = shape[axis]
    if isinstance(repeats, Tracer):
        if total_repeat_length is None:
            raise TracerError(f"repeat: traced per-element repeats decide the result's shape; "
                              f"pass total_repeat_length to fix it.\n  at {user_frame()}")
        counts = repeats if repeats.aval.ndim else st.broadcast_in_dim(repeats, (n,), ())
        return _gather_axis(x, _traced_repeat_index(counts, n, int(total_repeat_length)), axis)
    host = _static_ints("repeat", "repeats", repeats)
    if (host < 0).any():
        raise op_error(EmberValueError, "repeat", "repeats may not contain negative values")
    if host.ndim == 0 or host.shape == (1,):
        r = int(host.reshape(()))
        if total_repeat_length is None or total_repeat_length == r * n:
            # Give every element a new axis of length r right after it, then merge the two.
            spread = list(shape)
            spread.insert(axis + 1, r)
            dims = tuple(d if d <= axis else d + 1 for d in range(len(shape)))
            out_shape = list(shape)
            out_shape[axis] = n * r
            return st.reshape(st.broadcast_in_dim(x, spread, dims), out_shape)
        host = np.full((n,), r, np.int64)
    if host.shape != (n,):
        raise op_error(ShapeError, "repeat", f"repeats of shape {host.shape} do not match axis "
                       f"{axis} of length {n}")
    index = np.repeat(np.arange(n, dtype=np.int64), host)
    if total_repeat_length is not None:
        index = index[:total_repeat_length]
        fill = index[-1] if index.size else 0
        index = np.concatenate([index, np.full(total_repeat_length - index.size, fill)])
    return _gather_axis(x, value(index), axis)


def _traced_repeat_index(counts: Any, n: int, total: int) -> Any:
    """Source position of each output element: the number of elements whose run has ended
    by then, found by scattering a 1 at each run's end and taking a running sum."""
    ends = rd.cumsum(ew.convert(counts, dtypes.int64), 0)
    zeros = st.broadcast_in_dim(to_array(np.int64(0)), (total,), ())
    marks = ix.scatter(zeros,
                       st.reshape(ends, (n, 1)), ew.full_like(ends, 1), "add")
    return rd.cumsum(marks, 0)


# --- flips and rotations ---------------------------------------------------------------------

def flip(m: Any, axis: int | Sequence[int] | None = None) -> Any:
    x = value(m)
    return st.rev(x, normalize_axis_arg("flip", axis, aval_of(x).ndim))


def fliplr(m: Any) -> Any:
    x = value(m)
    if aval_of(x).ndim < 2:
        raise op_error(ShapeError, "fliplr", f"input must be >= 2-d, got {aval_of(x).shape}")
    return st.rev(x, (1,))


def flipud(m: Any) -> Any:
    x = value(m)
    if aval_of(x).ndim < 1:
        raise op_error(ShapeError, "flipud", "input must be >= 1-d")
    return st.rev(x, (0,))


def rot90(m: Any, k: int = 1, axes: Sequence[int] = (0, 1)) -> Any:
    """Rotate by 90 degrees ``k`` times in the plane of ``axes``, from the first axis toward
    the second."""
    x = value(m)
    nd = aval_of(x).ndim
    if len(axes) != 2:
        raise op_error(EmberValueError, "rot90", "len(axes) must be 2")
    if nd < 2:
        raise op_error(ShapeError, "rot90", f"input must be >= 2-d, got {aval_of(x).shape}")
    a0, a1 = (_axis("rot90", a, nd) for a in axes)
    if a0 == a1:
        raise op_error(EmberValueError, "rot90", f"axes must be different, got {tuple(axes)}")
    k = int(k) % 4
    perm = list(range(nd))
    perm[a0], perm[a1] = a1, a0
    if k == 0:
        return x
    if k == 2:
        return st.rev(x, (a0, a1))
    if k == 1:
        return st.transpose(st.rev(x, (a1,)), perm)
    return st.rev(st.transpose(x, perm), (a1,))


# --- roll ------------------------------------------------------------------------------------

def roll(a: Any, shift: Any, axis: int | Sequence[int] | None = None) -> Any:
    """Shift elements cyclically; ``shift`` may be traced (then it uses a dynamic slice)."""
    x = value(a)
    if axis is None:
        return st.reshape(roll(st.reshape(x, (aval_of(x).size,)), shift, 0), aval_of(x).shape)
    nd = aval_of(x).ndim
    if isinstance(shift, Tracer) or (isinstance(shift, (list, tuple))
                                     and any(isinstance(s, Tracer) for s in shift)):
        return _roll_traced(x, shift, axis)
    shifts, axes = np.broadcast_arrays(_static_ints("roll", "shift", shift),
                                       np.asarray(axis, np.int64))
    totals: dict[int, int] = {}
    for s, ax in zip(shifts.reshape(-1), axes.reshape(-1)):
        ax = _axis("roll", int(ax), nd)
        totals[ax] = totals.get(ax, 0) + int(s)
    for ax, s in totals.items():
        n = aval_of(x).shape[ax]
        if n and s % n:
            x = _take_static(x, (np.arange(n) - s) % n, ax)
    return x


def _roll_traced(x: Any, shift: Any, axis: Any) -> Any:
    nd = aval_of(x).ndim
    axes = axis if isinstance(axis, (list, tuple)) else (axis,)
    shifts = shift if isinstance(shift, (list, tuple)) else (shift,) * len(axes)
    if len(shifts) != len(axes):
        raise op_error(ShapeError, "roll", f"{len(shifts)} shifts for {len(axes)} axes")
    for s, ax in zip(shifts, axes):
        ax = _axis("roll", ax, nd)
        n = aval_of(x).shape[ax]
        if n == 0:
            continue
        s = ew.convert(value(s), dtypes.int64)
        if aval_of(s).ndim:
            raise op_error(ShapeError, "roll", f"a traced shift must be a scalar, got "
                           f"{aval_of(s).shape}")
        # Window of length n into [x, x] starting at (-shift mod n).
        size = ew.full_like(s, n)
        start = ew.rem(ew.add(ew.rem(ew.neg(s), size), size), size)
        doubled = st.concatenate([x, x], ax)
        zero = ew.zeros_like(start)
        starts = [start if i == ax else zero for i in range(nd)]
        x = st.dynamic_slice(doubled, starts, aval_of(x).shape)
    return x


# --- pad -------------------------------------------------------------------------------------

def _as_pairs(op: str, what: str, spec: Any, ndim: int) -> np.ndarray:
    """NumPy's forms (``n``, ``(n,)``, ``(before, after)``, one pair per axis) as ``(ndim, 2)``."""
    arr = np.asarray(spec)
    try:
        return np.broadcast_to(arr, (ndim, 2))
    except ValueError:
        raise op_error(ShapeError, op, f"{what} of shape {arr.shape} does not fit an array of "
                       f"{ndim} dimensions (expected a scalar, a pair or {ndim} pairs)") from None


def _pad_index(mode: str, n: int, before: int, after: int) -> np.ndarray:
    """Source position of every element of the padded axis, for the periodic modes."""
    p = np.arange(-before, n + after)
    if mode == "edge":
        return np.clip(p, 0, n - 1)
    if mode == "wrap":
        return p % n
    if mode == "symmetric":
        q = p % (2 * n)
        return np.where(q < n, q, 2 * n - 1 - q)
    if n == 1:  # reflect
        return np.zeros_like(p)
    q = p % (2 * (n - 1))
    return np.where(q < n, q, 2 * (n - 1) - q)


_MODES = ("constant", "empty", "edge", "reflect", "symmetric", "wrap")


def pad(array: Any, pad_width: Any, mode: str = "constant", *, constant_values: Any = 0,
        reflect_type: str = "even") -> Any:
    """``numpy.pad`` for modes constant, empty (zeros), edge, reflect, symmetric and wrap.

    Axes are padded one after another, as NumPy does, so corner regions come out the same.
    """
    x = value(array)
    shape = aval_of(x).shape
    nd = len(shape)
    if not isinstance(mode, str) or mode not in _MODES:
        raise op_error(UnsupportedError, "pad", f"mode {mode!r} is not supported; supported "
                       f"modes: {', '.join(_MODES)}")
    if reflect_type != "even":
        raise op_error(UnsupportedError, "pad", "only reflect_type='even' is supported")
    widths = _as_pairs("pad", "pad_width", _static_ints("pad", "pad_width", pad_width), nd)
    if (widths < 0).any():
        raise op_error(EmberValueError, "pad", f"pad_width can't contain negative values: "
                       f"{widths.tolist()}")
    if nd == 0 or not widths.any():
        return x
    if mode in ("constant", "empty"):
        return _pad_constant(x, widths, 0 if mode == "empty" else constant_values)
    for ax, (before, after) in enumerate(widths.tolist()):
        if not before and not after:
            continue
        if shape[ax] == 0:
            raise op_error(EmberValueError, "pad", f"can't extend empty axis {ax} using mode "
                           f"{mode!r}; only 'constant' and 'empty' can")
        x = _take_static(x, _pad_index(mode, shape[ax], before, after), ax)
    return x


def _pad_constant(x: Any, widths: np.ndarray, constant_values: Any) -> Any:
    dt = aval_of(x).dtype
    nd = aval_of(x).ndim
    if isinstance(constant_values, Tracer) or np.ndim(constant_values) == 0:
        v = ew.convert(value(constant_values), dt)
        if aval_of(v).ndim:
            raise op_error(ShapeError, "pad", "constant_values must be a scalar or pairs")
        return st.pad(x, v, widths[:, 0].tolist(), widths[:, 1].tolist())
    values = _as_pairs("pad", "constant_values", constant_values, nd)
    for ax in range(nd):
        for side in (0, 1):
            if widths[ax, side]:
                lo, hi = [0] * nd, [0] * nd
                (lo if side == 0 else hi)[ax] = int(widths[ax, side])
                x = st.pad(x, ew.convert(value(values[ax, side].item()), dt), lo, hi)
    return x


# --- diagonal and unstack --------------------------------------------------------------------

def diagonal(a: Any, offset: int = 0, axis1: int = 0, axis2: int = 1) -> Any:
    """The ``offset`` diagonal of the ``(axis1, axis2)`` planes, as a new last axis.

    The square block holding the diagonal is sliced out, flattened, and read with a stride of
    one more than its side: a strided slice, so the gradient is an interior pad.
    """
    x = value(a)
    shape = aval_of(x).shape
    nd = len(shape)
    if nd < 2:
        raise op_error(ShapeError, "diagonal", f"needs an array of at least 2 dimensions, got "
                       f"{shape}")
    ax1, ax2 = _axis("diagonal", axis1, nd), _axis("diagonal", axis2, nd)
    if ax1 == ax2:
        raise op_error(EmberValueError, "diagonal", "axis1 and axis2 cannot be the same")
    rest = [i for i in range(nd) if i not in (ax1, ax2)]
    x = st.transpose(x, (*rest, ax1, ax2))
    rows, cols = shape[ax1], shape[ax2]
    k = int(offset)
    length = max(0, min(rows, cols - k) if k >= 0 else min(rows + k, cols))
    r0, c0 = (0, k) if k >= 0 else (-k, 0)
    lead = [shape[i] for i in rest]
    block = st.slice(x, [0] * len(lead) + [min(r0, rows), min(c0, cols)],
                     lead + [min(r0, rows) + length, min(c0, cols) + length])
    flat = st.reshape(block, (*lead, length * length))
    return st.slice(flat, [0] * (len(lead) + 1), (*lead, length * length),
                    [1] * len(lead) + [length + 1])


def unstack(x: Any, /, *, axis: int = 0) -> tuple[Any, ...]:
    """Split ``x`` along ``axis`` into a tuple of arrays (array API)."""
    v = value(x)
    shape = aval_of(v).shape
    if not shape:
        raise op_error(ShapeError, "unstack", "input must be at least 1-d")
    ax = _axis("unstack", axis, len(shape))
    return tuple(st.index_in_dim(v, i, ax) for i in range(shape[ax]))


def diff(a: Any, n: int = 1, axis: int = -1, prepend: Any = None, append: Any = None) -> Any:
    """``n``-th differences along ``axis``: ``x[1:] - x[:-1]``, repeated ``n`` times (``!=`` for
    booleans, as NumPy). ``prepend``/``append`` are joined on first; a scalar one is one slice."""
    from ember.numpy._math import not_equal, subtract
    from ember.numpy._shape import concatenate

    x = value(a)
    if int(n) != n or n < 0:
        raise op_error(EmberValueError, "diff", f"order must be a non-negative integer, got {n}")
    if aval_of(x).ndim == 0:
        raise op_error(ShapeError, "diff", "input must be at least 1-d, got a 0-d array")
    ax = _axis("diff", axis, aval_of(x).ndim)
    if prepend is not None or append is not None:
        parts = [_edge(x, ax, prepend), x, _edge(x, ax, append)]
        x = concatenate([p for p in parts if p is not None], ax)
    step = not_equal if aval_of(x).dtype == dtypes.bool_ else subtract
    for _ in range(int(n)):
        size = aval_of(x).shape[ax]
        x = step(_slice_axis(x, ax, min(1, size), size), _slice_axis(x, ax, 0, max(size - 1, 0)))
    return x


def _edge(x: Any, axis: int, extra: Any) -> Any:
    """``diff``'s ``prepend``/``append``: a scalar becomes one slice of ``x``'s shape. A Python
    scalar is an ordinary (strong) value here, as in NumPy: ``diff(f32, prepend=0.5)`` is f64."""
    if extra is None:
        return None
    e = asarray(extra)
    if aval_of(e).ndim:
        return e
    shape = list(aval_of(x).shape)
    shape[axis] = 1
    return st.broadcast_in_dim(e, shape, ())
