"""Conversion, type promotion and broadcasting: the NumPy semantics every function shares.

``asarray`` turns anything array-like into an Ember value; ``promote_args`` applies NumPy 2
promotion (Python scalars are weak) and broadcasting, returning operands ready for a primitive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ember import dtypes
from ember.backends import default_backend
from ember.core.array import Array, Tracer
from ember.core.trace import aval_of, innermost_dynamic, shared_array, to_array
from ember.errors import DTypeError, EmberValueError, ShapeError, op_error
from ember.ir.types import type_of
from ember.ops import elementwise as ew
from ember.ops import structural as st
from ember.ops._checks import normalize_axes

ArrayLike = Any


def is_python_scalar(x: Any) -> bool:
    return dtypes.is_python_scalar(x)


def asarray(a: ArrayLike, dtype: Any = None, device: Any = None, copy: bool | None = None
            ) -> Array:
    """Convert to an Ember array (the array API's ``asarray``).

    Ember arrays are values, so no later write anywhere may change the result:

    - ``copy=None`` (default): an Ember array is returned as it is (nothing can change it);
      host memory that others can write (a NumPy array, a buffer, a torch tensor) is copied.
    - ``copy=True``: always a new array.
    - ``copy=False``: never a copy. NumPy memory is shared read-only: Ember never writes into it,
      and you must not either. ``ValueError`` when a copy cannot be avoided.
    """
    check_device("asarray", device)
    target = None if dtype is None else dtypes.canonicalize(dtype)
    if isinstance(a, Array):
        if target is not None and target != aval_of(a).dtype:
            if copy is False:
                raise _copy_needed(f"converting {aval_of(a).dtype} to {target}")
            return ew.convert(a, target)
        return st.copy(a) if copy else a
    if isinstance(a, (list, tuple)) and _contains_tracer(a):
        out = _stack_nested(a)
        return out if target is None else ew.convert(out, target)
    host = _host_array(a)
    shared = host is a or host.base is not None  # memory that someone else holds
    canonical = type_of(host).dtype == host.dtype
    if copy is False:
        if not shared or not canonical or target not in (None, host.dtype):
            raise _copy_needed(f"converting {type(a).__name__} of {host.dtype} to an ember "
                               f"{target or type_of(host).dtype} array")
        return shared_array(host)
    if target is not None and target != host.dtype:
        # The conversion writes a new buffer anyway: read the source in place.
        src = shared_array(host) if shared and canonical else to_array(host)
        return ew.convert(src, target)
    out = to_array(host)  # copies memory that someone else holds
    if out.aval.weak:  # a Python scalar given to asarray is an ordinary (strong) array
        out = Array(out._buffer, out.aval.strong(), out._backend)
    return out


def _host_array(a: Any) -> np.ndarray:
    try:
        host = np.asarray(a)
    except (ValueError, TypeError) as e:
        raise op_error(DTypeError, "asarray", f"cannot convert {type(a).__name__}: {e}") from None
    if host.dtype == object:
        raise op_error(DTypeError, "asarray", f"cannot convert {type(a).__name__} to an "
                       "array (ragged nesting or non-numeric values?)")
    if host.dtype.kind == "U" or host.dtype.kind == "S":
        raise op_error(DTypeError, "asarray", "strings are not supported")
    if host.dtype not in dtypes.SUPPORTED:
        raise op_error(DTypeError, "asarray", f"dtype {host.dtype} is not supported")
    return host


def _copy_needed(what: str) -> EmberValueError:
    return op_error(EmberValueError, "asarray", f"{what} needs a copy, but copy=False was given")


def refuse_complex(name: str, dt: np.dtype) -> None:
    """Functions that need an order (or have no complex definition) name themselves."""
    if dtypes.is_complex(dt):
        raise op_error(DTypeError, name, f"is not defined on complex numbers, got {dt} (apply "
                       "it to real(x), imag(x) or abs(x))")


def check_device(op: str, device: Any) -> None:
    """Accept ``None`` (the default device) or one of the default backend's devices, as the
    object, its name (``"cpu:0"``) or its platform (``"cpu"``, as PyTorch users write it)."""
    if device is None:
        return
    known = default_backend().devices
    if device in known or any(str(device) in (str(d), d.platform) for d in known):
        return
    raise op_error(EmberValueError, op, f"unsupported device {device!r}; ember arrays live on "
                   f"{', '.join(str(d) for d in known)}")


def _contains_tracer(seq: Any) -> bool:
    if isinstance(seq, Tracer):
        return True
    if isinstance(seq, (list, tuple)):
        return any(_contains_tracer(s) for s in seq)
    return False


def _stack_nested(seq: Any) -> Any:
    if not isinstance(seq, (list, tuple)):
        return seq if isinstance(seq, Array) else asarray(seq)
    items = [_stack_nested(s) for s in seq]
    items = promote_args("array", *items)
    return st.concatenate([st.expand_dims(i, 0) for i in items], 0)


def value(x: Any) -> Any:
    """An Ember value for an operand (Python scalars become weakly typed arrays)."""
    if isinstance(x, Array):
        return x
    return to_array(x) if is_python_scalar(x) else asarray(x)


def result_dtype(*args: Any) -> np.dtype:
    return dtypes.result_type(*[a if is_python_scalar(a) or hasattr(a, "aval") else value(a)
                                for a in args])


def broadcast_shapes(op: str, *shapes: Sequence[int]) -> tuple[int, ...]:
    if all(s == shapes[0] for s in shapes[1:]):
        return tuple(shapes[0])
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise op_error(ShapeError, op, "operands could not be broadcast together with shapes "
                       + " ".join(str(tuple(s)) for s in shapes)) from None


def promote_args(op: str, *args: Any, dtype: np.dtype | None = None) -> list[Any]:
    """Cast to the common dtype (or ``dtype``) and broadcast to the common shape."""
    if dtype is None:
        if len(args) == 2 and (type(args[1]) in _PYTHON_SCALAR_TYPES
                               or type(args[0]) in _PYTHON_SCALAR_TYPES):
            fast = _array_and_scalar(op, *args)
            if fast is not None:
                return fast
        elif _already_agree(args):
            return list(args)
    target = dtype if dtype is not None else result_dtype(*args)
    all_weak = all(is_python_scalar(a) or (hasattr(a, "aval") and a.aval.weak) for a in args)
    vals = []
    for a in args:
        if is_python_scalar(a):
            vals.append(_scalar_array(op, a, target, all_weak))
        else:
            v = value(a)
            vals.append(ew.convert(v, target, weak=all_weak and v.aval.weak))
    shape = broadcast_shapes(op, *[aval_of(v).shape for v in vals])
    return [st.broadcast_to_shape(v, shape) for v in vals]


def _scalar_array(op: str, x: Any, dtype: np.dtype, weak: bool) -> Array:
    """A rank-0 array of the Python scalar ``x`` in ``dtype`` (errors name ``op``)."""
    try:
        host = np.asarray(x, dtype=dtype)
    except OverflowError as e:
        raise op_error(DTypeError, op, f"Python integer {x} out of bounds for {dtype}") from e
    except TypeError as e:  # a Python complex where a real dtype is required
        raise op_error(DTypeError, op, f"cannot cast Python complex {x} to {dtype}: take its "
                       "real or imaginary part") from e
    arr = to_array(host)
    return Array(host, arr.aval.update(weak=True)) if weak else arr


def _already_agree(args: Sequence[Any]) -> bool:
    """The common case: Ember arrays of one type; nothing to promote or broadcast."""
    first = args[0]
    if not isinstance(first, Array):
        return False
    aval = first.aval
    for a in args[1:]:
        if not isinstance(a, Array) or a.aval != aval:
            return False
    return True


# --- ``a * 2.0``: an array and a Python scalar ------------------------------------------------
#
# The scalar must become an array of the other operand's shape before an elementwise primitive
# takes it: a conversion and a broadcast primitive on every call. Outside jit that broadcast runs
# eagerly on a constant, so its result (a read-only broadcast view of one element) is kept per
# (scalar, operand type) and reused; under jit the broadcast is staged as before. Each call
# gets a fresh Array around the kept buffer, so rebinding (``x[i] = v``) or donating what a
# caller received cannot reach the cache.

_PYTHON_SCALAR_TYPES = frozenset({bool, int, float, complex})
_SCALAR_ARRAYS: dict[tuple, tuple] = {}  # scalar and operand type -> (buffer, aval, backend)
_SCALAR_ARRAYS_SIZE = 256


def _array_and_scalar(op: str, x: Any, y: Any) -> list[Any] | None:
    """Promote ``(array, scalar)`` or ``(scalar, array)`` outside jit when the array's dtype
    wins (the common case); None leaves it to the general path."""
    if type(y) in _PYTHON_SCALAR_TYPES and isinstance(x, Array):
        arr, scalar = x, y
    elif type(x) in _PYTHON_SCALAR_TYPES and isinstance(y, Array):
        arr, scalar = y, x
    else:
        return None
    if innermost_dynamic().level != 0:
        return None
    aval = arr.aval
    # 0.0 and -0.0 (and 0 and False) are equal but make different arrays: zeros key by repr.
    # (The constant never carries the operand's sharding, so the key leaves it out.)
    key = (type(scalar), scalar if scalar else repr(scalar), aval.dtype, aval.shape, aval.weak)
    kept = _SCALAR_ARRAYS.get(key)
    if kept is None:
        target = dtypes.promote((aval.dtype, aval.weak), (dtypes.scalar_dtype(scalar), True))
        if target != aval.dtype:
            return None
        const = st.broadcast_to_shape(_scalar_array(op, scalar, target, aval.weak), aval.shape)
        kept = (const._buffer, const._aval, const._backend)
        if scalar == scalar:  # NaN never equals itself: keeping it would only fill the cache
            if len(_SCALAR_ARRAYS) >= _SCALAR_ARRAYS_SIZE:
                _SCALAR_ARRAYS.clear()
            _SCALAR_ARRAYS[key] = kept
    const = Array(*kept)
    return [arr, const] if arr is x else [const, arr]


def float_dtype(dt: np.dtype) -> np.dtype:
    """The dtype NumPy computes float functions of ``dt`` in (int8 -> float16, int32 -> f64)."""
    if dtypes.is_float(dt):
        return dt
    return dtypes.promote((dt, False), (dtypes.float16, False))


def normalize_axis_arg(op: str, axis: Any, ndim: int) -> tuple[int, ...]:
    """``None`` -> every axis; int or tuple -> non-negative tuple (errors name ``op``)."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (list, tuple)):
        return normalize_axes(op, [int(a) for a in axis], ndim)
    return normalize_axes(op, [int(axis)], ndim)
