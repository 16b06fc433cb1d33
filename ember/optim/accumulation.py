"""Gradient accumulation: several micro-batches per optimizer step, in one static graph.

``GradientAccumulation(opt, every=k)`` is itself an optimizer. Each ``update`` adds the
micro-batch gradients to an accumulator; the k-th call passes their mean to ``opt`` and resets
the accumulator. With a mean loss per micro-batch, k accumulated micro-batches of size b give
the same step as one batch of size k*b.

Every call runs the same graph: the inner update is always computed and ``enp.where`` keeps
either its result or the old values, so a jitted training step is traced once, not once per
phase. The price is an inner update's arithmetic on every micro-step, small next to the
forward and backward passes it accompanies.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ember.numpy as enp
from ember.core.array import Array
from ember.errors import EmberError, EmberValueError
from ember.optim._precision import cast, compute_dtype
from ember.optim.base import Optimizer, PyTree
from ember.tree import tree_map, tree_structure

__all__ = ["AccumulationState", "GradientAccumulation"]


class AccumulationState(NamedTuple):
    micro_step: Array  #: int32 micro-batches accumulated since the last real update
    grads: Any  #: running sum of gradients, params-shaped, in at least float32
    inner: Any  #: the wrapped optimizer's state


class GradientAccumulation:
    """Average gradients over ``every`` calls of ``update`` and step ``optimizer`` on the last."""

    def __init__(self, optimizer: Optimizer | GradientAccumulation, every: int):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise EmberValueError(f"GradientAccumulation: every must be an int >= 1, "
                                  f"got {every!r}")
        self.optimizer = optimizer
        self.every = every

    def __repr__(self) -> str:
        return f"GradientAccumulation({self.optimizer!r}, every={self.every})"

    def init(self, params: PyTree) -> AccumulationState:
        """Zero accumulator and counter, and the inner optimizer's fresh state."""
        inner = self.optimizer.init(params)
        grads = tree_map(lambda p: enp.zeros(p.shape, dtype=compute_dtype(p.dtype)), params)
        return AccumulationState(enp.zeros((), dtype=enp.int32), grads, inner)

    def update(self, params: PyTree, grads: PyTree, state: AccumulationState
               ) -> tuple[PyTree, AccumulationState]:
        """Accumulate ``grads``; on every ``every``-th call also apply the mean to ``params``."""
        if tree_structure(grads) != tree_structure(state.grads):
            raise EmberError(f"GradientAccumulation.update: grads have structure "
                             f"{tree_structure(grads)}, params have "
                             f"{tree_structure(state.grads)}")
        total = tree_map(lambda acc, g: acc + cast(g, acc.dtype), state.grads, grads)
        apply = state.micro_step + 1 == self.every
        stepped, inner = self.optimizer.update(params, tree_map(lambda t: t / self.every, total),
                                               state.inner)
        keep = lambda new, old: enp.where(apply, new, old)
        return tree_map(keep, stepped, params), AccumulationState(
            micro_step=enp.where(apply, 0, state.micro_step + 1),
            grads=tree_map(lambda t: enp.where(apply, 0.0, t), total),
            inner=tree_map(keep, inner, state.inner))

    def lr_at(self, state: AccumulationState) -> float | Array:
        """The learning rate of the next real update."""
        return self.optimizer.lr_at(state.inner)
