"""Parameter initialisers (PyTorch's defaults), PyTorch's in-place ones, and a switch to skip them.

The shape-taking initialisers (``normal(shape, std)``...) return a new array; the ones named
with a trailing underscore (``normal_(m.weight, mean, std)``...) are PyTorch's, by name,
argument names and defaults, and give the array passed in a new value. ``key`` is an
``ember.random`` key; when omitted the global generator (``ember.random.seed``) is used, as
PyTorch does. Loading a checkpoint overwrites every parameter, so the loaders build models
inside :func:`skip_init`, where initialisers return zeros (the in-place ones leave the array
alone) instead of spending seconds on random numbers that are thrown away.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import ember.numpy as enp
from ember import dtypes, random
from ember.core.array import Array
from ember.errors import EmberValueError, ShapeError, op_error

__all__ = ["uniform", "normal", "zeros", "ones", "kaiming_uniform", "xavier_uniform",
           "skip_init", "calculate_gain", "uniform_", "normal_", "trunc_normal_", "constant_",
           "zeros_", "ones_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
           "kaiming_normal_"]

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


# --- PyTorch's in-place initialisers -----------------------------------------------------------
#
# ``nn.init.normal_(m.weight, 0.0, 0.02)`` as in PyTorch: the array object passed in takes the
# new value, the way ``x[...] = v`` rebinds an ember array, so every module (and every tied
# name) holding that object sees it. Inside ``skip_init`` they leave the array as it is.

_GAINS = {"linear": 1.0, "identity": 1.0, "conv1d": 1.0, "conv2d": 1.0, "conv3d": 1.0,
          "conv_transpose1d": 1.0, "conv_transpose2d": 1.0, "conv_transpose3d": 1.0,
          "sigmoid": 1.0, "tanh": 5.0 / 3, "relu": math.sqrt(2.0), "selu": 3.0 / 4}


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended scale for an activation (PyTorch's table); ``param`` is leaky_relu's
    negative slope (default 0.01)."""
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity not in _GAINS:
        raise op_error(EmberValueError, "nn.init.calculate_gain", f"unsupported nonlinearity "
                       f"{nonlinearity!r} (supported: leaky_relu, {', '.join(_GAINS)})")
    return _GAINS[nonlinearity]


def _fans(op: str, tensor: Any) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a ``[out, in, *kernel]`` weight, as PyTorch counts them."""
    if tensor.ndim < 2:
        raise op_error(ShapeError, f"nn.init.{op}", f"fan in and fan out need an array of at "
                       f"least 2 dimensions, got shape {tuple(tensor.shape)}")
    receptive = math.prod(tensor.shape[2:])
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def _fill(op: str, tensor: Any, make: Callable[[tuple[int, ...], Any], Any]) -> Any:
    """Rebind ``tensor`` to ``make(shape, dtype)`` and return it (PyTorch's ``_`` convention)."""
    if not isinstance(tensor, Array) or not dtypes.is_float(np.dtype(tensor.dtype)):
        what = f"{tensor.dtype} array" if isinstance(tensor, Array) else type(tensor).__name__
        raise op_error(EmberValueError, f"nn.init.{op}", f"expects a floating-point ember array "
                       f"(a module's parameter), got {what}")
    if not _SKIP[0]:
        tensor[...] = make(tuple(tensor.shape), tensor.dtype)
    return tensor


def uniform_(tensor: Any, a: float = 0.0, b: float = 1.0, *, key: Any = None) -> Any:
    """Fill with ``U(a, b)``."""
    return _fill("uniform_", tensor, lambda s, dt: uniform(s, a, b, dt, key))


def normal_(tensor: Any, mean: float = 0.0, std: float = 1.0, *, key: Any = None) -> Any:
    """Fill with ``N(mean, std^2)``."""
    return _fill("normal_", tensor, lambda s, dt: normal(s, std, mean, dt, key))


def trunc_normal_(tensor: Any, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                  b: float = 2.0, *, key: Any = None) -> Any:
    """Fill with ``N(mean, std^2)`` conditioned on ``a <= x <= b`` (absolute bounds, as
    PyTorch: the defaults cut at +-2, not at +-2 std)."""
    def make(shape: tuple[int, ...], dtype: Any) -> Any:
        z = random.truncated_normal(_key(key), (a - mean) / std, (b - mean) / std, shape,
                                    enp.float32 if dtype != enp.float64 else dtype)
        return enp.clip(z * std + mean, a, b).astype(dtype)
    return _fill("trunc_normal_", tensor, make)


def constant_(tensor: Any, val: float) -> Any:
    """Fill with ``val``."""
    return _fill("constant_", tensor, lambda s, dt: enp.full(s, val, dtype=dt))


def zeros_(tensor: Any) -> Any:
    """Fill with zeros."""
    return constant_(tensor, 0.0)


def ones_(tensor: Any) -> Any:
    """Fill with ones."""
    return constant_(tensor, 1.0)


def xavier_uniform_(tensor: Any, gain: float = 1.0, *, key: Any = None) -> Any:
    """Glorot: ``U(-g sqrt(6 / (fan_in + fan_out)), +...)``."""
    fan_in, fan_out = _fans("xavier_uniform_", tensor)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -bound, bound, key=key)


def xavier_normal_(tensor: Any, gain: float = 1.0, *, key: Any = None) -> Any:
    """Glorot: ``N(0, g^2 2 / (fan_in + fan_out))``."""
    fan_in, fan_out = _fans("xavier_normal_", tensor)
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), key=key)


def _kaiming_std(op: str, tensor: Any, a: float, mode: str, nonlinearity: str) -> float:
    if mode not in ("fan_in", "fan_out"):
        raise op_error(EmberValueError, f"nn.init.{op}", f"mode must be 'fan_in' or 'fan_out', "
                       f"got {mode!r}")
    fan_in, fan_out = _fans(op, tensor)
    fan = fan_in if mode == "fan_in" else fan_out
    return calculate_gain(nonlinearity, a) / math.sqrt(fan) if fan else 0.0


def kaiming_uniform_(tensor: Any, a: float = 0.0, mode: str = "fan_in",
                     nonlinearity: str = "leaky_relu", *, key: Any = None) -> Any:
    """He: ``U(-b, b)`` with ``b = gain * sqrt(3 / fan)``; ``a=sqrt(5)`` gives ``Linear``'s
    default."""
    bound = math.sqrt(3.0) * _kaiming_std("kaiming_uniform_", tensor, a, mode, nonlinearity)
    return uniform_(tensor, -bound, bound, key=key)


def kaiming_normal_(tensor: Any, a: float = 0.0, mode: str = "fan_in",
                    nonlinearity: str = "leaky_relu", *, key: Any = None) -> Any:
    """He: ``N(0, (gain / sqrt(fan))^2)``."""
    std = _kaiming_std("kaiming_normal_", tensor, a, mode, nonlinearity)
    return normal_(tensor, 0.0, std, key=key)
