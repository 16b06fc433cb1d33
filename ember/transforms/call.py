"""``call``: a jitted function used inside another transformation, kept whole as one equation.

``jit(f)`` called under ``grad``, ``vmap``, ``linearize``, another ``jit`` or in a ``scan``
body binds ``call`` on the arguments with ``f``'s traced graph as its ``body``. Each rule below
turns the call into a *transformed call* (as JAX's ``pjit`` does), so the function stays a
compile boundary whatever is applied to it:

- ``jvp``: a call of the body's forward-mode graph (``name=jvp(f)``);
- ``partial_eval`` (``linearize``, hence ``grad``): the known part of the body runs now as one
  call and outputs the residuals; the unknown part is staged as a call taking them;
- ``transpose``: a call of the body's transposed graph (``name=transpose(...)``);
- ``batch``: a call of the body's vectorised graph (``name=vmap(f)``).

So an eager ``grad(jit(f))`` runs the forward pass as one compiled program and the backward pass
as another, instead of one primitive at a time. Derived graphs are memoised on the body (its
``cache``), and ``jit`` keeps one body per signature, so a function differentiated at every
training step, or a layer called 30 times, is traced, transformed and compiled once.

The body closes over nothing: constants, and values of enclosing transformations that the
function captured, are its leading operands, so every trace sees them.

:func:`inline_calls` undoes the boundary for compilers that want to fuse across it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ember import dtypes
from ember.backends.base import ANY_BACKEND, Backend
from ember.core.primitive import Primitive
from ember.core.trace import GraphTrace, GraphTracer, UndefinedPrimal, Zero, aval_of
from ember.errors import DTypeError, ShapeError, op_error
from ember.ir.graph import Atom, ClosedGraph, Eqn, Graph, Var
from ember.ir.passes import optimize
from ember.ir.types import ArrayType
from ember.ops.elementwise import instantiate
from ember.transforms.partial_eval import partial_eval_graph
from ember.transforms.subgraphs import (
    batch_graph,
    jvp_graph,
    move_batch_axis,
    program,
    transpose_graph,
)

__all__ = ["call_p", "inline_calls"]

call_p = Primitive("call", kind="control", multiple_results=True)


@call_p.def_abstract_eval
def _call_rule(*avals: ArrayType, body: ClosedGraph, name: str) -> list[ArrayType]:
    expected = body.in_avals
    if len(avals) != len(expected):
        raise op_error(ShapeError, f"call[name={name}]", f"got {len(avals)} operands, the "
                       f"traced function takes {len(expected)}")
    for i, (got, want) in enumerate(zip(avals, expected)):
        if got.shape != want.shape:
            raise op_error(ShapeError, f"call[name={name}]", f"operand {i} has shape "
                           f"{got.shape}, the traced function takes {want}")
        if got.dtype != want.dtype:
            raise op_error(DTypeError, f"call[name={name}]", f"operand {i} has dtype "
                           f"{got.dtype}, the traced function takes {want}")
    return body.out_avals


def _call_impl(backend: Backend, *args: Any, body: ClosedGraph, name: str) -> list[Any]:
    return program(body, backend)(*args)


call_p.def_impl(_call_impl, ANY_BACKEND)  # the body runs where the program around it runs


def derived(body: ClosedGraph, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, memoised on ``body`` under ``key``: a graph derived from a body (its jvp, its
    transpose...) is the same object every time, so whatever is compiled from it is reused too.
    Every primitive that holds a body keys its own derivations (``("jvp", ...)`` here)."""
    found = body.cache.get(key)
    if found is None:
        found = body.cache[key] = make()
    return found


@call_p.def_jvp
def _call_jvp(primals: Sequence[Any], tangents: Sequence[Any], *, body: ClosedGraph,
              name: str) -> tuple[list[Any], list[Any]]:
    nz = tuple(not isinstance(t, Zero) and dtypes.is_inexact(aval_of(p).dtype)
               for p, t in zip(primals, tangents))

    def make() -> tuple[ClosedGraph, list[bool]]:
        graph, out_nz = jvp_graph(body, nz)
        return optimize(graph), out_nz

    jbody, out_nz = derived(body, ("jvp", nz), make)
    outs = call_p.bind(*primals, *[t for t, z in zip(tangents, nz) if z], body=jbody,
                       name=f"jvp({name})")
    n = len(out_nz)
    rest = iter(outs[n:])
    return outs[:n], [next(rest) if z else Zero(aval_of(o)) for o, z in zip(outs[:n], out_nz)]


def _call_partial_eval(trace: GraphTrace, tracers: list[GraphTracer], params: dict[str, Any]
                       ) -> list[Any]:
    """The known part runs now as one call that also outputs the residuals; the unknown part
    is staged as one call of ``(residuals, unknown operands)``."""
    body, name = params["body"], params["name"]
    if all(t.is_known for t in tracers):
        return call_p.bind(*[t.const for t in tracers], **params)
    unknowns = tuple(not t.is_known for t in tracers)

    def make() -> tuple[ClosedGraph, ClosedGraph, list[bool], int]:
        known, unknown, out_uk, n_res = partial_eval_graph(body, unknowns)
        return optimize(known), optimize(unknown), out_uk, n_res

    known, unknown, out_uk, n_res = derived(body, ("partial_eval", unknowns), make)
    known_outs = call_p.bind(*[t.const for t in tracers if t.is_known], body=known, name=name)
    n_kout = len(known_outs) - n_res
    staged = []
    if any(out_uk):
        residuals = [trace.full_raise(r) for r in known_outs[n_kout:]]
        staged = trace.stage(call_p, [*residuals, *[t for t in tracers if not t.is_known]],
                             {"body": unknown, "name": name})
    known_it, staged_it = iter(known_outs[:n_kout]), iter(staged)
    return [next(staged_it) if u else next(known_it) for u in out_uk]


