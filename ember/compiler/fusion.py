"""Fusion: group elementwise, movement and reduction equations into ``fused`` equations.

A compiled backend pays for every array an equation writes and the next one reads back. Fusion
finds the groups of cheap equations that one loop nest can compute in a single pass over memory
and replaces each group by one ``fused`` equation holding the group as a subgraph. The rest of
the compiler then deals with only three things: fused equations (rendered as kernels),
contractions and library calls, and control flow.

Each group iterates over one *domain*: a ``full`` shape and the (possibly no) axes of it that
the group's reductions run over, its *row*; the other axes are the *outer* ones. A value of the
group has the full shape (computed once per point of the domain) or, in a row group, the outer
shape (computed once per row, as a reduction's result is; also with the reduced axes kept as
1s). So softmax is one row group (the max, the subtraction, the exponential, the sum and the
division), the gradient of a norm's weight (a sum over the batch and sequence axes) one group
with the product it sums, and the AdamW update of a parameter one elementwise group with three
outputs (the new parameter and both moments).

Rules (decided by ``prim.kind``, never by name):

- ``elementwise`` and ``reduction`` equations compute; they join the group of their producers
  when the shapes fit the domain, possibly merging several producer groups (the AdamW update
  reads ``m`` and ``v`` from two chains). A reduction of a group's full values turns an
  elementwise group into a row group over the reduced axes (or joins a row group reducing the
  same ones); any other reduction starts a group of its own.
- ``movement`` and ``generator`` equations are *views*: a view of a group input (or of an iota
  or a literal) is copied into every group that reads it, since it costs only index arithmetic.
  A view of a value the group computed stays inside the group only where it duplicates no work:
  a reshape between outer shapes, the broadcast of a per-row value along the row, and a
  reshape, transpose, reverse or concatenation written straight into an output (RoPE's
  rotate-half concatenation). Any other view of a computed value is read by its consumers from
  the group's output: a transpose or an expanding broadcast would otherwise recompute the
  value at every point it is read from.
- ``contraction``, ``indexing``, ``sort``, ``random``, ``library``, ``cumulative`` and ``control``
  equations never join a group.
- Grouping never creates a cycle: a group stops growing once anything outside it has read one
  of its results, so every read goes from a finished group to a later one. Every fusable
  equation ends up in a group, if only a group of one, so a code generator renders nothing but
  ``fused`` equations.

Running a fused graph on the NumPy backend runs the same equations in the same order as the
unfused graph (the body holds them unchanged), so the results are bitwise equal: grouping can
be tested before any code is generated.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ember.backends.base import ANY_BACKEND, Backend
from ember.compiler.loops import domain_level, reduced_axes, same_site, view_rule
from ember.core.primitive import Primitive
from ember.ir.graph import ClosedGraph, Eqn, Graph, Var
from ember.ir.types import ArrayType
from ember.transforms.subgraphs import program

__all__ = ["fused_p", "fuse", "fused_equations", "COMPUTE_KINDS", "VIEW_KINDS",
           "reduced_axes", "domain_level"]

COMPUTE_KINDS = frozenset({"elementwise", "reduction"})
VIEW_KINDS = frozenset({"movement", "generator"})


# --- the fused primitive ---------------------------------------------------------------------

fused_p = Primitive("fused", kind="control", multiple_results=True)


@fused_p.def_abstract_eval
def _fused_rule(*avals: ArrayType, body: ClosedGraph, name: str) -> list[ArrayType]:
    return list(body.out_avals)


def _fused_impl(backend: Backend, *args: Any, body: ClosedGraph, name: str) -> list[Any]:
    return program(body, backend)(*args)


# The reference implementation runs the body's equations, on the backend running the program.
fused_p.def_impl(_fused_impl, ANY_BACKEND)


def fused_equations(closed: ClosedGraph) -> list[Eqn]:
    """The ``fused`` equations of a graph, in order."""
    return [e for e in closed.graph.eqns if e.prim is fused_p]


# --- shapes of a group -----------------------------------------------------------------------

@dataclass
class _Group:
    full: tuple[int, ...]
    reduced: tuple[int, ...]  # the row axes of ``full``; () for an elementwise group
    members: list[int] = field(default_factory=list)  # equation indices, in graph order
    mask: int = 0  # the members as a bitset of equation indices
    usable: set[int] = field(default_factory=set)  # ids of member outputs later members read
    frozen: bool = False  # something outside has read a result: the group may not grow

    def level(self, shape: tuple[int, ...]) -> str | None:
        return domain_level(shape, self.full, self.reduced)


class _Fuser:
    """One run of the grouping over a graph's equations (see the module docstring)."""

    def __init__(self, graph: Graph):
        self.eqns = graph.eqns
        self.graph = graph
        self.producer: dict[int, int] = {}  # var id -> index of the equation defining it
        for i, eqn in enumerate(self.eqns):
            for v in eqn.outputs:
                self.producer[v.id] = i
        self.group_of: dict[int, _Group] = {}  # equation index -> its group
        self.view: set[int] = set()  # views not in any group (copied into their readers)

    # -- dependencies --------------------------------------------------------------------

    def roots(self, a: Any) -> list[Var]:
        """The vars a group reads for atom ``a``: through free views, down to their sources."""
        if not isinstance(a, Var):
            return []
        i = self.producer.get(a.id)
        if i is None or i not in self.view:
            return [a]
        return [r for b in self.eqns[i].inputs for r in self.roots(b)]

    def can_group(self, i: int, groups: Sequence[_Group], mask: int) -> bool:
        """Whether equation ``i`` and ``groups`` can become one group.

        No group may grow once something outside it has read its results (it is *frozen*):
        then every read goes from a finished group to a later one, and no path can leave a
        group and come back into it, so grouping never makes a cycle. And no member may read
        a value computed in the group through a free view: the view would recompute it at
        every point it reads it from.
        """
        if any(g.frozen for g in groups):
            return False
        usable = set().union(*(g.usable for g in groups))
        for j in _bits(mask) if len(groups) > 1 else [i]:
            for a in self.eqns[j].inputs:
                p = self.producer.get(a.id) if isinstance(a, Var) else None
                if p is None:
                    continue
                if (mask >> p) & 1 and a.id not in usable:
                    return False  # a value the group only writes out (transposed...)
                if p in self.view and any((mask >> self.producer[r.id]) & 1
                                          for r in self.roots(a) if r.id in self.producer):
                    return False
        return True

    def freeze_read(self, i: int) -> None:
        """Freeze the groups equation ``i`` reads from (other than its own)."""
        own = self.group_of.get(i)
        for a in self.eqns[i].inputs:
            for r in self.roots(a):
                g = self.group_of.get(self.producer.get(r.id, -1))
                if g is not None and g is not own:
                    g.frozen = True

    # -- grouping ------------------------------------------------------------------------

    def run(self) -> list[_Group]:
        for i, eqn in enumerate(self.eqns):
            kind = eqn.prim.kind
            if kind in COMPUTE_KINDS:
                if kind == "reduction":
                    self.add_reduction(i, eqn)
                else:
                    self.add_elementwise(i, eqn)
            elif kind in VIEW_KINDS and not self.add_link(i, eqn):
                self.view.add(i)
                continue  # a free view reads nothing yet: its readers will
            self.freeze_read(i)
        self.materialise_views()
        groups = {id(g): g for g in self.group_of.values()}
        return sorted(groups.values(), key=lambda g: g.members[0])

    def source(self, a: Any) -> tuple[_Group, str] | None:
        """The group computing ``a`` and the level it is usable at there, if any."""
        if not isinstance(a, Var) or a.id not in self.producer:
            return None
        g = self.group_of.get(self.producer[a.id])
        if g is None or a.id not in g.usable:
            return None
        level = g.level(a.aval.shape)
        return (g, level) if level else None

    def join(self, i: int, groups: Sequence[_Group], full: tuple[int, ...],
             reduced: tuple[int, ...], usable: bool = True) -> bool:
        """Put equation ``i`` and ``groups`` (merged) into one group over ``(full, reduced)``."""
        mask = 1 << i
        for g in groups:
            mask |= g.mask
        if not self.can_group(i, groups, mask):
            return False
        merged = _Group(full, reduced, mask=mask)
        for g in groups:
            merged.usable |= g.usable
        merged.members = sorted(_bits(mask))
        if usable:
            merged.usable.update(v.id for v in self.eqns[i].outputs)
        for j in merged.members:
            self.group_of[j] = merged
        return True

    def merge_domain(self, groups: Sequence[_Group]) -> tuple[tuple[int, ...], ...] | None:
        """The domain of ``groups`` merged: a row group's, into which elementwise groups of
        its outer or full shape fit; None when they do not fit together."""
        rows = {(g.full, g.reduced) for g in groups if g.reduced}
        if len(rows) > 1:
            return None
        full, reduced = rows.pop() if rows else (groups[0].full, ())
        for g in groups:
            if not g.reduced and domain_level(g.full, full, reduced) is None:
                return None
        return full, reduced

    def add_elementwise(self, i: int, eqn: Eqn) -> None:
        shape = eqn.outputs[0].aval.shape
        sources = [s for s in (self.source(a) for a in eqn.inputs) if s is not None]
        candidates = list({id(g): g for g, _ in sources}.values())
        # Prefer merging every producer group, then the latest producer alone.
        options = [candidates] if len(candidates) > 1 else []
        options += [[g] for g in sorted(candidates, key=lambda g: -g.members[-1])]
        for groups in options:
            domain = self.merge_domain(groups)
            if domain and domain_level(shape, *domain) and self.join(i, groups, *domain):
                return
        self.join(i, [], shape, ())

    def add_reduction(self, i: int, eqn: Eqn) -> None:
        x = eqn.inputs[0]
        axes = tuple(sorted(reduced_axes(eqn)))
        src = self.source(x)
        if src is not None and src[1] == "full":
            g = src[0]
            # Over no axes a reduction is its operand: it fits any group as an elementwise op.
            reduced = axes or g.reduced
            if g.reduced in ((), reduced) and self.join(i, [g], g.full, reduced):
                return
        self.join(i, [], tuple(x.aval.shape), axes)

    def add_link(self, i: int, eqn: Eqn) -> bool:
        """Keep a view of computed values inside their group where that duplicates no work:
        a view reading at each point the element the point computes (a reshape between
        per-row shapes, a per-row value broadcast along the row) stays usable in the group;
        a view moving each element to exactly one place (reshape, transpose, concatenation
        of sibling groups' values) is written straight into an output."""
        sources = [self.source(a) for a in eqn.inputs]
        rule = view_rule(eqn.prim)
        if not sources or any(s is None for s in sources) or rule is None:
            return False
        groups = list({id(g): g for g, _ in sources}.values())
        domain = self.merge_domain(groups)
        if domain is None:
            return False
        if len(eqn.inputs) == 1 and same_site(eqn, *domain):
            return self.join(i, groups, *domain)
        levels = {domain_level(a.aval.shape, *domain) for a in eqn.inputs}
        bijective = eqn.outputs[0].aval.size == sum(a.aval.size for a in eqn.inputs)
        return (rule.place is not None and bijective and len(levels) == 1
                and None not in levels and self.join(i, groups, *domain, usable=False))

    def materialise_views(self) -> None:
        """A free view read by something outside every group (a matmul, a graph output)
        becomes a group of one: code generators only render fused equations."""
        needed: set[int] = set()
        for j, eqn in enumerate(self.eqns):
            if j in self.view or j in self.group_of:
                continue
            needed.update(self.producer[a.id] for a in eqn.inputs
                          if isinstance(a, Var) and a.id in self.producer)
        needed.update(self.producer[a.id] for a in self.graph.outvars
                      if isinstance(a, Var) and a.id in self.producer)
        for j in sorted(needed & self.view):
            self.view.discard(j)
            shape = self.eqns[j].outputs[0].aval.shape
            self.group_of[j] = _Group(shape, (), [j], 1 << j,
                                      {v.id for v in self.eqns[j].outputs})


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


