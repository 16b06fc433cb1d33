"""Gradient clipping by the global L2 norm, as ``torch.nn.utils.clip_grad_norm_``.

Clipping by the norm of *all* gradients together keeps the update's direction and only shrinks
its length, which is what stabilises large-model training against the occasional huge batch.
The scale is computed without a Python ``if`` (``min(1, max_norm / (norm + 1e-6))``), so the
function traces into a jitted training step.
"""

from __future__ import annotations

from functools import reduce
from typing import Any

import ember.numpy as enp
from ember import dtypes
from ember.core.array import Array
from ember.errors import EmberValueError
from ember.optim._precision import cast, compute_dtype
from ember.tree import tree_leaves, tree_map

__all__ = ["clip_grad_norm", "global_norm"]


def global_norm(tree: Any) -> Array:
    """L2 norm of all leaves of ``tree`` taken as one vector, in at least float32."""
    leaves = tree_leaves(tree)
    dt = reduce(lambda a, b: dtypes.promote((a, False), (b, False)),
                [compute_dtype(leaf.dtype) for leaf in leaves], dtypes.float32)
    total = enp.zeros((), dtype=dt)
    for leaf in leaves:
        total = total + enp.sum(enp.square(cast(leaf, dt)))
    return enp.sqrt(total)


def clip_grad_norm(grads: Any, max_norm: float) -> tuple[Any, Array]:
    """``(grads * min(1, max_norm / (norm + 1e-6)), norm)`` with ``norm = global_norm(grads)``.

    Returns the norm *before* clipping, like PyTorch, so it can be logged. Each clipped leaf
    keeps its dtype.
    """
    if not isinstance(max_norm, (int, float)) or isinstance(max_norm, bool) or max_norm < 0:
        raise EmberValueError(f"clip_grad_norm: max_norm must be a number >= 0, got {max_norm!r}")
    norm = global_norm(grads)
    scale = enp.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: g * cast(scale, g.dtype), grads), norm
