"""A graph compiled to one C translation unit, run from one arena.

The equations that have C (fused kernels, contractions, indexing: ``lowerings.py``) are
grouped into *segments*, maximal runs of consecutive C equations, and each segment becomes one
C function ``ember_segment_N(char *ember_arena, void **ember_ext)``. A graph that is all C is
one segment: one foreign call per ``jit`` call, no Python per equation. Equations with no C
(control flow, sort, random, library routines, and whatever a rule declines) run through the
NumPy backend between segments, reading the arena through NumPy views, so every graph runs
today and each new C rule removes Python from the path without changing anything else.

Where values live:

- temporaries computed in C: at their offset in the arena (the static memory plan of
  ``ember.compiler.memory``), which the program owns and reuses from call to call;
- inputs, constants, outputs, and values computed by NumPy: in ``ext``, a table of pointers
  filled on each call. Outputs are fresh arrays on every call (the caller owns them), except
  those the plan stores over a donated input, which are that input's buffer.

``EMBER_DEBUG_FILL_FREED=1`` (read when a program is compiled) fills every arena buffer with
NaN (integers with the byte 0xAB) right after its last reader, so a read of freed memory shows
up as wrong results in any test.

A program compiled with ``profile=True`` times every equation (``profile.py``): the C reads
the clock around each statement into a static array, Python times the NumPy ones.
"""

from __future__ import annotations

import ctypes
import operator
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import compress, count
from typing import Any

import numpy as np

import ember.backends.cpu.attention  # noqa: F401  (registers the attention kernels)
import ember.backends.cpu.quant  # noqa: F401  (registers the quantised kernels)
from ember import dtypes
from ember.backends.cpu import kernels, toolchain
from ember.backends.cpu.lowerings import Statement, packed_product, shared_products
from ember.backends.cpu.profile import Entry, Profile, classify, nbytes
from ember.compiler.fusion import COMPUTE_KINDS, VIEW_KINDS, fused_p
from ember.compiler.memory import ALIGNMENT, MemoryAnalysis, plan_memory
from ember.errors import EmberValueError
from ember.ir.graph import ClosedGraph, Eqn, Graph, Literal, Var
from ember.ir.liveness import liveness
from ember.ops.structural import copy_p

# The C library headers a program and its kernels include, parsed once (precompiled). The
# intrinsics header is a fifth of a SIMD program's compile: a second prelude has it, for the
# programs whose helpers include it (loading it would cost any other program half its compile).
_PRELUDE = toolchain.Header("""#include <stdint.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
""")
_SIMD = "#include <immintrin.h>"
_PRELUDE_SIMD = toolchain.Header(_PRELUDE.text + _SIMD + "\n")

_POISON = r"""
/* Debug mode: overwrite a freed buffer with a poison pattern (NaN for floats). */
static void ember_poison(char *p, int64_t units, int unit, uint64_t pattern) {
    for (int64_t i = 0; i < units; ++i) memcpy(p + i * unit, &pattern, unit);
}
"""


# The statement of an equation whose results are all empty: its outputs get buffers as any C
# result's, but it is in no segment, so a program of nothing else compiles nothing.
_NOTHING = Statement(lambda outs, ins: "/* empty result: nothing to compute */")
# The statement of an equation that the statement before it computes (``Statement.covers``).
_COVERED = Statement(lambda outs, ins: "")
# Packed products reading the same left operand with at most this many equations between one
# and the next (q, k and v with each one's rotary embedding between; gate and up) run as one
# call (``lowerings.shared_products``, decision 0018): the later ones move up to the first, so
# their results live that much longer.
SHARED_WINDOW = 4


