"""Graph rewrites that run before a graph is compiled: DCE, CSE and constant folding.

Every primitive in Ember is pure (random numbers come from explicit keys), so an equation whose
results are unused can be dropped, two equations with the same primitive, operands and params
compute the same value, and an equation whose operands are all known constants can be computed
once at compile time.

Each pass also rewrites the bodies of control-flow equations (``cond`` branches, loop bodies,
``remat``...), keeping every body's inputs and outputs as they are, since the equation holding
it is typed by them. A pass returns its argument itself when it changes nothing, so whatever a
backend memoised on an unchanged graph (its compiled program) stays valid.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ember.errors import TracerError
from ember.ir.graph import ClosedGraph, Eqn, Graph, Literal, Var
from ember.ir.params import array_key, aval_key, bodies, map_bodies, param_key

# Constant folding keeps results up to this many elements; bigger ones stay as computations
# so that compiled programs do not balloon with materialised constants.
FOLD_LIMIT = 1 << 16


def _with_bodies(eqn: Eqn, rewrite: Any, inputs: list[Var | Literal] | None = None) -> Eqn:
    """``eqn`` with its bodies rewritten and, if given, new inputs (itself if nothing changed)."""
    params = map_bodies(eqn, rewrite)
    inputs = eqn.inputs if inputs is None else inputs
    if params is eqn.params and all(a is b for a, b in zip(inputs, eqn.inputs)):
        return eqn
    return Eqn(eqn.prim, inputs, eqn.outputs, params, eqn.source)


def _rebuilt(closed: ClosedGraph, constvars: list[Var], consts: list[Any], eqns: list[Eqn],
             outvars: list[Var | Literal]) -> ClosedGraph:
    """A graph with these parts, or ``closed`` itself when they are the ones it has."""
    g = closed.graph
    same = (len(constvars) == len(g.constvars) and len(eqns) == len(g.eqns)
            and all(a is b for a, b in zip(eqns, g.eqns))
            and all(a is b for a, b in zip(outvars, g.outvars)))
    if same:
        return closed
    return ClosedGraph(Graph(constvars, g.invars, eqns, outvars), consts)


def dce(closed: ClosedGraph) -> ClosedGraph:
    """Drop equations and constants that no output depends on."""
    graph = closed.graph
    live = {a.id for a in graph.outvars if isinstance(a, Var)}
    kept: list[Eqn] = []
    for eqn in reversed(graph.eqns):
        if any(v.id in live for v in eqn.outputs):
            kept.append(_with_bodies(eqn, dce))
            live.update(a.id for a in eqn.inputs if isinstance(a, Var))
    kept.reverse()
    pairs = [(v, c) for v, c in zip(graph.constvars, closed.consts) if v.id in live]
    return _rebuilt(closed, [v for v, _ in pairs], [c for _, c in pairs], kept, graph.outvars)


def _atom_key(a: Var | Literal) -> Any:
    if isinstance(a, Var):
        return ("var", a.id)
    # The type too: a weak literal 1 and a strong one give results of different types.
    return ("lit", aval_key(a.aval), array_key(a.value))


def cse(closed: ClosedGraph) -> ClosedGraph:
    """Reuse the result of an earlier identical equation.

    Identical means the same primitive on the same operands with params of equal
    :func:`~ember.ir.params.param_key`: two loops whose bodies were traced separately from the
    same code are one loop.
    """
    graph = closed.graph
    rename: dict[int, Var | Literal] = _equal_consts(closed)
    seen: dict[Any, list[Var]] = {}
    eqns: list[Eqn] = []

    def sub(a):
        return rename.get(a.id, a) if isinstance(a, Var) else a

    for eqn in graph.eqns:
        new_eqn = _with_bodies(eqn, cse, [sub(a) for a in eqn.inputs])
        try:
            key = (eqn.prim.name, tuple(_atom_key(a) for a in new_eqn.inputs),
                   param_key(new_eqn.params))
        except TypeError:  # a param with no canonical key: never merged
            key = None
        if key is not None and key in seen:
            for old, new in zip(eqn.outputs, seen[key]):
                rename[old.id] = new
            continue
        eqns.append(new_eqn)
        if key is not None:
            seen[key] = eqn.outputs
    outvars = [sub(a) for a in graph.outvars]
    return _rebuilt(closed, graph.constvars, closed.consts, eqns, outvars)


def _equal_consts(closed: ClosedGraph) -> dict[int, Var | Literal]:
    """Constants with the same type and bytes, renamed to the first of them.

    A NumPy array that two bodies close over is copied into each when they are traced, so
    without this the loops that use it could not be recognised as the same. Contents are
    compared only between constants whose type and sampled elements already agree.
    """
    rename: dict[int, Var | Literal] = {}
    groups: dict[Any, list[tuple[Var, np.ndarray]]] = {}
    for v, c in zip(closed.graph.constvars, closed.consts):
        host = _host_value(c)
        if host is None:
            continue
        flat = np.ascontiguousarray(host).reshape(-1)
        sample = flat[::max(1, flat.size // 16)]
        group = groups.setdefault((aval_key(v.aval), array_key(sample)), [])
        for first, other in group:
            if np.array_equal(other.view(np.uint8), flat.view(np.uint8)):
                rename[v.id] = first
                break
        else:
            group.append((v, flat))
    return rename


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
        # would only trade a cheap op for a large constant. Control flow is not run here (its
        # bodies are folded inside instead), nor a collective: its result depends on the values
        # other devices hold, not only on its operands.
        foldable = (impl is not None and vals and all(v is not None for v in vals)
                    and eqn.prim.kind != "collective" and next(bodies(eqn), None) is None
                    and out_size <= min(FOLD_LIMIT, max(in_size, 1)))
        if not foldable:
            eqns.append(_with_bodies(eqn, fold_constants, inputs))
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
    return dce(_rebuilt(closed, constvars, consts, eqns, outvars))


def _host_value(c: Any) -> np.ndarray | None:
    """The NumPy value of a constant, or None when it is not known now (a tracer)."""
    try:
        return np.asarray(c)
    except TracerError:
        return None


def optimize(closed: ClosedGraph) -> ClosedGraph:
    """The pass pipeline jit runs: fold constants, share common subexpressions, drop dead code,
    in the bodies of control flow too."""
    return dce(cse(fold_constants(closed)))
