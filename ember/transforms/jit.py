"""``jit``: trace a function once per signature into a graph, optimise it, compile it.

The cache key is explicit (rule 5): the pytree structure of the arguments, the abstract type of
every array leaf (shape, dtype, weak flag, sharding), the values of static arguments and the
backend. Each miss is a trace, counted per function and explained: ``f.cache_info()`` reports
the number of traces and hits and, for the last retrace, which part of the key changed.

Without ``backend=``, the backend is the default one when the function is called, so a function
jitted at import follows a later ``ember.backends.set_default_backend``.

Called from inside another transformation (``grad(jit(f))``, ``vmap(jit(f))``, another
``jit``, a ``scan`` body, ``checkpoint``), the function stays a compile boundary: its graph
(traced once per signature, from the same cache) is applied as one ``call`` equation
(:mod:`ember.transforms.call`), whose rules make transformed calls. ``donate_argnums`` does not
apply there: the enclosing transformation or program owns the buffers.

With shardings (``in_shardings``/``out_shardings``, or sharded arguments, whose types carry
their layouts) the traced global graph is handed to the parallel layer, which this module sits
below and reaches through :func:`register_sharding_hook`: it partitions the graph and runs the
per-device program on every device (``ember.parallel.jit``). Without them nothing here changes.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import compress, count, repeat
from typing import Any

from ember.backends import Backend, default_backend, get_backend
from ember.core.array import Array, Tracer
from ember.core.hidden_state import HiddenState, make_graph_with_state
from ember.core.trace import to_array, tracing_active
from ember.errors import EmberError, EmberValueError, UnsupportedError, user_frame
from ember.ir.graph import ClosedGraph
from ember.ir.passes import optimize
from ember.ir.types import ArrayType
from ember.ir.verify import verify
from ember.transforms.autodiff import flatten_fun
from ember.transforms.call import call_p
from ember.transforms.subgraphs import hoist_consts
from ember.tree import LEAF, TreeDef, tree_flatten, tree_unflatten

__all__ = ["jit", "Jitted", "Lowered", "Compiled", "ShardingHook", "register_sharding_hook"]


@dataclass(frozen=True, eq=False)
class CacheKey:
    tree: TreeDef
    avals: tuple[ArrayType, ...]
    static: tuple[Any, ...]
    # The backend that compiles the program: ``backend=``, else the default when called.
    backend: str = "numpy"

    # Hashed once: hashing the types of a model's hundreds of leaves is a Python call each.
    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.tree, self.avals, self.static,
                                                self.backend)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, CacheKey) and self._hash == other._hash
            and self.same(other.tree, other.avals, other.static, other.backend))

    def same(self, tree: TreeDef, avals: tuple[ArrayType, ...], static: tuple[Any, ...],
             backend: str) -> bool:
        """Whether this key has these parts (kept trees and the types in the tuples compare
        by identity first, with no Python call)."""
        return ((self.tree is tree or self.tree == tree) and self.avals == avals
                and self.static == static and self.backend == backend)

    def difference(self, other: CacheKey) -> str:
        if self.backend != other.backend:
            return f"backend changed: {other.backend} -> {self.backend}"
        if self.tree != other.tree:
            return f"argument structure changed: {other.tree} -> {self.tree}"
        if self.static != other.static:
            return f"static arguments changed: {other.static} -> {self.static}"
        for i, (a, b) in enumerate(zip(other.avals, self.avals)):
            if a != b:
                return f"argument leaf {i} changed type: {a} -> {b}"
        return "unknown"


@dataclass
class Lowered:
    """A traced and optimised function: its graph can be printed and compiled."""

    graph: ClosedGraph
    in_tree: TreeDef
    out_tree: TreeDef
    backend: str = "numpy"
    donate: tuple[bool, ...] = ()
    # Global state the function used (the ember.random key): trailing inputs and outputs.
    hidden: tuple[HiddenState, ...] = ()
    name: str = "function"
    # With shardings: the parallel layer's plan (the partitioned per-device program).
    sharded: Any = None

    def as_text(self) -> str:
        """The graph; with shardings, the per-device graph every device runs."""
        return str(self.graph) if self.sharded is None else self.sharded.as_text()

    def explain(self) -> Any:
        """The partitioner's :class:`~ember.parallel.Explanation` (printable): every collective
        of the per-device program and why; an error for a function without shardings."""
        if self.sharded is None:
            raise EmberError(f"explain: jit of {self.name} was lowered without shardings, so "
                             f"nothing was partitioned (pass in_shardings/out_shardings or "
                             f"sharded arguments)\n  at {user_frame()}")
        return self.sharded.partitioned.explanation

    def compile(self) -> Compiled:
        """Compile for this graph's backend: a :class:`Compiled`, called as the function is."""
        if self.sharded is not None:
            return self.sharded.compile(self)
        backend = get_backend(self.backend)
        program = backend.compile(self.graph, self.donate)
        return Compiled(self, program, _runner(self, backend, program))


