"""Redistribution: the steps that change how a value is laid out over a mesh, and their cost.

A value's layout (:class:`~ember.ir.sharding.Sharding`) changes when the equation that reads it
needs it split otherwise. :func:`plan_reshard` lists the steps that do it: collectives
(all-reduce, reduce-scatter, all-gather, all-to-all, collective-permute) and local steps (a
slice at this device's ``axis_index``, zeros outside coordinate 0 to make a value partial).
The partitioner writes them into the per-device graph and uses :class:`CostModel` to choose
among ways of computing an equation.

**Cost model.** A step is a collective over some mesh axes of ``n`` devices on a local block of
``B`` bytes; it costs ``latency + bytes / bandwidth``, where ``bytes`` is what each device
sends under ring algorithms (:func:`collective_bytes`): all-reduce ``2 (n-1)/n B``, all-gather
``(n-1) B``, reduce-scatter and all-to-all ``(n-1)/n B``, collective-permute ``B``; local steps
are free. Where two redistributions reach one layout (reduce-scatter against all-reduce then
slice, all-to-all against all-gather then slice) the cheaper is taken.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ember.ir.sharding import Sharding
from ember.parallel.propagate import layout

__all__ = ["CostModel", "Step", "plan_reshard", "collective_bytes", "after"]


@dataclass(frozen=True)
class CostModel:
    """Seconds a collective takes, ``latency + bytes / bandwidth`` (per device, ring
    algorithms), and seconds an equation computes, ``2 * points / flops`` for an iteration
    space of ``points`` (a product's multiply-adds, an elementwise op's elements). The defaults
    are in the range of a CPU core and shared-memory or InfiniBand links; only ratios matter
    for the choices made."""

    bandwidth: float = 10e9  # bytes per second over one device's link
    latency: float = 5e-6  # seconds per collective
    flops: float = 50e9  # arithmetic operations per second on one device

    def seconds(self, steps: Sequence[Step]) -> float:
        return sum(self.latency + s.nbytes / self.bandwidth for s in steps
                   if s.kind not in ("slice", "partial"))

    def compute(self, points: int) -> float:
        return 2 * points / self.flops


def collective_bytes(kind: str, local_bytes: int, n: int) -> int:
    """Bytes each device sends for one collective over ``n`` devices on a local block of
    ``local_bytes`` (its input); the formulas of the cost model above."""
    if kind == "all_reduce":
        return 2 * (n - 1) * local_bytes // n
    if kind == "all_gather":
        return (n - 1) * local_bytes
    if kind in ("reduce_scatter", "all_to_all"):
        return (n - 1) * local_bytes // n
    if kind == "collective_permute":
        return local_bytes
    return 0  # slice, partial: local


# --- redistribution plans ----------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One step of a redistribution: a collective or a local slice, on one dimension (two for
    all_to_all: ``dim`` is concatenated, ``to`` is split). A collective_permute reorders the
    axes splitting ``dim`` from ``axes`` to ``order``, each device sending by ``pairs``."""

    kind: str
    axes: tuple[str, ...]
    dim: int | None = None
    to: int | None = None
    nbytes: int = 0
    order: tuple[str, ...] = ()
    pairs: tuple[tuple[int, int], ...] = ()


