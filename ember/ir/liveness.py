"""Live intervals of a graph's values: when each is defined, when it is last read.

Every backend that frees or reuses buffers needs the same facts (the NumPy backend drops a
buffer after its last use, the compiled backend packs buffers into one arena), so they are
computed here once, on the IR alone. Time is the equation index: a value defined by equation
``i`` and last read by equation ``j`` occupies ``[i, j]``; graph inputs and constants are
defined at ``-1`` (before the first equation); outputs stay live to ``len(eqns)`` (after the
last one). A value nobody reads dies where it is born.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ember.ir.graph import Graph, Literal, Var


@dataclass(frozen=True)
class Interval:
    """The lifetime of one value. ``start`` and ``end`` are equation indices (inclusive)."""

    var: Var
    start: int
    end: int
    uses: int           # how many equation operands read it (an equation reading it twice: 2)
    is_input: bool      # a graph input or constant: its buffer comes from outside
    is_output: bool     # returned by the graph: the caller will see its buffer
    donated: bool       # an input whose buffer the caller gave up: the program may overwrite it

    @property
    def nbytes(self) -> int:
        return self.var.aval.size * self.var.aval.dtype.itemsize

    def overlaps(self, other: Interval) -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass
class Liveness:
    """Live intervals of every value of one graph, by ``Var.id``."""

    graph: Graph
    intervals: dict[int, Interval]

    def __getitem__(self, var: Var) -> Interval:
        return self.intervals[var.id]

    def dying_at(self, index: int) -> list[Var]:
        """Values whose last read is equation ``index`` and that are not outputs: their buffers
        are free once it has run."""
        return self._dying.get(index, [])

    def __post_init__(self) -> None:
        self._dying: dict[int, list[Var]] = {}
        for iv in self.intervals.values():
            if not iv.is_output and iv.end >= 0:
                self._dying.setdefault(iv.end, []).append(iv.var)

    def overwritable(self, var: Var, index: int) -> bool:
        """Whether equation ``index`` may write its result into ``var``'s buffer: ``var`` is
        a donated input (or a value of the program), read last and only once, by that
        equation, and not returned."""
        iv = self[var]
        return (iv.end == index and iv.uses == 1 and not iv.is_output
                and (iv.donated or not iv.is_input))


def liveness(graph: Graph, donate: Sequence[bool] = ()) -> Liveness:
    """The live intervals of ``graph``'s values; ``donate[i]`` marks input ``i`` as donated."""
    end = len(graph.eqns)
    start: dict[int, int] = {}
    last: dict[int, int] = {}
    uses: dict[int, int] = {}
    variables: dict[int, Var] = {}
    for v in [*graph.constvars, *graph.invars]:
        start[v.id], variables[v.id] = -1, v
    for i, eqn in enumerate(graph.eqns):
        for a in eqn.inputs:
            if not isinstance(a, Literal):
                last[a.id] = i
                uses[a.id] = uses.get(a.id, 0) + 1
        for v in eqn.outputs:
            start[v.id], variables[v.id] = i, v
    outputs = {a.id for a in graph.outvars if not isinstance(a, Literal)}
    donated = {v.id for v, d in zip(graph.invars, donate) if d}
    inputs = {v.id for v in [*graph.constvars, *graph.invars]}
    intervals = {
        vid: Interval(variables[vid], s, end if vid in outputs else last.get(vid, s),
                      uses.get(vid, 0), vid in inputs, vid in outputs, vid in donated)
        for vid, s in start.items()
    }
    return Liveness(graph, intervals)
