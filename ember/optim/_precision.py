"""The dtype an optimizer computes in, and casts that never change a parameter's dtype.

Parameters are often stored in bfloat16 or float16, and ember's default float is float64, so
careless arithmetic either loses precision (a bfloat16 moment update rounds at every operation)
or silently promotes (a float64 learning-rate array turns a float32 parameter into float64, and
the next jitted step retraces). Every update therefore works in :func:`compute_dtype` and casts
its results back to the stored dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ember import dtypes
from ember.core.array import Array


def compute_dtype(dtype: Any) -> np.dtype:
    """At least float32: half-precision values are upcast for the arithmetic, wider ones kept."""
    return dtypes.promote((dtypes.canonicalize(dtype), False), (dtypes.float32, False))


def cast(x: Any, dtype: np.dtype) -> Any:
    """``x`` as ``dtype`` if it is a floating array; Python scalars and flags pass unchanged.

    Python floats are weak (they take the dtype of the array they meet), so they never need a
    cast; boolean and integer arrays (masks, step counts) keep their meaning.
    """
    if isinstance(x, Array) and dtypes.is_float(x.dtype) and x.dtype != dtype:
        return x.astype(dtype)
    return x
