"""Graph rewrites that run before a graph is compiled: DCE, CSE and constant folding.

Every primitive in Ember is pure (random numbers come from explicit keys), so an equation whose
results are unused can be dropped, two equations with the same primitive, operands and params
compute the same value, and an equation whose operands are all known constants can be computed
once at compile time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ember.errors import TracerError
from ember.ir.graph import ClosedGraph, Eqn, Graph, Literal, Var

# Constant folding keeps results up to this many elements; bigger ones stay as computations
# so that compiled programs do not balloon with materialised constants.
FOLD_LIMIT = 1 << 16


def dce(closed: ClosedGraph) -> ClosedGraph:
    """Drop equations and constants that no output depends on."""
    graph = closed.graph
    live = {a.id for a in graph.outvars if isinstance(a, Var)}
    kept: list[Eqn] = []
    for eqn in reversed(graph.eqns):
        if any(v.id in live for v in eqn.outputs):
            kept.append(eqn)
            live.update(a.id for a in eqn.inputs if isinstance(a, Var))
    kept.reverse()
    pairs = [(v, c) for v, c in zip(graph.constvars, closed.consts) if v.id in live]
    new = Graph([v for v, _ in pairs], graph.invars, kept, graph.outvars)
    return ClosedGraph(new, [c for _, c in pairs])


def _param_key(value: Any) -> Any:
    if isinstance(value, (ClosedGraph, Graph)):
        return ("graph", id(value))
    if isinstance(value, (list, tuple)):
        return tuple(_param_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _param_key(v)) for k, v in value.items()))
    hash(value)
    return value


def _atom_key(a: Var | Literal) -> Any:
    if isinstance(a, Var):
        return ("var", a.id)
    v = np.asarray(a.value)
    return ("lit", v.dtype.str, v.tobytes())


def cse(closed: ClosedGraph) -> ClosedGraph:
    """Reuse the result of an earlier identical equation."""
    graph = closed.graph
    rename: dict[int, Var | Literal] = {}
    seen: dict[Any, list[Var]] = {}
    eqns: list[Eqn] = []

    def sub(a):
        return rename.get(a.id, a) if isinstance(a, Var) else a

    for eqn in graph.eqns:
        inputs = [sub(a) for a in eqn.inputs]
        try:
            key = (eqn.prim.name, tuple(_atom_key(a) for a in inputs),
                   _param_key(eqn.params))
        except TypeError:
            key = None
        if key is not None and key in seen:
            for old, new in zip(eqn.outputs, seen[key]):
                rename[old.id] = new
            continue
        new_eqn = Eqn(eqn.prim, inputs, eqn.outputs, eqn.params)
        eqns.append(new_eqn)
        if key is not None:
            seen[key] = eqn.outputs
    outvars = [sub(a) for a in graph.outvars]
    return ClosedGraph(Graph(graph.constvars, graph.invars, eqns, outvars), closed.consts)


def fold_constants(closed: ClosedGraph) -> ClosedGraph:
    """Evaluate equations whose operands are all known constants (NumPy implementations)."""
    graph = closed.graph
    known: dict[int, np.ndarray] = {}
    for v, c in zip(graph.constvars, closed.consts):
        host = _host_value(c)
        if host is not None:
            known[v.id] = host
    new_consts: list[tuple[Var, np.ndarray]] = []
    rename: dict[int, Var | Literal] = {}
    eqns: list[Eqn] = []

    def value(a):
        return np.asarray(a.value) if isinstance(a, Literal) else known.get(a.id)

    for eqn in graph.eqns:
        inputs = [rename.get(a.id, a) if isinstance(a, Var) else a for a in eqn.inputs]
        vals = [value(a) for a in inputs]
        impl = eqn.prim.impls.get("numpy")
        out_size = sum(o.aval.size for o in eqn.outputs)
        in_size = sum(np.size(v) for v in vals if v is not None)
        # Results bigger than the operands (broadcasts, iota) stay computations: folding them
        # would only trade a cheap op for a large constant.
        foldable = (impl is not None and vals and all(v is not None for v in vals) and
                    not any(isinstance(p, (Graph, ClosedGraph)) for p in eqn.params.values())
                    and out_size <= min(FOLD_LIMIT, max(in_size, 1)))
        if not foldable:
            eqns.append(Eqn(eqn.prim, inputs, eqn.outputs, eqn.params))
            continue
        result = impl(*vals, **eqn.params)
        results = result if eqn.prim.multiple_results else [result]
        for out, r in zip(eqn.outputs, results):
            r = np.asarray(r).astype(out.aval.dtype, copy=False)
            known[out.id] = r
            if r.ndim == 0:
                rename[out.id] = Literal(r, out.aval)
            else:
                new_consts.append((out, r))
    outvars = [rename.get(a.id, a) if isinstance(a, Var) else a for a in graph.outvars]
    constvars = list(graph.constvars) + [v for v, _ in new_consts]
    consts = list(closed.consts) + [c for _, c in new_consts]
    return dce(ClosedGraph(Graph(constvars, graph.invars, eqns, outvars), consts))


def _host_value(c: Any) -> np.ndarray | None:
    """The NumPy value of a constant, or None when it is not known now (a tracer)."""
    try:
        return np.asarray(c)
    except TracerError:
        return None


def optimize(closed: ClosedGraph) -> ClosedGraph:
    """The pass pipeline jit runs: fold constants, share common subexpressions, drop dead code."""
    return dce(cse(fold_constants(closed)))
