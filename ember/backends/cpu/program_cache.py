"""Compiled programs kept on disk by the graph they compile: a new process skips the passes.

The toolchain's disk cache is keyed by the C source, so a second process finds the shared
library only after fusing, lowering, planning and rendering the graph again to learn that
source. Here a program that runs wholly in C is also filed under a key of the graph it was
compiled from; the entry holds its library's key and what running needs
(:meth:`Program.run_state`), and a later process compiling an equal graph loads that library
and runs. Its C, plan and timed twin are computed when first asked for. A process that finds no
entry compiles under the entry's lock, so of several processes compiling the same program at
once (an MPI job's) one compiles and the others load its result.

The key (decision 0020) covers everything the program depends on: the graph's structure and
types (:func:`ember.ir.params.graph_key`: vars numbered in order, params by content), the
contents of its small constants (the values of big ones reach C through the address table,
never its code), the donated inputs, ember's own code (:func:`code_version`) and the
toolchain's flags, compiler and CPU. An entry that does not read, does not match its graph, or
whose library does not load is compiled anew and written over.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ember.backends.cpu import toolchain
from ember.backends.cpu.program import Program, debug_fill_freed
from ember.ir.graph import ClosedGraph
from ember.ir.params import array_key, graph_key

# Constants up to this size are keyed by their bytes (a pass may fold a small one into C).
_KEYED_CONST_BYTES = 256
_EMBER_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.cache
def code_version() -> str:
    """A hash of ember's Python sources: fusion, lowering and planning may change with any of
    them, and an entry made by other code must not be reused."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(_EMBER_ROOT)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, _EMBER_ROOT).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def program_key(closed: ClosedGraph, donate: Sequence[bool]) -> str:
    """The key of the program compiled from ``closed`` with these inputs donated."""
    small = [array_key(c) if np.asarray(c).nbytes <= _KEYED_CONST_BYTES else None
             for c in closed.consts]
    parts = ("program-1", graph_key(closed.graph), small, tuple(bool(d) for d in donate),
             debug_fill_freed(), code_version(), toolchain.cache_key(""))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def compile_program(closed: ClosedGraph, donate: Sequence[bool], run_numpy: Any,
                    prepare: Callable[[ClosedGraph], ClosedGraph]) -> Program:
    """The program of ``closed``: loaded from its entry when there is a good one, else
    compiled from ``prepare(closed)`` (the backend's passes) and filed for the next process."""
    key = program_key(closed, donate)
    name = key + ".program.json"

    def build_in_full() -> Program:
        return Program(prepare(closed), donate, run_numpy)

    def filed() -> Program | None:
        return _load(toolchain.read_entry(name), closed, build_in_full)

    loaded = filed()
    if loaded is not None:
        return loaded
    # Processes of one job compile the same programs at once: one runs the passes and the
    # compiler while the others wait for its entry (a lock per key; see toolchain.entry_lock).
    with toolchain.entry_lock(name):
        loaded = filed()
        return loaded if loaded is not None else _compile_and_file(closed, donate, run_numpy,
                                                                   prepare, name)


def _compile_and_file(closed: ClosedGraph, donate: Sequence[bool], run_numpy: Any,
                      prepare: Callable[[ClosedGraph], ClosedGraph], name: str) -> Program:
    """Compile ``closed`` and file the entry ``name`` for the next process."""
    prepared = prepare(closed)
    program = Program(prepared, donate, run_numpy)
    state = program.run_state()
    # Entries name constants by their position among the traced graph's: the passes keep
    # the very arrays (or drop unused ones), so each is found by identity.
    position = {id(c): i for i, c in enumerate(closed.consts)}
    consts = [position.get(id(c)) for c in prepared.consts]
    if state is not None and None not in consts:
        state["const_positions"] = consts
        toolchain.write_entry(name, json.dumps(state).encode())
    return program


def _load(data: bytes | None, closed: ClosedGraph,
          build_in_full: Callable[[], Program]) -> Program | None:
    """The program an entry describes, or None when there is none or it cannot be used."""
    if data is None:
        return None
    try:
        state = json.loads(data)
        consts = [closed.consts[i] for i in state["const_positions"]]
        return Program.from_run_state(state, consts, build_in_full)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None  # unreadable or from another layout: compiled anew and written over