def statement(eqn: Eqn) -> Statement | None:
    """How ``eqn`` runs in C, or None when it runs through NumPy."""
    if all(v.aval.size == 0 for v in eqn.outputs):
        return _NOTHING
    if eqn.prim is fused_p:
        kernel = kernels.render(eqn)
        return None if kernel is None else _kernel_call(kernel)
    # Fusable kinds have expression rules, used inside kernels; every other kind (contraction,
    # indexing, library...) may have a statement rule of its own.
    rule = eqn.prim.lowerings.get("c")
    if rule is None or eqn.prim.kind in COMPUTE_KINDS | VIEW_KINDS:
        return None
    return rule(eqn)


def _kernel_call(kernel: kernels.Kernel) -> Statement:
    def emit(outs: Sequence[str], ins: Sequence[str]) -> str:
        return f"{{ void *args[] = {{{', '.join([*outs, *ins])}}}; {kernel.name}(args); }}"
    return Statement(emit, (*kernel.helpers, kernel.source), writes_over=kernel.in_place)


def lower(closed: ClosedGraph) -> tuple[ClosedGraph, dict[int, Statement]]:
    """The graph as the program runs it, and the C of each equation that has C (by index).

    A fused group with no kernel (a dtype or primitive without C) is replaced by the
    equations it holds, which then run one by one through NumPy: running the group itself
    would compile its body, which this backend would fuse into the same group again.
    """
    graph = closed.graph
    eqns: list[Eqn] = []
    statements: dict[int, Statement] = {}
    inlined_any = False
    for eqn in graph.eqns:
        st = statement(eqn)
        if st is None and eqn.prim is fused_p:
            eqns += _inlined(eqn)
            inlined_any = True
            continue
        if st is not None:
            statements[len(eqns)] = st
        eqns.append(eqn)
    shared = _shared_left_operands(graph, eqns, statements)
    if not inlined_any and shared is None:
        return closed, statements
    eqns, statements = shared or (eqns, statements)
    inlined = Graph(graph.constvars, graph.invars, eqns, graph.outvars)
    return ClosedGraph(inlined, closed.consts), statements


def _shared_left_operands(graph: Graph, eqns: list[Eqn], statements: dict[int, Statement]
                          ) -> tuple[list[Eqn], dict[int, Statement]] | None:
    """The equations with packed products that share their left operand gathered (each group
    right after its first, which computes them all), and their statements; None when there are
    none. Only products of the graph's inputs (weights) join a group: moved up, they read
    nothing computed later, and nothing they read is freed before the group's call."""
    weights = {v.id for v in [*graph.constvars, *graph.invars]}
    groups: list[list[int]] = []
    latest: dict[tuple, list[int]] = {}  # a left operand and layout: its latest group
    for i, eqn in enumerate(eqns):
        product = packed_product(eqn) if i in statements else None
        lhs, rhs = eqn.inputs[:2] if product is not None else (None, None)
        if not (isinstance(lhs, Var) and isinstance(rhs, Var) and rhs.id in weights):
            continue
        key = (lhs.id, product[0], product[2], product[3])
        group = latest.get(key)
        if group is not None and i - group[-1] <= SHARED_WINDOW + 1:
            group.append(i)
        else:
            latest[key] = [i]
            groups.append(latest[key])
    groups = [g for g in groups if len(g) > 1]
    if not groups:
        return None
    later = {i for g in groups for i in g[1:]}
    order: list[int] = []
    new_statements: dict[int, Statement] = {}
    firsts = {g[0]: g for g in groups}
    for i in range(len(eqns)):
        if i in later:
            continue
        members = firsts.get(i, [i])
        for j, member in enumerate(members):
            if member in statements:
                new_statements[len(order)] = (statements[member] if len(members) == 1 else
                                              _COVERED if j else
                                              shared_products([eqns[m] for m in members]))
            order.append(member)
    return [eqns[i] for i in order], new_statements


