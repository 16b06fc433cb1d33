"""Attach NumPy's operators and methods to :class:`ember.Array` (and so to every tracer).

The array class lives in the core layer, which knows nothing of NumPy semantics; this layer
gives it ``+``, ``@``, ``x[i]``, ``.sum()``... by delegating to the ``ember.numpy`` functions, so
an operator and the function of the same name can never disagree.
"""

from __future__ import annotations

from typing import Any

from ember.core.array import Array
from ember.numpy import (
    _creation,
    _dispatch,
    _indexing,
    _info,
    _linalg,
    _math,
    _reductions,
    _search,
    _shape,
)
from ember.numpy import _shape_more as _more


def _swap(fn):
    return lambda self, other: fn(other, self)


def _reshape(self: Array, *shape: Any, order: str = "C") -> Any:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return _shape.reshape(self, shape, order)


def _transpose(self: Array, *axes: Any) -> Any:
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = axes[0]
    return _shape.transpose(self, axes or None)


def _T(self: Array) -> Any:  # noqa: N802
    return _shape.transpose(self)


def _mT(self: Array) -> Any:  # noqa: N802
    return _linalg.matrix_transpose(self)


def _setitem(self: Array, index: Any, value: Any) -> None:
    """``x[index] = value``: rebinds ``x`` to an updated copy (arrays are values, not views)."""
    _indexing.rebind(self, _indexing.at_set(self, index, value))


_OPERATORS = {
    "__add__": _math.add, "__radd__": _swap(_math.add),
    "__sub__": _math.subtract, "__rsub__": _swap(_math.subtract),
    "__mul__": _math.multiply, "__rmul__": _swap(_math.multiply),
    "__truediv__": _math.true_divide, "__rtruediv__": _swap(_math.true_divide),
    "__floordiv__": _math.floor_divide, "__rfloordiv__": _swap(_math.floor_divide),
    "__mod__": _math.remainder, "__rmod__": _swap(_math.remainder),
    "__divmod__": _math.divmod, "__rdivmod__": _swap(_math.divmod),
    "__pow__": _math.power, "__rpow__": _swap(_math.power),
    "__matmul__": _linalg.matmul, "__rmatmul__": _swap(_linalg.matmul),
    "__and__": _math.bitwise_and, "__rand__": _swap(_math.bitwise_and),
    "__or__": _math.bitwise_or, "__ror__": _swap(_math.bitwise_or),
    "__xor__": _math.bitwise_xor, "__rxor__": _swap(_math.bitwise_xor),
    "__lshift__": _math.left_shift, "__rlshift__": _swap(_math.left_shift),
    "__rshift__": _math.right_shift, "__rrshift__": _swap(_math.right_shift),
    "__eq__": _math.equal, "__ne__": _math.not_equal, "__lt__": _math.less,
    "__le__": _math.less_equal, "__gt__": _math.greater, "__ge__": _math.greater_equal,
    "__neg__": _math.negative, "__pos__": _math.positive, "__abs__": _math.absolute,
    "__invert__": _math.invert,
    "__getitem__": _indexing.getitem, "__setitem__": _setitem,
}

_METHODS = {
    "astype": _info.astype, "reshape": _reshape, "transpose": _transpose,
    "sum": _reductions.sum, "prod": _reductions.prod, "mean": _reductions.mean,
    "var": _reductions.var, "std": _reductions.std, "max": _reductions.max,
    "min": _reductions.min, "argmax": _reductions.argmax, "argmin": _reductions.argmin,
    "all": _reductions.all, "any": _reductions.any, "cumsum": _reductions.cumsum,
    "cumprod": _reductions.cumprod, "ptp": _reductions.ptp,
    "clip": _math.clip, "round": _math.round, "conj": _math.conj, "conjugate": _math.conj,
    "dot": _linalg.dot, "squeeze": _shape.squeeze, "swapaxes": _shape.swapaxes,
    "ravel": _shape.ravel, "flatten": _shape.ravel, "copy": _creation.copy,
    "take": _indexing.take, "sort": _search.sort, "argsort": _search.argsort,
    "nonzero": _search.nonzero, "repeat": _more.repeat,
    "diagonal": _more.diagonal,
    "trace": _linalg.trace,
    "__array_namespace__": _info.array_namespace, "to_device": _info.to_device,
}

_PROPERTIES = {"T": _T, "mT": _mT, "at": _indexing.at_property,
               "real": lambda self: _math.real(self), "imag": lambda self: _math.imag(self)}


def install() -> None:
    Array.__array_function__ = _dispatch.array_function
    Array.__array_ufunc__ = _dispatch.array_ufunc
    for name, fn in _OPERATORS.items():
        setattr(Array, name, fn)
    for name, fn in _METHODS.items():
        if fn is not None:
            setattr(Array, name, fn)
    for name, fn in _PROPERTIES.items():
        setattr(Array, name, property(fn))
    Array.__hash__ = None  # __eq__ is elementwise, so arrays are unhashable (as in NumPy)


