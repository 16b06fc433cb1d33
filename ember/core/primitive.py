"""The primitive registry: one object per primitive holding every rule about it.

Rule 1 of the brief: a primitive is declared once, and everything Ember knows about it hangs on
that one object: how to compute its result type (``abstract_eval``), how to differentiate it
(``jvp`` and, for linear primitives, ``transpose``), how to vectorise it (``batch``), and how to
run it on each backend (``impls``). Transformations and backends look the rules up here; nothing
above this layer special-cases a primitive by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

REGISTRY: dict[str, Primitive] = {}


def _route(prim: Primitive, args: tuple, params: dict[str, Any]) -> Any:
    """Replaced by :func:`ember.core.trace.bind` when that module loads (it imports this one, so
    this one cannot import it at the top; a lookup per call would cost every operation)."""
    from ember.core.trace import bind

    return bind(prim, args, params)

# What kind of computation a primitive is: compilers group and lower by kind, never by name.
#
# - ``elementwise``: operands of one shape, ``out[i] = f(in[i])`` (casts, select, copy too);
# - ``generator``: a value computed from indices alone (``iota``);
# - ``movement``: moves or repeats elements without arithmetic (broadcast, reshape, transpose,
#   slice, pad, concatenate, rev);
# - ``reduction``: combines elements along axes (sums, max, argmax);
# - ``cumulative``: running reductions along one axis (cumsum...);
# - ``contraction``: products summed over axes (``dot_general``);
# - ``indexing``: reads or writes at data-dependent positions (gather, scatter, dynamic slices);
# - ``sort``: sort, argsort, top_k;
# - ``random``: random bits from a key;
# - ``library``: computed by a library routine (linear-algebra factorisations, FFT);
# - ``control``: holds subgraphs (cond, while, scan, remat, custom_vjp, call, fused);
# - ``collective``: communicates between the devices of a mesh (all_reduce, all_gather...); a
#   compiled program runs it as a host step, never inside a kernel.
KINDS = frozenset({"elementwise", "generator", "movement", "reduction", "cumulative",
                   "contraction", "indexing", "sort", "random", "library", "control",
                   "collective"})


class Primitive:
    """A primitive operation and its rules.

    Rules (all optional except ``abstract_eval`` and a NumPy implementation):

    - ``abstract_eval(*avals, **params) -> ArrayType | list[ArrayType]``: result types; raises an
      :class:`ember.EmberError` for operands that do not fit.
    - ``impls[backend](*buffers, **params)``: compute the result on concrete buffers.
    - ``jvp(primals, tangents, **params) -> (out, tangent_out)``: forward-mode derivative;
      tangents may be :class:`ember.core.trace.Zero`.
    - ``transpose(cts, *args, **params) -> list``: for primitives linear in some operands, the
      cotangents of those operands (args that are linear come as ``UndefinedPrimal``).
    - ``batch(args, dims, **params) -> (out, out_dim)``: vmap rule; dims are ints or ``None``.
    - ``partial_eval``: for primitives holding subgraphs, how to split them into the part that
      can run now and the part that must be staged (used by ``linearize``).
    - ``inplace_impls[backend]``: like ``impls`` but allowed to overwrite operand 0 and return
      it; a compiled program uses it when operand 0 is a donated input read by nothing else
      (the KV cache update of a decode step).
    - ``lowerings[target]``: how a code generator renders the primitive for ``target`` (``"c"``
      for the compiled CPU backend). Registered by the backend that owns the target, as JAX's
      lowering rules are, so this layer knows nothing of C.

    ``kind`` (one of :data:`KINDS`) says what sort of computation the primitive is, so fusion
    and code generation decide by kind, never by name.

    ``sharding_rule(eqn_avals..., **params)`` says how the primitive's operands and results can
    be split over a device mesh (set for every primitive by ``ember.parallel.rules``; the
    parallel layer sits above this one, as the backends that set ``lowerings`` do).
    """

    def __init__(self, name: str, *, kind: str, multiple_results: bool = False):
        if name in REGISTRY:
            raise ValueError(f"primitive {name!r} is declared twice")
        if kind not in KINDS:
            raise ValueError(f"primitive {name!r}: unknown kind {kind!r}")
        self.name = name
        self.kind = kind
        self.multiple_results = multiple_results
        self.abstract_eval: Callable[..., Any] | None = None
        self.impls: dict[str, Callable[..., Any]] = {}
        self.inplace_impls: dict[str, Callable[..., Any]] = {}
        self.lowerings: dict[str, Any] = {}
        self.jvp: Callable[..., Any] | None = None
        self.transpose: Callable[..., Any] | None = None
        self.batch: Callable[..., Any] | None = None
        self.partial_eval: Callable[..., Any] | None = None
        self.sharding_rule: Callable[..., Any] | None = None
        REGISTRY[name] = self

    def bind(self, *args: Any, **params: Any) -> Any:
        return _route(self, args, params)

    def def_abstract_eval(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.abstract_eval = fn
        return fn

    def def_impl(self, fn: Callable[..., Any], backend: str = "numpy") -> Callable[..., Any]:
        self.impls[backend] = fn
        return fn

    def def_inplace_impl(self, fn: Callable[..., Any], backend: str = "numpy"
                         ) -> Callable[..., Any]:
        self.inplace_impls[backend] = fn
        return fn

    def def_lowering(self, target: str, rule: Any) -> Any:
        self.lowerings[target] = rule
        return rule

    def def_jvp(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.jvp = fn
        return fn

    def def_transpose(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.transpose = fn
        return fn

    def def_batch(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.batch = fn
        return fn

    def __repr__(self) -> str:
        return f"Primitive({self.name})"
