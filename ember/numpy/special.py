"""Special functions (``scipy.special`` names): erf, erfc, expit, logit, logsumexp, softmax."""

from __future__ import annotations

from typing import Any

from ember.core.trace import aval_of
from ember.numpy._core import float_dtype, value
from ember.numpy._reductions import logsumexp
from ember.ops import elementwise as ew
from ember.ops import structural as st

__all__ = ["erf", "erfc", "expit", "logit", "logsumexp", "softmax", "log_softmax"]


def _float(x: Any) -> Any:
    v = value(x)
    return ew.convert(v, float_dtype(aval_of(v).dtype), weak=aval_of(v).weak)


def erf(x: Any) -> Any:
    """The error function (accurate to about 1e-7 relative; see ``ember.ops._erf``)."""
    return ew.erf(_float(x))


def erfc(x: Any) -> Any:
    v = _float(x)
    return ew.sub(ew.full_like(v, 1), ew.erf(v))


def expit(x: Any) -> Any:
    """The logistic sigmoid ``1 / (1 + exp(-x))``, stable for large ``|x|``."""
    return ew.logistic(_float(x))


def logit(x: Any) -> Any:
    v = _float(x)
    return ew.log(ew.div(v, ew.sub(ew.full_like(v, 1), v)))


def log_softmax(x: Any, axis: int = -1) -> Any:
    v = _float(x)
    lse = logsumexp(v, axis=axis, keepdims=True)
    return ew.sub(v, st.broadcast_to_shape(lse, aval_of(v).shape))


def softmax(x: Any, axis: int = -1) -> Any:
    return ew.exp(log_softmax(x, axis))
