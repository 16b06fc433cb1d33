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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from ember import dtypes
from ember.core.array import Array
from ember.errors import EmberError
from ember.numpy import asarray
from ember.tree import register_pytree_node, tree_flatten, tree_unflatten

__all__ = ["Module", "ModuleList", "Sequential"]

_CONTAINERS = (list, tuple, dict)


def _is_child(value: Any) -> bool:
    """Children are traced through transformations; everything else is static structure."""
    if isinstance(value, (Array, Module, np.ndarray)) or hasattr(value, "aval"):
        return True
    if isinstance(value, _CONTAINERS):
        items = value.values() if isinstance(value, dict) else value
        return any(_is_child(v) for v in items)
    return False


def _flatten(module: Module) -> tuple[list[Any], Any]:
    names, children, static = [], [], []
    for name, value in module.__dict__.items():
        if _is_child(value):
            names.append(name)
            children.append(value)
        else:
            static.append((name, value))
    try:
        aux = (tuple(names), tuple(static))
        hash(aux)
    except TypeError:
        bad = [n for n, v in static if not _hashable(v)]
        raise EmberError(f"{type(module).__name__}: attribute(s) {bad} are neither arrays nor "
                         f"modules and are not hashable; a module's static attributes must be "
                         f"hashable (they are part of the jit cache key)") from None
    return children, aux


def _hashable(value: Any) -> bool:
    try:
        hash(value)
        return True
    except TypeError:
        return False


def _unflatten_for(cls: type) -> Callable[[Any, list[Any]], Module]:
    def unflatten(aux: Any, children: list[Any]) -> Module:
        names, static = aux
        module = object.__new__(cls)
        module.__dict__.update(static)
        module.__dict__.update(zip(names, children))
        return module
    return unflatten


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
        register_pytree_node(cls, _flatten, _unflatten_for(cls))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, np.ndarray):
            value = asarray(value)
        object.__setattr__(self, name, value)

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

    def _arrays(self, prefix: str = "") -> Iterator[_Slot]:
        """Every array reachable from this module (buffers included), in definition order."""
        for name, value in self._children():
            for path, leaf in _walk(value, _join(prefix, name)):
                if isinstance(leaf, Module):
                    yield from leaf._arrays(path)
                else:
                    keys = tuple(path[len(_join(prefix, name)):].split(".")[1:])
                    yield _Slot(path, self, name, keys, leaf)

    def named_parameters(self) -> Iterator[tuple[str, Any]]:
        """Parameters (arrays that are not buffers), frozen ones included, in definition order."""
        return ((s.name, s.value) for s in self._arrays() if not s.is_buffer)

    def parameters(self) -> list[Any]:
        return [p for _, p in self.named_parameters()]

    def trainable_parameters(self) -> dict[str, Any]:
        """``{name: array}`` of the parameters not frozen: what an optimizer updates."""
        return {s.name: s.value for s in self._arrays() if not s.is_buffer and not s.is_frozen}

    def num_parameters(self, trainable_only: bool = False) -> int:
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
        """``{name: array}`` of parameters and persistent buffers, PyTorch's names and layout."""
        return {s.name: s.value for s in self._arrays() if not s.is_transient}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True
                        ) -> tuple[list[str], list[str]]:
        """Copy ``state`` into this module; all-or-nothing.

        Every name, shape and dtype is checked before anything is assigned, so a failed load
        leaves the module unchanged. Values are cast to the parameter's dtype when the kinds
        agree (float to float); ``strict=False`` tolerates missing and unexpected names and
        returns them as ``(missing, unexpected)``.
        """
        slots = {s.name: s for s in self._arrays() if not s.is_transient}
        missing = [k for k in slots if k not in state]
        unexpected = [k for k in state if k not in slots]
        problems, updates = [], []
        for name, value in state.items():
            if name not in slots:
                continue
            if not isinstance(value, (Array, np.ndarray)):
                value = np.asarray(value)  # torch tensors, lists...
            slot = slots[name]
            shape, want = tuple(np.shape(value)), tuple(slot.value.shape)
            dtype = np.dtype(value.dtype)
            if shape != want:
                problems.append(f"{name}: checkpoint shape {shape}, model expects {want}")
            elif _kind(dtype) != _kind(slot.value.dtype):
                problems.append(f"{name}: checkpoint dtype {dtype}, model expects "
                                f"{slot.value.dtype}")
            else:
                updates.append((slot, value))
        if strict and missing:
            problems.append(f"missing from the checkpoint: {_short(missing)}")
        if strict and unexpected:
            problems.append(f"not in the model: {_short(unexpected)}")
        if problems:
            raise EmberError(f"load_state_dict into {type(self).__name__} failed; nothing was "
                             f"loaded:\n  " + "\n  ".join(problems))
        for slot, value in updates:
            slot.set(asarray(value, dtype=slot.value.dtype))
        return missing, unexpected

    def update(self, params: dict[str, Any]) -> Module:
        """Replace arrays by dotted name (as from ``trainable_parameters()``), in place."""
        slots = {s.name: s for s in self._arrays()}
        unknown = [k for k in params if k not in slots]
        if unknown:
            raise EmberError(f"{type(self).__name__}.update: no array named {_short(unknown)}")
        for name, value in params.items():
            slots[name].set(value)
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
        for slot in list(self._arrays()):
            if _kind(slot.value.dtype) == "f":
                slot.set(slot.value.astype(dtype))
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
