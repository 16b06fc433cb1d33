"""The array API standard's introspection: version, inspection namespace, devices, ``astype``.

Code written against the standard (SciPy, scikit-learn...) finds a namespace through
``x.__array_namespace__()``, asks ``__array_namespace_info__()`` what it supports, and passes
``device=`` to creation functions. Ember arrays live on the devices of the backends; every
function that takes ``device=`` checks it here, so a wrong device fails the same way everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ember import dtypes
from ember.backends import Device, default_backend
from ember.errors import EmberValueError, op_error
from ember.numpy._core import check_device, value
from ember.ops import elementwise as ew

__all__ = ["__array_api_version__", "__array_namespace_info__", "astype"]

__array_api_version__ = "2023.12"

# The versions whose semantics Ember follows (each later one extends the former).
_API_VERSIONS = ("2021.12", "2022.12", "2023.12")

# The standard's dtype names by kind; ``float16``/``bfloat16`` are Ember extras the standard
# does not name, so the inspection API leaves them out.
_KINDS = {
    "bool": ("bool",),
    "signed integer": ("int8", "int16", "int32", "int64"),
    "unsigned integer": ("uint8", "uint16", "uint32", "uint64"),
    "real floating": ("float32", "float64"),
    "complex floating": ("complex64", "complex128"),
}
_COMPOSITE_KINDS = {
    "integral": ("signed integer", "unsigned integer"),
    "numeric": ("signed integer", "unsigned integer", "real floating", "complex floating"),
}


def devices() -> list[Device]:
    """Every device an array can be placed on (today: the default backend's)."""
    return list(default_backend().devices)


def _dtype_names(kind: Any) -> list[str]:
    if kind is None:
        kinds = tuple(_KINDS)
    elif isinstance(kind, tuple):
        kinds = kind
    else:
        kinds = (kind,)
    names: list[str] = []
    for k in kinds:
        if k in _COMPOSITE_KINDS:
            names += _dtype_names(_COMPOSITE_KINDS[k])
        elif k in _KINDS:
            names += _KINDS[k]
        else:
            raise op_error(EmberValueError, "__array_namespace_info__().dtypes",
                           f"unknown kind {k!r}; expected one of "
                           f"{', '.join(map(repr, (*_KINDS, *_COMPOSITE_KINDS)))}")
    return names


class ArrayNamespaceInfo:
    """What ``__array_namespace_info__()`` returns: the standard's inspection functions."""

    def capabilities(self) -> dict[str, Any]:
        # Data-dependent shapes (``unique``, boolean masks) work eagerly, not under ``jit``.
        return {"boolean indexing": True, "data-dependent shapes": True}

    def default_device(self) -> Device:
        return default_backend().devices[0]

    def devices(self) -> list[Device]:
        return devices()

    def default_dtypes(self, *, device: Any = None) -> dict[str, np.dtype]:
        check_device("__array_namespace_info__().default_dtypes", device)
        return {"real floating": dtypes.default_float,
                "complex floating": dtypes.complex_dtype(dtypes.default_float),
                "integral": dtypes.default_int, "indexing": dtypes.default_int}

    def dtypes(self, *, device: Any = None, kind: Any = None) -> dict[str, np.dtype]:
        """The supported standard dtypes of ``kind`` (a kind name, or a tuple of them)."""
        check_device("__array_namespace_info__().dtypes", device)
        return {name: np.dtype(name) for name in dict.fromkeys(_dtype_names(kind))}


def __array_namespace_info__() -> ArrayNamespaceInfo:  # noqa: N807
    return ArrayNamespaceInfo()


def array_namespace(self: Any, /, *, api_version: str | None = None) -> Any:
    """``x.__array_namespace__()``: the namespace of Ember arrays is ``ember.numpy``."""
    if api_version is not None and api_version not in _API_VERSIONS:
        raise op_error(EmberValueError, "__array_namespace__", f"unsupported api_version "
                       f"{api_version!r}; ember.numpy implements {', '.join(_API_VERSIONS)}")
    import ember.numpy

    return ember.numpy


def to_device(self: Any, device: Any, /, *, stream: Any = None) -> Any:
    """``x.to_device(device)``: the array itself, since it already lives on the only device."""
    check_device("to_device", device)
    if stream is not None:
        raise op_error(EmberValueError, "to_device", f"streams are not supported, got "
                       f"stream={stream!r}")
    return self


def astype(x: Any, dtype: Any, /, *, copy: bool = True, device: Any = None) -> Any:
    """``x`` converted to ``dtype`` (arrays are values, so ``copy`` never changes the result)."""
    check_device("astype", device)
    return ew.convert(value(x), dtypes.canonicalize(dtype))
