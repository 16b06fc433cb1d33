"""What the partitioner did, for people: every collective it inserted and why.

``print(partitioned.explain())`` lists one line per collective (kind, mesh axes, bytes each
device sends, the local type it produces, the layouts it converts between, the user line of
the equation that needed it and, once ``ember.parallel.schedule`` ran, what local work it
overlaps or why it blocks), then the equations that had no sharding rule and so ran
replicated. Tests read the entries (:attr:`Explanation.collectives`) to check that a plan
communicates what an expert expects.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

__all__ = ["Collective", "Explanation", "Overlap"]


@dataclass(frozen=True)
class Overlap:
    """What a collective overlaps in the scheduled program: the local equations that run while
    it is in flight, their rough floating-point operations and the bytes they write; none (and
    ``blocking``, why) for one that runs as a single blocking step."""

    equations: int
    flops: float
    nbytes: int
    blocking: str = ""

    def __str__(self) -> str:
        if not self.equations:
            return f"blocking: {self.blocking}"
        s = "" if self.equations == 1 else "s"
        return (f"overlaps {self.equations} equation{s}, {_scaled(self.flops, 1000, 'FLOP')} "
                f"/ {_scaled(self.nbytes, 1024, 'B')} of local work")


def _scaled(x: float, step: int, unit: str) -> str:
    """``x`` in the largest prefix of ``step`` that keeps it >= 1: "3.1 MFLOP", "48 KiB"."""
    prefixes = ("", "k", "M", "G", "T") if step == 1000 else ("", "Ki", "Mi", "Gi", "Ti")
    i = 0
    while x >= step and i < len(prefixes) - 1:
        x, i = x / step, i + 1
    return f"{x:.3g} {prefixes[i]}{unit}"


@dataclass(frozen=True)
class Collective:
    """One collective in the per-device program."""

    kind: str  # all_reduce, all_gather, reduce_scatter, all_to_all, collective_permute
    axes: tuple[str, ...]  # the mesh axes it runs over
    nbytes: int  # bytes each device sends (ring algorithms; see ember.parallel.partition)
    source: str | None  # the user's file:line of the equation that needed it
    reason: str  # which value needed it: "dot_general operand 1", "output 0"...
    layouts: str  # "{_,tp}+dp -> {_,tp}"
    result: str  # the local type it produces, with its layout
    within: str = ""  # the bodies it runs in, outermost first: "scan body (x8)"
    repeats: int = 1  # how many times one run of the program runs it (a scan's length)
    # The id of the value it produces in the per-device graph (how the schedule finds it).
    value: int | None = field(default=None, compare=False)
    overlap: Overlap | None = field(default=None, compare=False)  # None: not scheduled

    def __str__(self) -> str:
        where = f"  at {self.source}" if self.source else ""
        inside = f"[in {self.within}] " if self.within else ""
        overlap = f"; {self.overlap}" if self.overlap is not None else ""
        return (f"{self.kind}[{','.join(self.axes)}] {self.nbytes} B/device -> {self.result}: "
                f"{inside}{self.reason} {self.layouts}{overlap}{where}")


@dataclass
class Explanation:
    """Every collective of a per-device program, and the equations that had no rule."""

    mesh: tuple[tuple[str, int], ...]
    collectives: list[Collective] = field(default_factory=list)
    replicated: list[tuple[str, str, str | None]] = field(default_factory=list)

    def add(self, collective: Collective) -> None:
        self.collectives.append(collective)

    def note(self, primitive: str, why: str, source: str | None) -> None:
        self.replicated.append((primitive, why, source))

    def extend(self, inner: Explanation, body: str, repeats: int = 1) -> None:
        """Take in what happened inside a body (``body`` names it: "scan body (x8)"), run
        ``repeats`` times per run of this program, in program order."""
        self.collectives += [replace(c, within=f"{body}, {c.within}" if c.within else body,
                                     repeats=c.repeats * repeats) for c in inner.collectives]
        self.replicated += inner.replicated

    def overlapped(self, overlaps: dict[int, Overlap]) -> Explanation:
        """A copy with each collective's overlap, from ``overlaps`` (value id -> overlap)."""
        return replace(self, collectives=[
            replace(c, overlap=overlaps.get(c.value, c.overlap)) for c in self.collectives])

    @property
    def total_bytes(self) -> int:
        """Bytes each device sends in one run of the program (a while loop's body counted
        once: its number of steps is not known in advance)."""
        return sum(c.nbytes * c.repeats for c in self.collectives)

    def counts(self) -> Counter:
        """How many collectives of each kind."""
        return Counter(c.kind for c in self.collectives)

    def __str__(self) -> str:
        mesh = ", ".join(f"{n}={s}" for n, s in self.mesh)
        n = len(self.collectives)
        lines = [f"mesh ({mesh}): {n} collective{'' if n == 1 else 's'}, "
                 f"{self.total_bytes} bytes per device"]
        lines += [f"  {c}" for c in self.collectives]
        for prim, why, source in self.replicated:
            lines.append(f"  {prim}: {why}" + (f"  at {source}" if source else ""))
        return "\n".join(lines)