def plan_reshard(shape: Sequence[int], itemsize: int, current: Sharding, target: Sharding,
                 cost: CostModel | None = None) -> list[Step]:
    """The steps that turn a value of local ``shape`` laid out as ``current`` into
    ``target``. Partial sums are resolved first (by reduce-scatter where the target splits a
    dimension over the axis next, else one all-reduce), then splits the target does not have
    are undone (all-to-all where the axis moves to a dimension that gains it next, else
    all-gather), then the target's further splits are cut locally, and last a whole value the
    target wants partial is made so locally."""
    cost = cost or CostModel()
    sizes = dict(current.mesh)
    shape = list(shape)
    dims = [list(d) for d in current.dims]
    want = [tuple(d) for d in target.dims]
    steps: list[Step] = []

    def nbytes() -> int:
        return math.prod(shape) * itemsize

    def add(kind: str, axes: tuple[str, ...], dim: int | None = None, to: int | None = None,
            **more: Any) -> None:
        n = math.prod(sizes[a] for a in axes)
        steps.append(Step(kind, axes, dim, to, collective_bytes(kind, nbytes(), n), **more))
        if kind in ("all_gather", "all_to_all"):
            shape[dim] *= n
        if kind in ("reduce_scatter", "slice", "all_to_all"):
            shape[to if kind == "all_to_all" else dim] //= n

    def next_axis(d: int) -> str | None:
        """The axis dimension ``d`` gains next on the way to its target, if it is on the way."""
        cur, tgt = tuple(dims[d]), want[d]
        if len(tgt) > len(cur) and tgt[:len(cur)] == cur:
            return tgt[len(cur)]
        return None

    pending = [a for a in current.partial if a not in target.partial]
    # Partial sums first: a reduce-scatter onto a dimension that gains the axis next costs
    # half an all-reduce and leaves a smaller value for the rest.
    for a in list(pending):
        d = next(iter(d for d in range(len(dims)) if next_axis(d) == a
                      and shape[d] % sizes[a] == 0), None)
        if d is not None:
            scatter = collective_bytes("reduce_scatter", nbytes(), sizes[a])
            if cost.latency + scatter / cost.bandwidth <= cost.latency + collective_bytes(
                    "all_reduce", nbytes(), sizes[a]) / cost.bandwidth:
                add("reduce_scatter", (a,), to=d, dim=d)
                dims[d].append(a)
                pending.remove(a)
    if pending:
        add("all_reduce", tuple(a for a, _ in current.mesh if a in pending))
    # Axes that split a dimension the target does not split that way: minor-most first.
    while True:
        d = next(iter(d for d in range(len(dims)) if tuple(dims[d]) != want[d][:len(dims[d])]),
                 None)
        if d is None:
            break
        if len(dims[d]) > 1 and sorted(dims[d]) == sorted(want[d]):  # same blocks, reordered
            order = want[d]
            add("collective_permute", tuple(dims[d]), dim=d, order=order,
                pairs=_reorder_pairs(tuple(dims[d]), order, sizes))
            dims[d] = list(order)
            continue
        a = dims[d][-1]
        e = next(iter(e for e in range(len(dims)) if e != d and next_axis(e) == a
                      and shape[e] % sizes[a] == 0), None)
        gather = cost.latency + collective_bytes("all_gather", nbytes(), sizes[a]) / cost.bandwidth
        swap = cost.latency + collective_bytes("all_to_all", nbytes(), sizes[a]) / cost.bandwidth
        dims[d].pop()
        if e is not None and swap <= gather:
            add("all_to_all", (a,), dim=d, to=e)
            dims[e].append(a)
        else:
            add("all_gather", (a,), dim=d)
    # What is left to split is a block of a value this device holds whole along it.
    for d in range(len(dims)):
        for a in want[d][len(dims[d]):]:
            add("slice", (a,), dim=d)
            dims[d].append(a)
    # A whole value becomes addends of itself: kept at coordinate 0 of the axis, zero elsewhere.
    for a in target.partial:
        if a not in current.partial:
            add("partial", (a,))
    return steps


def _reorder_pairs(axes: tuple[str, ...], order: tuple[str, ...], sizes: dict[str, int]
                   ) -> tuple[tuple[int, int], ...]:
    """(source, destination) ranks, in the group over ``axes``, that move each block of a
    dimension split over ``axes`` to the device that holds it when split over ``order``."""
    pairs = []
    for coords in itertools.product(*(range(sizes[a]) for a in axes)):
        at = dict(zip(axes, coords))
        block = _digits(axes, at, sizes)  # the block this device holds, and its rank
        # The device whose digits read in ``order`` give this block.
        dest, rest = {}, block
        for a in reversed(order):
            rest, dest[a] = divmod(rest, sizes[a])
        pairs.append((block, _digits(axes, dest, sizes)))
    return tuple(pairs)


def _digits(axes: Sequence[str], coords: Mapping[str, int], sizes: Mapping[str, int]) -> int:
    value = 0
    for a in axes:
        value = value * sizes[a] + coords[a]
    return value


def after(current: Sharding, step: Step) -> Sharding:
    """The layout a value has after ``step``."""
    dims = [list(d) for d in current.dims]
    partial = list(current.partial)
    if step.kind == "all_reduce":
        partial = [a for a in partial if a not in step.axes]
    elif step.kind == "reduce_scatter":
        partial.remove(step.axes[0])
        dims[step.dim].append(step.axes[0])
    elif step.kind == "all_gather":
        dims[step.dim].pop()
    elif step.kind == "all_to_all":
        dims[step.dim].pop()
        dims[step.to].append(step.axes[0])
    elif step.kind == "collective_permute":
        dims[step.dim] = list(step.order)
    elif step.kind == "partial":
        partial.append(step.axes[0])
        partial.sort(key=[a for a, _ in current.mesh].index)
    else:
        dims[step.dim].append(step.axes[0])
    return layout(current.mesh, tuple(tuple(d) for d in dims), tuple(partial))
