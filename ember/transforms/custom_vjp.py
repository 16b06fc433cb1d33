"""``custom_vjp``: give a function a hand-written reverse-mode derivative (as jax.custom_vjp).

For numerical stability (``log1p(exp(x))``), for speed (a fused backward kernel) or to change
what is differentiated (gradient clipping), a user supplies ``fwd(*args) -> (out, residuals)``
and ``bwd(residuals, cotangent) -> tuple of input cotangents``.

Two primitives carry it. ``custom_vjp_call`` holds the function and both rules, each traced into
a graph when the decorated function is called under a transformation (the argument types are
known then, so are the residuals' types, hence ``bwd``'s argument types). Graphs, not Python
functions, because an equation's params must hash canonically (the same code traced twice is the
same computation to CSE and to a compiler's cache) and because the backend that runs the program
compiles the bodies. Evaluated (eagerly, under ``jit`` or ``vmap``) the primitive runs the
function. Its jvp rule is where ``grad`` meets it: it runs ``fwd`` on the primal values and
returns, as the output tangent, a ``custom_vjp_bwd`` of the input tangents, a primitive linear
in them whose transpose runs the ``bwd`` graph. ``linearize`` stages that primitive and reverse
mode transposes it, so ``bwd`` runs in the backward pass; forward mode would have to evaluate
it, which a VJP cannot do, so it raises (as in JAX). Since ``bwd`` is traced, it must not branch
in Python on the values of its arguments (as under ``jit``). """

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from ember import dtypes
from ember.backends.base import ANY_BACKEND
from ember.core.array import Array
from ember.core.primitive import Primitive
from ember.core.trace import Zero, aval_of, eval_graph, make_graph, to_array, tracing_active
from ember.errors import EmberError, ShapeError, UnsupportedError, op_error
from ember.ir.graph import ClosedGraph
from ember.ir.types import ArrayType
from ember.ops.elementwise import instantiate
from ember.transforms.autodiff import flatten_fun
from ember.transforms.subgraphs import hoist_shared_consts, program
from ember.tree import TreeDef, tree_flatten, tree_unflatten

__all__ = ["custom_vjp", "custom_vjp_call_p", "custom_vjp_bwd_p"]

custom_vjp_call_p = Primitive("custom_vjp_call", kind="control", multiple_results=True)
custom_vjp_bwd_p = Primitive("custom_vjp_bwd", kind="control", multiple_results=True)

# custom_vjp_call(*consts, *args; fun, fwd, bwd, num_consts, nonzero_cts):
#   fun: (consts, args) -> outs;  fwd: (consts, args) -> (outs, residuals);
#   bwd: (consts, residuals, output cotangents) -> the cotangents bwd returns, one per argument
#   whose ``nonzero_cts`` flag is set (bwd returned None for the others).


@custom_vjp_call_p.def_abstract_eval
def _call_rule(*avals, fun: ClosedGraph, fwd: ClosedGraph, bwd: ClosedGraph, num_consts: int,
               nonzero_cts: tuple[bool, ...]):
    return fun.out_avals


def _call_impl(backend, *args, fun, fwd, bwd, num_consts, nonzero_cts):
    return program(fun, backend)(*args)


custom_vjp_call_p.def_impl(_call_impl, ANY_BACKEND)


@custom_vjp_call_p.def_jvp
def _call_jvp(primals, tangents, *, fun, fwd, bwd, num_consts, nonzero_cts):
    if any(not isinstance(t, Zero) for t in tangents[:num_consts]):
        raise op_error(UnsupportedError, "custom_vjp", "the function closes over a value that "
                       "is being differentiated; pass it as an argument instead, so that bwd "
                       "returns its cotangent")
    consts, args, arg_tangents = primals[:num_consts], primals[num_consts:], tangents[num_consts:]
    n_out = len(fun.out_avals)
    fwd_outs = eval_graph(fwd, *consts, *args)
    outs, residuals = fwd_outs[:n_out], fwd_outs[n_out:]
    diff = tuple(dtypes.is_inexact(aval_of(a).dtype) for a in args)
    t_outs = custom_vjp_bwd_p.bind(
        *consts, *residuals, *[instantiate(t) for t, d in zip(arg_tangents, diff) if d],
        bwd=bwd, num_res=num_consts + len(residuals), diff=diff, nonzero_cts=nonzero_cts,
        out_avals=tuple(a.strong() for a in fun.out_avals))
    t_it = iter(t_outs)
    return outs, [next(t_it) if dtypes.is_inexact(a.dtype) else Zero(a)
                  for a, _ in zip(fun.out_avals, outs)]


@custom_vjp_bwd_p.def_abstract_eval
def _bwd_rule(*avals, bwd, num_res, diff, nonzero_cts, out_avals):
    return [a for a in out_avals if dtypes.is_inexact(a.dtype)]


def _bwd_impl(backend, *args, bwd, num_res, diff, nonzero_cts, out_avals):
    raise op_error(UnsupportedError, "custom_vjp",
                   "forward-mode differentiation (jvp, or evaluating linearize's tangent map) "
                   "of a custom_vjp function is not supported: it only defines a reverse-mode "
                   "derivative. Use grad/vjp, or don't wrap the function in custom_vjp")


custom_vjp_bwd_p.def_impl(_bwd_impl, ANY_BACKEND)


@custom_vjp_bwd_p.def_transpose
def _bwd_transpose(cts, *args, bwd, num_res, diff, nonzero_cts, out_avals):
    float_outs = iter(cts)
    full_cts = [instantiate(next(float_outs)) if dtypes.is_inexact(a.dtype) else
                to_array(np.zeros(a.shape, a.dtype)) for a in out_avals]
    given = iter(eval_graph(bwd, *args[:num_res], *full_cts))
    grads = [next(given) if nz else None for nz in nonzero_cts]
    linear = iter(args[num_res:])
    return [None] * num_res + [Zero(next(linear).aval) if g is None else g
                               for g, d in zip(grads, diff) if d]


