"""Hidden state that ``jit`` threads through compiled programs (the global random key).

PyTorch code draws random numbers from a global generator (``F.dropout(x, 0.1)``) and expects a
compiled training step to draw fresh ones at every call. A traced program cannot read a Python
global at run time, so a :class:`HiddenState` is read and written through ``get``/``set``:

- eagerly (and under transformations that run now, such as eager ``grad`` or ``vmap``) these
  are plain reads and writes of the current value;
- while ``jit`` traces a function, the first ``get`` makes the state an extra input of the
  traced program and the last ``set`` an extra output; each call of the compiled program then
  passes the current value in and stores the new one, exactly as the eager code would have.

Inside a staged body of its own (a ``lax.scan``/``cond`` body, ``checkpoint``) the state cannot
flow out, so it is an error there that says to pass the value explicitly.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ember.core import trace as tr
from ember.errors import TracerError, user_frame
from ember.ir.graph import ClosedGraph
from ember.ir.types import ArrayType


class HiddenState:
    """A named global value (an Array) that compiled programs read and update."""

    def __init__(self, name: str, initial: Callable[[], Any], hint: str):
        self.name = name
        self.hint = hint  # how to do without it, for the error inside staged bodies
        self._initial = initial
        self._value: Any = None

    def get(self) -> Any:
        staging = _staging_for(self)
        return self.current() if staging is None else staging.read(self)

    def set(self, value: Any) -> None:
        staging = _staging_for(self)
        if staging is None:
            self._value = value
        else:
            staging.write(self, value)

    def current(self) -> Any:
        """The concrete value (created on first use)."""
        if self._value is None:
            self._value = self._initial()
        return self._value

    def __repr__(self) -> str:
        return f"HiddenState({self.name})"


class Staging:
    """The hidden states one ``jit`` trace has touched: their input tracers and latest values."""

    def __init__(self, main: tr.MainTrace):
        self.main = main
        self.inputs: dict[HiddenState, tr.GraphTracer] = {}
        self.latest: dict[HiddenState, Any] = {}

    def read(self, state: HiddenState) -> Any:
        if state not in self.latest:
            tracer = self.main.trace.new_arg(tr.aval_of(state.current()))
            self.inputs[state] = tracer
            self.latest[state] = tracer
        return self.latest[state]

    def write(self, state: HiddenState, value: Any) -> None:
        if isinstance(value, tr.Tracer) and value._trace.main is not self.main:
            raise _inside_body(state)
        self.latest[state] = value

    @property
    def states(self) -> list[HiddenState]:
        return list(self.latest)


class _Stagings(threading.local):
    """The jit traces collecting hidden state, per thread, as the trace stack is (two threads,
    such as virtual devices, may trace at once)."""

    def __init__(self):
        self.stack: list[Staging] = []


_stagings = _Stagings()


@contextlib.contextmanager
def staging(main: tr.MainTrace) -> Iterator[Staging]:
    """Collect the hidden states that a ``jit`` trace (``main``) reads and writes."""
    s = Staging(main)
    stack = _stagings.stack
    stack.append(s)
    try:
        yield s
    finally:
        stack.pop()


def _staging_for(state: HiddenState) -> Staging | None:
    top = tr.innermost_dynamic()
    if top.level == 0:
        return None  # nothing is being staged: the value is used now
    stack = _stagings.stack
    if stack and stack[-1].main is top:
        return stack[-1]
    raise _inside_body(state)


def _inside_body(state: HiddenState) -> TracerError:
    return TracerError(
        f"{state.name} is hidden global state; jit threads it through a compiled program, but "
        f"not out of a staged body (lax.scan/cond/while_loop, checkpoint, custom_vjp).\n"
        f"  at {user_frame()}\n{state.hint}")


def make_graph_with_state(fn: Callable[..., Any], in_avals: Sequence[ArrayType]
                          ) -> tuple[ClosedGraph, list[HiddenState]]:
    """:func:`ember.core.trace.make_graph` for ``jit``: the hidden states ``fn`` touched become
    trailing inputs (their values before) and trailing outputs (their values after)."""
    with tr.new_main(tr.GraphTrace, tr.GraphBuilder(), dynamic=True) as main:
        trace: tr.GraphTrace = main.trace
        builder: tr.GraphBuilder = main.payload
        ins = [trace.new_arg(a) for a in in_avals]
        invars = [builder.var(t) for t in ins]  # before fn runs: x[i] = v may rebind an input
        with staging(main) as staged:
            outs = list(fn(*ins))
        states = staged.states
        for s in states:  # a state only written still gets an input, so calls stay uniform
            t = staged.inputs[s] if s in staged.inputs else trace.new_arg(tr.aval_of(
                s.current()))
            invars.append(builder.var(t))
        outs += [staged.latest[s] for s in states]
        return builder.build(invars, [trace.full_raise(o) for o in outs]), states
