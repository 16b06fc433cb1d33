"""Reductions with NumPy's names, ``axis``/``keepdims``/``dtype`` arguments and dtypes."""

from __future__ import annotations

from typing import Any

import numpy as np

from ember import dtypes
from ember.core.trace import aval_of, to_array
from ember.errors import ShapeError, op_error
from ember.numpy._core import float_dtype, normalize_axis_arg, refuse_complex, value
from ember.ops import elementwise as ew
from ember.ops import reduce as rd
from ember.ops import structural as st

__all__ = ["sum", "prod", "mean", "var", "std", "max", "min", "amax", "amin", "argmax",
           "argmin", "all", "any", "logsumexp", "cumsum", "cumprod", "cumulative_sum",
           "cumulative_prod", "ptp", "average", "count_nonzero", "nansum", "nanmax", "nanmin",
           "nanmean", "median"]


def _keep(x: Any, out: Any, axes: tuple[int, ...], keepdims: bool) -> Any:
    if not keepdims:
        return out
    shape = tuple(1 if i in axes else n for i, n in enumerate(aval_of(x).shape))
    return st.reshape(out, shape)


def _sum_dtype(dt: np.dtype) -> np.dtype:
    """NumPy sums small integers and bools in the platform integer."""
    if dt == dtypes.bool_ or (dtypes.is_int(dt) and dt.itemsize < 8):
        return dtypes.uint64 if dtypes.is_unsigned(dt) else dtypes.int64
    return dt


def sum(a: Any, axis: Any = None, dtype: Any = None, keepdims: bool = False,  # noqa: A001
        initial: Any = None, where: Any = None) -> Any:
    x = value(a)
    axes = normalize_axis_arg("sum", axis, aval_of(x).ndim)
    dt = dtypes.canonicalize(dtype) if dtype is not None else _sum_dtype(aval_of(x).dtype)
    x = ew.convert(x, dt, weak=aval_of(x).weak)
    if where is not None:
        from ember.numpy._math import where as where_

        x = where_(where, x, ew.zeros_like(x))
    out = rd.reduce_sum(x, axes)
    if initial is not None:
        out = ew.add(out, ew.full_like(out, initial))
    return _keep(x, out, axes, keepdims)


def prod(a: Any, axis: Any = None, dtype: Any = None, keepdims: bool = False,
         initial: Any = None) -> Any:
    x = value(a)
    axes = normalize_axis_arg("prod", axis, aval_of(x).ndim)
    dt = dtypes.canonicalize(dtype) if dtype is not None else _sum_dtype(aval_of(x).dtype)
    x = ew.convert(x, dt, weak=aval_of(x).weak)
    out = rd.reduce_prod(x, axes)
    if initial is not None:
        out = ew.mul(out, ew.full_like(out, initial))
    return _keep(x, out, axes, keepdims)


def _count(x: Any, axes: tuple[int, ...]) -> int:
    shape = aval_of(x).shape
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def mean(a: Any, axis: Any = None, dtype: Any = None, keepdims: bool = False) -> Any:
    x = value(a)
    axes = normalize_axis_arg("mean", axis, aval_of(x).ndim)
    dt = dtypes.canonicalize(dtype) if dtype is not None else aval_of(x).dtype
    if not dtypes.is_inexact(dt):
        dt = dtypes.default_float
    # Half precision accumulates in float32, as NumPy does.
    acc = dtypes.float32 if dt in (dtypes.float16, dtypes.bfloat16) else dt
    xs = ew.convert(x, acc, weak=aval_of(x).weak)
    total = rd.reduce_sum(xs, axes)
    out = ew.div(total, ew.full_like(total, _count(x, axes)))
    return _keep(x, ew.convert(out, dt, weak=aval_of(out).weak), axes, keepdims)


def var(a: Any, axis: Any = None, dtype: Any = None, ddof: int = 0, keepdims: bool = False,
        correction: float | None = None) -> Any:
    x = value(a)
    if correction is not None:
        ddof = correction
    axes = normalize_axis_arg("var", axis, aval_of(x).ndim)
    m = mean(x, axes, dtype, keepdims=True)
    xs = ew.convert(x, aval_of(m).dtype)
    d = ew.sub(xs, st.broadcast_to_shape(m, aval_of(xs).shape))
    # |d|^2: the variance of complex numbers is real (float32 for complex64).
    sq = rd.reduce_sum(ew.real(ew.mul(d, ew.conj(d))) if dtypes.is_complex(aval_of(d).dtype)
                       else ew.mul(d, d), axes)
    n = _count(x, axes) - ddof
    out = ew.div(sq, ew.full_like(sq, n))
    return _keep(x, out, axes, keepdims)


def std(a: Any, axis: Any = None, dtype: Any = None, ddof: int = 0, keepdims: bool = False,
        correction: float | None = None) -> Any:
    return ew.sqrt(var(a, axis, dtype, ddof, keepdims, correction))


