"""``linearize``: evaluate a function now and stage its tangent map as a linear graph.

This is forward mode with the tangents *staged* instead of computed: the JVP trace runs on top
of a graph trace whose only arguments are the input tangents. Operations on primal values alone
never reach the graph trace, so they run now (or are staged by an enclosing ``jit``), while every
operation that touches a tangent is recorded. The result is the primal output and a graph that
is linear in its inputs, whose constants are the residuals it needs. Reverse mode is this graph
transposed (:mod:`ember.transforms.transpose`), so only linear primitives need transpose rules
(rule 4 of the brief).

Because primal values stay concrete in eager mode, Python control flow on them works under
``grad`` exactly as it does without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ember.core.trace import GraphBuilder, GraphTrace, Zero, aval_of, new_main
from ember.ir.graph import ClosedGraph
from ember.ir.passes import dce
from ember.ops.elementwise import zeros_like
from ember.transforms.jvp import JVPTrace, JVPTracer, _tangent_for


def linearize_flat(fun: Callable[..., Sequence[Any]], primals: Sequence[Any]
                   ) -> tuple[list[Any], ClosedGraph]:
    tangent_avals = [aval_of(p).strong() for p in primals]
    with new_main(GraphTrace, GraphBuilder()) as graph_main:
        gtrace: GraphTrace = graph_main.trace
        tangents_in = [gtrace.new_arg(a) for a in tangent_avals]
        invars = [graph_main.payload.var(t) for t in tangents_in]
        with new_main(JVPTrace) as jvp_main:
            jtrace = jvp_main.trace
            ins = [JVPTracer(jtrace, p, _tangent_for(p, t)) for p, t in zip(primals, tangents_in)]
            outs = [jtrace.full_raise(o) for o in fun(*ins)]
            primals_out = [o.primal for o in outs]
            tangents_out = [o.tangent for o in outs]
        tangents_out = [gtrace.full_raise(zeros_like(t) if isinstance(t, Zero) else t)
                        for t in tangents_out]
        closed = graph_main.payload.build(invars, tangents_out)
    return primals_out, dce(closed)
