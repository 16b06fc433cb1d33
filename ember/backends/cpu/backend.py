"""The compiled CPU backend, named ``"cpu"``: ``ember.jit(f, backend="cpu")``.

Its buffers are NumPy arrays, exactly as the NumPy backend's, so eager operations, copies to
the host and the donation check (``writable``) are the NumPy backend's own; only ``compile``
differs: a graph becomes a :class:`~ember.backends.cpu.program.Program` (C from one
translation unit, an arena laid out by a static memory plan, NumPy for what has no C yet),
loaded from the disk by its graph when an earlier process compiled it (``program_cache.py``).

Without a C compiler, ``compile`` warns once (:class:`NoCompilerWarning`) and returns the
NumPy backend's program, so code written for ``backend="cpu"`` still runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from ember.backends.base import register_backend
from ember.backends.cpu import toolchain
from ember.backends.cpu.program_cache import compile_program
from ember.backends.numpy_backend import NumpyBackend
from ember.compiler.contractions import fold_transposes
from ember.compiler.fusion import fuse
from ember.compiler.rewrites import rewrite
from ember.ir.graph import ClosedGraph


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
        return compile_program(closed, donate, self.run_primitive, prepare)


def prepare(closed: ClosedGraph) -> ClosedGraph:
    """The compiler's passes over a graph before it is lowered to C."""
    return fuse(rewrite(fold_transposes(closed)))


register_backend(CpuBackend())