call_p.partial_eval = _call_partial_eval


@call_p.def_transpose
def _call_transpose(cts: Sequence[Any], *args: Any, body: ClosedGraph, name: str
                    ) -> list[Any]:
    """Cotangents of the linear operands, from one call of the transposed body; the other
    operands are the residuals it reads."""
    linear = tuple(isinstance(a, UndefinedPrimal) for a in args)
    tbody = derived(body, ("transpose", linear),
                     lambda: optimize(transpose_graph(body, linear)))
    residuals = [a for a in args if not isinstance(a, UndefinedPrimal)]
    outs = iter(call_p.bind(*residuals, *[instantiate(c) for c in cts], body=tbody,
                            name=f"transpose({name})"))
    return [next(outs) if lin else None for lin in linear]


def batched_body(body: ClosedGraph, args: Sequence[Any], dims: Sequence[int | None],
                 derive: Callable[[ClosedGraph, tuple, Callable[[], Any]], Any] = derived
                 ) -> tuple[ClosedGraph, list[bool], list[Any], tuple[bool, ...]]:
    """What the batching rule of a primitive holding ``body`` binds: the body batched at axis
    0 of the batched operands (memoised by ``derive``), which results come out batched, the
    operands with their batch axis moved first, and which operands are batched."""
    size = next(aval_of(a).shape[d] for a, d in zip(args, dims) if d is not None)
    batched = tuple(d is not None for d in dims)

    def make() -> tuple[ClosedGraph, list[bool]]:
        graph, out_b = batch_graph(body, batched, size)
        return optimize(graph), out_b

    bbody, out_b = derive(body, ("batch", batched, size), make)
    args = [x if d is None else move_batch_axis(x, d, size) for x, d in zip(args, dims)]
    return bbody, out_b, args, batched


@call_p.def_batch
def _call_batch(args: Sequence[Any], dims: Sequence[int | None], *, body: ClosedGraph,
                name: str) -> tuple[list[Any], list[int | None]]:
    bbody, out_b, args, _ = batched_body(body, args, dims)
    outs = call_p.bind(*args, body=bbody, name=f"vmap({name})")
    return outs, [0 if b else None for b in out_b]


# --- inlining --------------------------------------------------------------------------------

def inline_calls(closed: ClosedGraph) -> ClosedGraph:
    """The same computation with every ``call`` equation replaced by its body's equations.

    Recursive: calls inside call bodies and inside other primitives' bodies (``scan``, ``cond``,
    ``remat``...) are inlined too, so a compiler that fuses across function boundaries sees one
    flat program. Each inlined copy gets fresh variables, so a body called twice stays in
    single-assignment form; bodies without calls are kept as they are (with their caches).
    """
    if not _contains_call(closed):
        return closed
    g = closed.graph
    constvars, consts = list(g.constvars), list(closed.consts)
    rename: dict[int, Atom] = {}
    eqns: list[Eqn] = []
    sub = lambda a: rename.get(a.id, a) if isinstance(a, Var) else a  # noqa: E731
    for eqn in g.eqns:
        inputs = [sub(a) for a in eqn.inputs]
        if eqn.prim is call_p:
            outs = _splice(inline_calls(eqn.params["body"]), inputs, eqns, constvars, consts)
            rename.update((v.id, o) for v, o in zip(eqn.outputs, outs))
        else:
            params = {k: _inline_param(v) for k, v in eqn.params.items()}
            eqns.append(Eqn(eqn.prim, inputs, eqn.outputs, params, eqn.source))
    graph = Graph(constvars, g.invars, eqns, [sub(a) for a in g.outvars])
    return ClosedGraph(graph, consts)


def _inline_param(value: Any) -> Any:
    if isinstance(value, ClosedGraph):
        return inline_calls(value)
    if isinstance(value, tuple) and value and all(isinstance(v, ClosedGraph) for v in value):
        return tuple(inline_calls(v) for v in value)
    return value


def _contains_call(closed: ClosedGraph) -> bool:
    for eqn in closed.graph.eqns:
        if eqn.prim is call_p:
            return True
        for value in eqn.params.values():
            graphs = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, ClosedGraph) and _contains_call(v) for v in graphs):
                return True
    return False


def _splice(body: ClosedGraph, args: list[Atom], eqns: list[Eqn], constvars: list[Var],
            consts: list[Any]) -> list[Atom]:
    """Append a copy of ``body``'s equations, with fresh variables, applied to ``args``; its
    constants join the enclosing graph's. Returns what stands for the body's outputs."""
    g = body.graph
    env: dict[int, Atom] = {v.id: a for v, a in zip(g.invars, args)}
    for v, c in zip(g.constvars, body.consts):
        env[v.id] = fresh = Var(v.aval)
        constvars.append(fresh)
        consts.append(c)
    sub = lambda a: env[a.id] if isinstance(a, Var) else a  # noqa: E731
    for eqn in g.eqns:
        outs = [Var(v.aval) for v in eqn.outputs]
        eqns.append(Eqn(eqn.prim, [sub(a) for a in eqn.inputs], outs, eqn.params, eqn.source))
        env.update((v.id, o) for v, o in zip(eqn.outputs, outs))
    return [sub(a) for a in g.outvars]