class Compiled:
    """A compiled program, called with the arguments the function was lowered for; it also
    shows the program (:meth:`as_text`) and its memory (:meth:`memory_analysis`)."""

    def __init__(self, lowered: Lowered, program: Callable[..., list[Any]],
                 run_leaves: Callable[[list[Any]], Any]):
        self.lowered = lowered
        self.program = program
        # The program as a function of the flattened argument arrays (what ``jit`` calls,
        # having flattened them once already to build its cache key).
        self.run_leaves = run_leaves

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, tree = _flatten_arguments(args, kwargs)
        if tree != self.lowered.in_tree:
            raise EmberError(f"compiled function called with structure {tree}, "
                             f"expected {self.lowered.in_tree}\n  at {user_frame()}")
        return self.run_leaves([to_array(x) for x in leaves])

    def as_text(self) -> str:
        """The backend's program as text where it has one (the C of the ``cpu`` backend),
        else the graph the program runs."""
        as_text = getattr(self.program, "as_text", None)
        return as_text() if as_text is not None else self.lowered.as_text()

    def _feature(self, name: str, lacking: str) -> Any:
        """The program's method ``name``; an error naming the backend when it has none."""
        method = getattr(self.program, name, None)
        if method is None:
            raise UnsupportedError(
                f"{name}: the {self.lowered.backend!r} backend compiled this function to a "
                f"program with {lacking} (programs the 'cpu' backend compiles to C have "
                f"them)\n  at {user_frame()}")
        return method

    def memory_analysis(self) -> Any:
        """The program's memory report (the ``cpu`` backend's ``MemoryAnalysis``: arena,
        arguments, outputs, peak); an error on a backend whose programs make none."""
        return self._feature("memory_analysis", "no memory report")()

    def profile(self, *args: Any, runs: int = 3, **kwargs: Any) -> Any:
        """Time each equation of the program on these arguments: the ``cpu`` backend's
        :class:`~ember.backends.cpu.profile.Profile` (``print`` it for the table), averaged
        over ``runs`` calls after a warm-up. The timed program is compiled separately (the
        default build has no timers); arguments, donated ones too, and the ``ember.random``
        state are left as they were."""
        profile = self._feature("profile", "no timers")
        if self.lowered.sharded is not None:
            raise UnsupportedError(f"profile: jit of {self.lowered.name} runs on several "
                                   f"devices; profiling covers one-device programs\n"
                                   f"  at {user_frame()}")
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
            raise EmberValueError(f"profile: runs must be an integer >= 1, got {runs!r}\n"
                                  f"  at {user_frame()}")
        leaves, tree = _flatten_arguments(args, kwargs)
        if tree != self.lowered.in_tree:
            raise EmberError(f"compiled function profiled with structure {tree}, "
                             f"expected {self.lowered.in_tree}\n  at {user_frame()}")
        buffers = [to_array(x)._buffer for x in leaves]
        buffers += [s.current()._buffer for s in self.lowered.hidden]
        return profile(buffers, runs)


