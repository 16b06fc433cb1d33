"""Sorting primitives: ``sort``, ``argsort`` and ``top_k`` along one axis."""

from __future__ import annotations

from typing import Any

import numpy as np

from ember import dtypes
from ember.core.primitive import Primitive
from ember.core.trace import Zero, aval_of
from ember.errors import ShapeError, op_error
from ember.ir.types import ArrayType
from ember.ops import structural as st
from ember.ops._checks import normalize_axis

__all__ = ["sort", "argsort", "top_k"]


def _argsort_numpy(x, axis, descending):
    if descending:
        # Stable descending order: sort the reversed array ascending and map positions back,
        # so equal elements keep their original order (as numpy's stable sort would).
        n = x.shape[axis]
        rev = np.flip(x, axis)
        order = np.argsort(rev, axis=axis, kind="stable")
        order = np.flip(order, axis)
        return (n - 1 - order)
    return np.argsort(x, axis=axis, kind="stable")


sort_p = Primitive("sort", kind="sort")
argsort_p = Primitive("argsort", kind="sort")


@sort_p.def_abstract_eval
def _sort_rule(x: ArrayType, *, axis: int, descending: bool) -> ArrayType:
    normalize_axis("sort", axis, x.ndim)
    return x


@argsort_p.def_abstract_eval
def _argsort_rule(x: ArrayType, *, axis: int, descending: bool, index_dtype: np.dtype
                  ) -> ArrayType:
    normalize_axis("argsort", axis, x.ndim)
    return ArrayType(x.shape, index_dtype)


sort_p.def_impl(lambda x, *, axis, descending: np.take_along_axis(
    x, _argsort_numpy(x, axis, descending), axis))
argsort_p.def_impl(lambda x, *, axis, descending, index_dtype: _argsort_numpy(
    x, axis, descending))


def sort(x: Any, axis: int = -1, descending: bool = False) -> Any:
    axis = normalize_axis("sort", int(axis), aval_of(x).ndim)
    return sort_p.bind(x, axis=axis, descending=bool(descending))


def argsort(x: Any, axis: int = -1, descending: bool = False,
            index_dtype: Any = dtypes.int64) -> Any:
    axis = normalize_axis("argsort", int(axis), aval_of(x).ndim)
    return argsort_p.bind(x, axis=axis, descending=bool(descending),
                          index_dtype=dtypes.canonicalize(index_dtype))


@sort_p.def_jvp
def _sort_jvp(primals, tangents, *, axis, descending):
    (x,), (t,) = primals, tangents
    out = sort(x, axis, descending)
    if isinstance(t, Zero):
        return out, Zero(out.aval)
    from ember.ops.indexing import take_along_axis

    return out, take_along_axis(t, argsort(x, axis, descending), axis)


argsort_p.def_jvp(lambda primals, tangents, **p: (lambda y: (y, Zero(y.aval)))(
    argsort_p.bind(*primals, **p)))


def _axis_batch(prim):
    def rule(args, dims, *, axis, **params):
        x = st.moveaxis(args[0], dims[0], 0)
        return prim.bind(x, axis=axis + 1, **params), 0
    return rule


sort_p.def_batch(_axis_batch(sort_p))
argsort_p.def_batch(_axis_batch(argsort_p))

top_k_p = Primitive("top_k", kind="sort", multiple_results=True)


@top_k_p.def_abstract_eval
def _top_k_rule(x: ArrayType, *, k: int) -> list[ArrayType]:
    if x.ndim == 0 or not 0 <= k <= x.shape[-1]:
        raise op_error(ShapeError, "top_k", f"k={k} must be between 0 and the last dimension "
                       f"of shape {x.shape}")
    shape = (*x.shape[:-1], k)
    return [ArrayType(shape, x.dtype, weak=x.weak), ArrayType(shape, dtypes.int64)]


def _top_k_impl(x, *, k):
    order = _argsort_numpy(x, -1, True)[..., :k]
    return [np.take_along_axis(x, order, -1), order]


top_k_p.def_impl(_top_k_impl)


def top_k(x: Any, k: int) -> tuple[Any, Any]:
    """The ``k`` largest entries along the last axis (values, indices), largest first."""
    values, indices = top_k_p.bind(x, k=int(k))
    return values, indices


@top_k_p.def_jvp
def _top_k_jvp(primals, tangents, *, k):
    (x,), (t,) = primals, tangents
    values, indices = top_k_p.bind(x, k=k)
    if isinstance(t, Zero):
        return [values, indices], [Zero(values.aval), Zero(indices.aval)]
    from ember.ops.indexing import take_along_axis

    return [values, indices], [take_along_axis(t, indices, aval_of(x).ndim - 1) if k else
                               Zero(values.aval), Zero(indices.aval)]


@top_k_p.def_batch
def _top_k_batch(args, dims, *, k):
    x = st.moveaxis(args[0], dims[0], 0)
    return top_k_p.bind(x, k=k), [0, 0]
