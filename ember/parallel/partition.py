"""The SPMD partitioner: one global graph in, one per-device graph with collectives out.

Every device runs the same per-device program on its own blocks of the values (local shapes).
The partitioner walks the global graph's equations in order, keeping for each value the local
value that stands for it and that value's :class:`~ember.ir.sharding.Sharding` (its layout,
partial sums included). For each equation it

1. picks how to split the equation's factors (``ember.parallel.rules``): from the layouts
   propagation planned (``ember.parallel.propagate``) or from the layouts the operands have
   now, whichever the cost model finds cheaper;
2. redistributes each operand whose layout differs from the one that split implies
   (:func:`~ember.parallel.reshard.plan_reshard`), which writes collectives into the
   per-device graph;
3. writes the equation itself on local shapes; its results get the implied layouts, partial
   over the mesh axes of the factors it sums away (a row-parallel product's contraction).

At the end each output is redistributed to the layout asked for (never partial). Every
collective inserted is recorded, with the user line of the equation that caused it, in an
:class:`~ember.parallel.explain.Explanation`.

**Choosing.** An equation's split is the candidate whose operand redistributions (priced by
:class:`~ember.parallel.reshard.CostModel`), local work (``2 * points / flops`` over its local
iteration space) and the redistributions that would bring its results to their planned layouts
cost least. A value every device can compute in any layout with no communication (a broadcast
or an elementwise operation of values held whole, in its turn: a clipping factor broadcast to a
weight's shape) is computed again in another layout where that costs less than moving it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ember import dtypes
from ember.errors import EmberError, EmberValueError, op_error
from ember.ir.graph import ClosedGraph, Eqn, Graph, Literal, Var
from ember.ir.sharding import Sharding
from ember.ir.types import ArrayType
from ember.ops import elementwise as ew
from ember.ops.structural import (
    broadcast_in_dim_p,
    concatenate_p,
    dynamic_slice_p,
    reshape_p,
    slice_p,
)
from ember.parallel import collectives as coll
from ember.parallel.array import sharding_constraint_p
from ember.parallel.explain import Collective, Explanation
from ember.parallel.propagate import Layouts, bodies, fit, known_inputs, layout, propagate, stacked
from ember.parallel.reshard import CostModel, Step, after, collective_bytes, plan_reshard
from ember.parallel.rules import WITH_BODIES, Rule, rule_for
from ember.transforms.call import call_p

__all__ = ["partition", "Partitioned"]

Mesh = tuple[tuple[str, int], ...]


# --- the partitioner ---------------------------------------------------------------------------

@dataclass
class Partitioned:
    """A per-device program and what it takes and gives.

    ``graph`` runs on every device on local blocks; ``in_shardings``/``out_shardings`` say how
    its inputs and outputs lay the global values out; ``explanation`` lists every collective.
    """

    graph: ClosedGraph
    mesh: Mesh
    in_shardings: list[Sharding]
    out_shardings: list[Sharding]
    explanation: Explanation

    def explain(self) -> str:
        return str(self.explanation)


def partition(closed: ClosedGraph, in_shardings: Sequence[Any] | None,
              out_shardings: Sequence[Any] | None, mesh: Any,
              cost: CostModel | None = None) -> Partitioned:
    """Partition the global program ``closed`` over ``mesh``.

    ``in_shardings``/``out_shardings``: one per input/output, each a
    :class:`~ember.ir.sharding.Sharding`, a ``NamedSharding`` or ``None`` (propagation
    decides); ``None`` for the whole list leaves them all to propagation. ``mesh``: a ``Mesh``,
    a ``{name: size}`` mapping or ``((name, size), ...)``.
    """
    mesh = _abstract_mesh(mesh)
    graph = closed.graph
    ins = _shardings(in_shardings, graph.invars, mesh)
    outs = _shardings(out_shardings, graph.outvars, mesh)
    layouts = propagate(closed, mesh, ins, outs)
    return _Partitioner(closed, mesh, layouts, cost or CostModel()).run(ins, outs)


def _abstract_mesh(mesh: Any) -> Mesh:
    mesh = getattr(mesh, "abstract", mesh)
    if isinstance(mesh, Mapping):
        mesh = mesh.items()
    return tuple((str(n), int(s)) for n, s in mesh)


def _shardings(given: Sequence[Any] | None, values: Sequence[Any], mesh: Mesh
               ) -> list[Sharding | None]:
    if given is None:
        return [None] * len(values)
    if len(given) != len(values):
        raise op_error(EmberValueError, "partition",
                       f"{len(given)} shardings for {len(values)} values")
    out = []
    for s, v in zip(given, values):
        if s is not None and not isinstance(s, Sharding):
            s = s.abstract(v.aval.ndim)  # a NamedSharding
        if s is not None and s.mesh != mesh:
            raise op_error(EmberValueError, "partition", f"a sharding over mesh {s.mesh} for a "
                           f"program partitioned over {mesh}")
        out.append(s)
    return out


class _Partitioner:
    """One walk over one graph (a body gets its own), writing the per-device graph."""

    def __init__(self, closed: ClosedGraph, mesh: Mesh, layouts: Layouts, cost: CostModel):
        self.closed, self.mesh, self.layouts, self.cost = closed, mesh, layouts, cost
        self.sizes = dict(mesh)
        graph = closed.graph
        self.producers = {v.id: e for e in graph.eqns for v in e.outputs}
        self.values = layouts.values
        self.uses = Counter(a.id for e in graph.eqns for a in e.inputs if isinstance(a, Var))
        self.uses.update(a.id for a in graph.outvars if isinstance(a, Var))
        self.eqns: list[Eqn] = []
        self.env: dict[int, tuple[Var | Literal, Sharding]] = {}
        self.sources: dict[int, str | None] = {}  # Var.id -> the user line that made it
        self.resharded: dict[tuple[int, Sharding], Var] = {}  # (local Var.id, layout) -> Var
        # local Var.id -> the equation that computed it from values held whole (or computed
        # so in their turn) with no communication: it can be computed again in another
        # layout, which costs less than moving it (a broadcast clipping factor).
        self.recipes: dict[int, Eqn] = {}
        self.recomputing: dict[tuple[int, Sharding], float] = {}  # its price, memoised
        self.explanation = Explanation(mesh)

    # -- driving --

    def run(self, in_shardings: Sequence[Sharding | None],
            out_shardings: Sequence[Sharding | None], as_computed: Sequence[int] = ()
            ) -> Partitioned:
        """The per-device program for inputs laid out as ``in_shardings`` say (``None``: as
        planned; partial sums allowed), its outputs as ``out_shardings`` say, except those in
        ``as_computed``, left as computed (partial sums too)."""
        closed = self.closed
        graph = closed.graph
        constvars = []
        for v in graph.constvars:  # captured arrays: every device holds them whole
            s = layout(self.mesh, ((),) * v.aval.ndim)
            local = Var(v.aval.update(sharding=s))
            constvars.append(local)
            self.env[v.id] = (local, s)
        invars, in_layouts = [], []
        for v, given in zip(graph.invars, in_shardings):
            s = given or self.layouts.of(v)
            local = Var(v.aval.update(shape=s.local_shape(v.aval.shape), sharding=s))
            invars.append(local)
            in_layouts.append(s)
            self.env[v.id] = (local, s)
        for eqn in graph.eqns:
            self.equation(eqn)
        outvars, out_layouts = [], []
        for i, (v, given) in enumerate(zip(graph.outvars, out_shardings)):
            target = given or (self.layouts.of(v) if isinstance(v, Var)
                               else layout(self.mesh, ((),) * v.aval.ndim))
            if i in as_computed:
                target = self.layout_of(v)
            local, _ = self.read(v)
            source = self.sources.get(v.id) if isinstance(v, Var) else None
            outvars.append(self.reshard(local, self.layout_of(v), target, source, f"output {i}"))
            out_layouts.append(target)
        local_graph = Graph(constvars, invars, self.eqns, outvars)
        return Partitioned(ClosedGraph(local_graph, list(closed.consts)), self.mesh, in_layouts,
                           out_layouts, self.explanation)

    def read(self, atom: Var | Literal) -> tuple[Var | Literal, Sharding]:
        if isinstance(atom, Literal):
            return atom, layout(self.mesh, ((),) * atom.aval.ndim)
        return self.env[atom.id]

    def layout_of(self, atom: Var | Literal) -> Sharding:
        return self.read(atom)[1]

    # -- one equation --

    def equation(self, eqn: Eqn) -> None:
        for v in eqn.outputs:
            self.sources[v.id] = eqn.source
        if eqn.prim is sharding_constraint_p:  # an annotation: its value laid out as asked, no op
            local, current = self.read(eqn.inputs[0])
            target = layout(self.mesh, eqn.params["sharding"].dims)
            out = self.reshard(local, current, target, eqn.source, "with_sharding_constraint")
            self.env[eqn.outputs[0].id] = (out, target)
            return
        if eqn.prim.name in WITH_BODIES:
            self.call(eqn)
            return
        if eqn.prim.name == "shard_map" and eqn.params["mesh"] == self.mesh:
            self.per_device(eqn)
            return
        rule = rule_for(eqn, self.producers, self.values)
        if rule.note is not None:
            self.explanation.note(eqn.prim.name, rule.note, eqn.source)
        options = self.candidates(eqn, rule)
        if len(options) == 1:
            operand_layouts, result_layouts = self.implied(eqn, rule, options[0])
        else:
            operand_layouts, result_layouts = min(
                (self.implied(eqn, rule, a) for a in options),
                key=lambda layouts: self.seconds(eqn, rule, *layouts))
        inputs = [self.reshard(*self.read(a), s, eqn.source, f"{eqn.prim.name} operand {i}")
                  if isinstance(a, Var) else a
                  for i, (a, s) in enumerate(zip(eqn.inputs, operand_layouts))]
        for i, columns in _split_columns(rule.index_columns + rule.masked_columns,
                                         operand_layouts, inputs).items():
            inputs[i] = self.local_indices(inputs[i], columns, eqn.source)
        outs = list(self.emit(eqn, inputs, result_layouts))  # (emit's list is the equation's)
        masked = _split_columns(rule.masked_columns, operand_layouts, inputs)
        for i, columns in masked.items():  # a lookup: rows from other devices' blocks are zeroed
            outs[0] = self.outside_zeroed(outs[0], inputs[i], columns, eqn.source)
        combined = _combined_axes(rule, operand_layouts)
        if combined:  # a max/min over split dimensions: the blocks' extremes combined at once
            outs = [self.combine(local, combined, rule.reduce_op, eqn.source, eqn.prim.name)
                    for local in outs]
        if _cheap(eqn) and all(self.local_only(a) for a in eqn.inputs):
            self.recipes[outs[0].id] = eqn
        for v, local, s in zip(eqn.outputs, outs, result_layouts):
            self.env[v.id] = (local, s)

    def local_only(self, atom: Var | Literal) -> bool:
        """Whether every device can compute its block of ``atom`` in any layout without
        communicating: it is held whole (or is a literal), or is a recipe's result."""
        local, current = self.read(atom)
        return isinstance(local, Literal) or local.id in self.recipes or (
            not current.partial and not any(current.dims))

    def call(self, eqn: Eqn) -> None:
        """The bodies of a call, a scan or a cond are partitioned in their turn, on the layouts
        their operands have (partial sums taken first), their results laid out as planned;
        their collectives are this program's, run where the body runs. A call's body, and a
        ``custom_vjp_call``'s function (which becomes a call: nothing differentiates the
        per-device program), take partial sums as they are, so a constraint inside sums them
        into the layout it asks for (a reduce-scatter, not an all-reduce and a slice); a
        recomputed body (``remat``) runs twice and takes them summed. A scan steps along the
        leading dimension of its scanned operands and stacked results, which stays whole, and
        its loop-carried values keep one layout from step to step. A cond's branch index is
        made whole, so every device takes the same branch."""
        if eqn.prim.name == "while":
            self.while_loop(eqn)
            return
        drops = stacked(eqn)
        branches = bodies(eqn)
        operands = branches[0][0]
        skip = len(eqn.inputs) - len(operands)  # a cond's branch index
        inputs = [self.reshard(*self.read(a), layout(self.mesh, ()), eqn.source,
                               f"{eqn.prim.name} operand {i}")
                  for i, a in enumerate(eqn.inputs[:skip])]
        inner_in = []
        as_is = eqn.prim.name in ("call", "custom_vjp_call")
        for i, (a, drop) in enumerate(zip(operands, drops)):
            local, current = self.read(a)
            dims = ((),) * drop + current.dims[drop:]
            partial = current.partial if as_is else ()
            inputs.append(self.reshard(local, current, layout(self.mesh, dims, partial),
                                       eqn.source, f"{eqn.prim.name} operand {skip + i}"))
            inner_in.append(layout(self.mesh, dims[drop:], partial))
        n = len(operands)
        inner_out = [layout(self.mesh, self.layouts.of(v).dims[drop:])
                     for v, drop in zip(eqn.outputs, drops[n:])]
        if eqn.prim.name == "scan":
            self.partial_carries(eqn, inputs, inner_in, inner_out)
        parts = [self.body(body, inner_in, inner_out, known_inputs(operands, body, self.values))
                 for operands, body in branches]
        if eqn.prim.name == "scan":
            where, repeats = f"scan body (x{eqn.params['length']})", eqn.params["length"]
        else:
            where, repeats = f"{eqn.prim.name} body", 1
        for i, part in enumerate(parts):
            label = f"cond branch {i}" if eqn.prim.name == "cond" else where
            self.explanation.extend(part.explanation, label, repeats)
        results = [layout(self.mesh, ((),) * drop + s.dims, s.partial)
                   for s, drop in zip(parts[0].out_shardings, drops[n:])]
        prim, params = eqn.prim, {**eqn.params, "body": parts[0].graph}
        if eqn.prim.name == "cond":
            params = {**eqn.params, "branches": tuple(p.graph for p in parts)}
        elif eqn.prim.name == "custom_vjp_call":
            prim, params = call_p, {"body": parts[0].graph, "name": "custom_vjp"}
        outs = self.bind(prim, inputs, params, eqn.source, results)
        for v, local, s in zip(eqn.outputs, outs, results):
            self.env[v.id] = (local, s)

    def per_device(self, eqn: Eqn) -> None:
        """A ``shard_map`` over this mesh is per-device code already: its operands are laid
        out as its in specs say (collectives only where they are laid out otherwise), its body
        runs on their blocks as it is, as a call (its psum & co. are collectives of this
        program: ``explain()`` lists them too), and its results are laid out as its out specs
        say (the out specs are trusted: an axis one leaves out is one the body replicated
        over)."""
        p = eqn.params
        inputs = [self.reshard(*self.read(a), s, eqn.source, f"shard_map operand {i}")
                  if isinstance(a, Var) else a
                  for i, (a, s) in enumerate(zip(eqn.inputs, p["in_shardings"]))]
        outs = self.bind(call_p, inputs, {"body": p["body"], "name": p["name"]}, eqn.source,
                         p["out_shardings"])
        for v, local, s in zip(eqn.outputs, outs, p["out_shardings"]):
            self.env[v.id] = (local, s)
        written = Explanation(self.mesh)
        for e in p["body"].graph.eqns:
            if e.prim in coll.COLLECTIVES and e.prim is not coll.axis_index_p:
                x = e.inputs[0].aval
                n = coll.group_size(self.mesh, e.params["axes"])
                written.add(Collective(
                    e.prim.name, e.params["axes"],
                    collective_bytes(e.prim.name, x.size * x.dtype.itemsize, n), e.source,
                    "per-device code", "as written", str(e.outputs[0].aval),
                    value=e.outputs[0].id))
        self.explanation.extend(written, f"shard_map {p['name']}")

    def while_loop(self, eqn: Eqn) -> None:
        """A while loop's body and test are partitioned on the layouts of its operands
        (partial sums taken first); its carry keeps one layout from step to step, and the
        test's answer is made whole, so every device runs the same number of steps."""
        p = eqn.params
        inputs, layouts = [], []
        for i, a in enumerate(eqn.inputs):
            local, current = self.read(a)
            whole = layout(self.mesh, current.dims)
            inputs.append(self.reshard(local, current, whole, eqn.source, f"while operand {i}"))
            layouts.append(whole)
        tests, steps, carry = _split_at(layouts, p["cond_nconsts"], p["body_nconsts"])
        test_in, step_in, carry_in = _split_at(list(eqn.inputs), p["cond_nconsts"],
                                               p["body_nconsts"])
        test = self.body(p["cond"], [*tests, *carry], [layout(self.mesh, ())],
                         known_inputs([*test_in, *carry_in], p["cond"], self.values))
        body = self.body(p["body"], [*steps, *carry], list(carry),
                         known_inputs([*step_in, *carry_in], p["body"], self.values))
        self.explanation.extend(test.explanation, "while test (each step)")
        self.explanation.extend(body.explanation, "while body (each step)")
        outs = self.bind(eqn.prim, inputs, {**p, "cond": test.graph, "body": body.graph},
                         eqn.source, carry)
        for v, local, s in zip(eqn.outputs, outs, carry):
            self.env[v.id] = (local, s)

    def partial_carries(self, eqn: Eqn, inputs: list[Var | Literal], inner_in: list[Sharding],
                        inner_out: list[Sharding]) -> None:
        """A scan's carries keep one layout from step to step; one that can stay a partial sum
        (an accumulated gradient) does, and is summed once, after the loop. A trial partition
        of the body, its carries entering partial over every axis they are not split over,
        says which stay so. Updates ``inputs``, ``inner_in`` and ``inner_out`` in place."""
        body = eqn.params["body"]
        first, carry = eqn.params["num_consts"], eqn.params["num_carry"]
        trial_in = list(inner_in)
        for i in range(first, first + carry):
            split = {a for axes in inner_in[i].dims for a in axes}
            if dtypes.is_inexact(body.graph.invars[i].aval.dtype):
                trial_in[i] = layout(self.mesh, inner_in[i].dims,
                                     tuple(a for a, _ in self.mesh if a not in split))
        known = known_inputs(eqn.inputs, body, self.values)
        trial = self.body(body, trial_in, [None] * carry + inner_out[carry:], known,
                          as_computed=range(carry))
        for i, (s, got) in enumerate(zip(inner_in[first:first + carry], trial.out_shardings)):
            if got.dims == s.dims and got.partial:
                carried = layout(self.mesh, s.dims, got.partial)
                inputs[first + i] = self.reshard(inputs[first + i], s, carried, eqn.source,
                                                 f"scan operand {first + i}")
                inner_in[first + i] = carried
        inner_out[:carry] = inner_in[first:first + carry]

    def body(self, body: ClosedGraph, ins: list[Sharding], outs: list[Sharding | None],
             known: dict[int, Any], as_computed: Sequence[int] = ()) -> Partitioned:
        """``body`` partitioned for inputs laid out as ``ins`` and outputs as ``outs``."""
        layouts = propagate(body, self.mesh, ins, outs, known)
        return _Partitioner(body, self.mesh, layouts, self.cost).run(
            ins, [s or layouts.of(v) if isinstance(v, Var) else s
                  for s, v in zip(outs, body.graph.outvars)], as_computed)

    def candidates(self, eqn: Eqn, rule: Rule) -> list[dict[int, tuple[str, ...]]]:
        """Factor splits worth costing: the planned one (from propagated layouts), the one
        the operands have now, and each of those without splitting the factors summed away
        (gathering operands can cost less than summing a large result). A lookup into a
        split table may also give the table's axes to its batch instead (a ZeRO-3 table split
        like the batch is gathered rather than the batch's indices)."""
        planned = [(v, f, self.layouts.dims.get(v.id)) for v, f in self._values(eqn, rule)]
        current = [(v, f, self.layout_of(v).dims) for v, f in self._values(eqn, rule)
                   if v in eqn.inputs]
        options = [self._assign(planned), self._assign(current)]
        options += [{f: axes for f, axes in a.items() if f not in rule.reduced} for a in options]
        if rule.masked_columns:
            options += [self._assign(values, rule.reduced) for values in (planned, current)]
        return [a for i, a in enumerate(options) if a not in options[:i]]

    def _values(self, eqn: Eqn, rule: Rule) -> list[tuple[Var, tuple[int | None, ...]]]:
        """The operands, then the results. An elementwise equation's operands computed from
        scalars alone come last: each device computes its block of one in any layout, so the
        others' layouts say how to split."""
        values = [(a, f) for a, f in zip(eqn.inputs, rule.operands) if isinstance(a, Var)]
        if eqn.prim.kind == "elementwise":
            values.sort(key=lambda value: value[0].id in self.layouts.weak)
        return values + list(zip(eqn.outputs, rule.results))

    def _assign(self, values: list[tuple[Var, tuple[int | None, ...], Any]],
                skip: frozenset[int] = frozenset()) -> dict[int, tuple[str, ...]]:
        """Each factor's axes from the first value that splits it, cut to fit every dimension
        of the factor (results come last, so operands as they are win over plans)."""
        sizes: dict[int, list[int]] = {}
        for var, factors, _ in values:
            for d, f in enumerate(factors):
                if f is not None:
                    sizes.setdefault(f, []).append(var.aval.shape[d])
        assignment: dict[int, tuple[str, ...]] = {}
        used: set[str] = set()
        for _, factors, dims in values:
            for d, f in enumerate(factors):
                if f is None or f in skip or f in assignment or not dims or not dims[d]:
                    continue
                axes = fit(dims[d], sizes[f], self.sizes, used)
                if axes:
                    assignment[f] = axes
                    used.update(axes)
        return assignment

    def implied(self, eqn: Eqn, rule: Rule, assignment: dict[int, tuple[str, ...]]
                ) -> tuple[list[Sharding], list[Sharding]]:
        """For one factor split: the operands' layouts it needs and the results'."""
        split = {a for axes in assignment.values() for a in axes}

        def dims(factors: tuple[int | None, ...]) -> tuple[tuple[str, ...], ...]:
            return tuple(assignment.get(f, ()) if f is not None else () for f in factors)

        current = [self.layout_of(a) for a in eqn.inputs]
        keep: dict[int, set[str]] = {i: set() for i in range(len(eqn.inputs))}
        result_partial: set[str] = ({a for f in rule.reduced for a in assignment.get(f, ())}
                                    if rule.reduce_op == "sum" else set())
        # A partial sum passes through an equation linear in it while that does not make the
        # sum still to be taken any larger (it is taken before a broadcast, never after) nor
        # more frequent: a partial value read by several equations is summed once, here, and
        # the sum reused, rather than once along each reader's path.
        biggest = max((math.prod(layout(self.mesh, dims(f)).local_shape(v.aval.shape))
                       for v, f in zip(eqn.outputs, rule.results)), default=0)
        for axis in {a for s in current for a in s.partial}:
            holders = {i for i, s in enumerate(current) if axis in s.partial}
            group = next(iter(g for g in rule.linear if set(g) <= holders), None)
            if (group is not None and axis not in split and axis not in result_partial
                    and all(self.uses[eqn.inputs[i].id] == 1 for i in group)
                    and biggest <= min(self.read(eqn.inputs[i])[0].aval.size for i in group)):
                for i in group:
                    keep[i].add(axis)
                result_partial.add(axis)
        reduced_axes = {a for f in rule.reduced for a in assignment.get(f, ())}
        for i in rule.accumulates:
            keep[i] |= reduced_axes
        ordered = lambda axes: tuple(a for a, _ in self.mesh if a in axes)  # noqa: E731
        operands = [layout(self.mesh, dims(f), ordered(keep[i]))
                    for i, f in enumerate(rule.operands)]
        results = [layout(self.mesh, dims(f), ordered(result_partial)) for f in rule.results]
        return operands, results

    def seconds(self, eqn: Eqn, rule: Rule, operands: list[Sharding], results: list[Sharding]
                ) -> float:
        """What computing ``eqn`` with these layouts costs: redistributing its operands, its
        local work, and bringing its results to their planned layouts."""
        seconds = 0.0
        for a, want in zip(eqn.inputs, operands):
            if isinstance(a, Var):
                seconds += self.moving(a, want)
        combined = _combined_axes(rule, operands)
        for v, s in zip(eqn.outputs, results):
            local = s.local_shape(v.aval.shape)
            if combined:
                n = math.prod(self.sizes[a] for a in combined)
                nbytes = math.prod(local) * v.aval.dtype.itemsize
                seconds += self.cost.seconds([Step("all_reduce", combined, nbytes=(
                    collective_bytes("all_reduce", nbytes, n)))])
            seconds += self.cost.seconds(plan_reshard(local, v.aval.dtype.itemsize, s,
                                                      self.layouts.of(v), self.cost))
        return seconds + self.cost.compute(_points(eqn, rule, operands, results))

    # -- writing the per-device graph --

    def bind(self, prim: Any, inputs: list[Var | Literal], params: dict[str, Any],
             source: str | None, layouts: Sequence[Sharding] | None = None) -> list[Var]:
        avals = prim.abstract_eval(*[a.aval for a in inputs], **params)
        avals = list(avals) if prim.multiple_results else [avals]
        if layouts is not None:
            avals = [a.update(sharding=s) for a, s in zip(avals, layouts)]
        outs = [Var(a) for a in avals]
        self.eqns.append(Eqn(prim, inputs, outs, params, source=source))
        return outs

    def emit(self, eqn: Eqn, inputs: list[Var | Literal], layouts: list[Sharding]) -> list[Var]:
        """``eqn`` on local shapes: its shape-valued params are made local, and the local
        result types are checked against the layouts (a mismatch is ember's bug)."""
        want = [s.local_shape(v.aval.shape) for v, s in zip(eqn.outputs, layouts)]
        params = _local_params(eqn, inputs, want)
        outs = self.bind(eqn.prim, inputs, params, eqn.source, layouts)
        got = [v.aval.shape for v in outs]
        if got != want:
            raise EmberError(f"ember bug: partitioning {eqn.prim.name} gave local shapes {got}, "
                             f"its layouts {layouts} need {want}")
        return outs

    def reshard(self, local: Var | Literal, current: Sharding, target: Sharding,
                source: str | None, reason: str) -> Var | Literal:
        """``local`` (laid out as ``current``) laid out as ``target``, with the collectives
        that takes written into the graph and the explanation. A value redistributed once is
        reused by every later equation that needs it laid out the same way."""
        if isinstance(local, Literal) or current == target:
            return local
        done = self.resharded.get((local.id, target))
        if done is not None:
            return done
        original = local
        steps = plan_reshard(local.aval.shape, local.aval.dtype.itemsize, current, target,
                             self.cost)
        if self.cost.seconds(steps) > self.recompute_seconds(local, target):
            local = self.recompute(local, target)
            self.resharded[(original.id, target)] = local
            return local
        now = current
        for step in steps:
            now = after(now, step)
            local = self.step(local, step, now, source)
            if step.kind not in ("slice", "partial"):
                self.explanation.add(Collective(
                    step.kind, step.axes, step.nbytes, source, reason,
                    f"{current} -> {target}", str(local.aval), value=local.id))
        self.resharded[(original.id, target)] = local
        return local

    def moving(self, atom: Var, want: Sharding) -> float:
        """Seconds to lay the value of ``atom`` out as ``want``: redistributing it, or
        computing it again where it is a recipe's result and that costs less."""
        local, current = self.read(atom)
        if current == want:
            return 0.0
        steps = plan_reshard(local.aval.shape, local.aval.dtype.itemsize, current, want,
                             self.cost)
        return min(self.cost.seconds(steps), self.recompute_seconds(local, want))

    def recipe(self, local: Var, target: Sharding
               ) -> tuple[Eqn, Rule, list[Sharding]] | None:
        """The equation that computed ``local``, its rule and its operands' layouts for a
        result laid out as ``target``; None where ``local`` is no recipe's result or the rule
        cannot give that layout."""
        eqn = self.recipes.get(local.id)
        if eqn is None or target.partial:
            return None
        rule = rule_for(eqn, self.producers, self.values)
        assignment = self._assign([(eqn.outputs[0], rule.results[0], target.dims)])
        operands, results = self.implied(eqn, rule, assignment)
        return (eqn, rule, operands) if results[0] == target else None

    def recompute_seconds(self, local: Var, target: Sharding) -> float:
        """What computing ``local`` again laid out as ``target`` costs: its equation's local
        work and laying its operands out for it (infinite where it cannot be)."""
        key = (local.id, target)
        if key not in self.recomputing:
            found = self.recipe(local, target)
            if found is None:
                self.recomputing[key] = math.inf
            else:
                eqn, rule, operands = found
                self.recomputing[key] = self.cost.compute(
                    _points(eqn, rule, operands, [target])) + sum(
                    self.moving(a, s) for a, s in zip(eqn.inputs, operands)
                    if isinstance(a, Var))
        return self.recomputing[key]

    def recompute(self, local: Var, target: Sharding) -> Var:
        """``local`` computed again by its recipe, laid out as ``target``: each device
        slices or recomputes its operands' blocks, with no communication."""
        found = self.recipe(local, target)
        assert found is not None, "recompute is chosen only where recompute_seconds is finite"
        eqn, _, operands = found
        inputs = [self.reshard(*self.read(a), s, eqn.source, f"{eqn.prim.name} operand {i}")
                  if isinstance(a, Var) else a
                  for i, (a, s) in enumerate(zip(eqn.inputs, operands))]
        (out,) = self.emit(eqn, inputs, [target])
        self.recipes[out.id] = eqn
        return out

    def step(self, x: Var, step: Step, after: Sharding, source: str | None) -> Var:
        common = {"axes": step.axes, "mesh": self.mesh}
        if step.kind == "all_reduce":
            return self.bind(coll.all_reduce_p, [x], {**common, "op": "sum"}, source, [after])[0]
        if step.kind == "all_gather":
            return self.bind(coll.all_gather_p, [x], {**common, "axis": step.dim}, source,
                             [after])[0]
        if step.kind == "reduce_scatter":
            return self.bind(coll.reduce_scatter_p, [x], {**common, "axis": step.dim, "op": "sum"},
                             source, [after])[0]
        if step.kind == "collective_permute":
            return self.bind(coll.collective_permute_p, [x], {**common, "pairs": step.pairs},
                             source, [after])[0]
        if step.kind == "all_to_all":
            return self.bind(coll.all_to_all_p, [x], {**common, "split_axis": step.to,
                                                   "concat_axis": step.dim}, source, [after])[0]
        if step.kind == "partial":
            return self.local_addend(x, step, after, source)
        return self.local_block(x, step, after, source)

    def local_addend(self, x: Var, step: Step, after: Sharding, source: str | None) -> Var:
        """A value every device holds whole, as addends over ``step.axes``: the device at
        coordinate 0 keeps it, the others hold zeros."""
        (axis,) = step.axes
        index = self.bind(coll.axis_index_p, [], {"axis": axis, "mesh": self.mesh}, source)[0]
        first = self.bind(ew.eq.prim, [index, _int32(0)], {}, source)[0]
        shape = x.aval.shape
        keep = self.bind(broadcast_in_dim_p, [first], {"shape": shape, "dims": ()}, source)[0]
        zero = Literal(np.zeros((), x.aval.dtype), ArrayType((), x.aval.dtype))
        zeros = self.bind(broadcast_in_dim_p, [zero], {"shape": shape, "dims": ()}, source)[0]
        return self.bind(ew.select_p, [keep, x, zeros], {}, source, [after])[0]

    def local_indices(self, indices: Var, columns: dict[int, tuple[tuple[str, ...], int]],
                      source: str | None) -> Var:
        """``indices`` with each column in ``columns`` made local: the start of this device's
        block of the dimension it addresses (split over ``axes``, blocks of ``size``)
        subtracted."""
        dtype = indices.aval.dtype
        parts = []
        for column in range(indices.aval.shape[-1]):
            if column in columns:
                axes, size = columns[column]
                block = None
                for a in axes:  # the block index, major axis first
                    index = self.bind(coll.axis_index_p, [], {"axis": a, "mesh": self.mesh},
                                      source)[0]
                    if block is not None:
                        block = self.bind(ew.mul.prim, [block, _int32(self.sizes[a])], {},
                                          source)[0]
                        index = self.bind(ew.add.prim, [block, index], {}, source)[0]
                    block = index
                start = self.bind(ew.mul.prim, [block, _int32(size)], {}, source)[0]
                start = self.bind(ew.convert_p, [start], {"dtype": dtype, "weak": False},
                                  source)[0]
            else:
                start = Literal(np.zeros((), dtype), ArrayType((), dtype))
            parts.append(self.bind(broadcast_in_dim_p, [start], {"shape": (1,), "dims": ()},
                                   source)[0])
        starts = self.bind(concatenate_p, parts, {"axis": 0}, source)[0]
        shape = indices.aval.shape
        starts = self.bind(broadcast_in_dim_p, [starts], {"shape": shape,
                                                          "dims": (len(shape) - 1,)}, source)[0]
        return self.bind(ew.sub.prim, [indices, starts], {}, source, [indices.aval.sharding])[0]

    def outside_zeroed(self, rows: Var, indices: Var,
                       columns: dict[int, tuple[tuple[str, ...], int]], source: str | None
                       ) -> Var:
        """A lookup's ``rows`` with those whose (local) index vector falls outside this
        device's block of a split dimension in ``columns`` zeroed: the gather clamped them
        onto a row of the block, which another device holds the right value for."""
        batch = indices.aval.shape[:-1]
        dtype = indices.aval.dtype
        inside = None
        for column, (_, size) in sorted(columns.items()):
            index = self.bind(slice_p, [indices], {
                "start": (0,) * len(batch) + (column,), "limit": (*batch, column + 1),
                "strides": (1,) * (len(batch) + 1)}, source)[0]
            index = self.bind(reshape_p, [index], {"shape": batch}, source)[0]
            low = self.bind(ew.le.prim, [self.filled(0, dtype, batch, source), index], {},
                            source)[0]
            high = self.bind(ew.lt.prim, [index, self.filled(size, dtype, batch, source)], {},
                             source)[0]
            ok = self.bind(ew.and_.prim, [low, high], {}, source)[0]
            inside = ok if inside is None else self.bind(ew.and_.prim, [inside, ok], {},
                                                         source)[0]
        shape = rows.aval.shape
        keep = self.bind(broadcast_in_dim_p, [inside], {"shape": shape,
                                                       "dims": tuple(range(len(batch)))},
                         source)[0]
        zeros = self.filled(0, rows.aval.dtype, shape, source)
        return self.bind(ew.select_p, [keep, rows, zeros], {}, source, [rows.aval.sharding])[0]

    def filled(self, value: int, dtype: Any, shape: tuple[int, ...], source: str | None) -> Var:
        scalar = Literal(np.asarray(value, dtype), ArrayType((), dtype))
        return self.bind(broadcast_in_dim_p, [scalar], {"shape": shape, "dims": ()}, source)[0]

    def combine(self, x: Var, axes: tuple[str, ...], op: str, source: str | None,
                primitive: str) -> Var:
        """Each device's ``op`` (max, min) of its block combined over ``axes``: one
        all-reduce with that op (a layout holds partial sums only)."""
        out = self.bind(coll.all_reduce_p, [x], {"axes": axes, "mesh": self.mesh, "op": op},
                        source, [x.aval.sharding])[0]
        n = math.prod(self.sizes[a] for a in axes)
        nbytes = collective_bytes("all_reduce", x.aval.size * x.aval.dtype.itemsize, n)
        self.explanation.add(Collective("all_reduce", axes, nbytes, source,
                                        f"{primitive} over a split dimension",
                                        f"{op} of the blocks", str(out.aval),
                                        value=out.id))
        return out

    def local_block(self, x: Var, step: Step, after: Sharding, source: str | None) -> Var:
        """This device's block along ``step.dim`` of a value it holds whole along it:
        a dynamic slice at ``axis_index * block``."""
        (axis,) = step.axes
        block = x.aval.shape[step.dim] // self.sizes[axis]
        index = self.bind(coll.axis_index_p, [], {"axis": axis, "mesh": self.mesh}, source)[0]
        start = self.bind(ew.mul.prim, [index, _int32(block)], {}, source)[0]
        zero = _int32(0)
        starts = [start if d == step.dim else zero for d in range(x.aval.ndim)]
        sizes = tuple(block if d == step.dim else n for d, n in enumerate(x.aval.shape))
        return self.bind(dynamic_slice_p, [x, *starts], {"sizes": sizes}, source, [after])[0]