def _inlined(eqn: Eqn) -> list[Eqn]:
    """The equations of a fused group's body, reading the group's inputs and writing its
    outputs (fresh variables inside, so a body shared by several groups stays single-use)."""
    body = eqn.params["body"].graph
    rename: dict[int, Any] = {v.id: a for v, a in zip(body.invars, eqn.inputs)}
    produced = {v.id for e in body.eqns for v in e.outputs}
    result: dict[int, Var] = {}
    tail: list[Eqn] = []
    for out, v in zip(body.outvars, eqn.outputs):
        if isinstance(out, Var) and out.id in produced and out.id not in result:
            result[out.id] = v
        else:  # a group input or constant returned as is, or one value returned twice
            tail.append(Eqn(copy_p, [out], [v]))
    eqns = []
    for e in body.eqns:
        outs = [result.get(v.id) or Var(v.aval) for v in e.outputs]
        rename.update((v.id, o) for v, o in zip(e.outputs, outs))
        ins = [rename.get(a.id, a) if isinstance(a, Var) else a for a in e.inputs]
        eqns.append(Eqn(e.prim, ins, outs, e.params))
    for t in tail:
        t.inputs = [rename.get(a.id, a) if isinstance(a, Var) else a for a in t.inputs]
    return eqns + tail


def debug_fill_freed() -> bool:
    """Whether programs compiled now fill freed arena memory (``EMBER_DEBUG_FILL_FREED=1``)."""
    return os.environ.get("EMBER_DEBUG_FILL_FREED") == "1"


def poison(dtype: np.dtype) -> tuple[int, int]:
    """(unit size in bytes, pattern) that the debug mode writes over freed memory: a quiet
    NaN of the (component) float type, else the byte 0xAB."""
    dtype = np.dtype(dtype)
    if not dtypes.is_inexact(dtype):
        return 1, 0xAB
    unit = dtype.itemsize // (2 if dtypes.is_complex(dtype) else 1)
    exponent = {2: 5 if dtype == dtypes.float16 else 8, 4: 8, 8: 11}[unit]
    mantissa = unit * 8 - 1 - exponent
    return unit, ((1 << exponent) - 1) << mantissa | 1 << (mantissa - 1)


@dataclass(frozen=True)
class _Home:
    """Where a value is: ``arena`` offset, or ``ext`` slot."""

    arena: int | None = None
    ext: int | None = None

    def c(self) -> str:
        return (f"(ember_arena + {self.arena})" if self.arena is not None
                else f"ember_ext[{self.ext}]")


_BUILDING_IN_FULL = threading.Lock()  # a loaded program is built in full once


