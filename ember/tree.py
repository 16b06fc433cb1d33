"""Pytrees: nested containers of arrays that transformations take apart and put back together.

Lists, tuples, dicts, namedtuples, dataclasses and ``None`` are trees; anything else is a leaf.
Register other containers with :func:`register_pytree_node` (``ember.nn.Module`` does).
A :class:`TreeDef` is hashable and compares by structure, so it can be part of the jit cache key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

__all__ = ["TreeDef", "register_pytree_node", "register_dataclass", "tree_flatten",
           "tree_unflatten", "tree_leaves", "tree_map", "tree_structure"]


class _NodeType(NamedTuple):
    flatten: Callable[[Any], tuple[list[Any], Hashable]]
    unflatten: Callable[[Hashable, list[Any]], Any]


_REGISTRY: dict[type, _NodeType] = {}


def register_pytree_node(cls: type, flatten: Callable[[Any], tuple[list[Any], Hashable]],
                         unflatten: Callable[[Hashable, list[Any]], Any]) -> None:
    """Make ``cls`` a tree node: ``flatten(x) -> (children, aux)``, ``unflatten(aux, children)``.

    ``aux`` must be hashable and comparable: it is part of the tree's structure (and of the jit
    cache key), so it should hold static configuration, never arrays.
    """
    _REGISTRY[cls] = _NodeType(flatten, unflatten)


register_pytree_node(tuple, lambda t: (list(t), None), lambda _, c: tuple(c))
register_pytree_node(list, lambda t: (list(t), None), lambda _, c: list(c))
register_pytree_node(dict, lambda d: ([d[k] for k in sorted(d, key=repr)],
                                      tuple(sorted(d, key=repr))),
                     lambda keys, c: dict(zip(keys, c)))
register_pytree_node(type(None), lambda _: ([], None), lambda _, c: None)


def register_dataclass(cls: type) -> type:
    """Register a dataclass as a tree node whose fields are all children (usable as decorator)."""
    names = tuple(f.name for f in dataclasses.fields(cls))
    register_pytree_node(cls, lambda x: ([getattr(x, n) for n in names], None),
                         lambda _, c: cls(**dict(zip(names, c))))
    return cls


def _node_type(x: Any) -> _NodeType | None:
    cls = type(x)
    node = _REGISTRY.get(cls)
    if node is not None:
        return node
    if isinstance(x, tuple) and hasattr(cls, "_fields"):  # namedtuple
        return _NodeType(lambda t: (list(t), None), lambda _, c, cls=cls: cls(*c))
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        register_dataclass(cls)
        return _REGISTRY[cls]
    return None


class TreeDef:
    """The structure of a tree with its leaves taken out."""

    __slots__ = ("node", "aux", "children", "num_leaves", "_hash")

    def __init__(self, node: type | None, aux: Hashable, children: tuple[TreeDef, ...]):
        self.node = node  # None marks a leaf
        self.aux = aux
        self.children = children
        self.num_leaves = 1 if node is None else sum(c.num_leaves for c in children)
        self._hash = hash((node, aux, children))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, TreeDef) and self._hash == other._hash and
                self.node == other.node and self.aux == other.aux and
                self.children == other.children)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        if self.node is None:
            return "*"
        inner = ", ".join(repr(c) for c in self.children)
        return f"{self.node.__name__}({inner})"

    def unflatten(self, leaves: list[Any]) -> Any:
        it = iter(leaves)
        out = self._build(it)
        return out

    def _build(self, it):
        if self.node is None:
            return next(it)
        children = [c._build(it) for c in self.children]
        cls = self.node
        node = _REGISTRY.get(cls) or _node_type_for_class(cls)
        return node.unflatten(self.aux, children)


def _node_type_for_class(cls: type) -> _NodeType:
    # namedtuples are recognised by instance; rebuild their node type from the class.
    return _NodeType(lambda t: (list(t), None), lambda _, c: cls(*c))


def tree_flatten(tree: Any, is_leaf: Callable[[Any], bool] | None = None
                 ) -> tuple[list[Any], TreeDef]:
    """Leaves in a fixed order (dict keys sorted) and the structure to rebuild the tree."""
    leaves: list[Any] = []

    def walk(x: Any) -> TreeDef:
        node = None if (is_leaf is not None and is_leaf(x)) else _node_type(x)
        if node is None:
            leaves.append(x)
            return TreeDef(None, None, ())
        children, aux = node.flatten(x)
        return TreeDef(type(x), aux, tuple(walk(c) for c in children))

    treedef = walk(tree)
    return leaves, treedef


def tree_unflatten(treedef: TreeDef, leaves: list[Any]) -> Any:
    return treedef.unflatten(list(leaves))


def tree_leaves(tree: Any) -> list[Any]:
    return tree_flatten(tree)[0]


def tree_structure(tree: Any) -> TreeDef:
    return tree_flatten(tree)[1]


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply ``fn`` to corresponding leaves of ``tree`` and ``rest`` (which share its shape)."""
    leaves, treedef = tree_flatten(tree)
    others = []
    for r in rest:
        r_leaves, r_def = tree_flatten(r)
        if r_def != treedef:
            from ember.errors import EmberError

            raise EmberError(f"tree_map: tree structures differ: {treedef} vs {r_def}")
        others.append(r_leaves)
    return treedef.unflatten([fn(*xs) for xs in zip(leaves, *others)])
