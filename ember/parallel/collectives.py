"""Collective primitives: the communication steps of a per-device (SPMD) program.

The partitioner (``ember.parallel.partition``) writes these into the per-device graph where a
value's layout has to change, and ``shard_map`` code calls them by hand. Each is a registered
:class:`~ember.core.primitive.Primitive` of kind ``collective``: fusion never groups it and the
compiled CPU backend runs it as a host step between compiled segments, through its NumPy
implementation, which calls the communicator of the device running it (decision 0022).

Every collective names the mesh it belongs to (``mesh``: ``((axis name, size), ...)``, the
abstract mesh of :class:`ember.ir.sharding.Sharding`) and the mesh axes it runs over (``axes``,
major first). Its group is the devices whose coordinates differ only along those axes; a
device's rank in the group is its coordinates along ``axes`` read as mixed-radix digits, the
same order in which a dimension split over those axes holds its blocks. Types are local
(per-device) shapes.

A collective the overlap schedule (``ember.parallel.schedule``) splits runs as a start
(``all_reduce_start``...: the communicator's ``start_*``, giving a ticket) and a
``collective_done`` (its wait), with the device's local work between them.

The device at flat mesh position ``i`` (row-major over the mesh axes) runs as rank ``i`` of the
runtime's world communicator; the group of each ``(mesh, axes)`` is split from it once, on first
use, which is safe because every device of an SPMD program reaches the same collectives in the
same order.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from ember import dtypes
from ember.core.primitive import Primitive
from ember.errors import EmberError, EmberValueError, ShapeError, op_error
from ember.ir.types import ArrayType
from ember.parallel import runtime

__all__ = ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "collective_permute",
           "axis_index", "all_reduce_p", "all_gather_p", "reduce_scatter_p", "all_to_all_p",
           "collective_permute_p", "axis_index_p", "COLLECTIVES", "REDUCE_OPS", "group_size",
           "group_rank", "mesh_coords", "Mesh", "STARTS", "collective_done_p", "TICKET"]

Mesh = tuple[tuple[str, int], ...]
REDUCE_OPS = ("sum", "max", "min")


# --- mesh arithmetic shared by the rules, the runtime path and the simulator -------------------

def group_size(mesh: Mesh, axes: Sequence[str]) -> int:
    """How many devices a collective over ``axes`` of ``mesh`` spans."""
    sizes = dict(mesh)
    return math.prod(sizes[a] for a in axes)


def mesh_coords(mesh: Mesh, device: int) -> dict[str, int]:
    """The mesh coordinates (axis -> index) of the device at flat position ``device``."""
    coords = {}
    for name, size in reversed(mesh):
        device, coords[name] = divmod(device, size)
    return coords


def group_rank(mesh: Mesh, axes: Sequence[str], coords: dict[str, int]) -> int:
    """The rank, in its group over ``axes``, of the device at ``coords`` (major axis first)."""
    sizes = dict(mesh)
    rank = 0
    for a in axes:
        rank = rank * sizes[a] + coords[a]
    return rank


def group_color(mesh: Mesh, axes: Sequence[str], coords: dict[str, int]) -> int:
    """Which group over ``axes`` the device at ``coords`` is in (its other coordinates)."""
    return group_rank(mesh, [n for n, _ in mesh if n not in axes], coords)


# --- checks and types --------------------------------------------------------------------------

def _check_axes(op: str, mesh: Mesh, axes: tuple[str, ...]) -> int:
    names = [n for n, _ in mesh]
    if not axes:
        raise op_error(EmberValueError, op, "needs at least one mesh axis")
    for a in axes:
        if a not in names:
            raise op_error(EmberValueError, op, f"mesh axis {a!r} is not in the mesh "
                           f"({', '.join(f'{n}={s}' for n, s in mesh)})")
    if len(set(axes)) != len(axes):
        raise op_error(EmberValueError, op, f"mesh axes {axes} repeat an axis")
    return group_size(mesh, axes)


def _check_dim(op: str, x: ArrayType, axis: int, what: str = "axis") -> None:
    if not 0 <= axis < x.ndim:
        raise op_error(ShapeError, op, f"{what}={axis} is out of range for {x}")


def _check_op(name: str, op: str) -> None:
    if op not in REDUCE_OPS:
        raise op_error(EmberValueError, name, f"op={op!r}; expected one of {REDUCE_OPS}")


def _resized(x: ArrayType, axis: int, size: int) -> ArrayType:
    shape = list(x.shape)
    shape[axis] = size
    return ArrayType(tuple(shape), x.dtype, weak=x.weak)


all_reduce_p = Primitive("all_reduce", kind="collective")
all_gather_p = Primitive("all_gather", kind="collective")
reduce_scatter_p = Primitive("reduce_scatter", kind="collective")
all_to_all_p = Primitive("all_to_all", kind="collective")
collective_permute_p = Primitive("collective_permute", kind="collective")
axis_index_p = Primitive("axis_index", kind="collective")
COLLECTIVES = (all_reduce_p, all_gather_p, reduce_scatter_p, all_to_all_p,
               collective_permute_p, axis_index_p)


@all_reduce_p.def_abstract_eval
def _all_reduce_rule(x: ArrayType, *, axes: tuple[str, ...], op: str, mesh: Mesh) -> ArrayType:
    _check_axes("all_reduce", mesh, axes)
    _check_op("all_reduce", op)
    return x.strong()


@all_gather_p.def_abstract_eval
def _all_gather_rule(x: ArrayType, *, axes: tuple[str, ...], axis: int, mesh: Mesh
                     ) -> ArrayType:
    n = _check_axes("all_gather", mesh, axes)
    _check_dim("all_gather", x, axis)
    return _resized(x.strong(), axis, x.shape[axis] * n)


@reduce_scatter_p.def_abstract_eval
def _reduce_scatter_rule(x: ArrayType, *, axes: tuple[str, ...], axis: int, op: str,
                         mesh: Mesh) -> ArrayType:
    n = _check_axes("reduce_scatter", mesh, axes)
    _check_op("reduce_scatter", op)
    _check_dim("reduce_scatter", x, axis)
    if x.shape[axis] % n:
        raise op_error(ShapeError, "reduce_scatter", f"dimension {axis} of {x} does not divide "
                       f"evenly over mesh axes {axes} ({n} devices)")
    return _resized(x.strong(), axis, x.shape[axis] // n)


@all_to_all_p.def_abstract_eval
def _all_to_all_rule(x: ArrayType, *, axes: tuple[str, ...], split_axis: int, concat_axis: int,
                     mesh: Mesh) -> ArrayType:
    n = _check_axes("all_to_all", mesh, axes)
    _check_dim("all_to_all", x, split_axis, "split_axis")
    _check_dim("all_to_all", x, concat_axis, "concat_axis")
    if x.shape[split_axis] % n:
        raise op_error(ShapeError, "all_to_all", f"dimension {split_axis} of {x} does not "
                       f"divide evenly over mesh axes {axes} ({n} devices)")
    out = _resized(x.strong(), split_axis, x.shape[split_axis] // n)
    return _resized(out, concat_axis, out.shape[concat_axis] * n)


@collective_permute_p.def_abstract_eval
def _permute_rule(x: ArrayType, *, axes: tuple[str, ...], pairs: tuple[tuple[int, int], ...],
                  mesh: Mesh) -> ArrayType:
    n = _check_axes("collective_permute", mesh, axes)
    for column, what in ((0, "source"), (1, "destination")):
        ranks = [p[column] for p in pairs]
        if len(set(ranks)) != len(ranks) or any(not 0 <= r < n for r in ranks):
            raise op_error(EmberValueError, "collective_permute",
                           f"pairs={pairs}: every {what} must be a distinct index in 0..{n - 1}")
    return x.strong()


@axis_index_p.def_abstract_eval
def _axis_index_rule(*, axis: str, mesh: Mesh) -> ArrayType:
    _check_axes("axis_index", mesh, (axis,))
    return ArrayType((), dtypes.int32)


# --- running on a communicator -----------------------------------------------------------------

# world communicator -> {(mesh, axes): the group's communicator}; dropped with the world.
_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _group(mesh: Mesh, axes: tuple[str, ...]) -> Any:
    """The communicator of the calling device's group over ``axes`` (split once, then kept)."""
    world = runtime.world()
    size = group_size(mesh, [n for n, _ in mesh])
    if world.size != size:
        raise op_error(EmberValueError, "collective", f"the per-device program was made for "
                       f"a mesh of {size} devices but runs on {world.size}")
    groups = _GROUPS.setdefault(world, {})
    comm = groups.get((mesh, axes))
    if comm is None:
        coords = mesh_coords(mesh, world.rank)
        comm = world.split(group_color(mesh, axes, coords), group_rank(mesh, axes, coords))
        groups[(mesh, axes)] = comm
    return comm