class Program:
    """A compiled graph: ``program(*buffers) -> list of output buffers``."""

    def __init__(self, closed: ClosedGraph, donate: Sequence[bool], run_numpy: Any,
                 profile: bool = False):
        self._origin = (closed, tuple(donate))  # what a profiling twin is compiled from
        self._profiling = profile
        self._twin: Program | None = None
        closed, statements = lower(closed)
        graph = self.graph = closed.graph
        self._run_numpy = run_numpy  # runs one equation eagerly (the NumPy backend's path)
        self.live = live = liveness(graph, donate)
        temps = {v.id for i in statements for v in graph.eqns[i].outputs
                 if not live[v].is_output}
        writes = {graph.eqns[i].outputs[k].id: graph.eqns[i].inputs[j].id
                  for i, s in statements.items() for k, j in s.writes_over
                  if isinstance(graph.eqns[i].inputs[j], Var)}
        # C never returns a view of an operand: its readers may precede an in-place write.
        self.plan = plan_memory(graph, live, temps, writes, copy_free=set(statements))
        self._debug = debug_fill_freed()
        self._homes(closed)
        self._steps(statements)
        self.source = self._render(statements)
        self._library = self._library_key = None
        self._functions: list[Any] = []
        if self.segments:
            needs_blas = any(s.uses_blas for s in statements.values())
            library = toolchain.blas() if needs_blas else toolchain.Library()
            for linked in dict.fromkeys(k for s in statements.values() for k in s.links):
                library += linked.link()
            self._library = toolchain.build(self.source, library, self._prelude)
            self._library_key = toolchain.cache_key(self.source, library)
            self._library.ember_init(program_threads())
        self._functions = [getattr(self._library, f"ember_segment_{n}")
                           for n in range(len(self.segments))]
        if profile:
            self._c_seconds = (np.ctypeslib.as_array(
                (ctypes.c_double * len(self._timed)).in_dll(self._library, "ember_profile"))
                if self._timed else np.zeros(0))
            self._numpy_seconds = np.zeros(len(graph.eqns))
        self._arena = _Arena(self.plan.arena_bytes, self.n_ext)
        self.overwrites = tuple(i for i, v in enumerate(graph.invars)
                                if v.id in self.plan.home)

    # --- kept on disk (program_cache.py) ----------------------------------------------------

    def run_state(self) -> dict[str, Any] | None:
        """What running this program needs, as JSON-ready data: its library's key, the layout
        of the address table, the outputs, the arena's size. None for a program that runs
        NumPy equations (they need the graph), returns a literal, or was built with timers
        or the debug fill."""
        if (self._library is None or self._profiling or self._debug or self._literal_outputs
                or any(kind != "c" for kind, _ in self._schedule)):
            return None
        return {"library": self._library_key, "n_ext": self.n_ext,
                "consts": [c.dtype.name for c in self.consts],
                "inputs": [d.name for d in self._inputs.dtypes], "unset": len(self._unset),
                "fresh": [(slot, shape, dtype.name) for slot, shape, dtype in self._fresh],
                "run_order": self._run_order, "outputs": self._output_slots,
                "overwrites": self.overwrites, "arena_bytes": self._arena.nbytes}

    @classmethod
    def from_run_state(cls, state: dict[str, Any], consts: Sequence[Any],
                       build_in_full: Callable[[], Program]) -> Program | None:
        """The program ``state`` describes, running with ``consts`` (the constants in the
        order the state lists them), or None when its library does not load. It has only what
        running needs; the rest (its C, plan, graph, timed twin) comes from
        ``build_in_full()`` on first use, the same program compiled from its graph."""
        library = toolchain.load(state["library"])
        if library is None:
            return None
        self = cls.__new__(cls)
        self._build_in_full = build_in_full
        self._profiling = False
        self._library, self._library_key = library, state["library"]
        library.ember_init(program_threads())
        self._functions = [getattr(library, f"ember_segment_{n}")
                           for n, _ in enumerate(state["run_order"])]
        self.n_ext = state["n_ext"]
        self.consts = [np.asarray(c, dtypes.canonicalize(d), order="C")
                       for c, d in zip(consts, state["consts"], strict=True)]
        self._inputs = _Inputs(self.consts, [dtypes.canonicalize(d) for d in state["inputs"]])
        self._unset = [None] * state["unset"]
        self._fresh = [(slot, tuple(shape), dtypes.canonicalize(name))
                       for slot, shape, name in state["fresh"]]
        self._run_order = [((kind, idx), drops) for (kind, idx), drops in state["run_order"]]
        self._output_slots, self._literal_outputs = state["outputs"], []
        self.overwrites = tuple(state["overwrites"])
        self._arena = _Arena(state["arena_bytes"], self.n_ext)
        return self

    def __getattr__(self, name: str) -> Any:
        # Reached only for an attribute this program lacks: one loaded by ``from_run_state``
        # becomes the program built in full (the same program, with everything computed).
        if "_build_in_full" not in self.__dict__ or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        with _BUILDING_IN_FULL:
            build = self.__dict__.get("_build_in_full")
            if build is not None:  # not done meanwhile by another thread
                self.__dict__.update(build().__dict__)
                del self.__dict__["_build_in_full"]
        return getattr(self, name)

    # --- layout ----------------------------------------------------------------------------

    def _homes(self, closed: ClosedGraph) -> None:
        graph, plan = self.graph, self.plan
        self.home: dict[int, _Home] = {}
        ext = 0
        for v in [*graph.constvars, *graph.invars]:
            self.home[v.id], ext = _Home(ext=ext), ext + 1
        for eqn in graph.eqns:
            for v in eqn.outputs:
                buffer = plan.home.get(v.id)
                if buffer is not None and buffer.offset is not None:
                    self.home[v.id] = _Home(arena=buffer.offset)
                elif buffer is not None:  # stored over a donated input
                    self.home[v.id] = self.home[buffer.root.id]
                else:
                    self.home[v.id], ext = _Home(ext=ext), ext + 1
        self.n_ext = ext
        # C reads raw memory: constants are contiguous arrays of exactly the declared dtype.
        self.consts = [np.asarray(c, v.aval.dtype, order="C")
                       for c, v in zip(closed.consts, graph.constvars)]
        self._inputs = _Inputs(self.consts, [v.aval.dtype for v in graph.invars])
        self._unset = [None] * (ext - len(self.consts) - len(graph.invars))

    def _steps(self, statements: dict[int, Statement]) -> None:
        """The run order: ("c", segment index) or ("numpy", equation index), each with the
        ext slots of the values that die in it (dropped afterwards, freeing their memory)."""
        graph, live = self.graph, self.live
        schedule: list[tuple[str, int]] = []
        spans: list[list[int]] = []  # the equations of each schedule entry
        self.segments: list[list[int]] = []
        for i in range(len(graph.eqns)):
            if statements.get(i) is _NOTHING:
                continue
            if i not in statements:
                schedule.append(("numpy", i))
                spans.append([i])
            elif schedule and schedule[-1][0] == "c":
                spans[-1].append(i)
            else:
                schedule.append(("c", len(self.segments)))
                spans.append([i])
                self.segments.append(spans[-1])
        self._schedule = schedule
        self._drops = [[self.home[v.id].ext for i in span for v in live.dying_at(i)
                        if self.home[v.id].ext is not None and not live[v].is_input]
                       for span in spans]
        # Outputs computed in C into fresh arrays (not stored over a donated input).
        self._fresh = [(self.home[v.id].ext, v.aval.shape, v.aval.dtype)
                       for i in statements for v in graph.eqns[i].outputs
                       if live[v].is_output and v.id not in self.plan.home]
        self._run_order = list(zip(schedule, self._drops))
        # The plan never places an output in the arena: every one has an ext slot (a literal
        # output reads slot 0 and is replaced after the run).
        self._output_slots = [0 if isinstance(a, Literal) else self.home[a.id].ext
                              for a in graph.outvars]
        self._literal_outputs = [(i, a.value) for i, a in enumerate(graph.outvars)
                                 if isinstance(a, Literal)]

    # --- C ---------------------------------------------------------------------------------

    def _render(self, statements: dict[int, Statement]) -> str:
        helpers: dict[str, None] = {}
        literals: list[str] = []
        bodies = []
        self._timed: list[tuple[int, str]] = []  # profiling: (equation, its C) per counter
        for n, segment in enumerate(self.segments):
            lines = []
            for i in segment:
                eqn, st = self.graph.eqns[i], statements[i]
                if st is _COVERED:
                    continue
                for h in st.helpers:
                    helpers[h] = None
                ins, outs = [], []
                for covered in self.graph.eqns[i:i + st.covers + 1]:
                    for a in covered.inputs:
                        if isinstance(a, Literal):
                            ins.append(f"(void *)L{len(literals)}")
                            literals.append(_literal(f"L{len(literals)}", a))
                        else:
                            ins.append(self.home[a.id].c())
                    outs += [self.home[v.id].c() for v in covered.outputs]
                lines.append(f"  /* {_describe(eqn)} */")
                code = st.emit(outs, ins)
                if self._profiling:
                    code = (f"{{ double t0 = omp_get_wtime();\n  {code}\n  "
                            f"ember_profile[{len(self._timed)}] += omp_get_wtime() - t0; }}")
                    self._timed.append((i, code))
                lines.append("  " + code)
                if self._debug:
                    helpers[_POISON] = None
                    for b in self.plan.freed_after(i):
                        unit, pattern = poison(b.values[-1].aval.dtype)
                        lines.append(f"  ember_poison(ember_arena + {b.offset}, "
                                     f"{b.nbytes // unit}, {unit}, {pattern}ull);")
            bodies.append(f"void ember_segment_{n}(char *ember_arena, void **ember_ext) {{\n"
                          + "\n".join(lines) + "\n}\n")
        blas = "#include <cblas.h>\n" if any(s.uses_blas for s in statements.values()) else ""
        # One pool of threads, OpenMP's: BLAS runs single-threaded, on the pieces OpenMP's threads
        # take (``lowerings.piece_step``; decision 0016).
        init = ("void ember_init(int threads) {\n  omp_set_num_threads(threads);\n"
                + ("  scipy_openblas_set_num_threads(1);\n" if blas else "") + "}\n")
        counters = ([f"double ember_profile[{len(self._timed)}];  /* seconds per statement */"]
                    if self._timed else [])
        self._prelude = _PRELUDE_SIMD if any(_SIMD in h for h in helpers) else _PRELUDE
        return "\n".join([self._prelude.include + blas, *helpers, *literals, *counters, init,
                          *bodies])

    def as_text(self) -> str:
        """The C translation unit of this program."""
        return self.source

    def set_threads(self, threads: int) -> None:
        """Run this program's later calls from the calling thread on ``threads`` OpenMP
        threads (OpenMP keeps the count per calling thread: a new thread starts with the
        runtime's default, every core)."""
        if self._library is not None:
            self._library.ember_init(threads)

    def memory_analysis(self) -> MemoryAnalysis:
        return self.plan.analysis

    def profile(self, buffers: Sequence[Any], runs: int = 3) -> Profile:
        """Time each equation over ``runs`` calls (after one warm-up call) of this program
        compiled with timers (a twin, built on first use). Inputs the program writes over
        (donated ones) are copied for every call, so ``buffers`` are left as they were. The
        counters are the twin's library's: two threads profiling one program at once would
        mix their times."""
        if self._twin is None:
            self._twin = (self if self._profiling
                          else Program(*self._origin, self._run_numpy, profile=True))
        return self._twin._measure(buffers, runs)

    def _measure(self, buffers: Sequence[Any], runs: int) -> Profile:
        def fresh() -> list[Any]:
            copied = list(buffers)
            for i in self.overwrites:
                copied[i] = np.array(copied[i], copy=True)
            return copied

        self(*fresh())  # warm-up: page faults, thread pools, BLAS buffers
        self._c_seconds[:] = 0.0
        self._numpy_seconds[:] = 0.0
        total = 0.0
        for _ in range(runs):
            args = fresh()
            start = time.perf_counter()
            outs = self(*args)
            total += time.perf_counter() - start
            del outs  # freed after the clock is read: freeing is the caller's time, not ours
        self._arena.clear()  # the twin is kept for the next profile, not its memory
        seconds = self._numpy_seconds.copy()
        codes: dict[int, str] = {}
        for (i, code), s in zip(self._timed, self._c_seconds):
            seconds[i], codes[i] = s, code
        entries = []
        for i, eqn in enumerate(self.graph.eqns):
            kind, what, flops = classify(eqn, codes.get(i))
            entries.append(Entry(i, kind, what, float(seconds[i]) / runs, flops, nbytes(eqn)))
        return Profile(tuple(entries), total / runs, runs)

    # --- running ---------------------------------------------------------------------------

    def __call__(self, *buffers: Any) -> list[Any]:
        work = self._arena.acquire()
        try:
            env = [*self.consts, *self._inputs.bind(buffers, work), *self._unset]
            table = work.table
            for slot, shape, dtype in self._fresh:
                out = env[slot] = np.empty(shape, dtype)
                table[slot] = _address(out)
            for (kind, idx), drops in self._run_order:
                if kind == "c":
                    self._functions[idx](*work.pointers)
                elif self._profiling:
                    start = time.perf_counter()
                    self._run_equation(idx, work, env)
                    self._numpy_seconds[idx] += time.perf_counter() - start
                else:
                    self._run_equation(idx, work, env)
                for slot in drops:
                    env[slot] = None
            outs = list(map(env.__getitem__, self._output_slots))
            for i, value in self._literal_outputs:
                outs[i] = np.asarray(value)
            return outs
        finally:
            self._arena.release(work)

    def _run_equation(self, i: int, work: _Workspace, env: list[Any]) -> None:
        eqn, home, arena = self.graph.eqns[i], self.home, work.arena
        args = [a.value if isinstance(a, Literal)
                else _arena_view(arena, home[a.id].arena, a.aval) if home[a.id].ext is None
                else env[home[a.id].ext] for a in eqn.inputs]
        result = self._run_numpy(eqn.prim, args, eqn.params)
        results = result if eqn.prim.multiple_results else [result]
        for v, r in zip(eqn.outputs, results):
            r = np.asarray(r)
            if r.dtype != v.aval.dtype:
                r = r.astype(v.aval.dtype)
            if np.may_share_memory(r, arena):
                r = r.copy()  # a view of the arena would change when the arena is reused
            elif not r.flags.c_contiguous:
                r = np.asarray(r, order="C")
            env[home[v.id].ext] = r
            work.table[home[v.id].ext] = _address(r)
        if self._debug:
            for b in self.plan.freed_after(i):
                unit, pattern = poison(b.values[-1].aval.dtype)
                region = arena[b.offset: b.offset + b.nbytes]
                region.view(np.dtype(f"u{unit}")).fill(pattern)


