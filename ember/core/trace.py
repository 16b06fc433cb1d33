"""The trace stack: how one primitive call is routed to the right interpreter.

Every operation ends in :func:`bind`. ``bind`` looks at its operands: if any is a
:class:`Tracer`, the operation belongs to the innermost active transformation among them and is
handed to that transformation's :class:`Trace`; otherwise it runs now, on the backend (eager
mode). Transformations nest by level, so ``grad(vmap(jit(f)))`` is three traces stacked, each
handling the primitives its own tracers reach and passing the rest down. This is JAX's design
(see autodidax), written here from scratch.

Two traces live at this layer because everything above needs them:

- the eval trace at level 0, which runs primitives on a backend;
- :class:`GraphTrace`, which stages primitives into a :class:`ember.ir.Graph` (used by ``jit``,
  by control-flow primitives for their bodies, and by ``linearize`` for the tangent program).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ember import dtypes
from ember.backends import Backend, default_backend
from ember.core import primitive
from ember.core.array import Array, Tracer
from ember.core.primitive import Primitive
from ember.errors import EmberError, TracerError, user_frame
from ember.ir.graph import ClosedGraph, Eqn, Graph, Literal, Var
from ember.ir.types import ArrayType, type_of


class MainTrace:
    """One active transformation on the stack."""

    def __init__(self, level: int, trace_type: type[Trace], payload: Any = None,
                 dynamic: bool = False):
        self.level = level
        self.dynamic = dynamic
        self.trace_type = trace_type
        self.payload = payload
        self.active = True
        self.trace = trace_type(self)

    def __repr__(self) -> str:
        return f"MainTrace({self.level}, {self.trace_type.__name__})"


class Trace:
    """Interprets primitives applied to its tracers."""

    def __init__(self, main: MainTrace):
        self.main = main

    def pure(self, value: Any) -> Tracer:
        """Wrap a value from outside every transformation (a constant)."""
        raise NotImplementedError

    def lift(self, value: Tracer) -> Tracer:
        """Wrap a tracer of a lower (outer) transformation."""
        return self.pure(value)

    def full_raise(self, value: Any) -> Tracer:
        if isinstance(value, Tracer):
            main = value._trace.main
            if main is self.main:
                return value
            if not main.active:
                raise escaped_tracer(value)
            if main.level < self.main.level:
                return self.lift(value)
            raise EmberError(f"internal: tracer of level {main.level} reached level "
                             f"{self.main.level}")
        return self.pure(value)

    def process_primitive(self, prim: Primitive, tracers: list[Tracer],
                          params: dict[str, Any]) -> Any:
        raise NotImplementedError


def escaped_tracer(t: Tracer) -> TracerError:
    return TracerError(
        f"a traced value ({t.aval}) was used after the transformation that made it had "
        f"finished (it escaped, e.g. stored in a global or a list outside the function).\n"
        f"  at {user_frame()}\nReturn it from the function instead.")


class EvalTrace(Trace):
    """Level 0: run primitives now. Only used as the bottom of the stack."""


_EVAL_MAIN = MainTrace(0, EvalTrace)  # stateless: the bottom of every thread's stack


class _Stacks(threading.local):
    """The active transformations, per thread: a thread (a virtual device's) runs eagerly
    while another traces."""

    def __init__(self):
        self.stack: list[MainTrace] = [_EVAL_MAIN]
        self.dynamic: list[MainTrace] = [_EVAL_MAIN]
        self.source: str | None = None  # the user line of the equation eval_graph replays


_stacks = _Stacks()
# Transformations active in all threads together. While it is 0, which is most of eager
# code's life, no thread traces, so the hot paths skip the thread-local lookup (~70 ns).
_tracing = 0
_tracing_lock = threading.Lock()


def _count_tracing(delta: int) -> None:
    global _tracing
    with _tracing_lock:
        _tracing += delta


@contextlib.contextmanager
def new_main(trace_type: type[Trace], payload: Any = None, dynamic: bool = False
             ) -> Iterator[MainTrace]:
    """Push a transformation; ``dynamic`` makes it receive even operations on constants."""
    stacks = _stacks
    main = MainTrace(len(stacks.stack), trace_type, payload, dynamic)
    stacks.stack.append(main)
    if dynamic:
        stacks.dynamic.append(main)
    _count_tracing(1)
    try:
        yield main
    finally:
        _count_tracing(-1)
        main.active = False
        stacks.stack.pop()
        if dynamic:
            stacks.dynamic.pop()


def innermost_main() -> MainTrace:
    """The transformation pushed last (the eval trace when none is active)."""
    return _stacks.stack[-1] if _tracing else _EVAL_MAIN


def innermost_dynamic() -> MainTrace:
    """The innermost transformation that stages every operation (a jit or body trace), or the
    eval trace when none is active."""
    return _stacks.dynamic[-1] if _tracing else _EVAL_MAIN


def tracing_active() -> bool:
    """True when some transformation other than the eval trace is active in this thread."""
    return bool(_tracing) and len(_stacks.stack) > 1


def bind(prim: Primitive, args: Sequence[Any], params: dict[str, Any]) -> Any:
    """Apply ``prim`` to ``args``: route it to the innermost transformation that owns an arg."""
    if not _tracing:  # no thread traces: run it now (eval_primitive refuses tracers)
        return eval_primitive(prim, args, params)
    stacks = _stacks
    if len(stacks.stack) == 1:  # this thread traces nothing
        return eval_primitive(prim, args, params)
    top = stacks.dynamic[-1]
    for a in args:
        if isinstance(a, Tracer):
            main = a._trace.main
            if not main.active:
                raise escaped_tracer(a)
            if main.level > top.level:
                top = main
    if top.level == 0:
        return eval_primitive(prim, args, params)
    trace = top.trace
    tracers = [trace.full_raise(a) for a in args]
    out = trace.process_primitive(prim, tracers, params)
    if prim.multiple_results:
        return [full_lower(o) for o in out]
    return full_lower(out)


primitive._route = bind  # Primitive.bind calls it directly from now on


def full_lower(value: Any) -> Any:
    return value.full_lower() if isinstance(value, Tracer) else value


# --- eager evaluation ------------------------------------------------------------------------

def to_array(value: Any) -> Array:
    """Turn a concrete value (Array, NumPy array, Python or NumPy scalar) into an Array.

    This is where host memory enters Ember, so memory that someone else can still write (a
    NumPy array, or anything that exposes its buffer) is copied: the Array's value can then
    never change behind its back (decision record 0008).
    """
    if isinstance(value, Array):
        # (A tracer has no buffer; a sharded array checks its own buffers when it is read.)
        if type(value) is Array and value._buffer is None:
            raise EmberError(f"this array was donated to a jitted function and can no longer "
                             f"be used\n  at {user_frame()}")
        return value
    if dtypes.is_python_scalar(value):
        aval = type_of(value)
        return Array(np.asarray(value, aval.dtype), aval)
    arr = np.asarray(value)
    aval = type_of(arr)
    if arr.dtype != aval.dtype:
        arr = arr.astype(aval.dtype)
    elif arr is value or arr.base is not None:
        arr = arr.copy()
    return Array(arr, aval)


def shared_array(value: np.ndarray) -> Array:
    """An Array that shares ``value``'s memory without copying it (``asarray(copy=False)``).

    Ember holds it through a read-only view, so no in-place path of Ember ever writes into it
    (they all require a buffer that owns its memory); whoever holds ``value`` must not write it
    either.
    """
    view = value.view()
    view.flags.writeable = False
    return Array(view, type_of(view))


# Array subclasses whose operations run elsewhere (a sharded array's, per device), with the
# function that runs them: registered by the layer that defines them, which this one cannot
# import. Looked up only off the fast path (operands that are not plain Arrays).
_EAGER_HANDLERS: dict[type, Callable[[Primitive, Sequence[Any], dict[str, Any]], Any]] = {}


def register_eager_handler(cls: type, handler: Callable[..., Any]) -> None:
    """Run every eager primitive that has an operand of type ``cls`` as
    ``handler(prim, args, params)``."""
    _EAGER_HANDLERS[cls] = handler


def eval_primitive(prim: Primitive, args: Sequence[Any], params: dict[str, Any]) -> Any:
    avals, buffers = [], []
    backend: Backend | None = None
    for a in args:
        if type(a) is not Array or a._buffer is None:  # else nothing to convert or check
            if isinstance(a, Tracer):  # reached the eval trace: its transformation is over
                raise escaped_tracer(a)
            handler = _EAGER_HANDLERS.get(type(a))
            if handler is not None:
                return handler(prim, args, params)
            a = to_array(a)
        avals.append(a._aval)
        buffers.append(a._buffer)
        backend = backend or a._backend
    out_aval = _RULE_MEMO.get((prim, (), *avals)) if not params else None
    if out_aval is None:
        out_aval = abstract_eval(prim, avals, params)
    backend = backend or default_backend()
    out = backend.run_primitive(prim, buffers, params)
    if prim.multiple_results:
        return [_wrap(o, av, backend) for o, av in zip(out, out_aval)]
    return _wrap(out, out_aval, backend)


def _wrap(buffer: Any, aval: ArrayType, backend: Backend) -> Array:
    if backend.numpy_results:
        # NumPy returns scalars for 0-d results and may widen a dtype: make it the rule's.
        if type(buffer) is not np.ndarray:
            buffer = np.asarray(buffer)
        if buffer.dtype != aval.dtype:
            buffer = buffer.astype(aval.dtype)
        if buffer.shape != aval.shape:
            raise EmberError(f"internal: implementation returned {buffer.shape}, rule said "
                             f"{aval.shape}")
    return Array(buffer, aval, backend)


# --- result types, memoised -----------------------------------------------------------------

_RULE_MEMO: dict[tuple, Any] = {}
_RULE_MEMO_SIZE = 4096  # distinct (primitive, types, params) kept; emptied when full
_PLAIN_TYPES = frozenset({int, bool, str, type(None)})


def abstract_eval(prim: Primitive, avals: Sequence[ArrayType], params: dict[str, Any]) -> Any:
    """``prim``'s result type (a tuple of them for multiple results) for operands of ``avals``.

    Eager code asks the same question over and over (``add`` of two ``f32[8,8]``), and a shape
    rule builds sets and new types each time. Rules are pure functions of types and params, so
    the answer is kept when every param is a plain value whose equality means sameness
    (:func:`_params_key`). A rule that raises is never memoised, so its error is raised anew,
    naming the caller's line.
    """
    pkey = _params_key(params) if params else ()
    if pkey is None:
        return prim.abstract_eval(*avals, **params)
    key = (prim, pkey, *avals)
    out = _RULE_MEMO.get(key)
    if out is None:
        out = prim.abstract_eval(*avals, **params)
        if isinstance(out, list):
            out = tuple(out)  # shared between callers: must not be mutable
        if len(_RULE_MEMO) >= _RULE_MEMO_SIZE:
            _RULE_MEMO.clear()
        _RULE_MEMO[key] = out
    return out


def _params_key(params: dict[str, Any]) -> tuple | None:
    """A key equal for equal params, or None when that cannot be had cheaply and safely.

    Accepted: ints, bools, strings, None, dtypes and (nested) tuples of ints or None, each with
    its type in the key, since ``1 == 1.0 == True`` but a rule may tell them apart. Floats
    (``0.0 == -0.0``, NaN), graphs, callables and other objects are not memoised. Equal keys
    here imply equal :func:`ember.ir.params.param_key`s; that general key is not used because
    it builds a tagged tuple per value, too slow for every eager operation.
    """
    key = []
    for name, v in params.items():
        t = type(v)
        if t is tuple:
            if not _int_tuple(v):
                return None
        elif t not in _PLAIN_TYPES and not isinstance(v, np.dtype):
            return None
        key.append((name, t, v))
    return tuple(key)


def _int_tuple(value: tuple) -> bool:
    for e in value:
        t = type(e)
        if t is tuple:
            if not _int_tuple(e):
                return False
        elif t is not int and e is not None:
            return False
    return True


# --- staging into a graph --------------------------------------------------------------------

_NOT_CONST = object()


class GraphTracer(Tracer):
    __slots__ = ("_aval_", "const")

    def __init__(self, trace: GraphTrace, aval: ArrayType, const: Any = _NOT_CONST):
        self._trace = trace
        self._aval_ = aval
        self.const = const

    @property
    def aval(self) -> ArrayType:
        return self._aval_

    @property
    def is_known(self) -> bool:
        """True for a value captured from outside (known now), False for a staged one."""
        return self.const is not _NOT_CONST


class GraphBuilder:
    """Collects the equations that staged primitives produce."""

    def __init__(self):
        self.eqns: list[Eqn] = []
        self.vars: dict[int, Var | Literal] = {}
        self.tracers: list[GraphTracer] = []  # keeps ids stable while building
        self.consts: dict[int, tuple[GraphTracer, Any]] = {}
        # id(outer value) -> (that value, its tracer); holding the value keeps the id unique
        self.const_tracers: dict[int, tuple[Any, GraphTracer]] = {}

    def new_tracer(self, trace: GraphTrace, aval: ArrayType, const: Any = _NOT_CONST
                   ) -> GraphTracer:
        t = GraphTracer(trace, aval, const)
        self.tracers.append(t)
        if const is _NOT_CONST:
            self.vars[id(t)] = Var(aval)
        elif _is_literal(const):
            self.vars[id(t)] = Literal(np.array(_host(const)), aval)
        else:
            self.vars[id(t)] = Var(aval)
            self.consts[id(t)] = (t, const)
        return t

    def var(self, t: GraphTracer) -> Var | Literal:
        return self.vars[id(t)]

    def build(self, invars: Sequence[Var | GraphTracer], outputs: Sequence[GraphTracer]
              ) -> ClosedGraph:
        """Close the graph over ``invars`` with the values of ``outputs``. Pass input Vars
        taken when the inputs were made: ``x[i] = v`` may rebind an input tracer later."""
        invars = [v if isinstance(v, Var) else self.vars[id(v)] for v in invars]
        outvars = [self.vars[id(t)] for t in outputs]
        used = _live_consts(self.eqns, outvars)
        constvars, consts = [], []
        for tid, (_, value) in self.consts.items():
            v = self.vars[tid]
            if v.id in used:
                constvars.append(v)
                consts.append(value)
        graph = Graph(constvars, list(invars), list(self.eqns), outvars)
        return ClosedGraph(graph, consts)


def _live_consts(eqns: list[Eqn], outvars: list[Any]) -> set[int]:
    ids = {a.id for a in outvars if isinstance(a, Var)}
    for eqn in eqns:
        ids.update(a.id for a in eqn.inputs if isinstance(a, Var))
    return ids


def _host(value: Any) -> Any:
    return value.to_numpy() if isinstance(value, Array) else value


def _is_literal(value: Any) -> bool:
    if isinstance(value, Tracer):
        return False
    if isinstance(value, (*dtypes.PYTHON_SCALARS, np.generic)):
        return True
    return getattr(value, "ndim", None) == 0 and isinstance(value, (Array, np.ndarray))


class GraphTrace(Trace):
    """Stages every primitive it receives into the builder in ``main.payload``."""

    @property
    def builder(self) -> GraphBuilder:
        return self.main.payload

    def pure(self, value: Any) -> GraphTracer:
        # One constant per outer value, so a residual used many times is stored once.
        known = self.builder.const_tracers.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        # A captured NumPy array is copied now: the program must not see later writes to it.
        const = value if isinstance(value, Array) or _is_literal(value) else to_array(value)
        tracer = self.builder.new_tracer(self, aval_of(const), const=const)
        self.builder.const_tracers[id(value)] = (value, tracer)
        return tracer

    def new_arg(self, aval: ArrayType) -> GraphTracer:
        return self.builder.new_tracer(self, aval)

    def process_primitive(self, prim: Primitive, tracers: list[GraphTracer],
                          params: dict[str, Any]) -> Any:
        # A dynamic trace (jit) stages everything; only a trace that separates known from
        # unknown values (linearize) lets primitives with subgraphs split themselves.
        if prim.partial_eval is not None and not self.main.dynamic and \
                any(t.is_known for t in tracers):
            return prim.partial_eval(self, tracers, params)
        return self.stage(prim, tracers, params)

    def stage(self, prim: Primitive, tracers: Sequence[GraphTracer], params: dict[str, Any]
              ) -> Any:
        """Record ``prim`` as an equation and return tracers for its results."""
        out_aval = abstract_eval(prim, [t.aval for t in tracers], params)
        avals = out_aval if prim.multiple_results else [out_aval]
        outs = [self.builder.new_tracer(self, a) for a in avals]
        self.builder.eqns.append(Eqn(prim, [self.builder.var(t) for t in tracers],
                                     [self.builder.var(o) for o in outs], params,
                                     source=staging_source()))
        return outs if prim.multiple_results else outs[0]


_EMBER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_IN_EMBER: dict[str, bool] = {}  # source file name -> inside the ember package


def staging_source() -> str | None:
    """``file:line`` of the innermost frame outside ember: the user line an equation comes from.

    Like :func:`ember.errors.user_frame` but cheap enough for every staged equation (about a
    microsecond: one dictionary lookup per frame, no source text read). While
    :func:`eval_graph` replays a traced equation (a transformation re-staging a body), the
    equations it stages come from that equation's line.
    """
    replayed = _stacks.source
    if replayed is not None:
        return replayed
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        inside = _IN_EMBER.get(name)
        if inside is None:
            inside = _IN_EMBER[name] = os.path.abspath(name).startswith(_EMBER_DIR)
        if not inside:
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def make_graph(fn: Callable[..., Sequence[Any]], in_avals: Sequence[ArrayType],
               dynamic: bool = True) -> ClosedGraph:
    """Trace ``fn(*tracers) -> list of values`` into a closed graph (flat inputs and outputs)."""
    with new_main(GraphTrace, GraphBuilder(), dynamic=dynamic) as main:
        trace: GraphTrace = main.trace
        ins = [trace.new_arg(a) for a in in_avals]
        invars = [main.payload.var(t) for t in ins]
        outs = [trace.full_raise(o) for o in fn(*ins)]
        return main.payload.build(invars, outs)


def eval_graph(closed: ClosedGraph, *args: Any) -> list[Any]:
    """Interpret a graph by binding its primitives: runs it under whatever traces are active."""
    graph = closed.graph
    env: dict[int, Any] = {}
    for v, x in zip(graph.constvars, closed.consts):
        env[v.id] = x
    for v, x in zip(graph.invars, args):
        env[v.id] = x

    def read(a: Var | Literal) -> Any:
        return Array(a.value, a.aval) if isinstance(a, Literal) else env[a.id]

    outer = _stacks.source
    try:
        for eqn in graph.eqns:
            _stacks.source = eqn.source or outer
            out = eqn.prim.bind(*[read(a) for a in eqn.inputs], **eqn.params)
            for v, o in zip(eqn.outputs, out if eqn.prim.multiple_results else [out]):
                env[v.id] = o
    finally:
        _stacks.source = outer
    return [read(a) for a in graph.outvars]


# --- markers used by differentiation rules ---------------------------------------------------

class Zero:
    """A symbolic zero tangent or cotangent: costs nothing until it must be materialised."""

    __slots__ = ("aval",)

    def __init__(self, aval: ArrayType):
        self.aval = aval.strong()

    def __repr__(self) -> str:
        return f"Zero({self.aval})"


class UndefinedPrimal:
    """Stands for a linear operand of a primitive while it is being transposed."""

    __slots__ = ("aval",)

    def __init__(self, aval: ArrayType):
        self.aval = aval

    def __repr__(self) -> str:
        return f"UndefinedPrimal({self.aval})"


def aval_of(x: Any) -> ArrayType:
    """The abstract type of any value Ember accepts as an operand."""
    if isinstance(x, (Array, Zero, UndefinedPrimal)):
        return x.aval
    return type_of(x)
