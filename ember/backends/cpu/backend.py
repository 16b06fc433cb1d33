"""The compiled CPU backend, named ``"cpu"``: ``ember.jit(f, backend="cpu")``.

Its buffers are NumPy arrays, exactly as the NumPy backend's, so eager operations, copies to
the host and the donation check (``writable``) are the NumPy backend's own; only ``compile``
differs: a graph becomes a :class:`~ember.backends.cpu.program.Program` (C from one
translation unit, an arena laid out by a static memory plan, NumPy for what has no C yet).

Without a C compiler, ``compile`` warns once (:class:`NoCompilerWarning`) and returns the
NumPy backend's program, so code written for ``backend="cpu"`` still runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ember.backends.base import register_backend
from ember.backends.cpu import toolchain
from ember.backends.cpu.program import Program
from ember.backends.numpy_backend import NumpyBackend
from ember.compiler.contractions import fold_transposes
from ember.compiler.fusion import fuse
from ember.ir.graph import ClosedGraph
from ember.ir.types import type_of


class NoCompilerWarning(UserWarning):
    """No C compiler was found: compiled programs run on the NumPy backend instead."""


class CpuBackend(NumpyBackend):
    name = "cpu"

    def __init__(self) -> None:
        self._warned = False

    def compile(self, closed: ClosedGraph, donate: Sequence[bool] = ()) -> Any:
        if not toolchain.available():
            if not self._warned:
                self._warned = True
                warnings.warn("ember: no C compiler found (set EMBER_CC to one); the 'cpu' "
                              "backend runs programs on the NumPy backend instead",
                              NoCompilerWarning, stacklevel=2)
            return super().compile(closed, donate)
        return Program(fuse(fold_transposes(closed)), donate, self.run_primitive)

    def run_primitive(self, prim: Any, buffers: Sequence[Any], params: dict[str, Any]) -> Any:
        # NumPy may return a scalar for a 0-d result or widen a dtype; eager results of
        # this backend are arrays of the primitive's declared type, as the NumPy backend's.
        out = super().run_primitive(prim, buffers, params)
        types = prim.abstract_eval(*[type_of(b) for b in buffers], **params)
        if not prim.multiple_results:
            return _as_type(out, types)
        return [_as_type(o, t) for o, t in zip(out, types)]


def _as_type(value: Any, aval: Any) -> np.ndarray:
    value = np.asarray(value)
    return value if value.dtype == aval.dtype else value.astype(aval.dtype)


register_backend(CpuBackend())
