"""Equation parameters: their canonical keys, and the graphs they hold.

An equation's params are static data (axes, dtypes, shapes, bodies of control flow). Passes and
compilers need to ask "are these two equations the same computation?" (CSE) and "have I compiled
this kernel before?" (a backend's kernel cache). :func:`param_key` answers both with a hashable
value built from the params' *content*: a graph by its structure (the same body traced twice
gives the same key), a dtype by its name, an array by its bytes. Nothing is keyed by ``id()``,
which would make equal bodies look different and could even match an unrelated object that
reused a freed address; and nothing callable may appear, since a function has no content to
compare. Keys are built from strings, numbers, bytes and tuples only, so they print and compare
the same in every process.

Graph-valued params (the bodies of ``cond``, ``scan``, ``while``, ``remat``...) are also what
passes recurse into: :func:`bodies` lists them and :func:`map_bodies` rebuilds an equation's
params with each body rewritten.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ember.ir.graph import ClosedGraph, Eqn, Graph, Literal, Var
from ember.ir.types import ArrayType

__all__ = ["param_key", "graph_key", "bodies", "map_bodies"]

# Arrays up to this many bytes are keyed by their bytes; bigger ones by a digest of them, so a
# key stays small when a body holds a large constant.
_INLINE_BYTES = 256

# Where a ClosedGraph memoises its key (a graph is not changed once built).
_KEY_SLOT = ("param_key",)


def param_key(value: Any) -> Any:
    """A hashable, canonical key of an equation param (or a whole params dict).

    Equal keys mean equal computations. Raises ``TypeError`` for a value with no canonical key:
    a callable, an object hashed by identity, or an array whose value is not known yet (a
    tracer); a pass treats such an equation as unique.
    """
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        return ("int", value)  # not 1.0 or True: params of another type may mean another thing
    if isinstance(value, float):
        return ("float", value.hex())  # NaN equals NaN, -0.0 differs from 0.0
    if isinstance(value, complex):
        return ("complex", value.real.hex(), value.imag.hex())
    if isinstance(value, ClosedGraph):
        return closed_graph_key(value)
    if isinstance(value, Graph):
        return graph_key(value)
    if isinstance(value, (tuple, list)):
        return ("tuple", *(param_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *sorted((str(k), param_key(v)) for k, v in value.items()))
    if isinstance(value, (frozenset, set)):
        return ("set", *sorted((param_key(v) for v in value), key=repr))
    if isinstance(value, np.dtype):
        return ("dtype", str(value))  # "bfloat16", not its kind's "V2"
    if isinstance(value, ArrayType):
        return aval_key(value)
    if isinstance(value, (np.ndarray, np.generic)):
        return array_key(value)
    if isinstance(value, enum.Enum):
        return ("enum", type(value).__qualname__, value.name)
    if callable(value):
        raise TypeError(f"a callable ({value!r}) has no canonical key; an equation param must "
                        "be data (a graph, a dtype, numbers...)")
    return _value_object_key(value)


def _value_object_key(value: Any) -> Any:
    """A key for another object that compares by value (a frozen dataclass, a slice...)."""
    cls = type(value)
    if cls.__hash__ is None or cls.__hash__ is object.__hash__ or cls.__eq__ is object.__eq__:
        raise TypeError(f"a {cls.__qualname__} param is compared by identity, so it has no "
                        "canonical key; give it value equality (a frozen dataclass)")
    fields = getattr(value, "__dataclass_fields__", None)
    if fields is not None:
        return ("object", cls.__qualname__,
                *((name, param_key(getattr(value, name))) for name in fields))
    hash(value)
    return ("object", cls.__qualname__, repr(value))


def aval_key(aval: ArrayType) -> tuple:
    return ("type", aval.shape, str(aval.dtype), aval.weak,
            None if aval.sharding is None else param_key(aval.sharding))


def array_key(value: Any) -> tuple:
    """A concrete array (or scalar) by dtype, shape and content."""
    a = np.asarray(value)
    raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)  # its bytes, copied only if strided
    data = (raw.tobytes() if raw.nbytes <= _INLINE_BYTES
            else hashlib.blake2b(raw, digest_size=20).digest())
    return ("array", str(a.dtype), a.shape, data)


def closed_graph_key(closed: ClosedGraph) -> tuple:
    """A graph by structure together with its constants by content; memoised on the graph."""
    key = closed.cache.get(_KEY_SLOT)
    if key is None:
        # np.asarray refuses a tracer (TracerError is a TypeError): unknown values have no key.
        consts = tuple(array_key(np.asarray(c)) for c in closed.consts)
        key = closed.cache[_KEY_SLOT] = ("closed", graph_key(closed.graph), consts)
    return key


def graph_key(graph: Graph) -> tuple:
    """A graph by structure: vars are numbered in order of definition, so two tracings of the
    same function give equal keys whatever ids their vars got."""
    names: dict[int, int] = {}

    def define(v: Var) -> tuple:
        names[v.id] = len(names)
        return aval_key(v.aval)

    def use(a: Var | Literal) -> Any:
        if isinstance(a, Literal):
            return ("lit", aval_key(a.aval), array_key(a.value))
        if a.id not in names:
            raise TypeError(f"the graph uses {a}, which it does not define")
        return names[a.id]

    consts = tuple(define(v) for v in graph.constvars)
    ins = tuple(define(v) for v in graph.invars)
    eqns = []
    for eqn in graph.eqns:
        inputs = tuple(use(a) for a in eqn.inputs)
        eqns.append((eqn.prim.name, inputs, param_key(eqn.params),
                     tuple(define(v) for v in eqn.outputs)))
    return ("graph", consts, ins, tuple(eqns), tuple(use(a) for a in graph.outvars))


# --- graph-valued params ---------------------------------------------------------------------

def _is_body_list(value: Any) -> bool:
    return (isinstance(value, (tuple, list)) and bool(value)
            and all(isinstance(v, ClosedGraph) for v in value))


def bodies(eqn: Eqn) -> Iterator[tuple[str, ClosedGraph]]:
    """The graphs an equation holds in its params (``branches[1]``, ``body``...), named."""
    for name, value in eqn.params.items():
        if isinstance(value, ClosedGraph):
            yield name, value
        elif _is_body_list(value):
            for i, v in enumerate(value):
                yield f"{name}[{i}]", v


def map_bodies(eqn: Eqn, fn: Callable[[ClosedGraph], ClosedGraph]) -> dict[str, Any]:
    """``eqn``'s params with every body replaced by ``fn(body)`` (the same dict when it holds
    none). ``fn`` must keep each body's inputs and outputs: the equation's operands and result
    types depend on them."""
    new = {}
    for name, value in eqn.params.items():
        if isinstance(value, ClosedGraph):
            value = fn(value)
        elif _is_body_list(value):
            value = type(value)(fn(v) for v in value)
        new[name] = value
    return new if any(new[k] is not eqn.params[k] for k in new) else eqn.params
