"""LoRA: low-rank adapters on frozen linear layers (Hu et al., 2021).

``LoRALinear`` keeps the base layer's ``weight``/``bias`` under their original names (so a
LoRA model still loads the base checkpoint) and adds ``lora_A [r, in]`` and
``lora_B [out, r]``; ``B`` starts at zero, so a fresh adapter leaves the model unchanged.
The base weight may be a packed :class:`~ember.nn.quantized.QuantizedWeight` (QLoRA: a frozen
quantised base, float32 adapters); ``F.linear`` multiplies by it without unpacking it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ember.numpy as enp
from ember import random
from ember.errors import EmberValueError
from ember.nn import init
from ember.nn.layers import Linear
from ember.nn.module import Module
from ember.nn.quantized import QuantizedWeight

__all__ = ["LoRALinear", "apply_lora", "merge_lora"]


class LoRALinear(Linear):
    """``x @ W.T + b + (x @ A.T @ B.T) * (alpha / r)`` with ``W`` and ``b`` frozen."""

    def __init__(self, base: Linear, rank: int = 8, alpha: float = 16.0, key: Any = None):
        if rank < 1:
            raise EmberValueError(f"LoRALinear: rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.scale = rank, float(alpha) / rank
        self.lora_A = init.kaiming_uniform((rank, base.in_features), base.weight.dtype, key)
        self.lora_B = init.zeros((base.out_features, rank), base.weight.dtype)
        self._frozen = frozenset({"weight", "bias"})
        self.training = base.training

    def forward(self, x: Any) -> Any:
        update = enp.matmul(enp.matmul(x, self.lora_A.T), self.lora_B.T)
        return super().forward(x) + update * self.scale

    def merged(self) -> Linear:
        """A plain ``Linear`` with the adapter folded into the weight (a float32 weight when
        the base is quantised: the sum is not a whole number of quantisation steps)."""
        out = object.__new__(Linear)
        out.in_features, out.out_features = self.in_features, self.out_features
        delta = enp.matmul(self.lora_B, self.lora_A) * self.scale
        base = self.weight.dequantize() if isinstance(self.weight, QuantizedWeight) \
            else self.weight
        out.weight = (base + delta).astype(base.dtype)
        out.bias = self.bias
        # The merged weight is the base weight: it keeps its frozen flag and the mode.
        out._frozen = self.__dict__.get("_frozen", frozenset()) & {"weight", "bias"}
        out.training = self.training
        return out


def _replace_linears(model: Module, pick: Any) -> int:
    """Swap module attributes for ``pick(name, value)`` where it is not None; how many."""
    count = 0
    for _, module in list(model.named_modules()):
        for name, value in list(module.__dict__.items()):
            new = pick(name, value)
            if new is not None:
                setattr(module, name, new)  # through the module: clears kept flattenings
                count += 1
    return count


def apply_lora(model: Module, rank: int = 8, alpha: float = 16.0,
               targets: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
               key: Any = None) -> Module:
    """Freeze ``model`` and wrap every ``Linear`` attribute named in ``targets`` with LoRA.

    In place; returns the model. Only the adapters are trainable afterwards.
    """
    targets = frozenset(targets)
    model.freeze()
    made = [0]

    def pick(name: str, value: Any) -> Any:
        if name not in targets or type(value) is not Linear:
            return None
        made[0] += 1
        sub = None if key is None else random.fold_in(key, made[0])
        return LoRALinear(value, rank, alpha, sub)

    if _replace_linears(model, pick) == 0:
        raise EmberValueError(f"apply_lora: no Linear layer named any of {sorted(targets)} "
                              f"in {type(model).__name__}")
    return model


def merge_lora(model: Module) -> Module:
    """Fold every adapter into its base weight, in place, leaving plain ``Linear`` layers."""
    _replace_linears(model, lambda _, v: v.merged() if isinstance(v, LoRALinear) else None)
    return model