class custom_vjp:  # noqa: N801  (named like the JAX decorator it mirrors)
    """Decorate ``fun`` and call ``.defvjp(fwd, bwd)`` to give it a custom reverse derivative.

    ``fwd`` takes ``fun``'s arguments and returns ``(output, residuals)`` (any pytree);
    ``bwd(residuals, cotangent)`` returns a tuple with one cotangent per argument (``None``
    for zero). Under a transformation (``grad``, ``jit``...) all three are traced at each call;
    outside any, the decorated function simply runs ``fun``.
    """

    def __init__(self, fun: Callable[..., Any]):
        self.fun = fun
        self.fwd: Callable[..., Any] | None = None
        self.bwd: Callable[..., Any] | None = None
        functools.update_wrapper(self, fun)

    def defvjp(self, fwd: Callable[..., Any], bwd: Callable[..., Any]) -> None:
        self.fwd, self.bwd = fwd, bwd

    def __call__(self, *args: Any) -> Any:
        if self.fwd is None or self.bwd is None:
            raise op_error(EmberError, "custom_vjp", f"{self.__name__} has no derivative "
                           "rules yet; call .defvjp(fwd, bwd) first")
        if not tracing_active():
            # Plain eager values: no transformation can differentiate the result any more,
            # so the rules need not be traced.
            return self.fun(*args)
        leaves, in_tree = tree_flatten((args, {}))
        leaves = [x if isinstance(x, Array) else to_array(x) for x in leaves]
        avals = [aval_of(x) for x in leaves]
        store: list = []
        fun = make_graph(flatten_fun(self.fun, in_tree, store), avals)
        out_tree = store[-1]
        fwd, bwd, nonzero_cts = self._trace_rules(args, in_tree, out_tree, fun.out_avals, avals)
        (fun, fwd, bwd), consts = hoist_shared_consts([fun, fwd, bwd])
        outs = custom_vjp_call_p.bind(*consts, *leaves, fun=fun, fwd=fwd, bwd=bwd,
                                      num_consts=len(consts), nonzero_cts=nonzero_cts)
        return tree_unflatten(out_tree, outs)

    def _trace_rules(self, args: tuple, in_tree: TreeDef, out_tree: TreeDef,
                     out_avals: list[ArrayType], avals: list[ArrayType]
                     ) -> tuple[ClosedGraph, ClosedGraph, tuple[bool, ...]]:
        """``fwd`` and ``bwd`` traced as graphs of flat leaves, checking what they return, and
        which arguments ``bwd`` gives a cotangent for."""
        res_trees: list[TreeDef] = []
        nonzero: list[bool] = []
        arg_trees = [tree_flatten(a)[1] for a in args]
        name = self.__name__
        as_value = lambda x: x if isinstance(x, Array) else to_array(x)  # noqa: E731

        def fwd(*leaves: Any) -> list[Any]:
            user_args, _ = tree_unflatten(in_tree, list(leaves))
            result = self.fwd(*user_args)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise op_error(EmberError, "custom_vjp", f"fwd of {name} must return a pair "
                               "(output, residuals)")
            out_leaves, tree = tree_flatten(result[0])
            if tree != out_tree:
                raise op_error(EmberError, "custom_vjp", f"fwd of {name} returns an output of "
                               f"structure {tree}; the function returns {out_tree}")
            for o, a in zip(out_leaves, out_avals):
                if (aval_of(o).shape, aval_of(o).dtype) != (a.shape, a.dtype):
                    raise op_error(ShapeError, "custom_vjp", f"fwd of {name} returns an output "
                                   f"of type {aval_of(o)} where the function returns {a}")
            res_leaves, res_tree = tree_flatten(result[1])
            res_trees.append(res_tree)
            return [as_value(x) for x in [*out_leaves, *res_leaves]]

        def bwd(*leaves: Any) -> list[Any]:
            res_leaves, ct_leaves = leaves[:n_res], leaves[n_res:]
            grads = self.bwd(tree_unflatten(res_trees[-1], list(res_leaves)),
                             tree_unflatten(out_tree, list(ct_leaves)))
            if not (isinstance(grads, (tuple, list)) and len(grads) == len(args)):
                raise op_error(EmberError, "custom_vjp", f"bwd of {name} must return a tuple "
                               f"of {len(args)} cotangents (one per argument)")
            flat = []
            for i, (g, tree) in enumerate(zip(grads, arg_trees)):
                if g is None:
                    flat.extend([None] * tree.num_leaves)
                    continue
                g_leaves, g_tree = tree_flatten(g)
                if g_tree != tree:
                    raise op_error(EmberError, "custom_vjp", f"bwd of {name} returns a "
                                   f"cotangent of structure {g_tree} for argument {i} of "
                                   f"structure {tree}")
                flat.extend(g_leaves)
            out = []
            for g, a in zip(flat, avals):
                nonzero.append(g is not None)
                if g is None:
                    continue
                g = as_value(g)
                if aval_of(g).shape != a.shape:
                    raise op_error(ShapeError, "custom_vjp", f"bwd of {name} returns a "
                                   f"cotangent of shape {aval_of(g).shape} for an argument "
                                   f"of shape {a.shape}")
                out.append(g)
            return out

        fwd_graph = make_graph(fwd, avals)
        n_res = len(fwd_graph.out_avals) - len(out_avals)
        res_avals = fwd_graph.out_avals[len(out_avals):]
        bwd_graph = make_graph(bwd, [*res_avals, *[a.strong() for a in out_avals]])
        return fwd_graph, bwd_graph, tuple(nonzero)
