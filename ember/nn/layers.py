"""The standard layers, PyTorch's names, arguments and parameter layouts."""

from __future__ import annotations

import math
from typing import Any

import ember.numpy as enp
from ember.nn import functional as F  # noqa: N812
from ember.nn import init
from ember.nn.module import Module

__all__ = ["Linear", "Embedding", "RMSNorm", "LayerNorm", "Dropout", "Identity", "ReLU",
           "SiLU", "GELU", "Sigmoid", "Tanh", "Softmax"]


class Linear(Module):
    """``y = x @ weight.T + bias`` with ``weight [out_features, in_features]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: Any = enp.float32, key: Any = None):
        self.in_features, self.out_features = in_features, out_features
        self.weight = init.kaiming_uniform((out_features, in_features), dtype, key)
        if bias:
            bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
            self.bias = init.uniform((out_features,), -bound, bound, dtype)
        else:
            self.bias = None

    def forward(self, x: Any) -> Any:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Embedding(Module):
    """A lookup table ``weight [num_embeddings, embedding_dim]`` (initialised N(0, 1))."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: Any = enp.float32,
                 key: Any = None):
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = init.normal((num_embeddings, embedding_dim), 1.0, dtype=dtype, key=key)

    def forward(self, ids: Any) -> Any:
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class RMSNorm(Module):
    """``x / rms(x) * weight`` over the last axis (Llama's norm)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: Any = enp.float32):
        self.eps = eps
        self.weight = init.ones((dim,), dtype)

    def forward(self, x: Any) -> Any:
        return F.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(Module):
    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, dtype: Any = enp.float32):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else \
            tuple(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.weight = init.ones(shape, dtype) if elementwise_affine else None
        self.bias = init.zeros(shape, dtype) if elementwise_affine and bias else None

    def forward(self, x: Any) -> Any:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Dropout(Module):
    """Dropout while ``training``, with masks from the global generator (fresh at every call
    of a jitted step, reproducible after ``ember.random.seed``) unless a ``key`` is passed."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def forward(self, x: Any, key: Any = None) -> Any:
        return F.dropout(x, self.p, self.training, key)


class _Activation(Module):
    fn: Any = None

    def forward(self, x: Any) -> Any:
        return type(self).fn(x)


class Identity(_Activation):
    fn = staticmethod(lambda x: x)


class ReLU(_Activation):
    fn = staticmethod(F.relu)


class SiLU(_Activation):
    fn = staticmethod(F.silu)


class Sigmoid(_Activation):
    fn = staticmethod(F.sigmoid)


class Tanh(_Activation):
    fn = staticmethod(F.tanh)


class GELU(Module):
    def __init__(self, approximate: str = "none"):
        self.approximate = approximate

    def forward(self, x: Any) -> Any:
        return F.gelu(x, self.approximate)


class Softmax(Module):
    def __init__(self, dim: int = -1):
        self.dim = dim

    def forward(self, x: Any) -> Any:
        return F.softmax(x, self.dim)
