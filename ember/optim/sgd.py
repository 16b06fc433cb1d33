"""Stochastic gradient descent with momentum, dampening, Nesterov and L2 weight decay.

Same hyperparameters and arithmetic as ``torch.optim.SGD``, including its first step: the
momentum buffer starts as a copy of the gradient (no dampening applied), not as a decayed zero.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ember.numpy as enp
from ember.core.array import Array
from ember.errors import EmberValueError
from ember.optim.base import Optimizer, Schedule

__all__ = ["SGD", "SGDState"]


class SGDState(NamedTuple):
    step: Array  #: int32 count of updates taken
    momentum_buffer: Any = None  #: params-shaped tree, ``None`` when ``momentum == 0``


class SGD(Optimizer):
    """``p -= lr * d`` where ``d`` is the (weight-decayed, momentum-averaged) gradient."""

    state_type = SGDState

    def __init__(self, lr: float | Schedule = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        if momentum < 0 or weight_decay < 0:
            raise EmberValueError(f"SGD: momentum ({momentum}) and weight_decay "
                                  f"({weight_decay}) must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise EmberValueError("SGD: nesterov momentum requires momentum > 0 and "
                                  "dampening == 0")
        super().__init__(lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov)
        self.momentum, self.dampening = momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, nesterov

    def slot_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum != 0 else ()

    def scalars(self, lr: Any, step: Array) -> dict[str, Any]:
        return {"lr": lr, "first": step == 0}

    def update_leaf(self, param: Array, grad: Array, slots: dict[str, Array],
                    scalars: dict[str, Any]) -> tuple[Array, dict[str, Array]]:
        if self.weight_decay != 0:
            grad = grad + self.weight_decay * param
        new_slots = {}
        if self.momentum != 0:
            decayed = self.momentum * slots["momentum_buffer"] + (1 - self.dampening) * grad
            buf = enp.where(scalars["first"], grad, decayed)
            new_slots["momentum_buffer"] = buf
            grad = grad + self.momentum * buf if self.nesterov else buf
        return param - scalars["lr"] * grad, new_slots
