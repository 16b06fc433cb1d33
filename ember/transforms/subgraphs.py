"""Whole-graph versions of the transformations, for primitives that hold subgraphs.

A control-flow primitive (``cond``, ``scan``, ``while``, ``remat``) carries its body as a graph,
so each of its rules has to produce a transformed *graph*: the body differentiated, batched or
transposed. Every function here does it by tracing: :func:`eval_graph` re-binds the body's
primitives under the transformation inside :func:`make_graph`, so the new graph is built by the
same rules as any other code, and control flow nested in the body recurses through its own rules.

The small helpers at the end edit graphs structurally (reorder inputs, hoist constants): that
costs nothing and keeps the rules free of re-tracing where only the layout changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ember import dtypes
from ember.backends import Backend
from ember.core.trace import Zero, aval_of, eval_graph, make_graph, new_main
from ember.ir.graph import ClosedGraph, Graph, Var
from ember.ir.types import ArrayType
from ember.ops import structural as st
from ember.ops.elementwise import instantiate as materialize
from ember.transforms.jvp import jvp_flat
from ember.transforms.transpose import backward_pass
from ember.transforms.vmap import BatchTrace, BatchTracer

__all__ = ["jvp_graph", "batch_graph", "transpose_apply", "transpose_graph", "permute",
           "hoist_consts", "hoist_shared_consts", "add_unused_inputs", "select_outputs", "mask",
           "program", "move_batch_axis"]


def mask(flags: bool | Sequence[bool], n: int) -> list[bool]:
    """Broadcast a single flag to ``n`` entries (``instantiate=True`` style arguments)."""
    return [bool(flags)] * n if isinstance(flags, bool) else [bool(f) for f in flags]


def jvp_graph(closed: ClosedGraph, nonzeros: Sequence[bool],
              instantiate: bool | Sequence[bool] = False) -> tuple[ClosedGraph, list[bool]]:
    """Forward-mode derivative of a graph.

    The result takes ``(primals..., tangents of the nonzero inputs...)`` and returns
    ``(primal outputs..., tangents of the nonzero outputs...)``; the second value says which
    outputs have a tangent. ``instantiate`` forces a (zero) tangent for chosen float outputs,
    which loops need so that a carry's tangent has the same layout on every iteration.
    """
    in_avals = closed.in_avals
    nonzeros = [nz and dtypes.is_inexact(a.dtype) for nz, a in zip(nonzeros, in_avals)]
    inst = mask(instantiate, len(closed.out_avals))
    out_nz: list[bool] = []

    def fn(*args: Any) -> list[Any]:
        primals, rest = args[:len(in_avals)], iter(args[len(in_avals):])
        tangents = [next(rest) if nz else Zero(a) for nz, a in zip(nonzeros, in_avals)]
        outs, t_outs = jvp_flat(lambda *xs: eval_graph(closed, *xs), primals, tangents)
        kept = []
        for o, t, force in zip(outs, t_outs, inst):
            if isinstance(t, Zero) and force and dtypes.is_inexact(aval_of(o).dtype):
                t = materialize(t)
            out_nz.append(not isinstance(t, Zero))
            if out_nz[-1]:
                kept.append(t)
        return [*outs, *kept]

    t_avals = [a.strong() for nz, a in zip(nonzeros, in_avals) if nz]
    return make_graph(fn, [*in_avals, *t_avals]), out_nz


def batch_graph(closed: ClosedGraph, batched: Sequence[bool], size: int,
                instantiate: bool | Sequence[bool] = False) -> tuple[ClosedGraph, list[bool]]:
    """The graph vectorised over a leading axis of size ``size`` on the ``batched`` inputs.

    Batched outputs come out with the batch axis first; ``instantiate`` forces chosen outputs to
    be batched (broadcast) even when they do not depend on a batched input.
    """
    inst = mask(instantiate, len(closed.out_avals))
    out_batched: list[bool] = []

    def fn(*args: Any) -> list[Any]:
        with new_main(BatchTrace, size) as main:
            trace = main.trace
            ins = [BatchTracer(trace, x, 0) if b else x for x, b in zip(args, batched)]
            outs = [trace.full_raise(o) for o in eval_graph(closed, *ins)]
        results = []
        for o, force in zip(outs, inst):
            out_batched.append(o.bdim is not None or force)
            results.append(move_batch_axis(o.val, o.bdim, size) if out_batched[-1] else o.val)
        return results

    in_avals = [a.update(shape=(size, *a.shape)) if b else a
                for a, b in zip(closed.in_avals, batched)]
    return make_graph(fn, in_avals), out_batched


def move_batch_axis(x: Any, bdim: int | None, size: int) -> Any:
    """``x`` with its batch axis first, broadcasting an unbatched value."""
    if bdim is None:
        shape = aval_of(x).shape
        return st.broadcast_in_dim(x, (size, *shape), tuple(range(1, len(shape) + 1)))
    return st.moveaxis(x, bdim, 0)


def transpose_apply(closed: ClosedGraph, linear: Sequence[bool], residuals: Sequence[Any],
                    cts: Sequence[Any]) -> list[Any]:
    """Cotangents of a graph's ``linear`` inputs; the other inputs take ``residuals``.

    Results are materialised (no symbolic zeros), so they can be returned from a traced body.
    """
    graph = closed.graph
    res_vars = [v for v, lin in zip(graph.invars, linear) if not lin]
    lin_vars = [v for v, lin in zip(graph.invars, linear) if lin]
    split = ClosedGraph(Graph([*graph.constvars, *res_vars], lin_vars, graph.eqns,
                              graph.outvars), [*closed.consts, *residuals])
    return [materialize(c) for c in backward_pass(split, cts)]


def transpose_graph(closed: ClosedGraph, linear: Sequence[bool]) -> ClosedGraph:
    """Graph ``(non-linear inputs..., output cotangents...) -> linear inputs' cotangents``."""
    res_avals = [a for a, lin in zip(closed.in_avals, linear) if not lin]
    ct_avals = [a.strong() for a in closed.out_avals]

    def fn(*args: Any) -> list[Any]:
        n = len(res_avals)
        return transpose_apply(closed, linear, args[:n], args[n:])

    return make_graph(fn, [*res_avals, *ct_avals])


