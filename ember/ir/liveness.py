"""Live intervals of a graph's values: when each is defined, when it is last read.

Every backend that frees or reuses buffers needs the same facts (the NumPy backend drops a
buffer after its last use, the compiled backend packs buffers into one arena), so they are
computed here once, on the IR alone. Time is the equation index: a value defined by equation
``i`` and last read by equation ``j`` occupies ``[i, j]``; graph inputs and constants are
defined at ``-1`` (before the first equation); outputs stay live to ``len(eqns)`` (after the
last one). A value nobody reads dies where it is born.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass

from ember.ir.graph import Graph, Literal, Var


@dataclass(frozen=True)
class Interval:
    """The lifetime of one value. ``start`` and ``end`` are equation indices (inclusive)."""

    var: Var
    start: int
    end: int
    readers: tuple[int, ...]  # the equations reading it, once per operand (in order)
    is_input: bool      # a graph input or constant: its buffer comes from outside
    is_output: bool     # returned by the graph: the caller will see its buffer
    donated: bool       # an input whose buffer the caller gave up: the program may overwrite it

    @property
    def uses(self) -> int:
        """How many equation operands read it (an equation reading it twice counts 2)."""
        return len(self.readers)

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

    def overwritable(self, var: Var, index: int, copy_free: Set[int] = frozenset()) -> bool:
        """Whether equation ``index`` may write its result into ``var``'s buffer: ``var`` is
        a donated input (or a value of the program), not returned, and read last by that
        equation, as one operand of it.

        Earlier readers must be in ``copy_free``: equations whose results never share memory
        with their operands (a compiled kernel writes new memory; a NumPy reshape may return
        a view of the buffer, which the write would change under a later reader). Without
        them, ``var`` must be read by that equation alone.
        """
        iv = self[var]
        return (iv.end == index and iv.readers.count(index) == 1 and not iv.is_output
                and (iv.donated or not iv.is_input)
                and all(r in copy_free for r in iv.readers if r != index))


def liveness(graph: Graph, donate: Sequence[bool] = ()) -> Liveness:
    """The live intervals of ``graph``'s values; ``donate[i]`` marks input ``i`` as donated."""
    end = len(graph.eqns)
    start: dict[int, int] = {}
    readers: dict[int, list[int]] = {}
    variables: dict[int, Var] = {}
    for v in [*graph.constvars, *graph.invars]:
        start[v.id], variables[v.id] = -1, v
    for i, eqn in enumerate(graph.eqns):
        for a in eqn.inputs:
            if not isinstance(a, Literal):
                readers.setdefault(a.id, []).append(i)
        for v in eqn.outputs:
            start[v.id], variables[v.id] = i, v
    outputs = {a.id for a in graph.outvars if not isinstance(a, Literal)}
    donated = {v.id for v, d in zip(graph.invars, donate) if d}
    inputs = {v.id for v in [*graph.constvars, *graph.invars]}
    intervals = {}
    for vid, s in start.items():
        read = tuple(readers.get(vid, ()))
        last = end if vid in outputs else read[-1] if read else s
        intervals[vid] = Interval(variables[vid], s, last, read, vid in inputs, vid in outputs,
                                  vid in donated)
    return Liveness(graph, intervals)
