"""The graph: a typed, static, single-assignment program over primitives.

A :class:`Graph` is a list of equations ``outs = prim[params](ins)`` between typed :class:`Var`
values, with explicit inputs, constants (arrays captured from the enclosing Python scope) and
outputs. It is what ``jit`` traces a function into, what the transformations and passes rewrite,
and what backends compile. It is deliberately small: no regions other than graph-valued params of
control-flow primitives, no mutation, no implicit broadcasting.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ember.ir.types import ArrayType

_ids = itertools.count()


class Var:
    """A value produced by one equation (or a graph input) and used by later ones."""

    __slots__ = ("aval", "id")

    def __init__(self, aval: ArrayType):
        self.aval = aval
        self.id = next(_ids)

    def __repr__(self) -> str:
        return f"Var({self.id}: {self.aval})"


class Literal:
    """A constant small enough to print inline (a scalar)."""

    __slots__ = ("value", "aval")

    def __init__(self, value: Any, aval: ArrayType):
        self.value = value
        self.aval = aval

    def __repr__(self) -> str:
        return f"Literal({_format_literal(self.value)}: {self.aval})"


Atom = Var | Literal


@dataclass
class Eqn:
    """``outputs = prim[params](inputs)``.

    ``source`` is the user's ``file:line`` that staged the equation (where known), so a pass
    that acts on it (the partitioner inserting a collective) can say which line caused what.
    It is not part of the equation's meaning: not compared, not in graph keys.
    """

    prim: Any  # ember.core.primitive.Primitive; typed loosely so ir does not import core
    inputs: list[Atom]
    outputs: list[Var]
    params: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False, repr=False)


@dataclass
class Graph:
    """A static program: ``constvars`` are bound by the closing :class:`ClosedGraph`."""

    constvars: list[Var]
    invars: list[Var]
    eqns: list[Eqn]
    outvars: list[Atom]

    @property
    def in_avals(self) -> list[ArrayType]:
        return [v.aval for v in self.invars]

    @property
    def out_avals(self) -> list[ArrayType]:
        return [v.aval for v in self.outvars]

    def __str__(self) -> str:
        return format_graph(self)


@dataclass
class ClosedGraph:
    """A graph together with the values of its constants."""

    graph: Graph
    consts: list[Any]
    # Backends memoise what they compiled from this graph here (control-flow bodies).
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def in_avals(self) -> list[ArrayType]:
        return self.graph.in_avals

    @property
    def out_avals(self) -> list[ArrayType]:
        return self.graph.out_avals

    def __str__(self) -> str:
        return format_graph(self.graph, self.consts)


def _format_literal(value: Any) -> str:
    v = np.asarray(value)
    if v.dtype == np.bool_:
        return "true" if bool(v) else "false"
    return repr(v.item()) if v.ndim == 0 else f"<{v.shape} constant>"


class _Namer:
    """Names vars a, b, ..., z, ba, bb... in order of appearance, as they are printed."""

    def __init__(self):
        self.names: dict[int, str] = {}

    def __call__(self, atom: Atom) -> str:
        if isinstance(atom, Literal):
            return _format_literal(atom.value)
        name = self.names.get(atom.id)
        if name is None:
            n, letters = len(self.names), ""
            while True:
                letters = chr(ord("a") + n % 26) + letters
                n //= 26
                if n == 0:
                    break
            name = self.names[atom.id] = "%" + letters
        return name


def format_graph(graph: Graph, consts: list[Any] | None = None, name: str = "graph",
                 indent: int = 0, namer: _Namer | None = None) -> str:
    """Pretty-print a graph; nested graphs (control flow) are printed indented in place."""
    namer = namer or _Namer()
    for v in [*graph.invars, *graph.constvars]:
        namer(v)
    pad = "  " * indent
    decl = lambda v: f"{namer(v)}: {v.aval}"  # noqa: E731
    lines = []
    if graph.constvars:
        shown = []
        for i, v in enumerate(graph.constvars):
            c = "" if consts is None else f" = {_describe_const(consts[i])}"
            shown.append(f"{decl(v)}{c}")
        lines.append(f"{pad}  const " + ", ".join(shown))
    for eqn in graph.eqns:
        outs = ", ".join(decl(v) for v in eqn.outputs)
        args = ", ".join(namer(a) for a in eqn.inputs)
        simple = {k: v for k, v in eqn.params.items() if not _is_graph(v)}
        nested = {k: v for k, v in eqn.params.items() if _is_graph(v)}
        params = ""
        if simple:
            params = "[" + ", ".join(f"{k}={_format_param(v)}" for k, v in simple.items()) + "]"
        lines.append(f"{pad}  {outs} = {eqn.prim.name}{params}({args})")
        for key, sub in nested.items():
            for i, g in enumerate(sub if isinstance(sub, (list, tuple)) else [sub]):
                label = f"{key}[{i}]" if isinstance(sub, (list, tuple)) else key
                inner = g.graph if isinstance(g, ClosedGraph) else g
                lines.append(format_graph(inner, None, label, indent + 2, namer))
    head = ", ".join(decl(v) for v in graph.invars)
    out_types = ", ".join(str(a.aval) for a in graph.outvars)
    result = ", ".join(namer(a) for a in graph.outvars)
    return "\n".join([f"{pad}{name}({head}) -> ({out_types}) {{", *lines,
                      f"{pad}  return {result}", f"{pad}}}"])


def _is_graph(v: Any) -> bool:
    if isinstance(v, (list, tuple)) and v:
        return all(isinstance(x, (Graph, ClosedGraph)) for x in v)
    return isinstance(v, (Graph, ClosedGraph))


def _describe_const(c: Any) -> str:
    a = np.asarray(c)
    if a.size <= 4:
        return np.array2string(a, separator=", ").replace("\n", "")
    return f"<array {a.dtype}{list(a.shape)}>"


def _format_param(v: Any) -> str:
    if isinstance(v, np.dtype):
        from ember.dtypes import short_name

        return short_name(v)
    if callable(v) and hasattr(v, "__name__"):
        return v.__name__
    if isinstance(v, str):  # names print bare, as in ``call[name=layer]``
        return v
    return repr(v)