def _extremum(name: str, op):
    def fn(a: Any, axis: Any = None, keepdims: bool = False, initial: Any = None,
           where: Any = None) -> Any:
        x = value(a)
        refuse_complex(name, aval_of(x).dtype)
        axes = normalize_axis_arg(name, axis, aval_of(x).ndim)
        if where is not None:
            from ember.numpy._math import where as where_

            if initial is None:
                raise op_error(ShapeError, name, "where= needs initial=")
            x = where_(where, x, ew.full_like(x, initial))
        if _count(x, axes) == 0:
            if initial is None:
                raise op_error(ShapeError, name, f"zero-size array of shape {aval_of(x).shape} "
                               "has no identity: pass initial=")
            shape = tuple(n for i, n in enumerate(aval_of(x).shape) if i not in axes)
            fill = value(np.asarray(initial, aval_of(x).dtype))
            out = st.broadcast_in_dim(fill, shape, ())
        else:
            out = op(x, axes)
            if initial is not None:
                pick = ew.max if name == "max" else ew.min
                out = pick(out, ew.full_like(out, initial))
        return _keep(x, out, axes, keepdims)

    fn.__name__ = fn.__qualname__ = name
    return fn


max = amax = _extremum("max", rd.reduce_max)  # noqa: A001
min = amin = _extremum("min", rd.reduce_min)  # noqa: A001


def ptp(a: Any, axis: Any = None, keepdims: bool = False) -> Any:
    return ew.sub(max(a, axis, keepdims), min(a, axis, keepdims))


def _arg(name: str, op):
    def fn(a: Any, axis: int | None = None, keepdims: bool = False) -> Any:
        x = value(a)
        if axis is None:
            x = st.reshape(x, (aval_of(x).size,))
            out = op(x, 0)
            return st.reshape(out, (1,) * aval_of(value(a)).ndim) if keepdims else out
        ax = normalize_axis_arg(name, axis, aval_of(x).ndim)[0]
        return _keep(x, op(x, ax), (ax,), keepdims)

    fn.__name__ = fn.__qualname__ = name
    return fn


argmax = _arg("argmax", rd.argmax)
argmin = _arg("argmin", rd.argmin)


def _truth(x: Any) -> Any:
    return x if aval_of(x).dtype == dtypes.bool_ else ew.ne(x, ew.zeros_like(x))


def _logical(name: str, op, identity: bool):
    """all/any: min/max over truth values; an empty reduction gives the identity."""
    def fn(a: Any, axis: Any = None, keepdims: bool = False) -> Any:
        x = _truth(value(a))
        axes = normalize_axis_arg(name, axis, aval_of(x).ndim)
        if aval_of(x).size == 0:
            shape = tuple(n for i, n in enumerate(aval_of(x).shape) if i not in axes)
            out = st.broadcast_in_dim(value(np.bool_(identity)), shape, ())
        else:
            out = op(x, axes)
        return _keep(x, out, axes, keepdims)

    fn.__name__ = fn.__qualname__ = name
    return fn


all = _logical("all", rd.reduce_min, True)  # noqa: A001
any = _logical("any", rd.reduce_max, False)  # noqa: A001


def count_nonzero(a: Any, axis: Any = None, keepdims: bool = False) -> Any:
    return sum(_truth(value(a)), axis, dtype=dtypes.int64, keepdims=keepdims)


def logsumexp(a: Any, axis: Any = None, keepdims: bool = False, b: Any = None) -> Any:
    """``log(sum(exp(a)))`` computed stably (as ``scipy.special.logsumexp``)."""
    from ember.numpy._math import where as where_
    x = value(a)
    x = ew.convert(x, float_dtype(aval_of(x).dtype))
    axes = normalize_axis_arg("logsumexp", axis, aval_of(x).ndim)
    # The shift cancels: cut the gradient before the max, so no tie mask is ever built.
    m = rd.reduce_max(ew.stop_gradient(x), axes)
    m = where_(ew.is_finite(m), m, ew.zeros_like(m))
    shifted = ew.exp(ew.sub(x, st.broadcast_in_dim(
        m, aval_of(x).shape, [i for i in range(aval_of(x).ndim) if i not in axes])))
    if b is not None:
        from ember.numpy._core import promote_args

        shifted, bb = promote_args("logsumexp", shifted, b)
        shifted = ew.mul(shifted, bb)
    out = ew.add(ew.log(rd.reduce_sum(shifted, axes)), m)
    return _keep(x, out, axes, keepdims)


