"""``vmap``: vectorise a function over an axis of its inputs.

The batch trace carries, beside each value, which of its axes is the mapped one (or ``None`` for
a value that is the same for every element of the batch). Each primitive's ``batch`` rule turns
the batched operation into one unbatched operation on bigger arrays; primitives without a rule
fall back to a loop over the batch (correct, slower), so every primitive can be vmapped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ember.core.array import Tracer
from ember.core.primitive import Primitive
from ember.core.trace import Trace, aval_of, new_main, to_array
from ember.errors import EmberError, ShapeError, user_frame
from ember.ir.types import ArrayType
from ember.ops import structural as st
from ember.ops.batching import batch_by_loop
from ember.tree import tree_flatten, tree_unflatten

__all__ = ["vmap"]


class BatchTracer(Tracer):
    __slots__ = ("val", "bdim")

    def __init__(self, trace: BatchTrace, val: Any, bdim: int | None):
        self._trace = trace
        self.val = val
        self.bdim = bdim

    @property
    def aval(self) -> ArrayType:
        aval = aval_of(self.val)
        if self.bdim is None:
            return aval
        shape = list(aval.shape)
        del shape[self.bdim]
        return aval.update(shape=tuple(shape))

    def full_lower(self) -> Any:
        return self.val if self.bdim is None else self


class BatchTrace(Trace):
    def pure(self, value: Any) -> BatchTracer:
        return BatchTracer(self, value, None)

    def process_primitive(self, prim: Primitive, tracers: list[BatchTracer],
                          params: dict[str, Any]) -> Any:
        vals = [t.val for t in tracers]
        dims = [t.bdim for t in tracers]
        if all(d is None for d in dims):
            out = prim.bind(*vals, **params)
            if prim.multiple_results:
                return [BatchTracer(self, o, None) for o in out]
            return BatchTracer(self, out, None)
        rule = prim.batch or functools.partial(batch_by_loop, prim)
        out, out_dims = rule(vals, dims, **params)
        if prim.multiple_results:
            return [BatchTracer(self, o, d) for o, d in zip(out, out_dims)]
        return BatchTracer(self, out, out_dims)


def _broadcast_prefix(prefix: Any, tree: Any, what: str) -> list[Any]:
    """Expand an ``in_axes``/``out_axes`` prefix tree to one entry per leaf of ``tree``."""
    if prefix is None or isinstance(prefix, int):
        return [prefix] * len(tree_flatten(tree)[0])
    if isinstance(prefix, (list, tuple)) and isinstance(tree, (list, tuple)):
        if len(prefix) != len(tree):
            raise EmberError(f"vmap: {what} has {len(prefix)} entries for {len(tree)} values")
        out = []
        for p, t in zip(prefix, tree):
            out.extend(_broadcast_prefix(p, t, what))
        return out
    if isinstance(prefix, dict) and isinstance(tree, dict):
        out = []
        for k in sorted(tree, key=repr):
            out.extend(_broadcast_prefix(prefix.get(k), tree[k], what))
        return out
    raise EmberError(f"vmap: {what}={prefix!r} does not match the structure of the values")


def vmap(fun: Callable[..., Any], in_axes: Any = 0, out_axes: Any = 0,
         axis_size: int | None = None) -> Callable[..., Any]:
    """Vectorise ``fun`` over axis ``in_axes`` of its inputs (``None``: not mapped)."""

    @functools.wraps(fun)
    def batched(*args: Any) -> Any:
        axes = in_axes
        if isinstance(axes, list):
            axes = tuple(axes)
        if isinstance(axes, tuple) and len(axes) != len(args):
            raise EmberError(f"vmap: in_axes has {len(axes)} entries but the function got "
                             f"{len(args)} arguments\n  at {user_frame()}")
        leaves, in_tree = tree_flatten(args)
        leaf_axes = _broadcast_prefix(axes, args, "in_axes")
        leaves = [x if hasattr(x, "aval") else to_array(x) for x in leaves]
        sizes = set()
        for x, ax in zip(leaves, leaf_axes):
            if ax is not None:
                nd = aval_of(x).ndim
                if not -nd <= ax < nd:
                    raise ShapeError(f"vmap: in_axes {ax} out of range for an argument of shape "
                                     f"{aval_of(x).shape}\n  at {user_frame()}")
                sizes.add(aval_of(x).shape[ax])
        if len(sizes) > 1:
            detail = ", ".join(f"{aval_of(x).shape} axis {ax}"
                               for x, ax in zip(leaves, leaf_axes) if ax is not None)
            raise ShapeError(f"vmap: mapped axes have different sizes: {detail}\n"
                             f"  at {user_frame()}")
        size = sizes.pop() if sizes else axis_size
        if size is None:
            raise EmberError("vmap: no argument is mapped; pass axis_size")
        with new_main(BatchTrace, size) as main:
            trace = main.trace
            ins = [x if ax is None else BatchTracer(trace, x, ax % aval_of(x).ndim)
                   for x, ax in zip(leaves, leaf_axes)]
            out = fun(*tree_unflatten(in_tree, ins))
            out_leaves, out_tree = tree_flatten(out)
            out_ax = _broadcast_prefix(out_axes, out, "out_axes")
            results = []
            for o, ax in zip(out_leaves, out_ax):
                t = trace.full_raise(o if hasattr(o, "aval") else to_array(o))
                results.append(_move_out(t.val, t.bdim, ax, size))
        return tree_unflatten(out_tree, results)

    return batched


def _move_out(val: Any, bdim: int | None, out_axis: int | None, size: int) -> Any:
    if out_axis is None:
        if bdim is not None:
            raise EmberError("vmap: out_axes=None but the output depends on the mapped axis")
        return val
    if bdim is None:
        shape = aval_of(val).shape
        val = st.broadcast_in_dim(val, (size, *shape), tuple(range(1, len(shape) + 1)))
        bdim = 0
    return st.moveaxis(val, bdim, out_axis)
