"""The NumPy backend: the reference every other backend is tested against.

Buffers are NumPy arrays. Eager ops call the primitive's NumPy implementation; a compiled
program is the graph's equations flattened into a list of closures that run those same
implementations, with buffers freed as soon as their last use has passed (the backend-neutral
live intervals of :mod:`ember.ir.liveness`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ember.backends.base import Backend, Device, register_backend
from ember.ir.graph import ClosedGraph, Literal, Var
from ember.ir.liveness import liveness


def _as_array(value: Any, dtype: np.dtype) -> np.ndarray:
    out = np.asarray(value)
    return out if out.dtype == dtype else out.astype(dtype)


class NumpyBackend(Backend):
    name = impls_key = "numpy"
    numpy_results = True
    devices = (Device("cpu", 0),)

    def from_host(self, array: np.ndarray) -> np.ndarray:
        return array

    def to_host(self, buffer: np.ndarray) -> np.ndarray:
        # A read-only view: the caller must not be able to write into an Array's buffer. The
        # view also holds a reference to the buffer, which keeps in-place paths away from it.
        view = np.asarray(buffer).view()  # also a NumPy scalar an implementation returned
        view.flags.writeable = False
        return view

    def run_primitive(self, prim: Any, buffers: Sequence[Any], params: dict[str, Any]) -> Any:
        impl = prim.impls.get(self.impls_key) or self.implementation(prim)
        return impl(*buffers, **params)

    def compile(self, closed: ClosedGraph, donate: Sequence[bool] = ()) -> Callable[..., list]:
        graph = closed.graph
        live = liveness(graph, donate)
        slots: dict[int, int] = {}
        for v in [*graph.constvars, *graph.invars]:
            slots[v.id] = len(slots)
        for eqn in graph.eqns:
            for v in eqn.outputs:
                slots[v.id] = len(slots)
        written: set[int] = set()
        steps = []
        for i, eqn in enumerate(graph.eqns):
            impl = self.implementation(eqn.prim)
            fn = getattr(impl, "unguarded", impl)  # the program runs under one np.errstate
            # A donated input read only by this equation (and not returned) may be written in
            # place. Only donated inputs: a value the program made may be a view of another.
            first = eqn.inputs[0] if eqn.inputs else None
            inplace = eqn.prim.inplace_impls.get(self.impls_key)
            if (isinstance(first, Var) and inplace is not None and live[first].donated
                    and live.overwritable(first, i)):
                fn = inplace
                written.add(slots[first.id])
            ins = [("lit", a.value) if isinstance(a, Literal) else ("slot", slots[a.id])
                   for a in eqn.inputs]
            outs = [(slots[v.id], v.aval.dtype) for v in eqn.outputs]
            # An elementwise implementation that can write its result into a given buffer may
            # reuse an input buffer that dies here (checked at run time: see _dead_buffer),
            # saving an allocation and a pass of page faults.
            reuse = ((eqn.outputs[0].aval.shape, eqn.outputs[0].aval.dtype)
                     if _writes_out(eqn.prim, impl) and not eqn.params else None)
            steps.append((fn, ins, outs, eqn.params, eqn.prim.multiple_results,
                          [slots[v.id] for v in live.dying_at(i)], reuse))
        # Snapshot the constants' buffers now: a captured array later rebound by ``x[i] = v``
        # must not change what an already compiled program computes.
        const_values = [np.asarray(c) for c in closed.consts]
        n_slots = len(slots)
        out_refs = [("lit", a.value) if isinstance(a, Literal) else ("slot", slots[a.id])
                    for a in graph.outvars]

        def program(*buffers: Any) -> list[Any]:
            env: list[Any] = [None] * n_slots
            env[: len(const_values)] = const_values
            env[len(const_values): len(const_values) + len(buffers)] = buffers
            with np.errstate(all="ignore"):
                _run(env, steps)
            return [np.asarray(v) if kind == "lit" else env[v] for kind, v in out_refs]

        program.overwrites = tuple(i for i, v in enumerate(graph.invars)  # type: ignore
                                   if slots[v.id] in written)
        return program

    def writable(self, buffer: Any) -> Any:
        # CPython only: the buffer is private when it owns its memory and its reference count
        # is what the caller's list, this call and getrefcount add (measured once, below):
        # any other Array, NumPy view (its ``base``) or user variable would add one.
        if (_REFS_OF_PRIVATE is not None and type(buffer) is np.ndarray
                and buffer.base is None and buffer.flags.writeable
                and sys.getrefcount(buffer) <= _REFS_OF_PRIVATE):
            return buffer
        return buffer.copy()


def _writes_out(prim: Any, impl: Any) -> bool:
    """Whether a program may call ``impl.unguarded(*args, out=buffer)``: an elementwise
    implementation declares it (``impl.writes_out``, set where NumPy ufuncs are wrapped)."""
    return prim.kind == "elementwise" and getattr(impl, "writes_out", False)


def _run(env: list[Any], steps: list[tuple]) -> None:
    """Execute the equations in order, writing results into ``env``."""
    for fn, ins, outs, params, multi, free, reuse in steps:
        args = [v if kind == "lit" else env[v] for kind, v in ins]
        target = _dead_buffer(env, free, args, *reuse) if reuse and free else None
        result = fn(*args, out=target) if target is not None else fn(*args, **params)
        if multi:
            for (slot, dtype), r in zip(outs, result):
                env[slot] = _as_array(r, dtype)
        else:
            slot, dtype = outs[0]
            env[slot] = _as_array(result, dtype)
        for s in free:
            env[s] = None


def _dead_buffer(env: list[Any], free: list[int], args: list[Any], shape: tuple[int, ...],
                 dtype: np.dtype) -> np.ndarray | None:
    """A buffer of a slot dying at this step that nothing else can see, or None.

    It must own its memory (not a view), fit the output exactly, and be referenced only by
    its slot and this step's arguments: a view of it elsewhere would hold a reference
    (``view.base``), and so would the caller or a captured constant. ``getrefcount`` sees
    the slot, the local ``buf``, its own argument, and each appearance among ``args``.
    """
    for s in free:
        buf = env[s]
        if (type(buf) is np.ndarray and buf.base is None and buf.shape == shape
                and buf.dtype == dtype and buf.flags.writeable
                and sys.getrefcount(buf) == 3 + sum(a is buf for a in args)):
            return buf
    return None


class _Probe:
    def refs(self, buffer: Any) -> int:  # called exactly as ``backend.writable(list[i])`` is
        return sys.getrefcount(buffer)


def _measure_private_refs() -> int | None:
    """The reference count ``writable`` sees for a buffer held only by the caller's list (it
    differs between Python versions, so it is measured rather than assumed)."""
    if sys.implementation.name != "cpython":
        return None  # no reliable reference counts: always copy donated buffers
    held = [np.empty(1)]
    return _Probe().refs(held[0])


_REFS_OF_PRIVATE = _measure_private_refs()

register_backend(NumpyBackend())
