"""``Module``: a PyTorch-shaped building block that is also a pytree.

Attributes are the whole story, as in PyTorch: assigning an array makes it a parameter,
assigning a module makes it a submodule, and names follow the attribute path
(``layers.0.self_attn.q_proj.weight``), so ``state_dict()`` keys and shapes match Hugging
Face checkpoints. Unlike PyTorch there is no hidden tape: a module is a tree whose leaves are
its arrays (as in MLX and Equinox), so ``ember.grad``, ``ember.jit`` and ``ember.tree`` work
on it directly. Everything that is not an array, a module or a container of them (sizes,
flags, the ``training`` switch, the set of frozen names) is static: it is part of the tree's
structure and therefore of the jit cache key, which is what makes ``train()``/``eval()`` or
freezing retrace instead of silently reusing the wrong program.

A module's flattening is kept for the next one (a decode step's ``jit`` call would otherwise
walk the whole model each token). Attribute assignment is what drops it, so change modules by
assigning attributes (or ``update``, ``load_state_dict``...), never by writing ``__dict__``
or calling ``object.__setattr__``; lists and dicts among the attributes may be changed in
place, their items are compared before a kept flattening is reused.
"""

from __future__ import annotations

import functools
import operator
import weakref
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any, NamedTuple

import numpy as np

from ember import dtypes
from ember.core.array import Array
from ember.errors import EmberError
from ember.numpy import asarray
from ember.tree import TreeDef, register_pytree_node, tree_flatten, tree_unflatten

__all__ = ["Module", "ModuleList", "Sequential"]

_CONTAINERS = (list, tuple, dict)


def _is_child(value: Any) -> bool:
    """Children are traced through transformations; everything else is static structure."""
    if _is_array(value) or isinstance(value, Module):
        return True
    if isinstance(value, _CONTAINERS):
        items = value.values() if isinstance(value, dict) else value
        return any(_is_child(v) for v in items)
    return False


def _is_array(value: Any) -> bool:
    return isinstance(value, (Array, np.ndarray)) or hasattr(value, "aval")


class _Spec:
    """One module of a flattened tree without its arrays: class, static attributes, and per
    child attribute its container structure and entries (a leaf position or a submodule).

    The hash is computed once, from the submodules' kept hashes: every jit call hashes the
    structure of its arguments, and a model's spec spans all of its submodules.
    """

    __slots__ = ("cls", "static", "children", "_hash")

    def __init__(self, cls: type, static: tuple[tuple[str, Any], ...],
                 children: tuple[tuple[str, TreeDef, tuple[Any, ...]], ...]):
        self.cls, self.static, self.children = cls, static, children
        self._hash = hash((cls, static, children))

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, _Spec) and self._hash == other._hash and self.cls is other.cls
            and self.static == other.static and self.children == other.children)

    def __hash__(self) -> int:
        return self._hash


class _Kept(NamedTuple):
    """A module's flattening, kept for the next one: ``jit`` flattens its arguments on every
    call, and walking a model's tree costs a millisecond where reusing it costs microseconds.

    Assigning an attribute of any module drops every kept flattening (``_forget``). What an
    assignment does not go through, a list or dict among the attributes changed in place
    (``model.layers.append(block)``), is compared item by item, by identity, before reuse.
    """

    root: weakref.ref  # weak: keeping a flattening must not keep the model alive
    leaves: tuple[Any, ...]
    spec: _Spec
    lists: tuple[list, ...]
    dicts: tuple[dict, ...]
    lengths: list[int]
    items: list[Any]


_KEPT: dict[int, _Kept] = {}  # id of the flattened module -> its kept flattening


def _forget() -> None:
    """Drop every kept flattening: a module changed (and the arrays it held may be freed)."""
    if _KEPT:
        _KEPT.clear()


def _drop(key: int, ref: weakref.ref) -> None:
    """The module behind ``ref`` is gone: so is its kept flattening, which holds its arrays."""
    kept = _KEPT.get(key)
    if kept is not None and kept.root is ref:
        _KEPT.pop(key, None)


