"""The NumPy backend: the reference every other backend is tested against.

Buffers are NumPy arrays. Eager ops call the primitive's NumPy implementation; a compiled
program is the graph's equations flattened into a list of closures that run those same
implementations, with buffers freed as soon as their last use has passed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ember.backends.base import Backend, Device, register_backend
from ember.ir.graph import ClosedGraph, Literal


def _as_array(value: Any, dtype: np.dtype) -> np.ndarray:
    out = np.asarray(value)
    return out if out.dtype == dtype else out.astype(dtype)


class NumpyBackend(Backend):
    name = "numpy"
    devices = (Device("cpu", 0),)

    def from_host(self, array: np.ndarray) -> np.ndarray:
        return array

    def to_host(self, buffer: np.ndarray) -> np.ndarray:
        return buffer

    def run_primitive(self, prim: Any, buffers: Sequence[Any], params: dict[str, Any]) -> Any:
        return prim.impls["numpy"](*buffers, **params)

    def compile(self, closed: ClosedGraph, donate: Sequence[bool] = ()) -> Callable[..., list]:
        graph = closed.graph
        slots: dict[int, int] = {}
        for v in [*graph.constvars, *graph.invars]:
            slots[v.id] = len(slots)
        for eqn in graph.eqns:
            for v in eqn.outputs:
                slots[v.id] = len(slots)
        last_use: dict[int, int] = {}
        for i, eqn in enumerate(graph.eqns):
            for a in eqn.inputs:
                if not isinstance(a, Literal):
                    last_use[slots[a.id]] = i
        keep = {slots[a.id] for a in graph.outvars if not isinstance(a, Literal)}
        overwritable = _overwritable(graph, donate, slots, keep)
        steps = []
        for i, eqn in enumerate(graph.eqns):
            fn = eqn.prim.impls["numpy"]
            fn = getattr(fn, "unguarded", fn)  # the program runs under one np.errstate
            first = eqn.inputs[0] if eqn.inputs else None
            if (first is not None and not isinstance(first, Literal)
                    and slots[first.id] in overwritable and "numpy" in eqn.prim.inplace_impls):
                fn = eqn.prim.inplace_impls["numpy"]
            ins = [("lit", a.value) if isinstance(a, Literal) else ("slot", slots[a.id])
                   for a in eqn.inputs]
            outs = [(slots[v.id], v.aval.dtype) for v in eqn.outputs]
            free = [s for s, last in last_use.items() if last == i and s not in keep]
            steps.append((fn, ins, outs, eqn.params, eqn.prim.multiple_results, free))
        # Snapshot the constants' buffers now: a captured array later rebound by ``x[i] = v``
        # must not change what an already compiled program computes.
        const_values = [np.asarray(c) for c in closed.consts]
        n_slots = len(slots)
        out_refs = [("lit", a.value) if isinstance(a, Literal) else ("slot", slots[a.id])
                    for a in graph.outvars]

        donated_args = [i for i, d in enumerate(donate) if d]

        def program(*buffers: Any) -> list[Any]:
            env: list[Any] = [None] * n_slots
            env[: len(const_values)] = const_values
            env[len(const_values): len(const_values) + len(buffers)] = buffers
            if donated_args:  # a buffer passed twice must not be overwritten through one
                counts = Counter(map(id, buffers))
                for i in donated_args:
                    if counts[id(buffers[i])] > 1:
                        env[len(const_values) + i] = buffers[i].copy()
            with np.errstate(all="ignore"):
                _run(env, steps)
            return [np.asarray(v) if kind == "lit" else env[v] for kind, v in out_refs]

        return program


def _run(env: list[Any], steps: list[tuple]) -> None:
    """Execute the equations in order, writing results into ``env``."""
    for fn, ins, outs, params, multi, free in steps:
        args = [v if kind == "lit" else env[v] for kind, v in ins]
        result = fn(*args, **params)
        if multi:
            for (slot, dtype), r in zip(outs, result):
                env[slot] = _as_array(r, dtype)
        else:
            slot, dtype = outs[0]
            env[slot] = _as_array(result, dtype)
        for s in free:
            env[s] = None


def _overwritable(graph: Any, donate: Sequence[bool], slots: dict[int, int], keep: set[int]
                  ) -> set[int]:
    """Slots of donated inputs that exactly one equation reads (and no output returns): that
    equation may write into the buffer instead of copying it."""
    uses: dict[int, int] = {}
    for eqn in graph.eqns:
        for a in eqn.inputs:
            if not isinstance(a, Literal):
                uses[a.id] = uses.get(a.id, 0) + 1
    return {slots[v.id] for v, d in zip(graph.invars, donate)
            if d and uses.get(v.id) == 1 and slots[v.id] not in keep}


register_backend(NumpyBackend())
