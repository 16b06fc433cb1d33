"""Sorting and searching: sort, argsort, top_k, searchsorted, nonzero, argwhere, unique and
the array API's unique_all/counts/inverse/values."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ember import dtypes
from ember.core.array import Tracer
from ember.core.trace import aval_of, to_array
from ember.errors import EmberValueError, TracerError, op_error, user_frame
from ember.numpy._core import value
from ember.ops import elementwise as ew
from ember.ops import structural as st
from ember.ops.sort import argsort as _argsort
from ember.ops.sort import sort as _sort
from ember.ops.sort import top_k as _top_k

__all__ = ["sort", "argsort", "top_k", "searchsorted", "nonzero", "argwhere", "flatnonzero",
           "unique", "unique_all", "unique_counts", "unique_inverse", "unique_values",
           "partition", "argpartition"]


def _axis_input(a: Any, axis: int | None) -> tuple[Any, int]:
    x = value(a)
    if axis is None:
        return st.reshape(x, (aval_of(x).size,)), 0
    return x, axis


def sort(a: Any, axis: int | None = -1, kind: str | None = None, order: Any = None, *,
         descending: bool = False, stable: bool = True) -> Any:
    """Sorted copy (stable). NaNs sort to the end, as in NumPy."""
    x, axis = _axis_input(a, axis)
    return _sort(x, axis, descending)


def argsort(a: Any, axis: int | None = -1, kind: str | None = None, order: Any = None, *,
            descending: bool = False, stable: bool = True) -> Any:
    x, axis = _axis_input(a, axis)
    return _argsort(x, axis, descending)


def top_k(a: Any, k: int) -> tuple[Any, Any]:
    """The ``k`` largest values along the last axis and their indices, largest first."""
    return _top_k(value(a), k)


def partition(a: Any, kth: int, axis: int = -1) -> Any:
    """A full sort satisfies ``numpy.partition``'s contract."""
    return sort(a, axis)


def argpartition(a: Any, kth: int, axis: int = -1) -> Any:
    return argsort(a, axis)


def searchsorted(a: Any, v: Any, side: str = "left", sorter: Any = None) -> Any:
    """Insertion points of ``v`` in sorted 1-d ``a``, by a branch-free binary search (so it
    works under jit and vmap, in ``log2(len(a))`` gathers of ``v``'s size). NaNs sort last, as
    in ``sort``: ``a`` holds them at its end, and a NaN in ``v`` goes before them (``left``) or
    after them (``right``)."""
    if side not in ("left", "right"):
        raise op_error(EmberValueError, "searchsorted", f"side must be 'left' or 'right', got "
                       f"{side!r}")
    arr = value(a)
    if aval_of(arr).ndim != 1:
        raise op_error(EmberValueError, "searchsorted", f"a must be 1-d, got shape "
                       f"{aval_of(arr).shape}")
    from ember.numpy._indexing import take

    if sorter is not None:
        arr = take(arr, sorter)
    arr, vals = _promote_pair(arr, v)
    n = aval_of(arr).shape[0]
    # ``count`` grows by halving steps while the element just past it still precedes ``v``:
    # the predicate is monotone along sorted ``a``, so this finds how many elements precede.
    count = ew.convert(ew.zeros_like(vals), dtypes.int64)
    step = 1 << max(n.bit_length() - 1, 0)
    while n and step:
        trial = ew.add(count, ew.full_like(count, step))
        last = ew.min(ew.sub(trial, ew.full_like(trial, 1)), ew.full_like(trial, n - 1))
        ok = ew.and_(ew.le(trial, ew.full_like(trial, n)),
                     _precedes(take(arr, last), vals, side))
        count = ew.select(ok, trial, count)
        step >>= 1
    return count