def _interface_address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def _choose_address_reader() -> Callable[[np.ndarray], int]:
    """How to read an ndarray's data address: ``__array_interface__`` builds a dict per read
    (13k instructions, measured with callgrind), more than the rest of a small program's call.
    In CPython an object's ``id`` is its address, and NumPy's array struct starts with its data
    pointer right after the object header (``PyArrayObject_fields``): read there it costs 1.6k.
    The layout is checked on two arrays first; any other layout reads the interface."""
    offset = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)  # refcnt, type
    pointer_at = ctypes.c_void_p.from_address

    def read(array: np.ndarray) -> int:
        return pointer_at(id(array) + offset).value

    probes = [np.empty(3, np.float32), np.arange(5.0)[1:]]
    if all(read(p) == _interface_address(p) for p in probes):
        return read
    return _interface_address


_address = _choose_address_reader()


class _Inputs:
    """A program's input buffers as C reads them, and their addresses in the ext table.

    Most inputs of a call are the very arrays of the last one (a model's weights, a KV cache
    written in place): those keep the address read last time (an array's memory never moves),
    and only the others are converted (contiguous, the declared dtype) and have their address
    read, so binding a decode step's hundreds of buffers is a few C-level passes, and none at
    all when the workspace's table holds these addresses already. The last call's arrays are
    recognised by weak references: the program keeps no input alive, and a donated buffer's
    reference count, which decides whether it is written in place, is unchanged.
    """

    def __init__(self, consts: list[np.ndarray], dtypes: list[np.dtype]):
        self.dtypes = dtypes
        self._first = len(consts)
        # The head of ``ember_ext``: the constants' addresses, then the inputs'.
        head = np.zeros(len(consts) + len(dtypes), np.uintp)
        head[:len(consts)] = [_address(c) for c in consts]
        self._last = ([_gone] * len(dtypes), head)  # one tuple: threads swap it whole

    def bind(self, buffers: Sequence[Any], work: _Workspace) -> Sequence[Any]:
        """The arrays C reads (to be kept alive until it has run), their addresses written
        into ``work``'s table."""
        if len(buffers) != len(self.dtypes):
            raise TypeError(f"ember internal error: a program of {len(self.dtypes)} inputs "
                            f"called with {len(buffers)} buffers")
        refs, head = self._last
        arrays = buffers
        if not all(map(operator.is_, map(operator.call, refs), buffers)):
            same = list(map(operator.is_, map(operator.call, refs), buffers))
            arrays, refs, head = list(buffers), list(refs), head.copy()
            for i in compress(count(), map(operator.not_, same)):
                array = arrays[i] = np.asarray(buffers[i], self.dtypes[i], order="C")
                head[self._first + i] = _address(array)
                refs[i] = _weak(array) if array is buffers[i] else _gone
            self._last = refs, head
        if work.head is not head:  # a new binding, or a workspace that has not seen it
            work.table[:len(head)] = head
            work.head = head
        return arrays


