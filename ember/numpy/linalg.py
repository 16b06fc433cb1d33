"""``ember.numpy.linalg``: norm, matmul, vecdot, outer, matrix_transpose, tensordot, trace."""

from __future__ import annotations

from typing import Any

import numpy as np

from ember.core.trace import aval_of
from ember.errors import EmberValueError, op_error
from ember.numpy._core import float_dtype, normalize_axis_arg, value
from ember.numpy._linalg import matmul, matrix_transpose, outer, tensordot, trace, vecdot
from ember.numpy._reductions import max as max_
from ember.numpy._reductions import min as min_
from ember.numpy._reductions import sum as sum_
from ember.ops import elementwise as ew

__all__ = ["norm", "vector_norm", "matrix_norm", "matmul", "matrix_transpose", "outer",
           "tensordot", "trace", "vecdot"]


def vector_norm(x: Any, /, *, axis: Any = None, keepdims: bool = False, ord: Any = 2) -> Any:
    v = value(x)
    v = ew.convert(v, float_dtype(aval_of(v).dtype))
    a = ew.abs(v)
    if ord == 2:
        return ew.sqrt(sum_(ew.mul(a, a), axis, keepdims=keepdims))
    if ord == 1:
        return sum_(a, axis, keepdims=keepdims)
    if ord in (np.inf, float("inf")):
        return max_(a, axis, keepdims=keepdims)
    if ord in (-np.inf, float("-inf")):
        return min_(a, axis, keepdims=keepdims)
    if ord == 0:
        return sum_(ew.convert(ew.ne(a, ew.zeros_like(a)), aval_of(a).dtype), axis,
                    keepdims=keepdims)
    p = ew.full_like(a, ord)
    s = sum_(ew.pow(a, p), axis, keepdims=keepdims)
    return ew.pow(s, ew.full_like(s, 1.0 / ord))


def matrix_norm(x: Any, /, *, keepdims: bool = False, ord: Any = "fro") -> Any:
    v = value(x)
    if ord in ("fro", None):
        return vector_norm(v, axis=(-2, -1), keepdims=keepdims)
    a = ew.abs(ew.convert(v, float_dtype(aval_of(v).dtype)))
    if ord == 1:
        return max_(sum_(a, -2, keepdims=keepdims), -1, keepdims=keepdims)
    if ord in (np.inf, float("inf")):
        return max_(sum_(a, -1, keepdims=keepdims), -2 if keepdims else -1, keepdims=keepdims)
    raise op_error(EmberValueError, "matrix_norm", f"ord={ord!r} is not supported (use 'fro', "
                   "1 or inf)")


def norm(x: Any, ord: Any = None, axis: Any = None, keepdims: bool = False) -> Any:
    """``numpy.linalg.norm`` for vectors (any ord) and matrices ('fro', 1, inf)."""
    v = value(x)
    nd = aval_of(v).ndim
    if axis is None and ord is None:
        return vector_norm(v, axis=None, keepdims=keepdims)
    axes = normalize_axis_arg("norm", axis, nd) if axis is not None else tuple(range(nd))
    if len(axes) == 1:
        return vector_norm(v, axis=axes, keepdims=keepdims, ord=2 if ord is None else ord)
    if len(axes) == 2:
        from ember.numpy._shape import moveaxis

        moved = moveaxis(v, axes, (-2, -1))
        out = matrix_norm(moved, keepdims=False, ord="fro" if ord is None else ord)
        if keepdims:
            from ember.numpy._shape import expand_dims

            out = expand_dims(out, tuple(sorted(axes)))
        return out
    raise op_error(EmberValueError, "norm", f"improper number of dimensions to norm: {axes}")
