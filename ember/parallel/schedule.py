"""The overlap schedule: collectives run while the device computes something else.

A per-device program from the partitioner runs each collective as one blocking step. This pass
first moves the computation of each collective's operand up to where its own operands are
ready, then splits a collective ``y = all_gather(x)`` into ``t = all_gather_start(x)``,
placed as early as ``x`` allows, and ``y = collective_done(t)``, placed right before the first
equation that reads ``y``; the equations between them are local work that runs while the data
moves (``ember.parallel.collectives`` runs the start as the communicator's ``start_*`` and the
done as the handle's wait). Two limits hold:

- order: collectives start in the order their operands are ready (ties: program order), a
  function of the graph alone. Every device runs the same graph, so every device issues the
  same collectives in the same order, which the communicators require (a rank waiting in a
  done only waits for collectives that every rank starts before reaching that done: no
  deadlock);
- memory: a started collective holds a copy of its operand and its result, so the bytes of the
  collectives in flight at any point stay under a bound (``EMBER_OVERLAP_BYTES``, default 64
  MiB); a start that would pass it moves later (then its done earlier).

A collective with no local work between its operand and its first use stays one blocking
equation. Bodies (scan, while, cond, call, remat) are scheduled each on its own: nothing moves
across a body's boundary. ``EMBER_OVERLAP=0`` turns the pass off (to time a program without
overlap). What it did is in :meth:`Partitioned.explain`: each collective's ``overlap``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from itertools import accumulate

from ember.errors import EmberValueError
from ember.ir.graph import ClosedGraph, Eqn, Graph, Var
from ember.ir.params import bodies, map_bodies
from ember.parallel.collectives import STARTS, TICKET, collective_done_p
from ember.parallel.explain import Overlap
from ember.parallel.partition import Partitioned

__all__ = ["schedule", "overlap_enabled", "max_bytes_in_flight"]

DEFAULT_MAX_BYTES = 64 << 20
# What _hoisted may move up: equations whose cost is their memory traffic, never a product, a
# body or a collective (moving those would reorder the program's real work and its memory).
_CHEAP = frozenset({"elementwise", "movement", "reduction", "generator"})


def overlap_enabled() -> bool:
    """Whether jit schedules collectives to overlap (``EMBER_OVERLAP``: 1, the default, or 0)."""
    text = os.environ.get("EMBER_OVERLAP", "1")
    if text not in ("0", "1"):
        raise EmberValueError(f"EMBER_OVERLAP={text!r}: expected 1 (overlap collectives with "
                              f"computation, the default) or 0 (run each one blocking)")
    return text == "1"


def max_bytes_in_flight() -> int:
    """The bound on the bytes of started collectives (``EMBER_OVERLAP_BYTES``)."""
    text = os.environ.get("EMBER_OVERLAP_BYTES", "")
    if not text:
        return DEFAULT_MAX_BYTES
    if not text.isdigit():
        raise EmberValueError(f"EMBER_OVERLAP_BYTES={text!r}: expected a number of bytes >= 0")
    return int(text)


def schedule(part: Partitioned, max_bytes: int | None = None) -> Partitioned:
    """``part`` with its collectives split into start and done around local work, and its
    explanation saying what each overlaps; ``part`` itself when ``EMBER_OVERLAP=0``.
    ``max_bytes``: the bound on bytes in flight (default: ``EMBER_OVERLAP_BYTES``)."""
    if not overlap_enabled():
        return part
    limit = max_bytes_in_flight() if max_bytes is None else max_bytes
    overlaps: dict[int, Overlap] = {}
    graph = _schedule(part.graph, limit, overlaps)
    return replace(part, graph=graph, explanation=part.explanation.overlapped(overlaps))


@dataclass
class _Split:
    """One collective of a graph: where its start and done go (gaps: before equation k)."""

    index: int  # the collective's equation
    start: int
    done: int


def _schedule(closed: ClosedGraph, limit: int, overlaps: dict[int, Overlap]) -> ClosedGraph:
    """One graph scheduled (its bodies first, each on its own); ``overlaps`` gets an entry per
    collective, keyed by the id of the value it produces."""
    graph = closed.graph
    eqns = []
    for e in graph.eqns:
        params = map_bodies(e, lambda b: _schedule(b, limit, overlaps))
        eqns.append(e if params is e.params else replace(e, params=params))
    eqns = _hoisted(eqns)
    splits = _place(eqns, limit, overlaps)
    if not splits and all(a is b for a, b in zip(eqns, graph.eqns)):
        return closed
    return ClosedGraph(Graph(graph.constvars, graph.invars, _emit(eqns, splits), graph.outvars),
                       closed.consts)


def _hoisted(eqns: list[Eqn]) -> list[Eqn]:
    """The equations with the computation of every collective's operand moved up to right
    after what it reads (a gradient scaled by the learning rate right after the gradient, not
    right before its sum), so the collective can start there. Only the cheap tail of that
    computation moves (elementwise, movement and reduction equations back to the products or
    other work that made their operands); the rest keeps its order.

    Each equation gets a sort key: one that stays, ``(k,)``; one that moves, the latest key of
    what it reads extended by its index (right after that, in program order); one that reads
    nothing computed (a constant's broadcast), just before its first reader, so that it
    neither blocks the move nor is made early and held long.
    """
    producer = {v.id: i for i, e in enumerate(eqns) for v in e.outputs}
    deps: dict[int, set[int]] = {}
    stack = [producer.get(e.inputs[0].id) for e in eqns
             if e.prim in STARTS and isinstance(e.inputs[0], Var)]
    while stack:
        j = stack.pop()
        if j is None or j in deps or eqns[j].prim.kind not in _CHEAP or any(
                isinstance(a, Var) and a.id in producer
                and eqns[producer[a.id]].prim.kind == "collective" for a in eqns[j].inputs):
            continue  # (a reader of a collective moved up would shorten that one's overlap)
        deps[j] = {producer[a.id] for a in eqns[j].inputs
                   if isinstance(a, Var) and a.id in producer}
        stack += deps[j]
    if not deps:
        return eqns
    floating: set[int] = set()
    key: dict[int, tuple] = {}
    for k in range(len(eqns)):
        if k not in deps:
            key[k] = (k,)
        elif deps[k] <= floating:
            floating.add(k)
        else:
            key[k] = max(key[d] for d in deps[k] if d not in floating) + (k,)
    readers: dict[int, list[int]] = {}
    for k, e in enumerate(eqns):
        for a in e.inputs:
            if isinstance(a, Var) and producer.get(a.id) in floating:
                readers.setdefault(producer[a.id], []).append(k)
    for f in sorted(floating, reverse=True):  # its readers come later: keyed already
        key[f] = min(key[u][:-1] + (key[u][-1] - 0.5, f) for u in readers[f])
    return [eqns[k] for k in sorted(range(len(eqns)), key=key.__getitem__)]


def _place(eqns: list[Eqn], limit: int, overlaps: dict[int, Overlap]) -> list[_Split]:
    """Where each collective of ``eqns`` starts and finishes (blocking ones are left out), in
    the order they start: the order their operands are ready (ties: program order).

    A start goes as early as its operand allows and then, if the bytes in flight between it
    and its done would pass the bound, right after the last gap that is too full (but never
    past the collective itself); a done that still does not fit moves up to the first gap that
    is too full (but never before the collective). Each search and each reservation is one
    walk down a tree of the bytes in flight, and the work a collective overlaps is a
    difference of running sums, so the pass costs O(n log n) for n equations.
    """
    n = len(eqns)
    producer = {v.id: i for i, e in enumerate(eqns) for v in e.outputs}
    first_use: dict[int, int] = {}
    for i, e in enumerate(eqns):
        for a in e.inputs:
            if isinstance(a, Var):
                first_use.setdefault(a.id, i)

    def ready(x: object) -> int:
        """The first gap where ``x`` is there: after its equation, or (that of a collective,
        which may finish as late as that) at its first use."""
        j = producer.get(x.id) if isinstance(x, Var) else None
        if j is None:
            return 0
        return first_use[x.id] if eqns[j].prim.kind == "collective" else j + 1

    order = sorted((ready(e.inputs[0]), i) for i, e in enumerate(eqns) if e.prim in STARTS)
    if not order:
        return []
    work = _RunningWork(eqns)
    load = _InFlight(n + 1)  # bytes in flight while equation k runs
    splits: list[_Split] = []
    for start, i in order:
        x, y = eqns[i].inputs[0], eqns[i].outputs[0]
        done = first_use.get(y.id, n)
        nbytes = _nbytes(x) + _nbytes(y)
        room = limit - nbytes  # the most bytes others may hold while this one is in flight
        full = load.last_above(start, done, room)
        if full is not None:
            start = min(full + 1, i)
        full = load.first_above(start, done, room)
        if full is not None:
            done = max(full, i + 1)
        fits = load.first_above(start, done, room) is None
        count, flops, written = work.between(start, done)
        if not count or not fits:
            why = ("no local work between its operand and its first use" if fits
                   else f"its {nbytes} B would pass the bound of {limit} B in flight "
                        f"(EMBER_OVERLAP_BYTES)")
            overlaps[y.id] = Overlap(0, 0.0, 0, why)
            continue
        load.add(start, done, nbytes)
        splits.append(_Split(i, start, done))
        overlaps[y.id] = Overlap(count, float(flops), written)
    return splits


class _RunningWork:
    """Running sums of the local work (equations that are not collectives) of a list of
    equations, so the work between two gaps is one subtraction. Each equation's
    :func:`_cost` is a whole number of operations, summed exactly here as an ``int``."""

    def __init__(self, eqns: list[Eqn]) -> None:
        costs = [(0, 0, 0) if e.prim.kind == "collective" else (1, *map(int, _cost(e)))
                 for e in eqns]
        self.count, self.flops, self.written = (
            list(accumulate(column, initial=0)) for column in zip(*costs))

    def between(self, start: int, done: int) -> tuple[int, int, int]:
        """The equations, operations and bytes written of the local work in gaps
        ``start`` to ``done`` (equations ``start`` to ``done - 1``)."""
        return (self.count[done] - self.count[start], self.flops[done] - self.flops[start],
                self.written[done] - self.written[start])


class _InFlight:
    """The bytes in flight at each of ``n`` points: a segment tree where a node holds what was
    added to its whole range (``whole``) and the largest total below it, its own included
    (``top``), so adding to a range and finding the first or last point above a level in a
    range each take O(log n) steps."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.top = [0] * (4 * n)
        self.whole = [0] * (4 * n)

    def add(self, lo: int, hi: int, nbytes: int, node: int = 1, nlo: int = 0,
            nhi: int | None = None) -> None:
        """``nbytes`` more at points ``lo`` to ``hi - 1``."""
        nhi = self.n if nhi is None else nhi
        if hi <= nlo or nhi <= lo:
            return
        if lo <= nlo and nhi <= hi:
            self.whole[node] += nbytes
            self.top[node] += nbytes
            return
        mid = (nlo + nhi) // 2
        self.add(lo, hi, nbytes, 2 * node, nlo, mid)
        self.add(lo, hi, nbytes, 2 * node + 1, mid, nhi)
        self.top[node] = self.whole[node] + max(self.top[2 * node], self.top[2 * node + 1])

    def first_above(self, lo: int, hi: int, level: int) -> int | None:
        """The first point in ``lo`` to ``hi - 1`` holding more than ``level`` bytes."""
        return self._search(lo, hi, level, 1, 0, self.n, last=False)

    def last_above(self, lo: int, hi: int, level: int) -> int | None:
        """The last point in ``lo`` to ``hi - 1`` holding more than ``level`` bytes."""
        return self._search(lo, hi, level, 1, 0, self.n, last=True)

    def _search(self, lo: int, hi: int, level: int, node: int, nlo: int, nhi: int,
                last: bool) -> int | None:
        # ``level`` is relative to this node: what its ancestors hold is taken off it.
        if hi <= nlo or nhi <= lo or self.top[node] <= level:
            return None
        if nhi - nlo == 1:
            return nlo
        level -= self.whole[node]
        mid = (nlo + nhi) // 2
        halves = [(2 * node, nlo, mid), (2 * node + 1, mid, nhi)]
        for child in reversed(halves) if last else halves:
            found = self._search(lo, hi, level, *child, last=last)
            if found is not None:
                return found
        return None


def _emit(eqns: list[Eqn], splits: list[_Split]) -> list[Eqn]:
    """The equations with each split collective as a start and a done at their gaps: in each
    gap the dones first (one may produce a start's operand), then the starts in order."""
    starts: dict[int, list[Eqn]] = {}
    dones: dict[int, list[Eqn]] = {}
    split = set()
    for seq, s in enumerate(splits):
        eqn = eqns[s.index]
        ticket = Var(TICKET)
        starts.setdefault(s.start, []).append(Eqn(
            STARTS[eqn.prim], list(eqn.inputs), [ticket], {**eqn.params, "seq": seq},
            source=eqn.source))
        dones.setdefault(s.done, []).append(Eqn(
            collective_done_p, [ticket], list(eqn.outputs), {"result": eqn.outputs[0].aval},
            source=eqn.source))
        split.add(s.index)
    out: list[Eqn] = []
    for k in range(len(eqns) + 1):
        out += dones.get(k, []) + starts.get(k, [])
        if k < len(eqns) and k not in split:
            out.append(eqns[k])
    return out


def _nbytes(atom: object) -> int:
    aval = atom.aval  # type: ignore[attr-defined]
    return aval.size * aval.dtype.itemsize


def _cost(eqn: Eqn) -> tuple[float, int]:
    """Rough floating-point operations and bytes written of one equation of local work: a
    product's 2 m n k, one per result element otherwise; a body's sum (a scan's times its
    length)."""
    inner = [e for _, body in bodies(eqn) for e in body.graph.eqns
             if e.prim.kind != "collective"]
    if inner:
        times = eqn.params.get("length", 1) if eqn.prim.name == "scan" else 1
        flops, written = map(sum, zip(*map(_cost, inner)))
        return times * flops, times * written
    written = sum(_nbytes(v) for v in eqn.outputs)
    if eqn.prim.name == "dot_general":
        (contracting, _), _ = eqn.params["dims"]
        lhs = eqn.inputs[0].aval
        k = math.prod(lhs.shape[d] for d in contracting)
        return 2.0 * eqn.outputs[0].aval.size * k, written
    return float(sum(v.aval.size for v in eqn.outputs)), written
