"""The static memory plan: every temporary of a program at a fixed offset in one arena.

A compiled program allocates nothing while it runs. Its temporaries (values that are neither
inputs nor outputs) live in one arena, laid out before the first run from the live intervals
of :mod:`ember.ir.liveness`: two temporaries share bytes only when their lifetimes do not
overlap. On top of that, an equation may write its result over an operand that dies there
(an elementwise kernel, the KV cache's ``dynamic_update_slice``): the backend says which
writes its kernels allow, the plan accepts those that are safe, and values joined that way
form one *buffer*. A buffer rooted at a donated input lives in that input's memory (the
caller gave it up), so a decode step updates its KV cache and an optimizer step its state
without a copy. Outputs are never placed in the arena: the caller receives them, and nothing
the caller can see is ever written by a later run.

Offsets come from a greedy best fit, largest buffers first (the heuristic TFLite's arena
planner uses): each buffer takes the smallest gap left by the buffers already placed whose
lifetimes overlap its own. ``lower_bound`` (the most bytes live at any one time) says how far
from optimal a plan is; :class:`MemoryAnalysis` reports both.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from ember.ir.graph import Graph, Var
from ember.ir.liveness import Liveness

ALIGNMENT = 64  # a cache line, and the widest vector load (AVX-512)


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


@dataclass
class Buffer:
    """Storage shared by a chain of values, each written over the previous one in place.

    ``offset`` is its place in the arena, or None for a buffer rooted at a donated input
    (``root`` is then that input) or at an output.
    """

    values: list[Var]
    start: int
    end: int
    nbytes: int
    offset: int | None = None
    root: Var | None = None

    def overlaps(self, other: Buffer) -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass(frozen=True)
class MemoryAnalysis:
    """Bytes a program uses, named as JAX's ``memory_analysis`` names them.

    ``temp_bytes`` is the arena; ``temp_lower_bound`` the most bytes of temporaries live at
    once (no plan can use less); ``alias_bytes`` the outputs written into donated inputs;
    ``output_bytes`` the outputs allocated afresh each call; ``peak_bytes`` all of it.
    """

    temp_bytes: int
    temp_lower_bound: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.temp_bytes + self.argument_bytes + self.output_bytes

    def __str__(self) -> str:
        mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
        return (f"arena {mib(self.temp_bytes)} (lower bound {mib(self.temp_lower_bound)}), "
                f"arguments {mib(self.argument_bytes)}, outputs {mib(self.output_bytes)} "
                f"(+{mib(self.alias_bytes)} written into donated arguments), "
                f"peak {mib(self.peak_bytes)}")


@dataclass
class MemoryPlan:
    """Where each planned value lives, and what is freed after each equation."""

    buffers: list[Buffer]
    home: dict[int, Buffer]          # Var.id -> its buffer, for every planned value
    arena_bytes: int
    lower_bound: int
    analysis: MemoryAnalysis
    _freed: dict[int, list[Buffer]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for b in self.buffers:
            if b.offset is not None:
                self._freed.setdefault(b.end, []).append(b)

    def freed_after(self, index: int) -> list[Buffer]:
        """Arena buffers whose last reader is equation ``index``."""
        return self._freed.get(index, [])


def plan_memory(graph: Graph, live: Liveness, temps: Set[int],
                may_write_over: Mapping[int, int] = {},
                copy_free: Set[int] = frozenset()) -> MemoryPlan:
    """Plan the arena for the values in ``temps`` (``Var.id``s of temporaries the backend
    computes into memory it owns).

    ``may_write_over[out.id] = operand.id`` says the kernel computing ``out`` may store it
    over ``operand``; it is done when that operand dies at that equation (see
    :meth:`Liveness.overwritable`: earlier readers must be among the ``copy_free``
    equations), is a temporary or a donated input, and when ``out`` is a temporary or the
    operand's chain is rooted at a donated input.
    """
    home: dict[int, Buffer] = {}
    for i, eqn in enumerate(graph.eqns):
        for out in eqn.outputs:
            iv = live[out]
            planned = out.id in temps or (iv.is_output and out.id in may_write_over)
            if not planned:
                continue
            target = _writable_operand(live, home, out, i, may_write_over.get(out.id),
                                       copy_free)
            if target is not None:
                target.values.append(out)
                target.end = iv.end
                home[out.id] = target
            elif out.id in temps and not iv.is_output:
                home[out.id] = Buffer([out], iv.start, iv.end, _aligned(iv.nbytes))
    buffers = list({id(b): b for b in home.values()}.values())
    arena = _assign_offsets([b for b in buffers if b.root is None])
    bound = _lower_bound([b for b in buffers if b.root is None])
    argument_bytes = sum(live[v].nbytes for v in [*graph.constvars, *graph.invars])
    alias_bytes = out_bytes = 0
    for a in {a.id: a for a in graph.outvars if isinstance(a, Var)}.values():
        if a.id in home:
            alias_bytes += live[a].nbytes
        elif not live[a].is_input:
            out_bytes += live[a].nbytes
    analysis = MemoryAnalysis(arena, bound, argument_bytes, out_bytes, alias_bytes)
    return MemoryPlan(buffers, home, arena, bound, analysis)


def _writable_operand(live: Liveness, home: dict[int, Buffer], out: Var, index: int,
                      operand_id: int | None, copy_free: Set[int]) -> Buffer | None:
    """The buffer ``out`` may be stored in over a dying operand, or None."""
    if operand_id is None:
        return None
    operand = live.intervals[operand_id]
    if not live.overwritable(operand.var, index, copy_free):
        return None
    if operand.is_input:
        if operand.var.id not in home:  # the donated input starts a chain of its own
            home[operand.var.id] = Buffer([operand.var], -1, operand.end, 0,
                                          root=operand.var)
        return home[operand.var.id]
    buffer = home.get(operand_id)
    if buffer is None or buffer.values[-1].id != operand_id:
        return None
    if live[out].is_output and buffer.root is None:
        return None  # an output must not live in the arena
    return buffer


def _assign_offsets(buffers: list[Buffer]) -> int:
    """Best-fit offsets, largest first; returns the arena size."""
    placed: list[Buffer] = []
    size = 0
    for b in sorted(buffers, key=lambda b: (-b.nbytes, b.start)):
        taken = sorted((p.offset, p.offset + p.nbytes) for p in placed if p.overlaps(b))
        best, best_gap, cursor = None, None, 0
        for lo, hi in taken:
            gap = lo - cursor
            if gap >= b.nbytes and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, hi)
        b.offset = best if best is not None else cursor
        size = max(size, b.offset + b.nbytes)
        placed.append(b)
    return size


def _lower_bound(buffers: list[Buffer]) -> int:
    """The most bytes live at one time: no layout of these lifetimes fits in less."""
    events: dict[int, int] = {}
    for b in buffers:
        events[b.start] = events.get(b.start, 0) + b.nbytes
        events[b.end + 1] = events.get(b.end + 1, 0) - b.nbytes
    live = best = 0
    for t in sorted(events):
        live += events[t]
        best = max(best, live)
    return best
