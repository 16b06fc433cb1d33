"""Quantised weights for ``nn`` layers: packed GGUF blocks in place of a float weight.

A :class:`QuantizedWeight` stands where a layer's float weight ``[N, K]`` would (``Linear.weight``,
``Embedding.weight``) and holds the weight as its rows of GGUF blocks, ``uint8 [N, row_bytes]``
(see :mod:`ember.ops.quantized`). ``F.linear`` multiplies by it with one ``quant_matmul``
and ``F.embedding`` gathers packed rows and dequantises only those, so ``Linear``,
``Embedding``, a tied output projection and ``LoRALinear`` work unchanged on packed weights
(the layer keeps its type; only its weight is replaced, as torchao does with tensor subclasses).

It is a module, so it is a pytree: the packed bytes are its one leaf, a buffer (never a trainable
parameter, so a LoRA fine-tune on a quantised base trains the adapters only) and the format is
static (part of the jit cache key). In ``state_dict()`` the bytes appear under the name of the
weight they replace (``...q_proj.weight``), as bitsandbytes stores packed weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

import ember.numpy as enp
from ember import dtypes
from ember.errors import EmberValueError
from ember.io.quants import block_format, quantize_rows
from ember.nn.module import Module, _Slot
from ember.ops.quantized import dequantize, quant_matmul

__all__ = ["QuantizedWeight", "quantize"]


class QuantizedWeight(Module):
    """A weight ``[N, K]`` kept as ``N`` rows of ``format`` blocks (``uint8 [N, row_bytes]``).

    ``shape`` and ``dtype`` are those of the weight it stands for (its values decode to
    float32); products with it take the dtype of the other operand and accumulate in float32.
    """

    def __init__(self, packed: Any, fmt: str):
        fmt = block_format(fmt)
        packed = enp.asarray(packed)
        if packed.dtype != dtypes.uint8 or packed.ndim != 2 or \
                packed.shape[1] % fmt.block_bytes:
            raise EmberValueError(f"QuantizedWeight: {fmt.name} weights are uint8 [rows, "
                                  f"row_bytes] with whole {fmt.block_bytes}-byte blocks per "
                                  f"row, got {packed.dtype}{list(packed.shape)}")
        self.format = fmt.name
        self.register_buffer("packed", packed)

    @classmethod
    def quantize(cls, weight: Any, fmt: str) -> QuantizedWeight:
        """Pack a float weight ``[N, K]`` (``K`` a multiple of the block size) as llama.cpp's
        reference quantiser rounds it."""
        values = np.asarray(weight, dtype=np.float32)
        if values.ndim != 2:
            raise EmberValueError(f"QuantizedWeight.quantize: expected a 2-D weight, got shape "
                                  f"{values.shape}")
        return cls(quantize_rows(values, fmt), fmt)

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.packed.shape
        return rows, block_format(self.format).row_elements(nbytes)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        return dtypes.float32

    def dequantize(self) -> Any:
        """The weight as a float32 array ``[N, K]``."""
        return dequantize(self.packed, self.format)

    def linear(self, x: Any, bias: Any = None) -> Any:
        """``x @ W.T + bias`` without unpacking ``W`` (``F.linear`` lands here)."""
        y = quant_matmul(enp.asarray(x), self.packed, self.format)
        return y if bias is None else y + bias

    def decode_rows(self, rows: Any) -> Any:
        """Packed rows gathered from ``packed`` (``[..., row_bytes]``) as float32 values."""
        return dequantize(rows, self.format)

    def _arrays(self, prefix: str = "") -> Iterator[_Slot]:
        # The packed bytes take the name of the weight they replace, so a quantised model's
        # state_dict has the float model's keys (and loads from a dict of packed tensors).
        yield _Slot(prefix or "packed", self, "packed", (), self.packed)

    def extra_repr(self) -> str:
        n, k = self.shape
        return f"{self.format}, [{n}, {k}]"


def quantize(model: Module, fmt: str = "q8_0", targets: Iterable[str] | None = None,
             embeddings: bool = False) -> Module:
    """Pack the weight of every ``Linear`` (named in ``targets``, default all) as ``fmt``
    blocks, in place; with ``embeddings`` also every ``Embedding``. Returns the model.

    Weights whose rows are not whole blocks stay in float. A weight tied between layers is
    packed once and stays tied.
    """
    from ember.nn.layers import Embedding, Linear  # layers import F, which imports this module

    fmt = block_format(fmt)
    kinds = (Linear, Embedding) if embeddings else (Linear,)
    wanted = None if targets is None else frozenset(targets)
    packed: dict[int, QuantizedWeight] = {}
    for name, module in model.named_modules():
        if type(module) not in kinds or (wanted is not None and
                                         name.rsplit(".", 1)[-1] not in wanted):
            continue
        weight = module.weight
        if isinstance(weight, QuantizedWeight) or weight.shape[-1] % fmt.block:
            continue
        if id(weight) not in packed:
            packed[id(weight)] = QuantizedWeight.quantize(weight, fmt.name)
        module.weight = packed[id(weight)]
    return model
