"""Ember's dtypes and NumPy 2 type promotion, with weakly typed Python scalars.

Dtypes are plain ``numpy.dtype`` objects, so an Ember dtype compares equal to NumPy's and an
array moves between the two without conversion. ``bfloat16`` comes from ``ml_dtypes``.

Promotion follows NumPy 2 (NEP 50): a Python ``bool``/``int``/``float``/``complex`` is *weak*:
it takes the dtype of the array it meets if that dtype is of the same kind or higher (kinds
ordered bool < integer < floating < complex: ``int8_array + 1 -> int8``,
``float16_array + 1.0 -> float16``), and only raises the kind otherwise
(``int8_array + 1.5 -> float64``, ``float32_array * 1j -> complex64``). Ember values carry a
``weak`` flag too, so a Python scalar passed through ``jit`` behaves exactly as it does eagerly.
"""

from __future__ import annotations

import functools
from typing import Any

import ml_dtypes
import numpy as np

bool_ = np.dtype(np.bool_)
int8 = np.dtype(np.int8)
int16 = np.dtype(np.int16)
int32 = np.dtype(np.int32)
int64 = np.dtype(np.int64)
uint8 = np.dtype(np.uint8)
uint16 = np.dtype(np.uint16)
uint32 = np.dtype(np.uint32)
uint64 = np.dtype(np.uint64)
float16 = np.dtype(np.float16)
bfloat16 = np.dtype(ml_dtypes.bfloat16)
float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)
complex64 = np.dtype(np.complex64)
complex128 = np.dtype(np.complex128)

SUPPORTED = (bool_, int8, int16, int32, int64, uint8, uint16, uint32, uint64,
             float16, bfloat16, float32, float64, complex64, complex128)
INTEGER = (int8, int16, int32, int64, uint8, uint16, uint32, uint64)
FLOATING = (float16, bfloat16, float32, float64)
COMPLEX = (complex64, complex128)
INEXACT = FLOATING + COMPLEX

default_int = int64
default_float = float64


_SUPPORTED_SET = frozenset(SUPPORTED)


def canonicalize(dtype: Any) -> np.dtype:
    """Turn anything NumPy accepts as a dtype (``"float32"``, ``np.float32``...) into a dtype."""
    if isinstance(dtype, np.dtype) and dtype in _SUPPORTED_SET:
        return dtype
    from ember.errors import DTypeError

    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise DTypeError(f"not a dtype: {dtype!r}") from e
    if dt not in SUPPORTED:
        raise DTypeError(f"dtype {dt} is not supported by ember; supported: "
                         f"{', '.join(str(d) for d in SUPPORTED)}")
    return dt


def is_float(dtype: np.dtype) -> bool:
    """Real floating (the array API's "real floating"); complex is not included."""
    return dtype in FLOATING


def is_complex(dtype: np.dtype) -> bool:
    return dtype in COMPLEX


def is_int(dtype: np.dtype) -> bool:
    return dtype in INTEGER


def is_unsigned(dtype: np.dtype) -> bool:
    return dtype.kind == "u"


def is_inexact(dtype: np.dtype) -> bool:
    """Floating or complex: the dtypes that have derivatives."""
    return dtype in INEXACT


_REAL_OF = {complex64: float32, complex128: float64}


def real_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of a complex dtype's components (``complex64 -> float32``); others unchanged."""
    return _REAL_OF.get(dtype, dtype)


def complex_dtype(dtype: np.dtype) -> np.dtype:
    """The complex dtype whose components hold ``dtype`` exactly (``float32 -> complex64``).

    There is no complex32: float16 and bfloat16 widen to complex64, as NumPy's float16 does."""
    if dtype in COMPLEX:
        return dtype
    return complex64 if dtype in (float16, bfloat16, float32) else complex128


PYTHON_SCALARS = (bool, int, float, complex)


def is_python_scalar(value: Any) -> bool:
    """A Python ``bool``/``int``/``float``/``complex`` (weakly typed), not a NumPy scalar."""
    return isinstance(value, PYTHON_SCALARS) and not isinstance(value, np.generic)


