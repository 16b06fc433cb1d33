"""``gather`` and ``scatter``: reading and writing elements at computed positions.

Both use one index convention: ``indices`` has shape ``(*B, k)`` and addresses the first ``k``
axes of ``operand``; each of the ``B`` index vectors selects an ``operand.shape[k:]`` block.
This is NumPy advanced indexing with the indexed axes moved to the front, which the NumPy layer
does. Out-of-range indices cannot be reported from inside a compiled program, so, as in JAX,
``gather`` clamps them and ``scatter`` drops updates that fall outside; the NumPy layer checks
bounds eagerly and raises ``IndexError`` like NumPy where the indices are known.
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
from ember.ops import elementwise as ew
from ember.ops import structural as st
from ember.ops._checks import same_dtypes

__all__ = ["gather", "scatter", "take_along_axis"]


def _check_indices(op: str, operand: ArrayType, indices: ArrayType) -> int:
    if not dtypes.is_int(indices.dtype):
        raise op_error(DTypeError, op, f"indices must be integers, got {indices.dtype}")
    if indices.ndim == 0 or indices.shape[-1] > operand.ndim:
        raise op_error(ShapeError, op, f"indices of shape {indices.shape} do not address an "
                       f"operand of shape {operand.shape}")
    return indices.shape[-1]


def _index_tuple(indices: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, ...]:
    k = indices.shape[-1]
    return tuple(np.clip(indices[..., i], 0, max(shape[i] - 1, 0)) for i in range(k))


gather_p = Primitive("gather", kind="indexing")


@gather_p.def_abstract_eval
def _gather_rule(operand: ArrayType, indices: ArrayType) -> ArrayType:
    k = _check_indices("gather", operand, indices)
    if any(operand.shape[i] == 0 for i in range(k)) and indices.size:
        raise op_error(ShapeError, "gather", f"cannot index into a zero-size axis of "
                       f"{operand.shape}")
    return ArrayType(indices.shape[:-1] + operand.shape[k:], operand.dtype, weak=operand.weak)


def _gather_impl(operand, indices):
    return operand[_index_tuple(indices, operand.shape)]


gather_p.def_impl(_gather_impl)


def gather(operand: Any, indices: Any) -> Any:
    return gather_p.bind(operand, indices)


@gather_p.def_jvp
def _gather_jvp(primals, tangents):
    x, idx = primals
    out = gather(x, idx)
    t = tangents[0]
    return out, Zero(out.aval) if isinstance(t, Zero) else gather(t, idx)


@gather_p.def_transpose
def _gather_transpose(ct, x, idx):
    if isinstance(ct, Zero):
        return [Zero(x.aval), None]
    # gather clamped out-of-range indices, so the cotangent goes to the clamped positions.
    return [scatter(ew.zeros_like(x), _clamp(idx, x.aval.shape), ct, "add"), None]


def _bounds(idx: Any, shape: Sequence[int]) -> tuple[Any, Any]:
    """Per-component limits ``0`` and ``shape[i] - 1``, broadcast to the shape of ``idx``."""
    from ember.core.trace import to_array

    ishape = aval_of(idx).shape
    dt = aval_of(idx).dtype
    hi = to_array(np.asarray([max(n - 1, 0) for n in shape[:ishape[-1]]], dt))
    hi = st.broadcast_in_dim(hi, ishape, (len(ishape) - 1,))
    return ew.zeros_like(idx), hi


def _clamp(idx: Any, shape: Sequence[int]) -> Any:
    lo, hi = _bounds(idx, shape)
    return ew.max(ew.min(idx, hi), lo)


def _in_bounds(idx: Any, shape: Sequence[int]) -> Any:
    """Bool of shape ``idx.shape[:-1]``: whether each index vector lies inside ``shape``."""
    from ember.ops.reduce import reduce_min

    lo, hi = _bounds(idx, shape)
    ok = ew.and_(ew.ge(idx, lo), ew.le(idx, hi))
    return reduce_min(ok, (aval_of(idx).ndim - 1,))


def _batch_index_args(args, dims, k_pos: int):
    """Move every batch axis to the front and prepend the batch position to the indices, so
    the batched op is the same op on an operand with one more leading indexed axis."""
    size = next(aval_of(a).shape[d] for a, d in zip(args, dims) if d is not None)
    moved = []
    for a, d in zip(args, dims):
        if d is None:
            shape = aval_of(a).shape
            moved.append(st.broadcast_in_dim(a, (size, *shape), tuple(range(1, len(shape) + 1))))
        else:
            moved.append(st.moveaxis(a, d, 0))
    idx = moved[k_pos]
    ishape = aval_of(idx).shape
    batch_pos = st.iota(aval_of(idx).dtype, (*ishape[:-1], 1), 0)
    moved[k_pos] = st.concatenate([batch_pos, idx], len(ishape) - 1)
    return moved


@gather_p.def_batch
def _gather_batch(args, dims):
    operand, indices = _batch_index_args(args, dims, 1)
    return gather(operand, indices), 0


# --- scatter ---------------------------------------------------------------------------------

scatter_p = Primitive("scatter", kind="indexing")
_SCATTER_MODES = {"set", "add", "mul", "min", "max"}


@scatter_p.def_abstract_eval
def _scatter_rule(operand: ArrayType, indices: ArrayType, updates: ArrayType, *, mode: str
                  ) -> ArrayType:
    k = _check_indices("scatter", operand, indices)
    same_dtypes("scatter", (operand, updates))
    expected = indices.shape[:-1] + operand.shape[k:]
    if updates.shape != expected:
        raise op_error(ShapeError, "scatter", f"updates of shape {updates.shape} do not match "
                       f"{expected} (indices {indices.shape} into {operand.shape})")
    if mode not in _SCATTER_MODES:
        raise op_error(ShapeError, "scatter", f"unknown mode {mode!r}")
    return operand


def _scatter_impl(operand, indices, updates, *, mode):
    out = operand.copy()
    k = indices.shape[-1]
    inside = np.ones(indices.shape[:-1], dtype=bool)
    for i in range(k):
        inside &= (indices[..., i] >= 0) & (indices[..., i] < operand.shape[i])
    idx = tuple(indices[..., i][inside] for i in range(k))
    upd = updates[inside]
    if mode == "set":
        out[idx] = upd
    else:
        {"add": np.add, "mul": np.multiply, "min": np.minimum, "max": np.maximum}[mode].at(
            out, idx, upd)
    return out


scatter_p.def_impl(_scatter_impl)


def scatter(operand: Any, indices: Any, updates: Any, mode: str = "set") -> Any:
    """``operand`` with ``updates`` combined in at ``indices`` by ``mode``."""
    return scatter_p.bind(operand, indices, updates, mode=mode)


@scatter_p.def_jvp
def _scatter_jvp(primals, tangents, *, mode):
    x, idx, upd = primals
    tx, _, tu = tangents
    out = scatter(x, idx, upd, mode)
    if isinstance(tx, Zero) and isinstance(tu, Zero):
        return out, Zero(out.aval)
    tx, tu = ew.instantiate(tx), ew.instantiate(tu)
    if mode in ("set", "add"):
        return out, scatter(tx, idx, tu, mode)
    if mode == "mul":
        # Exact for unique indices and non-zero updates.
        t_from_x = scatter(tx, idx, upd, "mul")
        grown = ew.mul(tu, ew.div(gather(out, idx), upd))
        return out, ew.add(t_from_x, scatter(ew.zeros_like(x), idx, grown, "add"))
    # min / max: the tangent of whichever value won (the operand's on ties).
    kept = ew.eq(out, x)
    t_from_x = ew.select(kept, tx, ew.zeros_like(tx))
    won = ew.and_(ew.eq(upd, gather(out, idx)), ew.not_(gather(kept, idx)))
    t_from_u = ew.select(won, tu, ew.zeros_like(tu))
    return out, scatter(t_from_x, idx, t_from_u, "add")


@scatter_p.def_transpose
def _scatter_transpose(ct, x, idx, upd, *, mode):
    # "mul" is linear in the operand alone (a diagonal scaling, its own transpose).
    if mode not in ("set", "add") and not (mode == "mul" and
                                           not isinstance(upd, UndefinedPrimal)):
        raise op_error(ShapeError, "scatter", f"mode {mode!r} is not linear")
    if isinstance(ct, Zero):
        return [Zero(x.aval) if isinstance(x, UndefinedPrimal) else None, None,
                Zero(upd.aval) if isinstance(upd, UndefinedPrimal) else None]
    t_x = t_u = None
    if isinstance(x, UndefinedPrimal):
        if mode == "add":
            t_x = ct
        elif mode == "mul":
            t_x = scatter(ct, idx, upd, "mul")
        else:  # overwritten positions get no cotangent
            t_x = scatter(ct, idx, ew.zeros_like(upd), "set")
    if isinstance(upd, UndefinedPrimal):
        # Updates that fell outside the operand were dropped: their cotangent is zero.
        inside = _in_bounds(idx, x.aval.shape)
        got = gather(ct, idx)
        inside = st.broadcast_in_dim(inside, aval_of(got).shape,
                                     tuple(range(aval_of(inside).ndim)))
        t_u = ew.select(inside, got, ew.zeros_like(got))
    return [t_x, None, t_u]


@scatter_p.def_batch
def _scatter_batch(args, dims, *, mode):
    operand, indices, updates = _batch_index_args(args, dims, 1)
    return scatter(operand, indices, updates, mode), 0


# --- helpers built on gather -----------------------------------------------------------------

def take_along_axis(x: Any, idx: Any, axis: int) -> Any:
    """``numpy.take_along_axis`` for in-range, non-negative ``idx`` of ``x``'s rank."""
    shape = aval_of(idx).shape
    parts = []
    for d in range(len(shape)):
        part = idx if d == axis else st.iota(aval_of(idx).dtype, shape, d)
        parts.append(st.reshape(part, (*shape, 1)))
    return gather(x, st.concatenate(parts, len(shape)))