def _points(eqn: Eqn, rule: Rule, operands: list[Sharding], results: list[Sharding]) -> int:
    """The size of a device's iteration space: each factor's local size, times the whole
    dimensions of the results (a product's ``M * N * K``, an elementwise op's elements)."""
    sizes: dict[int, int] = {}
    points = 1
    values = [*zip(eqn.inputs, rule.operands, operands), *zip(eqn.outputs, rule.results, results)]
    for i, (atom, factors, sharding) in enumerate(values):
        for d, f in enumerate(factors):
            n = atom.aval.shape[d] // sharding.split_count(d)
            if f is not None:
                sizes[f] = max(sizes.get(f, 0), n)
            elif i >= len(eqn.inputs):
                points *= n
    return points * math.prod(sizes.values())


def _cheap(eqn: Eqn) -> bool:
    """An equation worth computing again rather than moving its result: a broadcast or an
    elementwise operation."""
    return len(eqn.outputs) == 1 and (eqn.prim is broadcast_in_dim_p
                                      or eqn.prim.kind == "elementwise")


def _split_at(items: list[Any], *sizes: int) -> list[list[Any]]:
    """``items`` cut into runs of ``sizes`` and the rest."""
    out, start = [], 0
    for n in sizes:
        out.append(items[start:start + n])
        start += n
    return [*out, items[start:]]