def _contents(lists: tuple[list, ...], dicts: tuple[dict, ...]) -> tuple[list[int], list[Any]]:
    """The lengths and items (dict keys and values) of containers, gathered without a Python
    step per item."""
    return ([*map(len, lists), *map(len, dicts)],
            [*chain.from_iterable(lists), *chain.from_iterable(dicts),
             *chain.from_iterable(map(dict.values, dicts))])


def _flatten(module: Module) -> tuple[list[Any], _Spec]:
    """The module's leaves and spec: kept from the last flattening when nothing changed."""
    kept = _KEPT.get(id(module))
    if kept is not None and kept.root() is module:
        lengths, items = _contents(kept.lists, kept.dicts)
        if lengths == kept.lengths and all(map(operator.is_, items, kept.items)):
            return list(kept.leaves), kept.spec
    leaves, spec, lists, dicts = _walk_module(module)
    if lists is not None:
        root = weakref.ref(module, functools.partial(_drop, id(module)))
        _KEPT[id(module)] = _Kept(root, tuple(leaves), spec, lists, dicts,
                                  *_contents(lists, dicts))
    return leaves, spec


def _walk_module(module: Module) -> tuple[list[Any], _Spec, tuple | None, tuple | None]:
    """Flatten a module's whole subtree at once, each array object once; also the lists and
    dicts among its attributes (None when they hold other containers, such as a dataclass,
    whose changes in place no check would see: such a flattening is not kept).

    Flattening submodules as separate nodes would give an array reached by two paths (a tied
    weight) two leaves, and ``jit`` or ``grad`` would then see two independent values. Here a
    shared array is one leaf at one position, so it stays one value through every
    transformation and its gradient is the sum over its uses (docs/decisions/0007).
    """
    leaves: list[Any] = []
    seen: dict[int, int] = {}
    lists: list[list] = []
    dicts: list[dict] = []
    plain = True

    def entry(leaf: Any) -> Any:
        if isinstance(leaf, Module):
            return spec(leaf)
        if _is_array(leaf):
            index = seen.get(id(leaf))
            if index is not None:
                return index
            seen[id(leaf)] = len(leaves)
        leaves.append(leaf)
        return len(leaves) - 1

    def spec(m: Module) -> _Spec:
        nonlocal plain
        static, children = [], []
        for name, value in m.__dict__.items():
            if isinstance(value, _CONTAINERS):
                if _is_child(value):
                    parts, treedef = tree_flatten(value, is_leaf=_is_module)
                    plain = _containers(value, treedef, lists, dicts) and plain
                    children.append((name, treedef, tuple(entry(p) for p in parts)))
                    continue
            elif isinstance(value, Module) or _is_array(value):
                children.append((name, _LEAF, (entry(value),)))  # the common case, no walk
                continue
            static.append((name, value))
        try:
            return _Spec(type(m), tuple(static), tuple(children))
        except TypeError:
            bad = [n for n, v in static if not _hashable(v)]
            raise EmberError(f"{type(m).__name__}: attribute(s) {bad} are neither arrays nor "
                             f"modules and are not hashable; a module's static attributes "
                             f"must be hashable (they are part of the jit cache key)") from None

    root = spec(module)
    if not plain:
        return leaves, root, None, None
    return leaves, root, tuple(lists), tuple(dicts)


def _containers(value: Any, treedef: TreeDef, lists: list[list], dicts: list[dict]) -> bool:
    """Collect the lists and dicts that make up ``value`` (flattened as ``treedef``); False
    when it holds another kind of container."""
    node = treedef.node
    if node is None or node is type(None):
        return True
    if node is list:
        lists.append(value)
    elif node is dict:
        dicts.append(value)
        value = [value[k] for k in treedef.aux]
    elif node is not tuple:
        return False
    return all([_containers(v, c, lists, dicts) for v, c in zip(value, treedef.children)])


_LEAF = TreeDef(None, None, ())


def _is_module(value: Any) -> bool:
    return isinstance(value, Module)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
        return True
    except TypeError:
        return False


def _unflatten(spec: _Spec, leaves: list[Any]) -> Module:
    module = object.__new__(spec.cls)
    module.__dict__.update(spec.static)
    for name, treedef, entries in spec.children:
        parts = [_unflatten(e, leaves) if isinstance(e, _Spec) else leaves[e] for e in entries]
        module.__dict__[name] = parts[0] if treedef is _LEAF else tree_unflatten(treedef, parts)
    return module