@dataclass(frozen=True)
class ShardingHook:
    """What the parallel layer, above this one, provides for functions with shardings.

    ``input_types(in_shardings, tree, leaves, avals)``: the argument types with the layouts
    ``in_shardings`` gives (a conflict with a sharded argument is an error).
    ``lower(lowered, in_shardings, out_shardings)``: the plan, kept as ``Lowered.sharded``:
    it has ``partitioned``, ``as_text()`` and ``compile(lowered) -> Compiled``.
    """

    input_types: Callable[[Any, TreeDef, list[Any], tuple[ArrayType, ...]],
                          tuple[ArrayType, ...]]
    lower: Callable[[Lowered, Any, Any], Any]


_SHARDING_HOOK: list[ShardingHook] = []


def register_sharding_hook(hook: ShardingHook) -> None:
    """Called once by ``ember.parallel`` when it is imported."""
    _SHARDING_HOOK[:] = [hook]


def _sharding_hook() -> ShardingHook:
    if not _SHARDING_HOOK:
        raise EmberError(f"jit: shardings need ember.parallel (import ember.parallel)\n"
                         f"  at {user_frame()}")
    return _SHARDING_HOOK[0]


_NO_KEYWORDS = tree_flatten({})[1]


@functools.lru_cache(maxsize=256)
def _without_keywords(args_tree: TreeDef) -> TreeDef:
    """The structure of ``(args, {})`` from that of ``args``, one object per structure:
    walking the pair and the empty dict costs more than walking a list of arrays (23k of a
    call's 70k instructions, measured with callgrind)."""
    return TreeDef(tuple, None, (args_tree, _NO_KEYWORDS))


def _flatten_arguments(args: tuple, kwargs: dict) -> tuple[list[Any], TreeDef]:
    """The leaves and structure of ``(args, kwargs)``, as ``tree_flatten`` gives them."""
    if kwargs:
        return tree_flatten((args, kwargs))
    leaves, args_tree = tree_flatten(args)
    return leaves, _without_keywords(args_tree)


@functools.lru_cache(maxsize=64)
def _positional_tree(count: int) -> TreeDef:
    """The structure of ``(args, kwargs)`` for ``count`` array arguments and no keywords."""
    return _without_keywords(tree_flatten((0,) * count)[1])


_BUFFER = operator.attrgetter("_buffer")
_AVAL = operator.attrgetter("aval")  # a slot read for an Array, the property for a tracer
_ARRAY_AVAL = operator.attrgetter("_aval")  # an Array's slot, without the property's call
_ARRAY = {Array}


def _runner(lowered: Lowered, backend: Backend,
            program: Callable[..., list[Any]]) -> Callable[[list[Any]], Any]:
    """``program`` as a function of argument Arrays: buffers in, donated arguments let go of,
    hidden state read and written, results wrapped as the function's output tree."""
    # An output of the type of an input gets the input's very type object: fed back at the
    # next call (a training step's parameters), it then matches the cache key by identity.
    same = {a: a for a in lowered.graph.in_avals}
    out_avals = [same.get(a, a) for a in lowered.graph.out_avals]
    donated = [i for i, d in enumerate(lowered.donate) if d]
    overwrites = getattr(program, "overwrites", ())
    hidden = lowered.hidden
    out_tree = lowered.out_tree

    def run(leaves: list[Any]) -> Any:
        # C-level maps, not comprehensions: this runs over every leaf of every call.
        buffers = list(map(_BUFFER, leaves))
        if hidden:
            buffers += [s.current()._buffer for s in hidden]
        if donated:
            # The donated Arrays let go of their buffers first, so that a buffer nothing
            # else sees is written in place; one that is still seen (another Array, a NumPy
            # view, a second argument) is copied by ``writable`` instead.
            for i in donated:
                leaves[i]._buffer = None
            try:
                for i in overwrites:
                    buffers[i] = backend.writable(buffers[i])
                outs = program(*buffers)
            except BaseException:
                for i in donated:
                    leaves[i]._buffer = buffers[i]
                raise
        else:
            outs = program(*buffers)
        results = list(map(Array, outs, out_avals, repeat(backend)))
        if hidden:
            for s, value in zip(hidden, results[-len(hidden):]):
                s.set(value)
            results = results[:-len(hidden)]
        return results[0] if out_tree is LEAF else tree_unflatten(out_tree, results)
    return run