def program(closed: ClosedGraph, backend: Backend) -> Callable[..., list[Any]]:
    """``backend``'s compiled form of a body, memoised on the graph per backend.

    The generic implementations of control flow (registered for ``ANY_BACKEND``) run their
    bodies through it, with the backend that runs the program around them.
    """
    prog = closed.cache.get(backend.name)
    if prog is None:
        prog = closed.cache[backend.name] = backend.compile(closed)
    return prog


# --- structural edits ------------------------------------------------------------------------

def permute(closed: ClosedGraph, in_order: Sequence[int] | None = None,
            out_order: Sequence[int] | None = None) -> ClosedGraph:
    """The same graph with inputs/outputs reordered: new input ``i`` is old ``in_order[i]``."""
    g = closed.graph
    invars = g.invars if in_order is None else [g.invars[i] for i in in_order]
    outvars = g.outvars if out_order is None else [g.outvars[i] for i in out_order]
    return ClosedGraph(Graph(g.constvars, invars, g.eqns, outvars), closed.consts)


def add_unused_inputs(closed: ClosedGraph, avals: Sequence[ArrayType], at: int
                      ) -> ClosedGraph:
    """Insert inputs the graph ignores at position ``at`` (to match a wider operand layout)."""
    g = closed.graph
    invars = [*g.invars[:at], *[Var(a) for a in avals], *g.invars[at:]]
    return ClosedGraph(Graph(g.constvars, invars, g.eqns, g.outvars), closed.consts)


def select_outputs(closed: ClosedGraph, keep: Sequence[bool]) -> ClosedGraph:
    """The graph restricted to the ``keep`` outputs, with dead equations dropped."""
    from ember.ir.passes import dce

    g = closed.graph
    outvars = [v for v, k in zip(g.outvars, keep) if k]
    return dce(ClosedGraph(Graph(g.constvars, g.invars, g.eqns, outvars), closed.consts))


def hoist_shared_consts(graphs: Sequence[ClosedGraph]) -> tuple[list[ClosedGraph], list[Any]]:
    """Hoist the constants of several graphs held by one equation (``cond``'s branches,
    ``custom_vjp``'s function and rules) into leading inputs that all of them take, each graph
    ignoring the others' constants."""
    hoisted = [hoist_consts(c) for c in graphs]
    const_avals = [[v.aval for v in c.graph.constvars] for c in graphs]
    out, consts = [], []
    for i, (graph, cs) in enumerate(hoisted):
        before = [a for avals in const_avals[:i] for a in avals]
        after = [a for avals in const_avals[i + 1:] for a in avals]
        graph = add_unused_inputs(graph, before, 0)
        out.append(add_unused_inputs(graph, after, len(before) + len(cs)))
        consts.extend(cs)
    return out, consts


def hoist_consts(closed: ClosedGraph) -> tuple[ClosedGraph, list[Any]]:
    """Turn a traced body's captured constants into leading inputs.

    Captured values may be tracers of enclosing transformations; as explicit operands of the
    control-flow primitive every trace sees them, and the graph stored in the primitive's
    params closes over nothing.
    """
    g = closed.graph
    graph = Graph([], [*g.constvars, *g.invars], g.eqns, g.outvars)
    return ClosedGraph(graph, []), list(closed.consts)