class Module:
    """Base class of every layer and model; subclass it and assign attributes in ``__init__``.

    Conventions (PyTorch's): call the module to run ``forward``; ``training`` is on after
    construction; parameters are the arrays reachable through attributes, lists and dicts.
    ``register_buffer`` marks arrays that are state but not parameters (not trained, not
    returned by ``parameters()``).
    """

    training: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register_pytree_node(cls, _flatten, _unflatten)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, np.ndarray):
            value = asarray(value)
        _forget()
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        _forget()
        object.__delattr__(self, name)

    # --- traversal ------------------------------------------------------------------------------
    def _children(self) -> Iterator[tuple[str, Any]]:
        for name, value in self.__dict__.items():
            if _is_child(value):
                yield name, value

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module and every submodule, with dotted names (``""`` for the root)."""
        yield prefix, self
        for name, value in self._children():
            for path, leaf in _walk(value, _join(prefix, name)):
                if isinstance(leaf, Module):
                    yield from leaf.named_modules(path)

    def modules(self) -> Iterator[Module]:
        return (m for _, m in self.named_modules())

    def apply(self, fn: Callable[[Module], Any]) -> Module:
        """Call ``fn`` on every submodule, then on this one (PyTorch's order), e.g. to
        initialise weights with ``nn.init``; returns ``self``."""
        for _, value in self._children():
            for _, leaf in _walk(value, ""):
                if isinstance(leaf, Module):
                    leaf.apply(fn)
        fn(self)
        return self

    def _arrays(self, prefix: str = "") -> Iterator[_Slot]:
        """Every array reachable from this module (buffers included), in definition order."""
        for name, value in self._children():
            for path, leaf in _walk(value, _join(prefix, name)):
                if isinstance(leaf, Module):
                    yield from leaf._arrays(path)
                else:
                    keys = tuple(path[len(_join(prefix, name)):].split(".")[1:])
                    yield _Slot(path, self, name, keys, leaf)

    def _tied(self, slots: Iterator[_Slot]) -> list[list[_Slot]]:
        """Slots grouped by the array object they hold, in order of first appearance: a group
        of more than one is a tied parameter (``head.weight = wte.weight``)."""
        groups: dict[int, list[_Slot]] = {}
        for s in slots:
            groups.setdefault(id(s.value), []).append(s)
        return list(groups.values())

    def _parameter_groups(self) -> list[list[_Slot]]:
        return self._tied(s for s in self._arrays() if not s.is_buffer)

    def named_parameters(self) -> Iterator[tuple[str, Any]]:
        """Parameters (arrays that are not buffers), frozen ones included, in definition order.

        A tied array is listed once, under the first name that reaches it (as PyTorch).
        """
        return ((g[0].name, g[0].value) for g in self._parameter_groups())

    def parameters(self) -> list[Any]:
        return [p for _, p in self.named_parameters()]

    def trainable_parameters(self) -> dict[str, Any]:
        """``{name: array}`` of the parameters not frozen: what an optimizer updates.

        A tied array appears once, under its first name, so it has one gradient (the sum over
        its uses) and one optimizer state; its first name also decides whether it is frozen.
        """
        return {g[0].name: g[0].value for g in self._parameter_groups() if not g[0].is_frozen}

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameter elements, each tied array counted once."""
        params = self.trainable_parameters().values() if trainable_only else self.parameters()
        return int(sum(p.size for p in params))

    # --- state ----------------------------------------------------------------------------------
    def register_buffer(self, name: str, value: Any, persistent: bool = True) -> None:
        """Store ``value`` as state that is not a parameter (``persistent=False``: not saved)."""
        setattr(self, name, value)
        self._buffers = self.__dict__.get("_buffers", frozenset()) | {name}
        if not persistent:
            self._transient = self.__dict__.get("_transient", frozenset()) | {name}

    def state_dict(self) -> dict[str, Any]:
        """``{name: array}`` of parameters and persistent buffers, PyTorch's names and layout.

        A tied array is there under each of its names (the same object), as in PyTorch.
        """
        return {s.name: s.value for s in self._arrays() if not s.is_transient}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False
                        ) -> tuple[list[str], list[str]]:
        """Load ``state`` into this module; all-or-nothing.

        Every name, shape and dtype is checked before anything is assigned, so a failed load
        leaves the module unchanged. Values are cast to the parameter's dtype when the kinds
        agree (float to float); ``strict=False`` tolerates missing and unexpected names and
        returns them as ``(missing, unexpected)``. A tied parameter needs only one of its names
        (Hugging Face drops the duplicate); given under several, the values must be equal.

        ``assign=False`` copies the values. ``assign=True`` takes NumPy arrays of the right
        dtype without a copy (for large checkpoints): the module then shares memory with the
        arrays you pass; ember never writes into them, but you must not either.
        """
        groups = self._tied(s for s in self._arrays() if not s.is_transient)
        names = {s.name for g in groups for s in g}
        unexpected = [k for k in state if k not in names]
        missing, problems, updates = [], [], []
        for group in groups:
            given = [s.name for s in group if s.name in state]
            if not given:
                missing.extend(s.name for s in group)
                continue
            target = group[0].value
            values = [_host_view(state[n]) for n in given]
            for name, value in zip(given, values):
                shape, want = tuple(np.shape(value)), tuple(target.shape)
                if shape != want:
                    problems.append(f"{name}: checkpoint shape {shape}, model expects {want}")
                elif _kind(value.dtype) != _kind(target.dtype):
                    problems.append(f"{name}: checkpoint dtype {np.dtype(value.dtype)}, model "
                                    f"expects {target.dtype}")
            if len({id(v) for v in values}) > 1 and not all(
                    np.array_equal(np.asarray(values[0]), np.asarray(v)) for v in values[1:]):
                problems.append(f"{_short(given)} are tied in the model but hold different "
                                f"values in the checkpoint")
            updates.append((group, values[0]))
        if strict and missing:
            problems.append(f"missing from the checkpoint: {_short(missing)}")
        if strict and unexpected:
            problems.append(f"not in the model: {_short(unexpected)}")
        if problems:
            raise EmberError(f"load_state_dict into {type(self).__name__} failed; nothing was "
                             f"loaded:\n  " + "\n  ".join(problems))
        for group, value in updates:
            dtype = group[0].value.dtype
            if assign and isinstance(value, np.ndarray) and value.dtype == np.dtype(dtype):
                loaded = asarray(value, copy=False)  # shared read-only: no second copy
            else:  # assign: take ember arrays as they are; otherwise always a new array
                loaded = asarray(value, dtype=dtype, copy=None if assign else True)
            for slot in group:  # one array object for the whole group keeps the tie
                slot.set(loaded)
        return missing, unexpected

    def update(self, params: dict[str, Any]) -> Module:
        """Replace arrays by dotted name (as from ``trainable_parameters()``), in place.

        Names, shapes and dtypes are all checked first (every problem reported at once, nothing
        replaced on error). Replacing a tied array by any of its names replaces it everywhere.
        """
        groups = {s.name: g for g in self._tied(self._arrays()) for s in g}
        problems: list[str] = []
        chosen: dict[int, tuple[list[_Slot], Any]] = {}
        for name, value in params.items():
            group = groups.get(name)
            if group is None:
                problems.append(f"no array named {name!r}")
                continue
            if isinstance(value, np.ndarray):
                value = asarray(value)
            old = group[0].value
            if not _is_array(value):
                problems.append(f"{name}: expected an array, got {type(value).__name__}")
            elif tuple(value.shape) != tuple(old.shape) or \
                    np.dtype(value.dtype) != np.dtype(old.dtype):
                problems.append(f"{name}: got {_describe(value)}, the model holds "
                                f"{_describe(old)}")
            elif chosen.setdefault(id(group), (group, value))[1] is not value:
                problems.append(f"{name}: tied to {group[0].name}, which is given a different "
                                f"array")
        if problems:
            raise EmberError(f"{type(self).__name__}.update: nothing was updated:\n  "
                             + "\n  ".join(problems))
        for group, value in chosen.values():
            for slot in group:
                slot.set(value)
        return self

    def replace(self, params: dict[str, Any]) -> Module:
        """A copy of this module with some arrays replaced: ``update`` without mutation, which
        is what a function being differentiated or jitted should use."""
        leaves, treedef = tree_flatten(self)
        return tree_unflatten(treedef, leaves).update(params)

    # --- modes ----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def freeze(self, recurse: bool = True) -> Module:
        """Exclude this module's parameters from ``trainable_parameters()``."""
        for m in (self.modules() if recurse else [self]):
            m._frozen = frozenset(name for name, _ in m._children())
        return self

    def unfreeze(self, recurse: bool = True) -> Module:
        for m in (self.modules() if recurse else [self]):
            m._frozen = frozenset()
        return self

    def astype(self, dtype: Any) -> Module:
        """Cast every floating-point array to ``dtype``, in place (like ``module.to(dtype)``)."""
        for group in self._tied(self._arrays()):
            if _kind(group[0].value.dtype) == "f":
                cast = group[0].value.astype(dtype)  # once per array: ties stay tied
                for slot in group:
                    slot.set(cast)
        return self

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        subs = [(n, m) for n, m in self.named_modules() if n and "." not in n]
        for name, m in subs:
            lines.append("  (" + name + "): " + repr(m).replace("\n", "\n  "))
        return lines[0] + (")" if not subs else "\n" + "\n".join(lines[1:]) + "\n)")

    def extra_repr(self) -> str:
        return ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Leaves (arrays and modules) of an attribute value, with dotted paths."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, _join(path, str(k)))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, _join(path, str(i)))
    elif _is_child(value):
        yield path, value


