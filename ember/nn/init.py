"""Parameter initialisers (PyTorch's defaults) and a switch to skip them.

Each initialiser returns a new array (arrays are values). ``key`` is an ``ember.random`` key;
when omitted the global generator (``ember.random.seed``) is used, as PyTorch does.
Loading a checkpoint overwrites every parameter, so the loaders build models inside
:func:`skip_init`, where initialisers return zeros instead of spending seconds on random
numbers that are thrown away.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

import ember.numpy as enp
from ember import random

__all__ = ["uniform", "normal", "zeros", "ones", "kaiming_uniform", "xavier_uniform",
           "skip_init"]

_SKIP = [False]


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Inside this block initialisers return zeros (for models about to be loaded)."""
    old, _SKIP[0] = _SKIP[0], True
    try:
        yield
    finally:
        _SKIP[0] = old


def _key(key: Any) -> Any:
    return random.next_key() if key is None else key


def zeros(shape: tuple[int, ...], dtype: Any = enp.float32) -> Any:
    return enp.asarray(np.zeros(shape, dtype=enp.dtype(dtype)))


def ones(shape: tuple[int, ...], dtype: Any = enp.float32) -> Any:
    return enp.ones(shape, dtype=dtype)


def uniform(shape: tuple[int, ...], low: float, high: float, dtype: Any = enp.float32,
            key: Any = None) -> Any:
    if _SKIP[0]:
        return zeros(shape, dtype)
    return random.uniform(_key(key), shape, dtype=dtype, minval=low, maxval=high)


def normal(shape: tuple[int, ...], std: float = 1.0, mean: float = 0.0,
           dtype: Any = enp.float32, key: Any = None) -> Any:
    if _SKIP[0]:
        return zeros(shape, dtype)
    return (random.normal(_key(key), shape, dtype=dtype) * std + mean).astype(dtype)


def kaiming_uniform(shape: tuple[int, ...], dtype: Any = enp.float32, key: Any = None) -> Any:
    """PyTorch's default for ``Linear`` weights: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
    (``kaiming_uniform_`` with ``a=sqrt(5)``)."""
    bound = 1.0 / math.sqrt(shape[-1]) if shape[-1] else 0.0
    return uniform(shape, -bound, bound, dtype, key)


def xavier_uniform(shape: tuple[int, ...], gain: float = 1.0, dtype: Any = enp.float32,
                   key: Any = None) -> Any:
    fan_out, fan_in = shape[0], shape[-1]
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform(shape, -bound, bound, dtype, key)
