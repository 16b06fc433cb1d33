"""The verifier: checks that a graph is well formed before it is compiled.

Each var is defined once, before its uses; outputs are defined; every equation's result types
are what its primitive's shape rule gives for its operand types; its params are data with a
canonical key (no functions); and the same holds inside every body of control flow. ``jit``
runs it after the passes, so a pass that breaks a graph is caught at the equation it broke
rather than as a wrong number later. A failure is an Ember bug, not a user error: it raises
:class:`VerifyError` naming the equation and where it sits.
"""

from __future__ import annotations

from typing import Any

from ember.ir.graph import ClosedGraph, Eqn, Literal, Var
from ember.ir.params import bodies, param_key

__all__ = ["verify", "VerifyError"]


class VerifyError(AssertionError):
    """A malformed graph: a bug in whatever built or rewrote it (please report it)."""


def verify(closed: ClosedGraph, where: str = "graph") -> None:
    """Check ``closed`` and, recursively, the bodies its equations hold."""
    graph = closed.graph
    if len(graph.constvars) != len(closed.consts):
        _fail(where, f"{len(graph.constvars)} constvars but {len(closed.consts)} constants")
    defined: set[int] = set()

    def define(v: Any, what: str) -> None:
        if not isinstance(v, Var):
            _fail(where, f"{what} defines {v!r}, which is not a var")
        if v.id in defined:
            _fail(where, f"{what} defines {v}, which is already defined")
        defined.add(v.id)

    for v in graph.constvars:
        define(v, "a constvar")
    for v in graph.invars:
        define(v, "an input")
    for i, eqn in enumerate(graph.eqns):
        what = f"equation {i} ({_describe(eqn)})"
        for a in eqn.inputs:
            if not isinstance(a, Literal) and a.id not in defined:
                _fail(where, f"{what} uses {a} before it is defined")
        try:
            param_key(eqn.params)
        except TypeError as e:
            _fail(where, f"{what}: a param has no canonical key (params must be data): {e}")
        _check_types(eqn, where, what)
        for name, body in bodies(eqn):
            verify(body, f"{where} > {what} > {name}")
        for v in eqn.outputs:
            define(v, what)
    for a in graph.outvars:
        if not isinstance(a, Literal) and a.id not in defined:
            _fail(where, f"output {a} is not defined")


def _check_types(eqn: Eqn, where: str, what: str) -> None:
    """The results must be typed exactly as the primitive's shape rule types them."""
    try:
        expected = eqn.prim.abstract_eval(*[a.aval for a in eqn.inputs], **eqn.params)
    except Exception as e:  # the rule refuses the operands it was given
        raise VerifyError(f"{where}: {what}: its shape rule rejects the operands: {e}") from e
    expected = list(expected) if eqn.prim.multiple_results else [expected]
    got = [v.aval for v in eqn.outputs]
    if [_type(e) for e in expected] != [_type(g) for g in got]:
        _fail(where, f"{what}: outputs typed {got}, its shape rule gives {expected}")


def _type(aval: Any) -> tuple:
    return aval.shape, aval.dtype, aval.weak


def _describe(eqn: Eqn) -> str:
    ins = ", ".join(str(a.aval) for a in eqn.inputs)
    outs = ", ".join(str(v.aval) for v in eqn.outputs)
    return f"{outs} = {eqn.prim.name}({ins})"


def _fail(where: str, message: str) -> None:
    raise VerifyError(f"ember internal error, please report it: malformed {where}: {message}")
