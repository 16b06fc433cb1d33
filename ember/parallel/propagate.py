"""Sharding propagation: a layout for every value of a graph, from a few annotations.

GSPMD's idea, on Ember's IR: the caller fixes the layouts of some values (the inputs and
outputs it passes shardings for, and every ``with_sharding_constraint`` in the function), and
each equation's sharding rule (``ember.parallel.rules``) carries a split from the values that
have one to those that do not, forward (a product of a split matrix is split) and backward (a
value only ever read split might as well be made split). The pass sweeps the equations forward
and then backward until nothing changes.

Priorities make annotations win: an annotated value's layout is never changed, and where two
operands of an equation propose different splits for one factor, an annotated operand's
proposal beats an inferred one (then the proposal splitting over more axes, then the first).
An inferred layout only ever *grows* (a dimension gains axes after those it has), so the sweep
ends; the first proposal to reach a value wins over later, conflicting ones. Conflicts are not
errors: the partitioner redistributes wherever a value's layout differs from what an equation
needs, so propagation decides only how much communication there will be, never correctness.

Results live in a side table keyed by ``Var`` (:class:`Layouts`); no ``Var`` or type is mutated,
since graphs share them (core review).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ember.errors import user_frame
from ember.ir.graph import Atom, ClosedGraph, Eqn, Literal, Var
from ember.ir.sharding import Sharding, ShardingError
from ember.ops.structural import broadcast_in_dim_p
from ember.parallel.array import sharding_constraint_p
from ember.parallel.rules import WITH_BODIES, Rule, rule_for

__all__ = ["Layouts", "propagate", "check_even", "fit", "layout", "stacked", "bodies",
           "known_inputs"]

Dims = tuple[tuple[str, ...], ...]


@dataclass
class Layouts:
    """The propagated layout of every value of a graph (no partial sums: those appear only
    where the partitioner decides how to compute an equation)."""

    mesh: tuple[tuple[str, int], ...]
    dims: dict[int, Dims] = field(default_factory=dict)  # Var.id -> per-dimension axes
    fixed: set[int] = field(default_factory=set)  # Var.ids the caller or the function annotated
    # Var.id -> value, for the values known before running (captured constants, and a body's
    # inputs fed by them): rules read index bounds from them (rules.iota_columns).
    values: dict[int, Any] = field(default_factory=dict)
    # Var.ids of values computed from scalars alone (a broadcast clipping factor): every
    # device computes its block of one in any layout, so their splits are proposed last.
    weak: set[int] = field(default_factory=set)

    def of(self, var: Var) -> Sharding:
        dims = self.dims.get(var.id)
        return layout(self.mesh, dims if dims is not None else ((),) * var.aval.ndim)


@functools.lru_cache(maxsize=4096)
def layout(mesh: tuple[tuple[str, int], ...], dims: Dims, partial: tuple[str, ...] = ()
           ) -> Sharding:
    """``Sharding(mesh, dims, partial)``, built (and validated) once per distinct layout: the
    passes ask for the same few layouts thousands of times."""
    return Sharding(mesh, dims, partial)


def propagate(closed: ClosedGraph, mesh: tuple[tuple[str, int], ...],
              in_shardings: Sequence[Sharding | None],
              out_shardings: Sequence[Sharding | None] | None = None,
              known: dict[int, Any] | None = None) -> Layouts:
    """Layouts for every value of ``closed``'s top-level graph, from the inputs' and outputs'
    shardings (``None``: propagation decides) and the graph's sharding constraints.
    ``known`` gives the values of inputs known in advance (``Var.id`` -> value).

    A fixed layout that does not divide its value evenly is an error naming the value, the
    mesh axis and the user's line.
    """
    graph = closed.graph
    values = {v.id: c for v, c in zip(graph.constvars, closed.consts)}
    layouts = Layouts(tuple(mesh), values={**values, **(known or {})},
                      weak=_from_scalars(graph.eqns))
    where = user_frame()
    for i, (v, s) in enumerate(zip(graph.invars, in_shardings)):
        if s is not None:
            _fix(layouts, v, s, f"input {i}", where)
    for eqn in graph.eqns:
        if eqn.prim is sharding_constraint_p:  # with_sharding_constraint: fixed as asked
            _fix(layouts, eqn.outputs[0], eqn.params["sharding"],
                 "the with_sharding_constraint value", eqn.source or where)
    for i, (v, s) in enumerate(zip(graph.outvars, out_shardings or ())):
        if s is not None and isinstance(v, Var) and v.id not in layouts.fixed:
            _fix(layouts, v, s, f"output {i}", where)
    producers = {v.id: e for e in graph.eqns for v in e.outputs}
    rules = [rule_for(e, producers, layouts.values) for e in graph.eqns]
    ids = [[a.id for a in (*e.inputs, *e.outputs) if isinstance(a, Var)] for e in graph.eqns]
    # An equation is visited again only when one of its values grew since its last visit.
    clock = 0
    grown_at: dict[int, int] = {}
    visited_at = [-1] * len(graph.eqns)
    order = list(range(len(graph.eqns)))
    changed = True
    while changed:
        changed = False
        for i in [*order, *reversed(order)]:
            if visited_at[i] >= 0 and all(grown_at.get(v, -1) < visited_at[i] for v in ids[i]):
                continue
            clock += 1
            visited_at[i] = clock
            for v in _visit(layouts, graph.eqns[i], rules[i]):
                grown_at[v] = clock
                changed = True
    return layouts


def _from_scalars(eqns: Sequence[Eqn]) -> set[int]:
    """The ids of the values computed from scalars alone: broadcasts of scalars, and
    elementwise operations on those."""
    weak: set[int] = set()
    for e in eqns:
        operands = [a for a in e.inputs if isinstance(a, Var)]
        if (e.prim is broadcast_in_dim_p and all(a.aval.ndim == 0 for a in e.inputs)) or (
                e.prim.kind == "elementwise" and operands
                and all(a.id in weak for a in operands)):
            weak.update(v.id for v in e.outputs)
    return weak


def _fix(layouts: Layouts, var: Var, sharding: Sharding, what: str, where: str) -> None:
    check_even(var, sharding, what, where)
    layouts.dims[var.id] = sharding.dims
    layouts.fixed.add(var.id)


def check_even(var: Var, sharding: Sharding, what: str, where: str) -> None:
    """Raise a :class:`ShardingError` naming ``what``, the mesh axis and ``where`` when
    ``sharding`` does not lay ``var`` out on equal blocks (or has the wrong rank)."""
    try:
        sharding.local_shape(var.aval.shape)
    except ShardingError as e:
        raise ShardingError(f"{what} ({var.aval}) cannot be laid out as {sharding}: {e}\n"
                            f"  at {where}") from None


# --- one equation ------------------------------------------------------------------------------

def _visit(layouts: Layouts, eqn: Eqn, rule: Rule) -> list[int]:
    """Carry splits through one equation; the ids of the values whose layouts grew."""
    if eqn.prim.name in WITH_BODIES:
        return _visit_body(layouts, eqn)
    if eqn.prim.name == "shard_map" and eqn.params["mesh"] == layouts.mesh:
        return _visit_per_device(layouts, eqn)
    if rule.note is not None:  # no rule: nothing flows through a replicated equation
        return []
    values = [(a, f) for a, f in zip(eqn.inputs, rule.operands) if isinstance(a, Var)]
    values += list(zip(eqn.outputs, rule.results))
    assignment = _assign(layouts, values, weak_last=eqn.prim.kind == "elementwise")
    grew = []
    for var, factors in values:
        if var.id in layouts.fixed:
            continue
        proposal = tuple(assignment.get(f, ()) if f is not None else () for f in factors)
        current = layouts.dims.get(var.id, ((),) * var.aval.ndim)
        grown = _grow(current, proposal)
        if grown != current:
            layouts.dims[var.id] = grown
            grew.append(var.id)
    return grew


def _visit_body(layouts: Layouts, eqn: Eqn) -> list[int]:
    """Carry splits through the bodies of a call, a scan or a conditional: propagate inside
    each from the layouts its operands and results have (those without one left to it), and
    take back what the body says of its inputs and outputs. A scan's body sees its scanned
    operands and stacked results without their leading (step) dimension, which stays whole."""
    drops = stacked(eqn)
    grew = []
    for operands, body in bodies(eqn):
        outer = [*operands, *eqn.outputs]
        known = []
        for a, drop in zip(outer, drops):
            dims = layouts.of(a).dims[drop:] if isinstance(a, Var) else None
            known.append(layout(layouts.mesh, dims) if dims and any(dims) else None)
        n = len(operands)
        inner = propagate(body, layouts.mesh, known[:n], known[n:],
                          known_inputs(operands, body, layouts.values))
        for var, mine, drop in zip(outer, [*body.graph.invars, *body.graph.outvars], drops):
            if not isinstance(var, Var) or var.id in layouts.fixed or not isinstance(mine, Var):
                continue
            current = layouts.dims.get(var.id, ((),) * var.aval.ndim)
            grown = _grow(current, ((),) * drop + inner.of(mine).dims)
            if grown != current:
                layouts.dims[var.id] = grown
                grew.append(var.id)
    return grew


def _visit_per_device(layouts: Layouts, eqn: Eqn) -> list[int]:
    """A ``shard_map`` over this mesh says its operands' and results' layouts itself (its in
    and out specs): they are proposed to its operands (so their producers may compute them
    so) and given to its results."""
    grew = []
    values = [*zip(eqn.inputs, eqn.params["in_shardings"]),
              *zip(eqn.outputs, eqn.params["out_shardings"])]
    for var, sharding in values:
        if not isinstance(var, Var) or var.id in layouts.fixed:
            continue
        current = layouts.dims.get(var.id, ((),) * var.aval.ndim)
        grown = _grow(current, sharding.dims)
        if grown != current:
            layouts.dims[var.id] = grown
            grew.append(var.id)
    return grew


def bodies(eqn: Eqn) -> list[tuple[list[Atom], ClosedGraph]]:
    """The bodies of a call, scan, cond or while equation, each with the operands it takes (a
    cond's branches all take the operands after the branch index)."""
    if eqn.prim.name == "cond":
        return [(eqn.inputs[1:], b) for b in eqn.params["branches"]]
    if eqn.prim.name == "while":  # the loop body; its test only reads the carry
        return [(eqn.inputs[eqn.params["cond_nconsts"]:], eqn.params["body"])]
    if eqn.prim.name == "custom_vjp_call":  # its function, on its constants and arguments
        return [(eqn.inputs, eqn.params["fun"])]
    return [(eqn.inputs, eqn.params["body"])]


def known_inputs(operands: Sequence[Atom], body: ClosedGraph, values: dict[int, Any]
                 ) -> dict[int, Any]:
    """The values of a body's inputs fed by known values (constants hoisted out of it)."""
    known = {}
    for a, mine in zip(operands, body.graph.invars):
        if isinstance(a, Literal):
            known[mine.id] = a.value
        elif a.id in values:
            known[mine.id] = values[a.id]
    return known


def stacked(eqn: Eqn) -> list[int]:
    """For each operand its bodies take (:func:`bodies`) and each result of a body-holding
    equation, 1 where the body sees it one step at a time (a scan's scanned operands and
    stacked results), else 0."""
    if eqn.prim.name != "scan":
        return [0] * (len(bodies(eqn)[0][0]) + len(eqn.outputs))
    first = eqn.params["num_consts"] + eqn.params["num_carry"]
    carry = eqn.params["num_carry"]
    return ([0] * first + [1] * (len(eqn.inputs) - first)
            + [0] * carry + [1] * (len(eqn.outputs) - carry))


def _assign(layouts: Layouts, values: list[tuple[Var, tuple[int | None, ...]]],
            weak_last: bool = False) -> dict[int, tuple[str, ...]]:
    """Each factor's axes: the best proposal among the values that split it, cut to what
    divides every dimension of the factor; an axis goes to one factor only. With
    ``weak_last`` (an elementwise equation) the values computed from scalars alone propose
    last: each device computes its block of one in any layout."""
    proposals: dict[int, list[tuple[int, int, int, tuple[str, ...]]]] = {}
    sizes: dict[int, list[int]] = {}
    for order, (var, factors) in enumerate(values):
        dims = layouts.dims.get(var.id)
        rank = 0 if var.id in layouts.fixed else 2 if weak_last and var.id in layouts.weak else 1
        for d, f in enumerate(factors):
            if f is None:
                continue
            sizes.setdefault(f, []).append(var.aval.shape[d])
            if dims is not None and dims[d]:
                proposals.setdefault(f, []).append((rank, -len(dims[d]), order, dims[d]))
    ranked = sorted((min(p), f) for f, p in proposals.items())
    used: set[str] = set()
    assignment = {}
    for (_, _, _, axes), f in ranked:
        axes = fit(axes, sizes[f], dict(layouts.mesh), used)
        if axes:
            assignment[f] = axes
            used.update(axes)
    return assignment


def fit(axes: tuple[str, ...], dim_sizes: Sequence[int], mesh: dict[str, int],
        used: set[str]) -> tuple[str, ...]:
    """The longest prefix of ``axes``, none in ``used``, whose split divides every size."""
    kept: list[str] = []
    for a in axes:
        n = math.prod(mesh[x] for x in kept) * mesh[a]
        if a in used or any(s % n for s in dim_sizes):
            break
        kept.append(a)
    return tuple(kept)


def _grow(current: Dims, proposal: Dims) -> Dims:
    """``current`` with each dimension extended to the proposal's axes where the proposal
    starts with the current axes and adds only axes no other dimension uses."""
    out = list(current)
    for d, (cur, new) in enumerate(zip(current, proposal)):
        if len(new) <= len(cur) or new[:len(cur)] != cur:
            continue
        others = {a for e, axes in enumerate(out) if e != d for a in axes}
        if not others.intersection(new[len(cur):]):
            out[d] = new
    return tuple(out)

