"""Adam and AdamW, with PyTorch's bias correction, epsilon placement and AMSGrad variant.

The two differ only in weight decay: Adam adds ``weight_decay * p`` to the gradient (L2
regularisation, which the adaptive denominator then rescales), AdamW shrinks the parameter by
``1 - lr * weight_decay`` before the step ("decoupled" decay, Loshchilov & Hutter). As in
PyTorch 2, AdamW is Adam with the decoupled flag set, so there is one update rule.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ember.numpy as enp
from ember.core.array import Array
from ember.errors import EmberValueError
from ember.optim.base import Optimizer, Schedule

__all__ = ["Adam", "AdamState", "AdamW"]


class AdamState(NamedTuple):
    step: Array  #: int32 count of updates taken
    exp_avg: Any  #: first moment, a params-shaped tree
    exp_avg_sq: Any  #: second moment, a params-shaped tree
    max_exp_avg_sq: Any = None  #: running max of the second moment; ``None`` unless amsgrad


class Adam(Optimizer):
    """``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`` at step ``t`` (from 1).

    ``weight_decay`` is L2 regularisation added to the gradient, as in ``torch.optim.Adam``.
    """

    state_type = AdamState
    decoupled_weight_decay = False

    def __init__(self, lr: float | Schedule = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False):
        beta1, beta2 = betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise EmberValueError(f"{type(self).__name__}: betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise EmberValueError(f"{type(self).__name__}: eps ({eps}) and weight_decay "
                                  f"({weight_decay}) must be >= 0")
        super().__init__(lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.weight_decay, self.amsgrad = weight_decay, amsgrad

    def slot_names(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    def scalars(self, lr: Any, step: Array) -> dict[str, Any]:
        t = (step + 1).astype(enp.float64)  # bias correction counts the step being taken
        return {"step_size": lr / (1 - self.beta1 ** t),
                "bias_correction2_sqrt": enp.sqrt(1 - self.beta2 ** t),
                "decay": 1 - lr * self.weight_decay}

    def update_leaf(self, param: Array, grad: Array, slots: dict[str, Array],
                    scalars: dict[str, Any]) -> tuple[Array, dict[str, Array]]:
        if self.weight_decay != 0:
            if self.decoupled_weight_decay:
                param = param * scalars["decay"]
            else:
                grad = grad + self.weight_decay * param
        exp_avg = slots["exp_avg"] + (1 - self.beta1) * (grad - slots["exp_avg"])
        exp_avg_sq = self.beta2 * slots["exp_avg_sq"] + (1 - self.beta2) * grad * grad
        new_slots = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        second = exp_avg_sq
        if self.amsgrad:
            second = new_slots["max_exp_avg_sq"] = enp.maximum(slots["max_exp_avg_sq"],
                                                               exp_avg_sq)
        denom = enp.sqrt(second) / scalars["bias_correction2_sqrt"] + self.eps
        return param - scalars["step_size"] * (exp_avg / denom), new_slots


class AdamW(Adam):
    """Adam with decoupled weight decay (default 0.01), as ``torch.optim.AdamW``."""

    decoupled_weight_decay = True

    def __init__(self, lr: float | Schedule = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, amsgrad: bool = False):
        super().__init__(lr, betas, eps, weight_decay, amsgrad)