@dataclass
class _Entry:
    lowered: Lowered
    run: Callable[..., Any] | None = None  # compiled on the first call made outside any trace
    # The graph bound by ``call`` under a transformation (constants hoisted into leading
    # operands) and those constants; made on the first such call.
    body: ClosedGraph | None = None
    consts: list[Any] = field(default_factory=list)


# Why a function traced under a transformation is traced again at its next call.
_CLOSES_OVER_TRACERS = ("the function closes over values of an enclosing transformation, so "
                        "its graph is traced anew at each call (pass them as arguments)")


@dataclass
class _Stats:
    traces: int = 0
    hits: int = 0
    last_retrace_reason: str | None = None
    keys: list[CacheKey] = field(default_factory=list)


class Jitted:
    """A function compiled on first call for each new signature."""

    def __init__(self, fun: Callable[..., Any], static_argnums: Sequence[int] = (),
                 static_argnames: Sequence[str] = (), donate_argnums: Sequence[int] = (),
                 backend: str | None = None, in_shardings: Any = None,
                 out_shardings: Any = None):
        self.fun = fun
        # Pytree prefixes of the positional arguments / the results (None: not given).
        self.in_shardings = in_shardings
        self.out_shardings = out_shardings
        self.static_argnums = tuple(static_argnums)
        self.static_argnames = tuple(static_argnames)
        self.donate_argnums = tuple(donate_argnums)
        # None follows the default backend, resolved at each call (``set_default_backend``).
        self.backend = None if backend is None else get_backend(backend).name
        self._cache: dict[CacheKey, _Entry] = {}
        self._last_key: CacheKey | None = None
        self._stats = _Stats()
        self._signature = _safe_signature(fun)
        # Name and docstring only: merging ``fun.__dict__`` would let a wrapped Jitted's own
        # attributes (``grad(jit(f))`` copies them onto its wrapper) replace this one's.
        functools.update_wrapper(self, fun, updated=())
        self._name = getattr(fun, "__name__", type(fun).__name__)  # printed as call[name=...]

    @property
    def trace_count(self) -> int:
        """How many times the function has been traced (one per distinct signature)."""
        return self._stats.traces

    def cache_info(self) -> dict[str, Any]:
        s = self._stats
        return {"traces": s.traces, "hits": s.hits, "entries": len(self._cache),
                "last_retrace_reason": s.last_retrace_reason}

    def cached_lowerings(self) -> list[Lowered]:
        """The :class:`Lowered` form of every signature in the cache, oldest first: what a
        tool reports on (``.compile().memory_analysis()`` of each program a run used)."""
        return [entry.lowered for entry in self._cache.values()]

    def _static_positions(self, nargs: int) -> set[int]:
        """Positions that are static: ``static_argnums`` plus ``static_argnames`` passed
        positionally."""
        nums = {n % nargs for n in self.static_argnums if -nargs <= n < nargs}
        if self._signature is not None:
            names = list(self._signature.parameters)
            nums.update(names.index(n) for n in self.static_argnames
                        if n in names and names.index(n) < nargs)
        return nums

    def _split(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, tuple]:
        static_nums = self._static_positions(len(args))
        static = []
        dyn_args = []
        for i, a in enumerate(args):
            if i in static_nums:
                static.append(("arg", i, _hashable(a, f"static argument {i}")))
            else:
                dyn_args.append(a)
        dyn_kwargs = {}
        for k, v in kwargs.items():
            if k in self.static_argnames or self._argname_is_static(k):
                static.append(("kw", k, _hashable(v, f"static argument {k!r}")))
            else:
                dyn_kwargs[k] = v
        return tuple(dyn_args), dyn_kwargs, tuple(static)

    def _argname_is_static(self, name: str) -> bool:
        if self._signature is None:
            return False
        names = list(self._signature.parameters)
        return name in names and names.index(name) in self.static_argnums

    def _key(self, args: tuple, kwargs: dict) -> tuple[CacheKey, list[Any]]:
        if self.static_argnums or self.static_argnames:
            args, kwargs, static = self._split(args, kwargs)
        else:
            static = ()
        if not kwargs and _ARRAY.issuperset(map(type, args)):
            leaves, tree = list(args), _positional_tree(len(args))  # f(x, y): nothing to walk
            only_arrays = True
        else:
            leaves, tree = _flatten_arguments(args, kwargs)
            only_arrays = _ARRAY.issuperset(map(type, leaves))
        # Arrays, the common leaves (a model's weights), are typed and checked with ``map``,
        # no Python step per leaf; only the others (NumPy arrays, scalars, tracers) are
        # converted one by one.
        arrays = leaves
        if not only_arrays:
            types = list(map(type, leaves))
            arrays = list(compress(leaves, map(operator.is_, types, repeat(Array))))
            for i in compress(count(), map(operator.is_not, types, repeat(Array))):
                leaves[i] = _argument(leaves[i])
        if any(map(operator.is_, map(_BUFFER, arrays), repeat(None))):
            for a in arrays:
                to_array(a)  # refuses the array already donated
        avals = tuple(map(_ARRAY_AVAL if only_arrays else _AVAL, leaves))
        if self.in_shardings is not None:
            avals = _sharding_hook().input_types(self.in_shardings, tree, leaves, avals)
        backend = self.backend or default_backend().name
        # A call like the last one (a decode step) reuses its key and so its kept hash.
        last = self._last_key
        if last is not None and last.same(tree, avals, static, backend):
            return last, leaves
        key = self._last_key = CacheKey(tree, avals, static, backend)
        return key, leaves

    def _rebuild(self, args: tuple, kwargs: dict) -> Callable[..., Any]:
        """The function of the dynamic arguments only, with static ones bound."""
        static_nums = self._static_positions(len(args))
        static_kw = {k: v for k, v in kwargs.items()
                     if k in self.static_argnames or self._argname_is_static(k)}

        def call(*dyn: Any, **dyn_kw: Any) -> Any:
            it = iter(dyn)
            full = [args[i] if i in static_nums else next(it) for i in range(len(args))]
            return self.fun(*full, **dyn_kw, **static_kw)

        return call

    def lower(self, *args: Any, **kwargs: Any) -> Lowered:
        """Trace and optimise for these arguments without running; ``.as_text()`` shows it."""
        key, _ = self._key(args, kwargs)
        return self._lower(key, args, kwargs)

    def _lower(self, key: CacheKey, args: tuple, kwargs: dict) -> Lowered:
        fun = self._rebuild(args, kwargs)
        store: list = []
        flat = flatten_fun(fun, key.tree, store)
        closed, hidden = make_graph_with_state(flat, key.avals)
        closed = optimize(closed)
        verify(closed)
        lowered = Lowered(closed, key.tree, store[-1], key.backend, self._donated_leaves(args),
                          tuple(hidden), self._name)
        if (self.in_shardings is not None or self.out_shardings is not None
                or any(a.sharding is not None for a in key.avals)):
            lowered.sharded = _sharding_hook().lower(lowered, self.in_shardings,
                                                     self.out_shardings)
        return lowered

    def _donated_leaves(self, args: tuple) -> tuple[bool, ...]:
        """One flag per dynamic leaf: does it belong to a ``donate_argnums`` argument?"""
        static_nums = self._static_positions(len(args))
        donate = {n % len(args) for n in self.donate_argnums if -len(args) <= n < len(args)}
        flags: list[bool] = []
        for i, a in enumerate(args):
            if i not in static_nums:
                flags += [i in donate] * len(tree_flatten(a)[0])
        return tuple(flags)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key, values = self._key(args, kwargs)
        entry = self._cache.get(key)
        if entry is None:
            entry = self._trace(key, args, kwargs)
        else:
            self._stats.hits += 1
        if tracing_active():
            return self._bind_call(entry, values)
        if entry.run is None:
            entry.run = entry.lowered.compile().run_leaves
        return entry.run(values)

    def _trace(self, key: CacheKey, args: tuple, kwargs: dict) -> _Entry:
        """Trace for a new signature, count it, and keep the graph for the next calls unless
        it captured values of an enclosing transformation (they are gone after it ends)."""
        stats = self._stats
        if stats.keys:
            stats.last_retrace_reason = (_CLOSES_OVER_TRACERS if key in stats.keys
                                         else key.difference(stats.keys[-1]))
        entry = _Entry(self._lower(key, args, kwargs))
        stats.traces += 1
        stats.keys.append(key)
        if not any(isinstance(c, Tracer) for c in entry.lowered.graph.consts):
            self._cache[key] = entry
        return entry

    def _bind_call(self, entry: _Entry, values: list[Any]) -> Any:
        """Apply the traced graph as one ``call`` equation, for the enclosing transformation.

        Hidden state (the ``ember.random`` key) is read and written around the call, as the
        compiled program does: the enclosing ``jit`` threads it on, eager ``grad`` stores it.
        """
        if entry.body is None:
            entry.body, entry.consts = hoist_consts(entry.lowered.graph)
        hidden = entry.lowered.hidden
        outs = call_p.bind(*entry.consts, *values, *[s.get() for s in hidden], body=entry.body,
                           name=self._name)
        n = len(outs) - len(hidden)
        for s, value in zip(hidden, outs[n:]):
            s.set(value)
        return tree_unflatten(entry.lowered.out_tree, outs[:n])

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else functools.partial(self, obj)


