"""The optimizer interface every ember optimizer shares: ``init``, a pure ``update``, ``lr_at``.

An optimizer is configuration only; everything that changes from step to step lives in its
state, a pytree. ``update`` takes the parameters, the gradients and the state and returns the
new parameters and the new state without mutating anything, so a whole training step (loss,
grad, clipping, update) can be wrapped in one ``ember.jit`` and traced once.

Subclasses say which per-parameter buffers they keep (``slot_names``), which step-dependent
scalars they need (``scalars``, computed once per update, not once per parameter) and how one
parameter leaf is updated (``update_leaf``). This base does the rest: the learning-rate
schedule, the step counter, walking the trees and the dtype discipline of ``_precision``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import ember.numpy as enp
from ember import dtypes
from ember.core.array import Array, Tracer
from ember.errors import EmberError, EmberValueError
from ember.optim._precision import cast, compute_dtype
from ember.optim.serialization import named_leaves
from ember.tree import tree_flatten, tree_leaves, tree_map, tree_structure, tree_unflatten

__all__ = ["Optimizer", "PyTree", "Schedule"]

PyTree = Any
Schedule = Callable[[Any], Any]


class Optimizer:
    """Base of the PyTorch-named optimizers (``SGD``, ``Adam``, ``AdamW``).

    ``lr`` is a number or a schedule, a callable ``step -> lr`` (see ``ember.optim.schedules``).
    The update that takes the state from step ``t`` to ``t + 1`` uses ``lr(t)``, so the first
    update uses ``lr(0)``: the learning rate PyTorch's ``LambdaLR`` gives the first
    ``optimizer.step()``.
    """

    #: A NamedTuple type whose first field is ``step`` and whose other fields are slot trees.
    state_type: type

    def __init__(self, lr: float | Schedule, **hyperparams: Any):
        if not callable(lr):
            if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
                raise EmberValueError(f"{type(self).__name__}: invalid learning rate {lr!r}; "
                                      "expected a number >= 0 or a schedule step -> lr")
            lr = float(lr)
        self.lr = lr
        self.defaults = {"lr": lr, **hyperparams}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return f"{type(self).__name__}({args})"

    # The three methods a subclass provides.

    def slot_names(self) -> tuple[str, ...]:
        """Names of the per-parameter buffers this configuration keeps (each a params tree)."""
        raise NotImplementedError

    def scalars(self, lr: Any, step: Array) -> dict[str, Any]:
        """Scalars of the update from ``step`` to ``step + 1``, computed once (floats in float64,
        then cast to each parameter's compute dtype)."""
        raise NotImplementedError

    def update_leaf(self, param: Array, grad: Array, slots: dict[str, Array],
                    scalars: dict[str, Any]) -> tuple[Array, dict[str, Array]]:
        """New value of one parameter and of its slots; all arrays are in the compute dtype."""
        raise NotImplementedError

    # The public interface.

    def init(self, params: PyTree) -> NamedTuple:
        """State for ``params``: ``step = 0`` (int32) and zeroed slots shaped like the params."""
        for name, leaf in named_leaves(params):
            dtype = getattr(leaf, "dtype", None)
            if dtype is None or not dtypes.is_float(dtypes.canonicalize(dtype)):
                raise EmberError(f"{type(self).__name__}.init: parameter {name!r} must be a "
                                 f"floating-point array, got {type(leaf).__name__} of dtype "
                                 f"{dtype}")
        params = tree_map(enp.asarray, params)
        slots = {name: tree_map(enp.zeros_like, params) for name in self.slot_names()}
        return self.state_type(step=enp.zeros((), dtype=enp.int32), **slots)

    def update(self, params: PyTree, grads: PyTree, state: NamedTuple
               ) -> tuple[PyTree, NamedTuple]:
        """One optimizer step: ``(new_params, new_state)``; pure, so it can run under jit.

        Each parameter keeps its dtype, and so does each slot; the arithmetic is done in at
        least float32.
        """
        p_leaves, treedef = tree_flatten(tree_map(enp.asarray, params))
        g_leaves, g_def = tree_flatten(tree_map(enp.asarray, grads))
        if g_def != treedef:
            raise EmberError(f"{type(self).__name__}.update: grads have structure {g_def}, "
                             f"params have {treedef}")
        names = self.slot_names()
        for n in names:
            if tree_structure(getattr(state, n)) != treedef:
                raise EmberError(f"{type(self).__name__}.update: state.{n} has structure "
                                 f"{tree_structure(getattr(state, n))}, params have {treedef}; "
                                 "was the state made by this optimizer for these params?")
        slot_leaves = {n: tree_leaves(getattr(state, n)) for n in names}
        scalars = self.scalars(self._lr(state.step), state.step)
        per_dtype: dict[Any, dict[str, Any]] = {}
        new_params: list[Array] = []
        new_slots: dict[str, list[Array]] = {n: [] for n in names}
        for i, (p, g) in enumerate(zip(p_leaves, g_leaves)):
            dt = compute_dtype(p.dtype)
            if dt not in per_dtype:
                per_dtype[dt] = {k: cast(v, dt) for k, v in scalars.items()}
            p_new, s_new = self.update_leaf(
                cast(p, dt), cast(g, dt), {n: cast(slot_leaves[n][i], dt) for n in names},
                per_dtype[dt])
            new_params.append(cast(p_new, p.dtype))
            for n in names:
                new_slots[n].append(cast(s_new[n], slot_leaves[n][i].dtype))
        state = self.state_type(step=state.step + 1,
                                **{n: tree_unflatten(treedef, new_slots[n]) for n in names})
        return tree_unflatten(treedef, new_params), state

    def lr_at(self, state: NamedTuple) -> float | Array:
        """The learning rate the next ``update`` of ``state`` will use.

        A Python float eagerly; a scalar array when called while tracing (inside ``jit``).
        """
        lr = self._lr(state.step)
        return lr if isinstance(lr, (float, Tracer)) else float(lr)

    def _lr(self, step: Array) -> Any:
        return self.lr(step) if callable(self.lr) else self.lr
