"""The user-facing differentiation API: jvp, linearize, vjp, grad, value_and_grad,
stop_gradient. Functions take and return pytrees of arrays."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from ember import dtypes
from ember.core.trace import Zero, aval_of, eval_graph, full_lower, innermost_main, to_array
from ember.errors import DTypeError, EmberError, ShapeError, user_frame
from ember.ir.types import ArrayType
from ember.ops import elementwise as ew
from ember.ops.elementwise import full_like, zeros_like
from ember.transforms.jvp import JVPTracer, jvp_flat
from ember.transforms.linearize import linearize_flat
from ember.transforms.transpose import backward_pass
from ember.tree import TreeDef, tree_flatten, tree_map, tree_unflatten

__all__ = ["jvp", "linearize", "vjp", "grad", "value_and_grad", "stop_gradient"]


def _as_value(x: Any) -> Any:
    return x if hasattr(x, "aval") else to_array(x)


def flatten_fun(fun: Callable[..., Any], in_tree: TreeDef, out_store: list
                ) -> Callable[..., list[Any]]:
    """Wrap a pytree function as a function of flat leaves; records its output tree."""
    def flat(*leaves: Any) -> list[Any]:
        args, kwargs = tree_unflatten(in_tree, list(leaves))
        out = fun(*args, **kwargs)
        out_leaves, out_tree = tree_flatten(out)
        out_store.append(out_tree)
        return [_as_value(o) for o in out_leaves]
    return flat


def _materialize(ct: Any) -> Any:
    return zeros_like(ct) if isinstance(ct, Zero) else ct


def jvp(fun: Callable[..., Any], primals: Sequence[Any], tangents: Sequence[Any]
        ) -> tuple[Any, Any]:
    """Forward-mode derivative: ``(fun(*primals), d fun(primals) . tangents)``."""
    p_leaves, p_tree = tree_flatten((tuple(primals), {}))
    t_leaves, t_tree = tree_flatten((tuple(tangents), {}))
    if p_tree != t_tree:
        raise EmberError(f"jvp: primals and tangents must have the same structure, got "
                         f"{p_tree} and {t_tree}")
    for p, t in zip(p_leaves, t_leaves):
        pa, ta = aval_of(_as_value(p)), aval_of(_as_value(t))
        if pa.shape != ta.shape:
            raise ShapeError(f"jvp: tangent of shape {ta.shape} for a primal of shape "
                             f"{pa.shape}\n  at {user_frame()}")
    store: list = []
    outs, t_outs = jvp_flat(flatten_fun(fun, p_tree, store), [_as_value(p) for p in p_leaves],
                            [_as_value(t) for t in t_leaves])
    out_tree = store[-1]
    return (tree_unflatten(out_tree, outs),
            tree_unflatten(out_tree, [_materialize(t) for t in t_outs]))


def linearize(fun: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[..., Any]]:
    """``(fun(*primals), f_jvp)`` where ``f_jvp(*tangents)`` applies the linear map, staged."""
    leaves, in_tree = tree_flatten((primals, {}))
    store: list = []
    outs, lin = linearize_flat(flatten_fun(fun, in_tree, store), [_as_value(x) for x in leaves])
    out_tree = store[-1]

    def f_jvp(*tangents: Any) -> Any:
        t_leaves, t_tree = tree_flatten((tangents, {}))
        if t_tree != in_tree:
            raise EmberError(f"linearize: tangents have structure {t_tree}, expected {in_tree}")
        return tree_unflatten(out_tree, eval_graph(lin, *[_as_value(t) for t in t_leaves]))

    return tree_unflatten(out_tree, outs), f_jvp


def _vjp(fun: Callable[..., Any], primals: Sequence[Any], has_aux: bool
         ) -> tuple[Any, Callable[..., Any], Any]:
    leaves, in_tree = tree_flatten((tuple(primals), {}))
    leaves = [_as_value(x) for x in leaves]
    store: list = []
    aux_store: list = []

    def fun_main(*args: Any) -> Any:
        out = fun(*args)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise EmberError("has_aux=True needs the function to return (output, aux)")
            out, aux = out
            aux_store.append(tree_map(_strip_tangent, aux))
        return out

    outs, lin = linearize_flat(flatten_fun(fun_main, in_tree, store), leaves)
    out_tree = store[-1]
    in_avals = [aval_of(x) for x in leaves]

    def vjp_fn(cotangent: Any) -> tuple[Any, ...]:
        ct_leaves, ct_tree = tree_flatten(cotangent)
        if ct_tree != out_tree:
            raise EmberError(f"vjp: cotangent structure {ct_tree} does not match the "
                             f"output structure {out_tree}")
        cts = []
        for ct, o in zip(ct_leaves, outs):
            ct = _as_value(ct)
            if aval_of(ct).shape != aval_of(o).shape:
                raise ShapeError(f"vjp: cotangent of shape {aval_of(ct).shape} for an output "
                                 f"of shape {aval_of(o).shape}\n  at {user_frame()}")
            cts.append(ct)
        grads = backward_pass(lin, cts)
        grads = [_materialize(g) for g in grads]
        grads = [_cast_like(g, a) for g, a in zip(grads, in_avals)]
        args, _ = tree_unflatten(in_tree, grads)
        return args

    aux = aux_store[-1] if has_aux else None
    return tree_unflatten(out_tree, outs), vjp_fn, aux


def _strip_tangent(x: Any) -> Any:
    """An aux output is returned as a plain value: drop the tangent the innermost (this
    function's own) JVP trace attached to it."""
    if isinstance(x, JVPTracer) and x._trace.main is innermost_main():
        return full_lower(x.primal)
    return x


def _cast_like(g: Any, aval: ArrayType) -> Any:
    from ember.ops.elementwise import convert

    return convert(g, aval.dtype, aval.weak) if aval_of(g).dtype != aval.dtype else g


def vjp(fun: Callable[..., Any], *primals: Any, has_aux: bool = False) -> Any:
    """``(fun(*primals), vjp_fn)``; ``vjp_fn(ct)`` returns a tuple of input cotangents."""
    out, fn, aux = _vjp(fun, primals, has_aux)
    return (out, fn, aux) if has_aux else (out, fn)


def value_and_grad(fun: Callable[..., Any], argnums: int | Sequence[int] = 0,
                   has_aux: bool = False) -> Callable[..., Any]:
    """``f -> (value, gradient)`` of a scalar-valued function with respect to ``argnums``."""
    multiple = not isinstance(argnums, int)
    nums = tuple(argnums) if multiple else (argnums,)

    @functools.wraps(fun)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        for n in nums:
            if not -len(args) <= n < len(args):
                raise EmberError(f"grad: argnums={argnums} but the function got {len(args)} "
                                 f"positional arguments")
        nums_ = tuple(n % len(args) for n in nums)
        _check_differentiable(args, nums_)

        def partial(*diff_args: Any) -> Any:
            full = list(args)
            for n, a in zip(nums_, diff_args):
                full[n] = a
            return fun(*full, **kwargs)

        out, vjp_fn, aux = _vjp(partial, [args[n] for n in nums_], has_aux)
        out_leaves = tree_flatten(out)[0]
        if len(out_leaves) != 1 or aval_of(_as_value(out_leaves[0])).shape != ():
            shapes = [aval_of(_as_value(o)).shape for o in out_leaves]
            raise ShapeError(f"grad: the function must return a scalar, got shapes {shapes}\n"
                             f"  at {user_frame()}\nUse vjp or jacrev-style vmap for "
                             "non-scalar outputs.")
        if not dtypes.is_float(aval_of(_as_value(out_leaves[0])).dtype):
            raise DTypeError("grad: the function must return a real floating-point scalar, "
                             f"got {aval_of(_as_value(out_leaves[0])).dtype} (for a complex "
                             "result, differentiate its real part, imaginary part or abs)")
        grads = vjp_fn(tree_unflatten(tree_flatten(out)[1],
                                      [full_like(_as_value(out_leaves[0]), 1.0)]))
        grads = grads if multiple else grads[0]
        return ((out, aux), grads) if has_aux else (out, grads)

    return wrapped


def grad(fun: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
         ) -> Callable[..., Any]:
    """Gradient of a scalar-valued function with respect to argument(s) ``argnums``."""
    vg = value_and_grad(fun, argnums, has_aux)

    @functools.wraps(fun)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        (value, g) = vg(*args, **kwargs)
        return (g, value[1]) if has_aux else g

    return wrapped


def _check_differentiable(args: Sequence[Any], nums: Sequence[int]) -> None:
    for n in nums:
        for leaf in tree_flatten(args[n])[0]:
            dt = aval_of(_as_value(leaf)).dtype
            if not dtypes.is_inexact(dt):
                raise DTypeError(f"grad: argument {n} has dtype {dt}; gradients are only "
                                 f"defined for floating-point and complex inputs (cast it, or "
                                 f"leave it out of argnums)\n  at {user_frame()}")


# --- stop_gradient ---------------------------------------------------------------------------

def stop_gradient(x: Any) -> Any:
    """The identity, with a derivative of zero (applies to every leaf of a pytree)."""
    leaves, tree = tree_flatten(x)
    return tree_unflatten(tree, [ew.stop_gradient(_as_value(v)) for v in leaves])


