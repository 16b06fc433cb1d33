"""Transposition: run a linear graph backwards, from output cotangents to input cotangents.

The graphs come from :mod:`ember.transforms.linearize`: their inputs are tangents, their
constants are residuals. Equations that do not depend on an input are evaluated forwards first
(they only touch residuals); the rest are linear and are visited in reverse, each primitive's
``transpose`` rule mapping the cotangent of its result to cotangents of its linear operands.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ember.core.trace import UndefinedPrimal, Zero, to_array
from ember.errors import EmberError
from ember.ir.graph import ClosedGraph, Literal, Var
from ember.ops.elementwise import add_any


def backward_pass(closed: ClosedGraph, cts_out: Sequence[Any],
                  extra_linear: Sequence[Any] = ()) -> list[Any]:
    """Cotangents of the graph's inputs given cotangents of its outputs.

    ``extra_linear`` lists inputs (by Var) beyond ``invars`` that are linear too; by default the
    graph's invars are the linear inputs and constvars are residuals.
    """
    graph = closed.graph
    linear = {v.id for v in graph.invars} | {v.id for v in extra_linear}
    env: dict[int, Any] = {v.id: c for v, c in zip(graph.constvars, closed.consts)}

    def read(a: Var | Literal) -> Any:
        return to_array(a.value) if isinstance(a, Literal) else env[a.id]

    linear_eqns = []
    for eqn in graph.eqns:
        if any(isinstance(a, Var) and a.id in linear for a in eqn.inputs):
            linear.update(v.id for v in eqn.outputs)
            linear_eqns.append(eqn)
        else:
            out = eqn.prim.bind(*[read(a) for a in eqn.inputs], **eqn.params)
            for v, o in zip(eqn.outputs, out if eqn.prim.multiple_results else [out]):
                env[v.id] = o

    cts: dict[int, Any] = {}

    def accumulate(v: Var, ct: Any) -> None:
        if ct is None or isinstance(ct, Zero):
            return
        cts[v.id] = add_any(cts[v.id], ct) if v.id in cts else ct

    for v, ct in zip(graph.outvars, cts_out):
        if isinstance(v, Var) and v.id in linear:
            accumulate(v, ct)

    for eqn in reversed(linear_eqns):
        outs = [cts.pop(v.id, None) for v in eqn.outputs]
        if all(o is None for o in outs):
            continue
        outs = [Zero(v.aval) if o is None else o for v, o in zip(eqn.outputs, outs)]
        if eqn.prim.transpose is None:
            raise EmberError(f"internal: {eqn.prim.name} reached reverse mode but has no "
                             "transpose rule (it should not be applied to a tangent)")
        args = [UndefinedPrimal(a.aval) if isinstance(a, Var) and a.id in linear else read(a)
                for a in eqn.inputs]
        ct_in = eqn.prim.transpose(outs if eqn.prim.multiple_results else outs[0], *args,
                                   **eqn.params)
        for a, ct in zip(eqn.inputs, ct_in):
            if isinstance(a, Var) and a.id in linear:
                accumulate(a, ct)

    return [cts.get(v.id, Zero(v.aval)) for v in [*graph.invars, *extra_linear]]