# --- building the fused graph ----------------------------------------------------------------

def fuse(closed: ClosedGraph) -> ClosedGraph:
    """The graph with its fusable equations grouped into ``fused`` equations."""
    graph = closed.graph
    fuser = _Fuser(graph)
    groups = fuser.run()
    eqns = graph.eqns
    # Who reads each var from outside its group: later equations, groups, graph outputs.
    readers: dict[int, set[int]] = {}
    for j, eqn in enumerate(eqns):
        if j in fuser.view:
            continue
        for a in eqn.inputs:
            for r in fuser.roots(a):
                g = fuser.group_of.get(j)
                readers.setdefault(r.id, set()).add(id(g) if g is not None else -1 - j)
    graph_outs = {a.id for a in graph.outvars if isinstance(a, Var)}

    nodes: list[tuple[int, Eqn]] = []  # (position in the original order, equation)
    for g in groups:
        nodes.append((g.members[-1], _fused_eqn(g, fuser, readers, graph_outs)))
    for j, eqn in enumerate(eqns):
        if j not in fuser.group_of and j not in fuser.view:
            nodes.append((j, eqn))
    return ClosedGraph(Graph(graph.constvars, graph.invars, _toposort(nodes, graph),
                             graph.outvars), closed.consts)


def _fused_eqn(g: _Group, fuser: _Fuser, readers: dict[int, set[int]],
               graph_outs: set[int]) -> Eqn:
    eqns = fuser.eqns
    body_idx = set(g.members)
    # Copy in the free views the members read, down to their sources.
    stack = [a for j in g.members for a in eqns[j].inputs]
    while stack:
        a = stack.pop()
        if isinstance(a, Var) and fuser.producer.get(a.id) in fuser.view:
            j = fuser.producer[a.id]
            if j not in body_idx:
                body_idx.add(j)
                stack.extend(eqns[j].inputs)
    order = sorted(body_idx)
    defined = {v.id for j in order for v in eqns[j].outputs}
    invars: list[Var] = []
    for j in order:
        for a in eqns[j].inputs:
            if isinstance(a, Var) and a.id not in defined and a not in invars:
                invars.append(a)
    outvars = [v for j in g.members for v in eqns[j].outputs
               if v.id in graph_outs or readers.get(v.id, set()) - {id(g)}]
    body = ClosedGraph(Graph([], invars, [eqns[j] for j in order], outvars), [])
    names = []
    for j in g.members:
        if eqns[j].prim.kind in COMPUTE_KINDS and eqns[j].prim.name not in names:
            names.append(eqns[j].prim.name)
    names = names or [eqns[g.members[0]].prim.name]
    name = "_".join(names[:4]) + (f"+{len(names) - 4}" if len(names) > 4 else "")
    return Eqn(fused_p, list(invars), list(outvars), {"body": body, "name": name})


def _toposort(nodes: list[tuple[int, Eqn]], graph: Graph) -> list[Eqn]:
    """Order the equations so each comes after what it reads, as close to the original order
    as that allows (grouping moved members to their group's last position)."""
    defined_by: dict[int, int] = {}
    for k, (_, eqn) in enumerate(nodes):
        for v in eqn.outputs:
            defined_by[v.id] = k
    deps = [{defined_by[a.id] for a in eqn.inputs if isinstance(a, Var) and a.id in defined_by}
            for _, eqn in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for k, ds in enumerate(deps):
        for d in ds:
            users[d].append(k)
    waiting = [len(ds) for ds in deps]
    ready = [(nodes[k][0], k) for k in range(len(nodes)) if not waiting[k]]
    heapq.heapify(ready)
    out: list[Eqn] = []
    while ready:
        _, k = heapq.heappop(ready)
        out.append(nodes[k][1])
        for u in users[k]:
            waiting[u] -= 1
            if not waiting[u]:
                heapq.heappush(ready, (nodes[u][0], u))
    assert len(out) == len(nodes), "fusion created a cycle"  # an ember bug, never the user's
    return out