def _argument(leaf: Any) -> Any:
    """An argument leaf that is not an Array, as one (a tracer stays itself)."""
    try:
        return to_array(leaf)
    except EmberError:
        raise
    except Exception as e:
        raise EmberError(f"jit: argument leaf {leaf!r} is not an array; mark it static with "
                         f"static_argnums/static_argnames\n  at {user_frame()}") from e


def _hashable(value: Any, what: str) -> Any:
    try:
        hash(value)
    except TypeError:
        raise EmberError(f"jit: {what} must be hashable to be static, got "
                         f"{type(value).__name__}") from None
    return value


def _safe_signature(fun: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fun)
    except (TypeError, ValueError):
        return None


def jit(fun: Callable[..., Any] | None = None, *, static_argnums: int | Sequence[int] = (),
        static_argnames: str | Sequence[str] = (), donate_argnums: int | Sequence[int] = (),
        backend: str | None = None, in_shardings: Any = None, out_shardings: Any = None
        ) -> Any:
    """Compile ``fun`` to a static graph; usable as ``@jit`` or ``@jit(static_argnums=...)``.

    ``in_shardings``/``out_shardings``: pytree prefixes of the positional arguments / of the
    results holding ``ember.parallel.NamedSharding`` or ``None``; with them, or with sharded
    arguments, the program is partitioned and runs on every device of the mesh
    (``docs/parallel.md``).
    """
    as_tuple = lambda v: (v,) if isinstance(v, (int, str)) else tuple(v)  # noqa: E731
    if fun is None:
        return lambda f: jit(f, static_argnums=static_argnums, static_argnames=static_argnames,
                             donate_argnums=donate_argnums, backend=backend,
                             in_shardings=in_shardings, out_shardings=out_shardings)
    return Jitted(fun, as_tuple(static_argnums), as_tuple(static_argnames),
                  as_tuple(donate_argnums), backend, in_shardings, out_shardings)
