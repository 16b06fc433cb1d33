"""Array creation: array/asarray, zeros/ones/full/empty(_like), arange, linspace, eye, tri,
tril/triu, meshgrid, identity, diag."""

from __future__ import annotations

from typing import Any

import numpy as np

from ember import dtypes
from ember.core.trace import aval_of, to_array
from ember.errors import EmberValueError, op_error
from ember.numpy._core import asarray, check_device, is_python_scalar, value
from ember.ops import elementwise as ew
from ember.ops import structural as st

__all__ = ["array", "asarray", "zeros", "ones", "full", "empty", "zeros_like", "ones_like",
           "full_like", "empty_like", "arange", "linspace", "logspace", "eye", "identity", "tri",
           "tril", "triu", "meshgrid", "diag", "copy", "ascontiguousarray", "from_dlpack",
           "frombuffer"]


def array(obj: Any, dtype: Any = None, copy: bool | None = True, ndmin: int = 0) -> Any:
    """A new array from ``obj`` (NumPy's ``np.array``); ``copy`` as in :func:`asarray`."""
    out = asarray(obj, dtype=dtype, copy=copy)
    nd = aval_of(out).ndim
    if ndmin > nd:
        out = st.reshape(out, (1,) * (ndmin - nd) + aval_of(out).shape)
    return out


def _shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise op_error(EmberValueError, "zeros/ones/full", f"negative dimensions are not "
                       f"allowed: {shape}")
    return shape


def full(shape: Any, fill_value: Any, dtype: Any = None, *, device: Any = None) -> Any:
    """An array of ``shape`` filled with ``fill_value`` (dtype from the value, as NumPy)."""
    check_device("full", device)
    shape = _shape(shape)
    if dtype is None:
        fill = value(fill_value)
        fill = to_array(np.asarray(fill.to_numpy())) if is_python_scalar(fill_value) else fill
        dt = aval_of(fill).dtype
    else:
        dt = dtypes.canonicalize(dtype)
        fill = value(fill_value)
    fill = ew.convert(fill, dt, weak=False)
    if aval_of(fill).shape:
        return st.broadcast_to_shape(fill, shape)
    return st.broadcast_in_dim(fill, shape, ())


def zeros(shape: Any, dtype: Any = None, *, device: Any = None) -> Any:
    check_device("zeros", device)
    return full(shape, 0, dtypes.canonicalize(dtype) if dtype is not None else dtypes.float64)


def ones(shape: Any, dtype: Any = None, *, device: Any = None) -> Any:
    check_device("ones", device)
    return full(shape, 1, dtypes.canonicalize(dtype) if dtype is not None else dtypes.float64)


def empty(shape: Any, dtype: Any = None, *, device: Any = None) -> Any:
    """Like ``zeros``: Ember never exposes uninitialised memory."""
    check_device("empty", device)
    return zeros(shape, dtype)


def _like(a: Any, dtype: Any, shape: Any) -> tuple[tuple[int, ...], np.dtype]:
    aval = aval_of(value(a))
    return (aval.shape if shape is None else _shape(shape),
            aval.dtype if dtype is None else dtypes.canonicalize(dtype))


def full_like(a: Any, fill_value: Any, dtype: Any = None, shape: Any = None, *,
              device: Any = None) -> Any:
    check_device("full_like", device)
    s, dt = _like(a, dtype, shape)
    return full(s, fill_value, dt)


def zeros_like(a: Any, dtype: Any = None, shape: Any = None, *, device: Any = None) -> Any:
    check_device("zeros_like", device)
    return full_like(a, 0, dtype, shape)


def ones_like(a: Any, dtype: Any = None, shape: Any = None, *, device: Any = None) -> Any:
    check_device("ones_like", device)
    return full_like(a, 1, dtype, shape)


def empty_like(a: Any, dtype: Any = None, shape: Any = None, *, device: Any = None) -> Any:
    check_device("empty_like", device)
    return zeros_like(a, dtype, shape)


