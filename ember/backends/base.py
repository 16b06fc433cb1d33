"""The backend interface and the registry of backends.

A backend is small (rule 7): it turns host arrays into its own buffers and back, runs one
primitive on buffers (eager mode), and compiles a whole :class:`ember.ir.Graph` into a callable
program (jit). Primitives declare their per-backend implementations themselves
(``Primitive.impls[name]``), so a backend never switches on primitive names.

A primitive that holds subgraphs (``cond``, ``scan``, ``remat``...) declares one generic
implementation instead, under :data:`ANY_BACKEND`: it takes the backend that runs it as its first
argument and runs its bodies through that backend's :meth:`Backend.compile`, so a new backend
gets control flow without writing any, and a body always runs where the program around it runs.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ember.errors import EmberError, UnsupportedError
from ember.ir.graph import ClosedGraph

# The key of ``Primitive.impls`` for implementations that work on every backend, written
# against this interface; they are called as ``impl(backend, *buffers, **params)``.
ANY_BACKEND = "any"


@dataclass(frozen=True)
class Device:
    """A device a backend can place arrays on (``cpu:0``, later ``cuda:0``...)."""

    platform: str
    id: int = 0

    def __str__(self) -> str:
        return f"{self.platform}:{self.id}"


class Backend:
    """Interface every backend implements."""

    name: str = ""
    devices: tuple[Device, ...] = ()
    # The entry of ``Primitive.impls`` that computes on this backend's buffers: its own name,
    # unless it runs another backend's implementations (a backend built on NumPy arrays).
    impls_key: str = ""
    # Whether its implementations are NumPy functions, whose results may be scalars (0-d) or of
    # a wider dtype than the primitive's rule says: eager results are then coerced to the rule.
    numpy_results: bool = False

    def implementation(self, prim: Any) -> Callable[..., Any]:
        """The function that runs ``prim`` on this backend's buffers: the primitive's own
        implementation for this backend, else its generic one bound to this backend."""
        impl = prim.impls.get(self.impls_key or self.name)
        if impl is not None:
            return impl
        generic = prim.impls.get(ANY_BACKEND)
        if generic is None:
            raise UnsupportedError(f"{prim.name} has no implementation for the {self.name} "
                                   "backend")
        return functools.partial(generic, self)

    def from_host(self, array: np.ndarray) -> Any:
        """Copy a NumPy array into a buffer of this backend."""
        raise NotImplementedError

    def to_host(self, buffer: Any) -> np.ndarray:
        """The buffer's data as a NumPy array that cannot be used to write into the buffer
        (a copy, or a read-only view)."""
        raise NotImplementedError

    def writable(self, buffer: Any) -> Any:
        """A buffer with ``buffer``'s data that a program may overwrite in place (a donated
        argument): ``buffer`` itself when nothing else can see it, else a private copy.

        The caller has already dropped its own Array's reference to ``buffer``.
        """
        raise NotImplementedError

    def run_primitive(self, prim: Any, buffers: Sequence[Any], params: dict[str, Any]) -> Any:
        """Run one primitive eagerly; returns a buffer, or a list for multi-result primitives."""
        raise NotImplementedError

    def compile(self, graph: ClosedGraph, donate: Sequence[bool] = ()) -> Callable[..., list[Any]]:
        """Compile a closed graph into ``program(*buffers) -> list of buffers``.

        ``program.overwrites`` lists the input positions the program may write into (donated
        inputs); the caller passes those through :meth:`writable` first."""
        raise NotImplementedError


_BACKENDS: dict[str, Backend] = {}
# The backend used where none is named (new arrays, ``jit`` without ``backend=``): the
# ``EMBER_BACKEND`` environment variable, read once here, else the compiled CPU backend (which
# runs on NumPy, with one warning, where there is no C compiler); ``set_default_backend``
# changes it. The NumPy backend stays the reference, by name.
_DEFAULT = [os.environ.get("EMBER_BACKEND") or "cpu"]


# Backends imported on first use, by module name: one in a layer above this one (the compiled
# CPU backend needs the compiler) is announced by a module allowed to import it.
_LAZY: dict[str, str] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def register_lazy_backend(name: str, module: str) -> None:
    """Make backend ``name`` available: importing ``module`` (on first use) registers it."""
    _LAZY[name] = module


def get_backend(name: str | None = None) -> Backend:
    name = name or _DEFAULT[0]
    if name not in _BACKENDS and name == "numpy":
        import ember.backends.numpy_backend  # noqa: F401  (registers itself)
    if name not in _BACKENDS and name in _LAZY:
        importlib.import_module(_LAZY[name])
    try:
        return _BACKENDS[name]
    except KeyError:
        source = (" (the default, from the EMBER_BACKEND environment variable)"
                  if name == _DEFAULT[0] == os.environ.get("EMBER_BACKEND") else "")
        raise EmberError(f"unknown backend {name!r}{source}; available: "
                         f"{sorted({'numpy', *_BACKENDS, *_LAZY})}") from None


def default_backend() -> Backend:
    return get_backend()


def set_default_backend(name: str) -> None:
    """Make ``name`` the backend of new arrays and of every ``jit`` without ``backend=``.

    Jitted functions resolve the default when they trace, so one made earlier (at module
    level) compiles anew for the new backend at its next call."""
    get_backend(name)  # an unknown name raises here, not at the next jit call
    _DEFAULT[0] = name
