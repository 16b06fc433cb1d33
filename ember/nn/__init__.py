"""``ember.nn``: PyTorch-shaped modules that are pytrees, and the functions behind them.

A model is a :class:`Module` tree; its arrays are the leaves, so ``ember.grad(loss)(model, x)``
returns gradients shaped like the model and ``ember.jit`` takes models as arguments.
:func:`value_and_grad` differentiates only the trainable (not frozen) parameters.
"""

from ember.nn import functional, init
from ember.nn.layers import (
    GELU,
    Dropout,
    Embedding,
    Identity,
    LayerNorm,
    Linear,
    ReLU,
    RMSNorm,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
)
from ember.nn.lora import LoRALinear, apply_lora, merge_lora
from ember.nn.module import Module, ModuleList, Sequential
from ember.nn.quantized import QuantizedWeight, quantize
from ember.nn.training import value_and_grad

__all__ = ["GELU", "Dropout", "Embedding", "Identity", "LayerNorm", "Linear", "LoRALinear",
           "Module", "ModuleList", "QuantizedWeight", "RMSNorm", "ReLU", "Sequential", "SiLU",
           "Sigmoid", "Softmax", "Tanh", "apply_lora", "functional", "init", "merge_lora",
           "quantize", "value_and_grad"]