def arange(start: Any, stop: Any = None, step: Any = None, dtype: Any = None, *,
           device: Any = None) -> Any:
    """Evenly spaced values in ``[start, stop)``; bounds must be concrete (as in JAX)."""
    check_device("arange", device)
    bounds = [_concrete(v) for v in (start, stop, step) if v is not None]
    if step is not None and stop is None:
        bounds = [0, bounds[0], bounds[1]]
    host = np.arange(*bounds)
    if dtype is not None:
        host = host.astype(dtypes.canonicalize(dtype))
    return asarray(host)


def _concrete(v: Any) -> Any:
    if hasattr(v, "aval"):
        return v.item()  # raises a clear error for traced values
    return v


def linspace(start: Any, stop: Any, num: int = 50, endpoint: bool = True, retstep: bool = False,
             dtype: Any = None, axis: int = 0, *, device: Any = None) -> Any:
    """``num`` evenly spaced samples from ``start`` to ``stop``; bounds may be traced."""
    check_device("linspace", device)
    if num < 0:
        raise op_error(EmberValueError, "linspace", f"number of samples, {num}, must be "
                       "non-negative")
    from ember.numpy._math import add, multiply, subtract

    a, b = value(start), value(stop)
    dt = dtypes.canonicalize(dtype) if dtype is not None else dtypes.result_type(a, b, 1.0)
    calc = dtypes.float64 if dtypes.is_int(dt) or dt in (dtypes.float16, dtypes.bfloat16) \
        else dt
    div = (num - 1) if endpoint else num
    a, b = ew.convert(a, calc), ew.convert(b, calc)
    steps = st.iota(calc, (num,), 0)
    span = subtract(b, a)
    step = span / div if div > 0 else span * np.nan
    out = add(a, multiply(steps, step)) if div > 0 else add(a, multiply(steps, span))
    if endpoint and num > 1:  # hit ``stop`` exactly, as NumPy does
        out = ew.select(ew.eq(st.iota(dtypes.int64, (num,), 0),
                              ew.full_like(st.iota(dtypes.int64, (num,), 0), num - 1)),
                        st.broadcast_in_dim(b, (num,), ()), out)
    out = ew.convert(out, dt) if not dtypes.is_int(dt) else ew.convert(ew.floor(out), dt)
    if axis != 0:
        out = st.moveaxis(out, 0, axis)
    return (out, step) if retstep else out


def logspace(start: Any, stop: Any, num: int = 50, endpoint: bool = True, base: float = 10.0,
             dtype: Any = None) -> Any:
    from ember.numpy._math import power

    out = power(base, linspace(start, stop, num, endpoint))
    return out if dtype is None else ew.convert(out, dtypes.canonicalize(dtype))


def eye(N: int, M: int | None = None, k: int = 0, dtype: Any = None, *,  # noqa: N803
        device: Any = None) -> Any:
    check_device("eye", device)
    cols_n = N if M is None else M
    rows = st.iota(dtypes.int64, (N, cols_n), 0)
    cols = st.iota(dtypes.int64, (N, cols_n), 1)
    mask = ew.eq(ew.add(rows, ew.full_like(rows, _offset(k, N, cols_n))), cols)
    return ew.convert(mask, dtypes.canonicalize(dtype) if dtype is not None else dtypes.float64)


def _offset(k: int, n_rows: int, n_cols: int) -> int:
    """A diagonal offset clipped to ``[-n_rows, n_cols]``: any farther diagonal lies outside
    the matrix just the same, and a huge ``k`` would overflow int64 arithmetic."""
    return max(-n_rows, min(int(k), n_cols))


def identity(n: int, dtype: Any = None) -> Any:
    return eye(n, dtype=dtype)