def _split_columns(index_columns: Sequence[tuple[int, int, int]], layouts: list[Sharding],
                   inputs: list[Var | Literal]
                   ) -> dict[int, dict[int, tuple[tuple[str, ...], int]]]:
    """Index operand -> {column: (axes, local size)} for each of a rule's index columns
    whose array dimension is split."""
    out: dict[int, dict[int, tuple[tuple[str, ...], int]]] = {}
    for i, column, array in index_columns:
        axes = layouts[array].dims[column]
        if axes:
            out.setdefault(i, {})[column] = (axes, inputs[array].aval.shape[column])
    return out


def _combined_axes(rule: Rule, operands: Sequence[Sharding]) -> tuple[str, ...]:
    """The mesh axes that split a max/min reduction's reduced factors (in mesh order), whose
    blocks' results an all-reduce with that op combines; () for sums (left partial)."""
    if rule.reduce_op == "sum":
        return ()
    axes = {a for factors, s in zip(rule.operands, operands)
            for f, split in zip(factors, s.dims) if f in rule.reduced for a in split}
    return tuple(a for a, _ in operands[0].mesh if a in axes) if axes else ()


def _int32(value: int) -> Literal:
    return Literal(np.int32(value), ArrayType((), dtypes.int32))


def _local_params(eqn: Eqn, inputs: Sequence[Var | Literal], outs: list[tuple[int, ...]]
                  ) -> dict[str, Any]:
    """Params that hold global shapes, made local: a result ``shape`` (broadcast_in_dim,
    reshape, iota), dynamic_slice's ``sizes``, and slice's ``limit`` along a split dimension
    (which the slice's rule only allows to span the whole dimension)."""
    params = eqn.params
    if "shape" in params:
        params = {**params, "shape": outs[0]}
    if "sizes" in params:
        params = {**params, "sizes": outs[0]}
    if "limit" in params:
        local = inputs[0].aval.shape
        full = eqn.inputs[0].aval.shape
        params = {**params, "limit": tuple(n if n != g else e for n, g, e in
                                           zip(local, full, params["limit"]))}
    return params