def _host_view(value: Any) -> Any:
    """A checkpoint value as something with ``shape`` and ``dtype`` (torch tensors, lists...)."""
    return value if isinstance(value, (Array, np.ndarray)) else np.asarray(value)


def _describe(x: Any) -> str:
    return f"{np.dtype(x.dtype)}{list(x.shape)}"


def _kind(dtype: Any) -> str:
    """Coarse dtype kind for load checks: bfloat16 (a NumPy 'V' type) counts as float."""
    return "f" if dtypes.is_float(np.dtype(dtype)) else np.dtype(dtype).kind


class _Slot(NamedTuple):
    """Where one array lives: ``owner.attr[keys...]``, and the flags that filter it."""

    name: str
    owner: Module
    attr: str
    keys: tuple[str, ...]
    value: Any

    def _flag(self, field: str) -> bool:
        return self.attr in self.owner.__dict__.get(field, ())

    @property
    def is_buffer(self) -> bool:
        return self._flag("_buffers")

    @property
    def is_transient(self) -> bool:
        return self._flag("_transient")

    @property
    def is_frozen(self) -> bool:
        return self._flag("_frozen")

    def set(self, value: Any) -> None:
        current = self.owner.__dict__[self.attr]
        _forget()
        object.__setattr__(self.owner, self.attr, _replace_in(current, self.keys, value))


