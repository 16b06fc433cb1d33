"""The verifier: checks that a graph is well formed before it is compiled.

Each var is defined once, before its uses; every equation's result types are what its
primitive's shape rule says for its operand types. A failure here is an Ember bug, not a user
error, so it raises ``AssertionError`` with the offending equation.
"""

from __future__ import annotations

from ember.ir.graph import ClosedGraph, Literal, Var


def verify(closed: ClosedGraph) -> None:
    graph = closed.graph
    assert len(graph.constvars) == len(closed.consts), "constants do not match constvars"
    defined: set[int] = set()

    def define(v: Var) -> None:
        assert v.id not in defined, f"{v} defined twice"
        defined.add(v.id)

    for v in [*graph.constvars, *graph.invars]:
        define(v)
    for eqn in graph.eqns:
        for a in eqn.inputs:
            assert isinstance(a, Literal) or a.id in defined, \
                f"{eqn.prim.name} uses {a} before it is defined"
        expected = eqn.prim.abstract_eval(*[a.aval for a in eqn.inputs], **eqn.params)
        expected = expected if eqn.prim.multiple_results else [expected]
        got = [v.aval for v in eqn.outputs]
        assert [(e.shape, e.dtype) for e in expected] == [(g.shape, g.dtype) for g in got], \
            f"{eqn.prim.name}: outputs typed {got}, shape rule gives {expected}"
        for v in eqn.outputs:
            define(v)
    for a in graph.outvars:
        assert isinstance(a, Literal) or a.id in defined, f"output {a} is not defined"
