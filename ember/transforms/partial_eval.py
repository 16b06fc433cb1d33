"""Partial evaluation of a graph: split it into what can run now and what must wait.

``linearize`` needs this for primitives that hold subgraphs: given which inputs of a body are
*unknown* (tangents, staged) and which are *known* (primal values), the body splits into

- a known graph, ``known inputs -> known outputs + residuals``, which runs now, and
- an unknown graph, ``residuals + unknown inputs -> unknown outputs``, which is staged;

the residuals are the known values the unknown part needs.

The split is made by tracing, with two graph traces stacked: an outer, dynamic one whose
arguments are the known inputs, and an inner, non-dynamic one whose arguments are the unknown
inputs. Evaluating the body with both sets of arguments sends every primitive on known values
to the outer graph, and stages in the inner graph every primitive touching an unknown one; the
outer values the inner graph captures are exactly the residuals. Control flow nested in the
body meets the inner trace with some known operands, so it is split by its own
``partial_eval`` rule in the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ember.core import trace as core
from ember.core.trace import GraphBuilder, GraphTrace, GraphTracer, eval_graph, make_graph
from ember.ir.graph import ClosedGraph, Graph
from ember.transforms.subgraphs import mask

__all__ = ["partial_eval_graph"]


def partial_eval_graph(closed: ClosedGraph, unknowns: Sequence[bool],
                       instantiate: bool | Sequence[bool] = False
                       ) -> tuple[ClosedGraph, ClosedGraph, list[bool], int]:
    """Split ``closed`` given which inputs are unknown.

    Returns ``(known, unknown, out_unknowns, num_residuals)``: ``known`` maps the known inputs
    to the known outputs followed by the residuals; ``unknown`` maps the residuals followed by
    the unknown inputs to the unknown outputs. An output is unknown if it depends on an unknown
    input or if ``instantiate`` asks for it (loops need a carry to stay unknown once it is).
    """
    in_avals = closed.in_avals
    inst = mask(instantiate, len(closed.out_avals))
    known_avals = [a for a, u in zip(in_avals, unknowns) if not u]
    unknown_avals = [a for a, u in zip(in_avals, unknowns) if u]
    found: dict[str, Any] = {}

    def known_fn(*known_args: Any) -> list[Any]:
        with core.new_main(GraphTrace, GraphBuilder()) as main:
            trace: GraphTrace = main.trace
            unknown_args = [trace.new_arg(a) for a in unknown_avals]
            known_it, unknown_it = iter(known_args), iter(unknown_args)
            args = [next(unknown_it) if u else next(known_it) for u in unknowns]
            outs = [_lower_known(o, main) for o in eval_graph(closed, *args)]
            out_unknowns = [_is_staged(o, main) or force for o, force in zip(outs, inst)]
            staged = main.payload.build(
                unknown_args, [trace.full_raise(o) for o, u in zip(outs, out_unknowns) if u])
        found["staged"], found["out_unknowns"] = staged, out_unknowns
        return [*[o for o, u in zip(outs, out_unknowns) if not u], *staged.consts]

    known = make_graph(known_fn, known_avals)
    staged: ClosedGraph = found["staged"]
    g = staged.graph
    unknown = ClosedGraph(Graph([], [*g.constvars, *g.invars], g.eqns, g.outvars), [])
    return known, unknown, found["out_unknowns"], len(g.constvars)


def _lower_known(value: Any, main: core.MainTrace) -> Any:
    """A captured value of the inner trace stands for the outer value it captured."""
    if isinstance(value, GraphTracer) and value._trace.main is main and value.is_known:
        return value.const
    return value


def _is_staged(value: Any, main: core.MainTrace) -> bool:
    return isinstance(value, GraphTracer) and value._trace.main is main