def _replace_in(container: Any, keys: tuple[str, ...], value: Any) -> Any:
    if not keys:
        return value
    head, rest = keys[0], keys[1:]
    if isinstance(container, dict):
        key = next(k for k in container if str(k) == head)
        return {**container, key: _replace_in(container[key], rest, value)}
    items = list(container)
    items[int(head)] = _replace_in(items[int(head)], rest, value)
    return tuple(items) if isinstance(container, tuple) else items


def _short(names: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class ModuleList(Module):
    """A list of modules whose parameters are named ``<index>.<name>``."""

    def __init__(self, modules: list[Module] | tuple[Module, ...] = ()):
        self.items = list(modules)

    def _children(self) -> Iterator[tuple[str, Any]]:
        # The list itself is transparent: names start with the index, as in PyTorch.
        return ((str(i), m) for i, m in enumerate(self.items))

    def __getitem__(self, i: int) -> Module:
        return self.items[i]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Module]:
        return iter(self.items)

    def append(self, module: Module) -> ModuleList:
        self.items.append(module)
        return self


class Sequential(ModuleList):
    """Modules applied in order: ``Sequential(Linear(4, 8), SiLU(), Linear(8, 2))``."""

    def __init__(self, *modules: Module):
        super().__init__(modules)

    def forward(self, x: Any) -> Any:
        for m in self.items:
            x = m(x)
        return x
