"""``ember.optim``: PyTorch's optimizers as pure functions over pytrees.

An optimizer holds only hyperparameters; ``state = opt.init(params)`` makes its state (a pytree
with a ``step`` counter and per-parameter buffers) and ``params, state = opt.update(params,
grads, state)`` takes one step without mutating anything, so the whole training step can be
wrapped in ``ember.jit``. Names and hyperparameter semantics follow ``torch.optim``. See
``docs/optim.md``.
"""

from ember.optim import schedules
from ember.optim.accumulation import AccumulationState, GradientAccumulation
from ember.optim.adam import Adam, AdamState, AdamW
from ember.optim.base import Optimizer
from ember.optim.clip import clip_grad_norm, global_norm
from ember.optim.serialization import named_leaves, state_from_dict, state_to_dict
from ember.optim.sgd import SGD, SGDState

__all__ = ["SGD", "AccumulationState", "Adam", "AdamState", "AdamW", "GradientAccumulation",
           "Optimizer", "SGDState", "clip_grad_norm", "global_norm", "named_leaves", "schedules",
           "state_from_dict", "state_to_dict"]