def tri(N: int, M: int | None = None, k: int = 0, dtype: Any = None) -> Any:  # noqa: N803
    cols_n = N if M is None else M
    rows = st.iota(dtypes.int64, (N, cols_n), 0)
    cols = st.iota(dtypes.int64, (N, cols_n), 1)
    mask = ew.le(cols, ew.add(rows, ew.full_like(rows, _offset(k, N, cols_n))))
    return ew.convert(mask, dtypes.canonicalize(dtype) if dtype is not None else dtypes.float64)


def _triangle(m: Any, k: int, lower: bool) -> Any:
    x = value(m)
    shape = aval_of(x).shape
    if len(shape) < 2:
        raise op_error(EmberValueError, "tril/triu", f"input must be at least 2-d, got {shape}")
    keep = tri(shape[-2], shape[-1], k if lower else k - 1, dtype=dtypes.bool_)
    if not lower:
        keep = ew.not_(keep)
    keep = st.broadcast_to_shape(keep, shape)
    return ew.select(keep, x, ew.zeros_like(x))


def tril(m: Any, k: int = 0) -> Any:
    return _triangle(m, k, True)


def triu(m: Any, k: int = 0) -> Any:
    return _triangle(m, k, False)


def meshgrid(*xi: Any, indexing: str = "xy", sparse: bool = False,
             copy: bool = True) -> list[Any]:
    if indexing not in ("xy", "ij"):
        raise op_error(EmberValueError, "meshgrid", "indexing must be 'xy' or 'ij'")
    arrays = [st.reshape(value(x), (aval_of(value(x)).size,)) for x in xi]
    n = len(arrays)
    sizes = [aval_of(a).shape[0] for a in arrays]
    if indexing == "xy" and n >= 2:
        sizes[0], sizes[1] = sizes[1], sizes[0]
    out = []
    for i, a in enumerate(arrays):
        axis = i
        if indexing == "xy" and n >= 2 and i < 2:
            axis = 1 - i
        if sparse:
            shape = [1] * n
            shape[axis] = aval_of(a).shape[0]
            out.append(st.reshape(a, shape))
        else:
            out.append(st.broadcast_in_dim(a, sizes, (axis,)))
    return out


def diag(v: Any, k: int = 0) -> Any:
    x = value(v)
    shape = aval_of(x).shape
    if len(shape) == 1:
        n = shape[0] + abs(k)
        rows = st.iota(dtypes.int64, (n, n), 0)
        cols = st.iota(dtypes.int64, (n, n), 1)
        on = ew.eq(ew.add(rows, ew.full_like(rows, k)), cols)
        # Row r holds v[r] (k >= 0) or column c holds v[c] (k < 0), padded to n entries.
        zero = to_array(np.zeros((), aval_of(x).dtype))
        padded = st.pad(x, zero, (0,), (abs(k),))
        src = st.broadcast_in_dim(padded, (n, n), (0,) if k >= 0 else (1,))
        return ew.select(on, src, ew.zeros_like(src))
    if len(shape) == 2:
        from ember.numpy._shape_more import diagonal

        return diagonal(x, k)
    raise op_error(EmberValueError, "diag", f"input must be 1-d or 2-d, got {shape}")


def copy(a: Any) -> Any:
    """A new array equal to ``a`` (``x[i] = v`` on it leaves ``a`` unchanged)."""
    return asarray(a, copy=True)


def ascontiguousarray(a: Any, dtype: Any = None) -> Any:
    return asarray(a, dtype)


def from_dlpack(x: Any, /, *, device: Any = None, copy: bool | None = None) -> Any:
    """Import an array from any DLPack producer (NumPy, PyTorch on CPU...).

    A copy by default, so that later writes by the producer cannot change the result;
    ``copy=False`` shares the producer's memory read-only, as :func:`asarray` does.
    """
    return asarray(np.from_dlpack(x), device=device, copy=copy)


def frombuffer(buffer: Any, dtype: Any = float, count: int = -1, offset: int = 0) -> Any:
    return asarray(np.frombuffer(buffer, dtype=dtypes.canonicalize(dtype), count=count,
                                 offset=offset))


