"""Special functions (``scipy.special`` names): erf, erfc, expit, logit, logsumexp, softmax.

All are real functions: complex input raises a ``DTypeError`` naming the function."""

from __future__ import annotations

from typing import Any

from ember import dtypes
from ember.core.trace import aval_of
from ember.errors import DTypeError, op_error
from ember.numpy._core import float_dtype, value
from ember.numpy._reductions import logsumexp
from ember.ops import elementwise as ew
from ember.ops import structural as st

__all__ = ["erf", "erfc", "expit", "logit", "logsumexp", "softmax", "log_softmax"]


def _float(name: str, x: Any) -> Any:
    v = value(x)
    if dtypes.is_complex(aval_of(v).dtype):
        raise op_error(DTypeError, name, f"is not defined on complex numbers, got "
                       f"{aval_of(v).dtype}")
    return ew.convert(v, float_dtype(aval_of(v).dtype), weak=aval_of(v).weak)


def erf(x: Any) -> Any:
    """The error function (accurate to about 1e-7 relative; see ``ember.ops._erf``)."""
    return ew.erf(_float("erf", x))


def erfc(x: Any) -> Any:
    v = _float("erfc", x)
    return ew.sub(ew.full_like(v, 1), ew.erf(v))


def expit(x: Any) -> Any:
    """The logistic sigmoid ``1 / (1 + exp(-x))``, stable for large ``|x|``."""
    return ew.logistic(_float("expit", x))


def logit(x: Any) -> Any:
    v = _float("logit", x)
    return ew.log(ew.div(v, ew.sub(ew.full_like(v, 1), v)))


def log_softmax(x: Any, axis: int = -1) -> Any:
    v = _float("log_softmax", x)
    lse = logsumexp(v, axis=axis, keepdims=True)
    return ew.sub(v, st.broadcast_to_shape(lse, aval_of(v).shape))


def softmax(x: Any, axis: int = -1) -> Any:
    return ew.exp(log_softmax(x, axis))