def _scan(name: str, op, identity: int, x: Any, axis: int, dtype: Any,
          include_initial: bool) -> Any:
    """``op`` (an inclusive scan) along ``axis``; ``include_initial`` scans the input with the
    identity prepended, which yields the exclusive prefix too."""
    dt = dtypes.canonicalize(dtype) if dtype is not None else _sum_dtype(aval_of(x).dtype)
    x = ew.convert(x, dt)
    nd = aval_of(x).ndim
    ax = normalize_axis_arg(name, axis, nd)[0]
    if include_initial:
        lo = [0] * nd
        lo[ax] = 1
        x = st.pad(x, to_array(np.asarray(identity, dt)), lo, [0] * nd)
    return op(x, ax)


def _numpy_scan(name: str, op, identity: int):
    """NumPy's ``cumsum``/``cumprod``: ``axis=None`` scans the flattened array."""
    def fn(a: Any, axis: int | None = None, dtype: Any = None) -> Any:
        x = value(a)
        if axis is None:
            x, axis = st.reshape(x, (aval_of(x).size,)), 0
        return _scan(name, op, identity, x, axis, dtype, False)

    fn.__name__ = fn.__qualname__ = name
    return fn


def _api_scan(name: str, op, identity: int):
    """The array API's ``cumulative_sum``/``cumulative_prod``: ``axis`` may be omitted only
    for 1-d input (0-d input counts as 1-d, as in NumPy), and ``include_initial=True``
    prepends the identity."""
    def fn(x: Any, /, *, axis: int | None = None, dtype: Any = None,
           include_initial: bool = False) -> Any:
        x = value(x)
        if aval_of(x).ndim == 0:
            x = st.reshape(x, (1,))
        if axis is None:
            if aval_of(x).ndim > 1:
                raise op_error(ShapeError, name, f"axis is required for an array of shape "
                               f"{aval_of(x).shape} (more than one dimension)")
            axis = 0
        return _scan(name, op, identity, x, axis, dtype, include_initial)

    fn.__name__ = fn.__qualname__ = name
    return fn


cumsum = _numpy_scan("cumsum", rd.cumsum, 0)
cumprod = _numpy_scan("cumprod", rd.cumprod, 1)
cumulative_sum = _api_scan("cumulative_sum", rd.cumsum, 0)
cumulative_prod = _api_scan("cumulative_prod", rd.cumprod, 1)


def average(a: Any, axis: Any = None, weights: Any = None, keepdims: bool = False) -> Any:
    if weights is None:
        return mean(a, axis, keepdims=keepdims)
    from ember.numpy._math import multiply

    x = value(a)
    w = value(weights)
    if aval_of(w).shape != aval_of(x).shape:
        if axis is None or aval_of(w).ndim != 1:
            raise op_error(ShapeError, "average", f"weights of shape {aval_of(w).shape} do not "
                           f"match {aval_of(x).shape}")
        ax = normalize_axis_arg("average", axis, aval_of(x).ndim)[0]
        w = st.broadcast_in_dim(w, aval_of(x).shape, (ax,))
    num = sum(multiply(x, w), axis, keepdims=keepdims)
    den = sum(w, axis, keepdims=keepdims)
    from ember.numpy._math import divide

    return divide(num, den)


def _nan_version(name: str, base, fill):
    def fn(a: Any, axis: Any = None, keepdims: bool = False) -> Any:
        from ember.numpy._math import isnan, where

        x = value(a)
        if not dtypes.is_inexact(aval_of(x).dtype):
            return base(x, axis, keepdims=keepdims)
        return base(where(isnan(x), ew.full_like(x, fill), x), axis, keepdims=keepdims)

    fn.__name__ = fn.__qualname__ = name
    return fn


nansum = _nan_version("nansum", sum, 0)
nanmax = _nan_version("nanmax", max, -np.inf)
nanmin = _nan_version("nanmin", min, np.inf)


def nanmean(a: Any, axis: Any = None, keepdims: bool = False) -> Any:
    from ember.numpy._math import divide, isnan, logical_not

    x = value(a)
    return divide(nansum(x, axis, keepdims), sum(logical_not(isnan(x)), axis, keepdims=keepdims))


def median(a: Any, axis: Any = None, keepdims: bool = False) -> Any:
    from ember.ops.sort import sort

    x = value(a)
    if axis is None:
        x = st.reshape(x, (aval_of(x).size,))
        ax = 0
    else:
        ax = normalize_axis_arg("median", axis, aval_of(x).ndim)[0]
    n = aval_of(x).shape[ax]
    if n == 0:
        raise op_error(ShapeError, "median", "median of an empty axis")
    s = ew.convert(sort(x, ax), float_dtype(aval_of(x).dtype))
    lo = st.index_in_dim(s, (n - 1) // 2, ax)
    hi = st.index_in_dim(s, n // 2, ax)
    out = ew.div(ew.add(lo, hi), ew.full_like(lo, 2))
    if keepdims:
        shape = list(aval_of(value(a)).shape) if axis is not None else \
            [1] * aval_of(value(a)).ndim
        if axis is not None:
            shape[ax] = 1
        out = st.reshape(out, shape)
    return out