def _precedes(x: Any, v: Any, side: str) -> Any:
    """Whether ``x`` sorts before ``v`` (``left``) or at or before it (``right``)."""
    before = ew.lt(x, v) if side == "left" else ew.le(x, v)
    if not dtypes.is_float(aval_of(x).dtype):
        return before
    # ``<`` is false against NaN, but in sort order every number precedes a NaN query, and for
    # ``right`` so does a NaN of ``a``.
    v_nan = ew.ne(v, v)
    precedes_nan = v_nan if side == "right" else ew.and_(v_nan, ew.eq(x, x))
    return ew.or_(before, precedes_nan)


def _promote_pair(arr: Any, v: Any) -> tuple[Any, Any]:
    x, y = value(arr), value(v)
    common = dtypes.result_type(x, y)
    return ew.convert(x, common), ew.convert(y, common)


def _concrete(op: str, x: Any) -> np.ndarray:
    if isinstance(x, Tracer):
        raise TracerError(f"{op} needs concrete values: the size of its result depends on the "
                          f"data ({aval_of(x)}).\n  at {user_frame()}\nIt cannot be used under "
                          "jit/vmap; use where(...) with a fixed size instead.")
    return np.asarray(x.to_numpy())


def nonzero(a: Any) -> tuple[Any, ...]:
    """Indices of non-zero elements (not available under jit: the size depends on data)."""
    host = _concrete("nonzero", value(a))
    if host.ndim == 0:
        raise op_error(EmberValueError, "nonzero", "called on a 0-d array; use atleast_1d")
    return tuple(to_array(i.astype(np.int64)) for i in np.nonzero(host))


def flatnonzero(a: Any) -> Any:
    return to_array(np.flatnonzero(_concrete("flatnonzero", value(a))).astype(np.int64))


def argwhere(a: Any) -> Any:
    return to_array(np.argwhere(_concrete("argwhere", value(a))).astype(np.int64))


def unique(ar: Any, return_index: bool = False, return_inverse: bool = False,
           return_counts: bool = False, axis: int | None = None) -> Any:
    """Sorted unique elements (not available under jit: the size depends on data)."""
    host = _concrete("unique", value(ar))
    res = np.unique(host, return_index, return_inverse, return_counts, axis=axis)
    if isinstance(res, tuple):
        return tuple(to_array(r if r.dtype in dtypes.SUPPORTED else r.astype(np.int64))
                     for r in res)
    return to_array(res)


class UniqueAllResult(NamedTuple):
    values: Any
    indices: Any
    inverse_indices: Any
    counts: Any


class UniqueCountsResult(NamedTuple):
    values: Any
    counts: Any


class UniqueInverseResult(NamedTuple):
    values: Any
    inverse_indices: Any


def _unique_parts(op: str, x: Any) -> tuple[Any, Any, Any, Any]:
    """The array API's unique: sorted values of flattened ``x``, every NaN a value of its own
    (NaN != NaN), ``-0.0`` and ``0.0`` one value; ``inverse_indices`` has ``x``'s shape."""
    host = _concrete(op, value(x))
    vals, index, inverse, counts = np.unique(host.reshape(-1), return_index=True,
                                             return_inverse=True, return_counts=True,
                                             equal_nan=False)
    return (to_array(vals), to_array(index.astype(np.int64)),
            to_array(inverse.reshape(host.shape).astype(np.int64)),
            to_array(counts.astype(np.int64)))


def unique_all(x: Any, /) -> UniqueAllResult:
    """Unique values, the first index of each, the inverse map and the counts (eager only)."""
    return UniqueAllResult(*_unique_parts("unique_all", x))


def unique_counts(x: Any, /) -> UniqueCountsResult:
    vals, _, _, counts = _unique_parts("unique_counts", x)
    return UniqueCountsResult(vals, counts)


def unique_inverse(x: Any, /) -> UniqueInverseResult:
    vals, _, inverse, _ = _unique_parts("unique_inverse", x)
    return UniqueInverseResult(vals, inverse)


def unique_values(x: Any, /) -> Any:
    return _unique_parts("unique_values", x)[0]