# How each collective calls its group's communicator: the method's name (``start_`` + it
# starts the collective without waiting) and its arguments after the operand, from the params.
_CALLS: dict[str, tuple[str, Any]] = {
    "all_reduce": ("all_reduce", lambda p: (p["op"],)),
    "all_gather": ("all_gather", lambda p: (p["axis"],)),
    "reduce_scatter": ("reduce_scatter", lambda p: (p["axis"], p["op"])),
    "all_to_all": ("all_to_all", lambda p: (p["split_axis"], p["concat_axis"])),
    "collective_permute": ("permute", lambda p: (p["pairs"],)),
}


def _runner(name: str, start: bool) -> Any:
    method, args = _CALLS[name]
    method = f"start_{method}" if start else method

    def run(x: np.ndarray, **params: Any) -> Any:
        return getattr(_group(params["mesh"], params["axes"]), method)(x, *args(params))
    return run


_MOVING = tuple(p for p in COLLECTIVES if p.name in _CALLS)  # all but axis_index
for _p in _MOVING:
    _p.def_impl(_runner(_p.name, start=False))


@axis_index_p.def_impl
def _axis_index_impl(*, axis: str, mesh: Mesh) -> np.ndarray:
    return np.int32(mesh_coords(mesh, runtime.world().rank)[axis])


