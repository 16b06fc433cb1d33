"""``Array``: Ember's user-facing n-dimensional array, and ``Tracer``, its traced stand-in.

An ``Array`` owns an immutable buffer on one backend. Arrays are values, not views: slicing
produces a new array and ``x[i] = v`` rebinds ``x`` to an updated copy (as in MLX and JAX's
``x.at[i].set(v)``), so code behaves the same eagerly and under ``jit``.

The NumPy-level methods (operators, ``reshape``, ``sum``...) are attached by ``ember.numpy``,
which is the layer that knows NumPy semantics; this module holds what an array *is*.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from ember import dtypes
from ember.backends import Backend, Device, default_backend
from ember.errors import EmberError, TracerError, user_frame
from ember.ir.types import ArrayType


class Array:
    """A concrete array: a backend buffer and its type."""

    __slots__ = ("_buffer", "_aval", "_backend", "__weakref__")
    __array_priority__ = 100

    def __init__(self, buffer: Any, aval: ArrayType, backend: Backend | None = None):
        self._buffer = buffer
        self._aval = aval
        self._backend = backend or default_backend()

    # --- what an array is -------------------------------------------------------------------
    # Read on every operation: a C-level getter costs less than a Python property.
    aval = property(operator.attrgetter("_aval"), doc="The abstract type (ArrayType).")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.aval.shape

    @property
    def dtype(self) -> np.dtype:
        return self.aval.dtype

    @property
    def ndim(self) -> int:
        return len(self.aval.shape)

    @property
    def size(self) -> int:
        return self.aval.size

    @property
    def weak_type(self) -> bool:
        return self.aval.weak

    @property
    def device(self) -> Device:
        return self._backend.devices[0]

    # --- exchange with NumPy and Python -------------------------------------------------------
    def to_numpy(self) -> np.ndarray:
        """The data as a read-only NumPy array (a view of the buffer on the NumPy backend).

        Read-only because an Array is a value: writing through the view would change it.
        ``np.array(x)`` gives a writeable copy.
        """
        if self._buffer is None:
            raise EmberError(f"this array was donated to a jitted function and can no longer "
                             f"be used\n  at {user_frame()}")
        return self._backend.to_host(self._buffer)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.to_numpy()
        if dtype is not None and np.dtype(dtype) != out.dtype:
            if copy is False:
                raise ValueError(f"converting an ember {self.dtype} array to {np.dtype(dtype)} "
                                 f"needs a copy, but copy=False was given")
            return out.astype(dtype)
        return out.copy() if copy else out

    def __dlpack__(self, *, stream: Any = None, max_version: tuple[int, int] | None = None,
                   dl_device: Any = None, copy: bool | None = None) -> Any:
        """Export through DLPack: a private copy, so a consumer can never write into this array
        (consumers such as PyTorch ignore DLPack's read-only flag). ``copy=False`` shares the
        memory, flagged read-only, with consumers that speak DLPack 1.0."""
        view = self.to_numpy()
        if copy is False:
            if max_version is None or max_version < (1, 0):
                raise BufferError("ember arrays are read-only, and DLPack before 1.0 cannot "
                                  "say so: it cannot share one without a copy")
            return view.__dlpack__(stream=stream, max_version=max_version)
        out = view.copy()
        if max_version is None:
            return out.__dlpack__(stream=stream)
        return out.__dlpack__(stream=stream, max_version=max_version)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU

    def item(self) -> Any:
        return self.to_numpy().item()

    def tolist(self) -> Any:
        return self.to_numpy().tolist()

    def __bool__(self) -> bool:
        return bool(self.to_numpy())

    def __int__(self) -> int:
        return int(self.to_numpy())

    def __float__(self) -> float:
        return float(self.to_numpy())

    def __complex__(self) -> complex:
        return complex(self.to_numpy())

    def __index__(self) -> int:
        if not dtypes.is_int(self.dtype):
            raise TypeError(f"only integer arrays can be used as an index, not {self.dtype}")
        return int(self.to_numpy())

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def __iter__(self):
        if not self.shape:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        # NumPy's own repr (shape= for empty arrays, summarised large ones), renamed.
        return "Array" + np.array_repr(self.to_numpy())[len("array"):]

    def __str__(self) -> str:
        return str(self.to_numpy())

    def __format__(self, spec: str) -> str:
        return format(self.to_numpy().item() if self.ndim == 0 else self.to_numpy(), spec)


class Tracer(Array):
    """An array whose value is being traced by a transformation (jit, grad, vmap...)."""

    __slots__ = ("_trace",)

    @property
    def aval(self) -> ArrayType:  # type: ignore[override]
        raise NotImplementedError

    def full_lower(self) -> Any:
        """The simplest equivalent value (a tracer of a lower trace, or a concrete array)."""
        return self

    @property
    def device(self) -> Device:
        return default_backend().devices[0]

    def _concrete_needed(self, what: str) -> TracerError:
        return TracerError(
            f"{what} needs a concrete value, but this array is traced ({self.aval}) by "
            f"{type(self._trace).__name__.replace('Trace', '').lower() or 'a'} transformation.\n"
            f"  at {user_frame()}\n"
            "Python control flow cannot depend on traced values: use ember.lax.cond / "
            "ember.numpy.where for branches, ember.lax.while_loop / fori_loop for loops, or mark "
            "the argument static with jit(..., static_argnums=...)."
        )

    def concrete_value(self) -> Array | None:
        """The value, when this transformation knows it now (e.g. the primal under eager
        ``grad``), so Python control flow on it works as it would without the transformation."""
        return None

    def _concrete(self, what: str) -> Array:
        value = self.concrete_value()
        if value is None:
            raise self._concrete_needed(what)
        return value

    def to_numpy(self) -> np.ndarray:
        raise self._concrete_needed("converting to a NumPy array")

    def __bool__(self) -> bool:
        return bool(self._concrete("`if`/`while`/`and`/`or`/bool()"))

    def __int__(self) -> int:
        return int(self._concrete("int()"))

    def __float__(self) -> float:
        return float(self._concrete("float()"))

    def __complex__(self) -> complex:
        return complex(self._concrete("complex()"))

    def __index__(self) -> int:
        return self._concrete("using an array as a Python index").__index__()

    def item(self) -> Any:
        return self._concrete(".item()").item()

    def tolist(self) -> Any:
        raise self._concrete_needed(".tolist()")

    def __repr__(self) -> str:
        value = self.concrete_value()
        if value is not None:  # e.g. under eager grad: show the value, as PyTorch would
            return f"{value!r} (traced by {type(self).__name__})"
        return f"Traced<{self.aval}>({type(self).__name__})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)
