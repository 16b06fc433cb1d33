"""``checkpoint`` (``remat``): trade compute for memory in reverse-mode differentiation.

Without it, ``grad`` keeps every intermediate value the backward pass needs (the residuals)
from the forward pass until it is used. A checkpointed function keeps only its inputs: the
forward pass runs it normally, and the backward pass runs it again to rebuild the intermediates
just before they are needed.

The function is traced into a ``remat`` primitive holding its graph. Its ``partial_eval`` rule
(used by ``linearize``) runs the primal part now but stages the *whole* body, taking the known
inputs as its only residuals; its ``transpose`` rule splits that body again at that point,
recomputes the primal part and runs the linear part backwards. The recomputation is itself
wrapped in a ``remat`` equation so that common-subexpression elimination under ``jit`` cannot
merge it back into the forward pass.

A ``policy`` may let chosen intermediates be saved anyway (for instance matrix products, which
are expensive to recompute): a function ``policy(prim, *in_avals, **params) -> bool``, or one of
:data:`checkpoint_policies`. The ``remat`` equation holds it as a :class:`Policy`, a name that
hashes canonically (an equation's params must: CSE and compilers compare them), under which the
function is registered once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from ember.backends.base import ANY_BACKEND
from ember.core.array import Array
from ember.core.primitive import Primitive
from ember.core.trace import (
    GraphTrace,
    GraphTracer,
    UndefinedPrimal,
    Zero,
    aval_of,
    eval_graph,
    make_graph,
    to_array,
)
from ember.errors import EmberError, op_error
from ember.ir.graph import ClosedGraph, Eqn, Graph, Var
from ember.ir.passes import dce
from ember.ir.types import ArrayType
from ember.ops.elementwise import instantiate
from ember.transforms.autodiff import flatten_fun
from ember.transforms.partial_eval import partial_eval_graph
from ember.transforms.subgraphs import (
    batch_graph,
    hoist_consts,
    jvp_graph,
    move_batch_axis,
    program,
    transpose_apply,
)
from ember.tree import tree_flatten, tree_unflatten

__all__ = ["checkpoint", "remat", "checkpoint_policies", "remat_p", "Policy"]

SaveRule = Callable[..., bool]  # rule(prim, *in_avals, **params) -> may its results be saved?

# Every policy's rule, by the policy's name.
_RULES: dict[str, SaveRule] = {}


@dataclass(frozen=True)
class Policy:
    """A checkpoint policy as equation params hold it: the name of a registered rule.

    Two ``remat`` equations with the same body and policy name are the same computation, in
    this process and in the next, which a function object (compared by identity) cannot say.
    """

    name: str

    def saves(self, prim: Primitive, avals: list[ArrayType], params: dict[str, Any]) -> bool:
        """Whether the results of ``prim`` applied to ``avals`` may be kept for the backward
        pass instead of recomputed."""
        return bool(_RULES[self.name](prim, *avals, **params))

    def __repr__(self) -> str:
        return self.name


def as_policy(policy: Policy | SaveRule | None) -> Policy | None:
    """The :class:`Policy` for a ``checkpoint(policy=...)`` argument.

    A function is registered the first time it is seen, under its qualified name (with ``#2``,
    ``#3``... when another function has that name), and keeps that name for the whole process:
    define a policy function once, not anew at each call.
    """
    if policy is None:
        return None
    if isinstance(policy, Policy):
        if policy.name not in _RULES:
            raise op_error(EmberError, "checkpoint", f"no policy is registered as "
                           f"{policy.name!r}; pass the policy function itself")
        return policy
    if not callable(policy):
        raise op_error(EmberError, "checkpoint", f"policy must be a function or one of "
                       f"checkpoint_policies, got {type(policy).__name__}")
    for name, rule in _RULES.items():
        if rule is policy:
            return Policy(name)
    base = f"{getattr(policy, '__module__', None) or '?'}." \
           f"{getattr(policy, '__qualname__', type(policy).__qualname__)}"
    name, n = base, 1
    while name in _RULES:
        n += 1
        name = f"{base}#{n}"
    _RULES[name] = policy
    return Policy(name)


remat_p = Primitive("remat", kind="control", multiple_results=True)


@remat_p.def_abstract_eval
def _remat_rule(*avals, body: ClosedGraph, policy: Policy | None):
    return body.out_avals


def _remat_impl(backend, *args, body, policy):
    return program(body, backend)(*args)


remat_p.def_impl(_remat_impl, ANY_BACKEND)


@remat_p.def_jvp
def _remat_jvp(primals, tangents, *, body, policy):
    from ember import dtypes

    nz = [not isinstance(t, Zero) and dtypes.is_inexact(aval_of(p).dtype)
          for p, t in zip(primals, tangents)]
    jbody, out_nz = jvp_graph(body, nz)
    outs = remat_p.bind(*primals, *[t for t, z in zip(tangents, nz) if z], body=jbody,
                        policy=policy)
    n = len(out_nz)
    rest = iter(outs[n:])
    return outs[:n], [next(rest) if z else Zero(aval_of(o)) for o, z in zip(outs[:n], out_nz)]


@remat_p.def_batch
def _remat_batch(args, dims, *, body, policy):
    size = next(aval_of(a).shape[d] for a, d in zip(args, dims) if d is not None)
    bbody, out_b = batch_graph(body, [d is not None for d in dims], size)
    args = [x if d is None else move_batch_axis(x, d, size) for x, d in zip(args, dims)]
    return remat_p.bind(*args, body=bbody, policy=policy), [0 if b else None for b in out_b]


def _remat_partial_eval(trace: GraphTrace, tracers: list[GraphTracer], params: dict[str, Any]
                        ) -> list[Any]:
    """Known outputs are computed now; the unknown ones are staged as the whole body, whose
    residuals are the known inputs (plus whatever the policy allows to be saved)."""
    body, policy = params["body"], params["policy"]
    if all(t.is_known for t in tracers):
        return trace.stage(remat_p, tracers, params)
    unknowns = [not t.is_known for t in tracers]
    known, unknown, out_uk, n_res = partial_eval_graph(body, unknowns)
    n_kout = len(known.out_avals) - n_res
    saved = _saveable(known, n_kout, policy)
    g = known.graph
    forward = dce(ClosedGraph(Graph(g.constvars, g.invars, g.eqns, [*g.outvars[:n_kout], *saved]),
                              known.consts))
    outs = remat_p.bind(*[t.const for t in tracers if t.is_known], body=forward, policy=policy)
    known_outs, saved_vals = outs[:n_kout], outs[n_kout:]
    recompute = _recompute_body(body.in_avals, known, unknown, unknowns, saved)
    staged = trace.stage(remat_p, [*[t for t in tracers if t.is_known],
                                   *[trace.full_raise(v) for v in saved_vals],
                                   *[t for t in tracers if not t.is_known]],
                         {"body": recompute, "policy": policy})
    known_it, staged_it = iter(known_outs), iter(staged)
    return [next(staged_it) if u else next(known_it) for u in out_uk]


remat_p.partial_eval = _remat_partial_eval


def _saveable(known: ClosedGraph, n_kout: int, policy: Policy | None) -> list[Var]:
    """The intermediates of the known part that the policy lets the forward pass keep: results
    of approved equations that the residuals are computed from."""
    if policy is None:
        return []
    g = known.graph
    live = dce(ClosedGraph(Graph(g.constvars, g.invars, g.eqns, g.outvars[n_kout:]),
                           known.consts)).graph.eqns
    return [v for eqn in live
            if policy.saves(eqn.prim, [a.aval for a in eqn.inputs], eqn.params)
            for v in eqn.outputs]


def _recompute_body(in_avals: list[ArrayType], known: ClosedGraph, unknown: ClosedGraph,
                    unknowns: list[bool], saved_vars: list[Var]) -> ClosedGraph:
    """``(known inputs, saved values, unknown inputs) -> unknown outputs``: the body again
    (its known part, then its unknown part), with the saved values read, not recomputed."""
    g = known.graph
    n_res = len(unknown.in_avals) - unknowns.count(True)
    saved_ids = {v.id for v in saved_vars}
    new_inputs = [Var(v.aval) for v in saved_vars]
    # The known part with the saved values as inputs: their producers drop out (DCE).
    redo = dce(ClosedGraph(Graph(g.constvars, [*g.invars, *new_inputs],
                                 [e for e in g.eqns
                                  if not all(o.id in saved_ids for o in e.outputs)],
                                 g.outvars[len(g.outvars) - n_res:]), known.consts))
    redo = _rename_uses(redo, dict(zip((v.id for v in saved_vars), new_inputs)))
    n_known, n_saved = unknowns.count(False), len(saved_vars)

    def fn(*args: Any) -> list[Any]:
        residuals = eval_graph(redo, *args[:n_known + n_saved])
        return eval_graph(unknown, *residuals, *args[n_known + n_saved:])

    avals = [*[a for a, u in zip(in_avals, unknowns) if not u], *[v.aval for v in saved_vars],
             *[a for a, u in zip(in_avals, unknowns) if u]]
    return make_graph(fn, avals)


def _rename_uses(closed: ClosedGraph, rename: dict[int, Var]) -> ClosedGraph:
    sub = lambda a: rename.get(a.id, a) if isinstance(a, Var) else a
    g = closed.graph
    eqns = [Eqn(e.prim, [sub(a) for a in e.inputs], e.outputs, e.params, e.source) for e in g.eqns]
    return ClosedGraph(Graph(g.constvars, g.invars, eqns, [sub(a) for a in g.outvars]),
                       closed.consts)


@remat_p.def_transpose
def _remat_transpose(cts, *args, body, policy):
    """Recompute the primal part from the residual inputs, then run the linear part back."""
    linear = [isinstance(a, UndefinedPrimal) for a in args]
    residuals = [a for a in args if not isinstance(a, UndefinedPrimal)]
    known, unknown, out_uk, n_res = partial_eval_graph(body, linear)
    n_kout = len(known.out_avals) - n_res
    uk_cts = [c for c, u in zip(cts, out_uk) if u]

    def fn(*a: Any) -> list[Any]:
        res = eval_graph(known, *a[:len(residuals)])[n_kout:]
        return transpose_apply(unknown, [False] * n_res + [True] * linear.count(True), res,
                               a[len(residuals):])

    ct_avals = [aval_of(c).strong() for c in uk_cts]
    backward = make_graph(fn, [*[aval_of(r) for r in residuals], *ct_avals])
    outs = iter(remat_p.bind(*residuals, *[instantiate(c) for c in uk_cts], body=backward,
                             policy=None))
    return [next(outs) if lin else None for lin in linear]


def checkpoint(fun: Callable[..., Any] | None = None, *,
               policy: Policy | SaveRule | None = None, prevent_cse: bool = True) -> Any:
    """Make ``grad`` recompute ``fun``'s intermediates instead of storing them.

    Usable as ``checkpoint(f)``, ``@checkpoint`` or ``@checkpoint(policy=...)``. Results are
    identical to ``fun``'s; only what reverse mode keeps in memory changes. ``prevent_cse`` is
    accepted for JAX compatibility: the recomputation is always kept apart from the forward pass.
    """
    del prevent_cse
    policy = as_policy(policy)
    if fun is None:
        return functools.partial(checkpoint, policy=policy)

    @functools.wraps(fun)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        leaves, in_tree = tree_flatten((args, kwargs))
        leaves = [x if isinstance(x, Array) else to_array(x) for x in leaves]
        store: list = []
        closed = make_graph(flatten_fun(fun, in_tree, store), [aval_of(x) for x in leaves])
        body, consts = hoist_consts(closed)
        outs = remat_p.bind(*consts, *leaves, body=body, policy=policy)
        return tree_unflatten(store[-1], outs)

    return wrapped


remat = checkpoint


def _builtin(name: str, rule: SaveRule) -> Policy:
    _RULES[name] = rule
    return Policy(name)


checkpoint_policies = SimpleNamespace(
    nothing_saveable=_builtin("nothing_saveable", lambda prim, *avals, **params: False),
    everything_saveable=_builtin("everything_saveable", lambda prim, *avals, **params: True),
    dots_saveable=_builtin("dots_saveable",
                           lambda prim, *avals, **params: prim.kind == "contraction"),
)
checkpoint_policies.__doc__ = "Ready-made policies for :func:`checkpoint`."