# --- started and finished apart: what the overlap schedule writes ----------------------------
#
# ``ember.parallel.schedule`` splits a collective ``y = all_reduce(x)`` into
# ``t = all_reduce_start[..., seq=k](x)`` and ``y = collective_done[result=...](t)`` with local
# work in between. ``t`` is an int32 ticket naming the started collective's handle, which the
# device keeps until the done waits on it: backends store and pass it as any scalar, so they
# run both as ordinary host steps and never see a communicator. ``seq`` (the start's position
# in its graph) keeps two starts of the same value apart, so no pass merges them.

TICKET = ArrayType((), dtypes.int32)
# world communicator -> {ticket: handle}, per device; dropped with the run's communicators.
_IN_FLIGHT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_tickets = itertools.count()


def _started(blocking: Primitive) -> Primitive:
    start = Primitive(f"{blocking.name}_start", kind="collective")
    run = _runner(blocking.name, start=True)

    @start.def_abstract_eval
    def _start_rule(x: ArrayType, *, seq: int, **params: Any) -> ArrayType:
        blocking.abstract_eval(x, **params)  # the same checks as the blocking collective
        return TICKET

    @start.def_impl
    def _start_impl(x: np.ndarray, *, seq: int, **params: Any) -> np.ndarray:
        ticket = next(_tickets) & 0x7FFFFFFF
        _IN_FLIGHT.setdefault(runtime.world(), {})[ticket] = run(x, **params)
        return np.int32(ticket)
    return start


STARTS = {p: _started(p) for p in _MOVING}
collective_done_p = Primitive("collective_done", kind="collective")


@collective_done_p.def_abstract_eval
def _done_rule(ticket: ArrayType, *, result: ArrayType) -> ArrayType:
    if ticket.shape != () or ticket.dtype != TICKET.dtype:
        raise op_error(ShapeError, "collective_done",
                       f"expected the {TICKET} ticket of a collective start, got {ticket}")
    return result


@collective_done_p.def_impl
def _done_impl(ticket: np.ndarray, *, result: ArrayType) -> Any:
    handle = _IN_FLIGHT.get(runtime.world(), {}).pop(int(ticket), None)
    if handle is None:
        raise EmberError(f"ember bug: collective_done of ticket {int(ticket)}, which this "
                         f"device did not start (or already finished)")
    return handle.wait()


# --- binding -----------------------------------------------------------------------------------

def _axes(axes: str | Sequence[str]) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes)


def all_reduce(x: Any, axes: str | Sequence[str], mesh: Mesh, op: str = "sum") -> Any:
    """Combine ``x`` over the group of ``axes`` (``op``: sum, max or min); all get the result."""
    return all_reduce_p.bind(x, axes=_axes(axes), op=op, mesh=tuple(mesh))


def all_gather(x: Any, axes: str | Sequence[str], mesh: Mesh, axis: int) -> Any:
    """Concatenate the group's ``x`` along ``axis`` in rank order."""
    return all_gather_p.bind(x, axes=_axes(axes), axis=int(axis), mesh=tuple(mesh))


def reduce_scatter(x: Any, axes: str | Sequence[str], mesh: Mesh, axis: int,
                   op: str = "sum") -> Any:
    """Combine ``x`` over the group and keep this device's block of ``axis``."""
    return reduce_scatter_p.bind(x, axes=_axes(axes), axis=int(axis), op=op, mesh=tuple(mesh))


def all_to_all(x: Any, axes: str | Sequence[str], mesh: Mesh, split_axis: int,
               concat_axis: int) -> Any:
    """Send block ``j`` of ``split_axis`` to rank ``j``; concatenate what arrives on
    ``concat_axis`` in rank order."""
    return all_to_all_p.bind(x, axes=_axes(axes), split_axis=int(split_axis),
                             concat_axis=int(concat_axis), mesh=tuple(mesh))


def collective_permute(x: Any, axes: str | Sequence[str], mesh: Mesh,
                       pairs: Sequence[tuple[int, int]]) -> Any:
    """Send ``x`` from rank ``src`` to rank ``dst`` of each pair; a rank nobody sends to
    gets zeros."""
    pairs = tuple((int(s), int(d)) for s, d in pairs)
    return collective_permute_p.bind(x, axes=_axes(axes), pairs=pairs, mesh=tuple(mesh))


def axis_index(axis: str, mesh: Mesh) -> Any:
    """The calling device's coordinate along mesh axis ``axis`` (an int32 scalar)."""
    return axis_index_p.bind(axis=axis, mesh=tuple(mesh))