def scalar_dtype(value: Any) -> np.dtype:
    """The dtype a Python scalar becomes on its own (NumPy's defaults)."""
    if isinstance(value, (bool, np.bool_)):
        return bool_
    if isinstance(value, int):
        return default_int
    if isinstance(value, float):
        return default_float
    if isinstance(value, complex):
        return complex128
    from ember.errors import DTypeError

    raise DTypeError(f"unsupported Python scalar {value!r} of type {type(value).__name__}")


def _stand_in(dt: np.dtype) -> np.dtype:
    # NumPy cannot promote ml_dtypes' bfloat16; it promotes exactly like float16 except with
    # float16 itself (bfloat16 + float16 -> float32), so float16 stands in for it.
    return float16 if dt == bfloat16 else dt


@functools.lru_cache(maxsize=4096)
def promote(*operands: tuple[np.dtype, bool]) -> np.dtype:
    """Result dtype of ``(dtype, weak)`` operands under NumPy 2 rules (memoised: it is on the
    path of every eager operation)."""
    strong = [dt for dt, weak in operands if not weak]
    weak = [dt for dt, weak in operands if weak]
    if strong:
        has_bf16 = bfloat16 in strong
        if has_bf16 and float16 in strong:
            result = np.result_type(*[float32 if d in (bfloat16, float16) else d for d in strong])
        else:
            result = np.result_type(*[_stand_in(d) for d in strong])
            if has_bf16 and result == float16:
                result = bfloat16
    else:
        result = None
    for dt in weak:
        result = _promote_weak(result, dt)
    return result


_KIND_ORDER = {"b": 0, "u": 1, "i": 1, "f": 2, "V": 2, "c": 3}


def _promote_weak(result: np.dtype | None, weak: np.dtype) -> np.dtype:
    if result is None:
        return weak
    if _KIND_ORDER[weak.kind] <= _KIND_ORDER[result.kind]:
        return result
    if weak.kind == "c" and is_float(result):
        return complex_dtype(result)  # a weak complex keeps the float's precision
    return weak


def result_type(*args: Any) -> np.dtype:
    """``numpy.result_type`` for Ember values, NumPy arrays, dtypes and Python scalars."""
    return promote(*[dtype_and_weakness(a) for a in args])


def dtype_and_weakness(x: Any) -> tuple[np.dtype, bool]:
    if is_python_scalar(x):
        return scalar_dtype(x), True
    aval = getattr(x, "aval", None)
    if aval is not None:
        return aval.dtype, aval.weak
    if hasattr(x, "dtype"):
        return canonicalize(x.dtype), False
    return canonicalize(x), False


def finfo(dtype: Any) -> Any:
    """Machine limits of a floating dtype (``numpy.finfo`` that also knows bfloat16).

    A complex dtype gives the limits of its real components, as the array API requires."""
    dt = canonicalize(dtype)
    if not is_inexact(dt):
        from ember.errors import DTypeError

        raise DTypeError(f"finfo needs a floating or complex dtype, got {dt}")
    return ml_dtypes.finfo(real_dtype(dt))


def iinfo(dtype: Any) -> Any:
    """Machine limits of an integer dtype."""
    dt = canonicalize(dtype)
    if not is_int(dt):
        from ember.errors import DTypeError

        raise DTypeError(f"iinfo needs an integer dtype, got {dt}")
    return ml_dtypes.iinfo(dt)


def short_name(dt: np.dtype) -> str:
    """Compact name used by the IR printer: ``f32``, ``bf16``, ``c64``, ``i64``, ``bool``."""
    return _SHORT[dt]


_SHORT = {bool_: "bool", int8: "i8", int16: "i16", int32: "i32", int64: "i64", uint8: "u8",
          uint16: "u16", uint32: "u32", uint64: "u64", float16: "f16", bfloat16: "bf16",
          float32: "f32", float64: "f64", complex64: "c64", complex128: "c128"}