def _gone() -> None:
    """What a dead weak reference returns: stands for an input not to be recognised."""
    return None


def _weak(array: Any) -> Any:
    try:
        return weakref.ref(array)
    except TypeError:  # not an ndarray (a NumPy scalar): converted on every call
        return _gone


def _arena_view(arena: np.ndarray, offset: int, aval: Any) -> np.ndarray:
    view = np.ndarray(aval.shape, aval.dtype, buffer=arena, offset=offset)
    view.flags.writeable = False
    return view


def _literal(name: str, atom: Literal) -> str:
    data = np.broadcast_to(np.asarray(atom.value), atom.aval.shape).astype(atom.aval.dtype)
    raw = data.tobytes() or b"\0"
    return (f"static const unsigned char {name}[{len(raw)}] __attribute__((aligned(64))) = "
            "{" + ", ".join(str(b) for b in raw) + "};")


def _describe(eqn: Eqn) -> str:
    outs = ", ".join(str(v.aval) for v in eqn.outputs)
    ins = ", ".join(str(a.aval) for a in eqn.inputs)
    return f"{outs} = {eqn.prim.name}({ins})"


def program_threads() -> int:
    """Threads of the program's one pool (OpenMP's; BLAS calls run on them, one piece each):
    ``EMBER_NUM_THREADS``, else ``OMP_NUM_THREADS`` (its first level), else the cores this
    process may run on."""
    for name in ("EMBER_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name)
        if value:
            try:
                return max(1, int(value.split(",")[0]))
            except ValueError:
                raise EmberValueError(f"{name}={value!r}: expected a number of threads, "
                                      f"such as 4") from None
    return available_cores()


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class _Workspace:
    """What one call writes: the arena (temporaries) and the ext table (the addresses of
    everything else), with the two pointers every segment is called with, made once."""

    __slots__ = ("arena", "table", "pointers", "head")

    def __init__(self, arena_bytes: int, n_ext: int):
        self.arena = _aligned_bytes(arena_bytes)
        self.table = np.zeros(max(1, n_ext), np.uintp)
        self.pointers = (ctypes.c_void_p(_address(self.arena)),
                         ctypes.c_void_p(_address(self.table)))
        self.head: np.ndarray | None = None  # the inputs' binding the table holds


class _Arena:
    """The program's workspace, reused across calls; a call that finds it busy (another
    thread) gets a fresh one, so concurrent calls never share temporaries or tables."""

    def __init__(self, nbytes: int, n_ext: int):
        self.nbytes, self.n_ext = nbytes, n_ext
        self._lock = threading.Lock()
        self._kept: _Workspace | None = None

    @property
    def _memory(self) -> np.ndarray | None:
        """The kept arena's bytes (None once cleared)."""
        return None if self._kept is None else self._kept.arena

    def acquire(self) -> _Workspace:
        if self._lock.acquire(False):  # positional: no keyword to parse on every call
            if self._kept is None:
                self._kept = _Workspace(self.nbytes, self.n_ext)
            return self._kept
        return _Workspace(self.nbytes, self.n_ext)

    def release(self, work: _Workspace) -> None:
        if work is self._kept:
            self._lock.release()

    def clear(self) -> None:
        """Free the kept workspace (made again by the next call)."""
        with self._lock:
            self._kept = None


def _aligned_bytes(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start: start + nbytes]

