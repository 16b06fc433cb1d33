"""Pytrees: nested containers of arrays that transformations take apart and put back together.

Lists, tuples, dicts, namedtuples, dataclasses and ``None`` are trees; anything else is a leaf.
Register other containers with :func:`register_pytree_node` (``ember.nn.Module`` does).
A :class:`TreeDef` is hashable and compares by structure, so it can be part of the jit cache key.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Hashable
from itertools import islice
from typing import Any, NamedTuple

__all__ = ["TreeDef", "register_pytree_node", "register_dataclass", "tree_flatten",
           "tree_unflatten", "tree_leaves", "tree_map", "tree_structure"]


class _NodeType(NamedTuple):
    flatten: Callable[[Any], tuple[list[Any], Hashable]]
    unflatten: Callable[[Hashable, list[Any]], Any]


_REGISTRY: dict[type, _NodeType] = {}
# Classes seen to be leaves or namedtuples, so each class is examined once (flattening runs on
# every jit call, over every leaf). Registering a class drops what was decided for it.
_SEEN: dict[type, _NodeType | None] = {}
_LEAF_CLASSES: set[type] = set()  # the classes _SEEN maps to None


def register_pytree_node(cls: type, flatten: Callable[[Any], tuple[list[Any], Hashable]],
                         unflatten: Callable[[Hashable, list[Any]], Any]) -> None:
    """Make ``cls`` a tree node: ``flatten(x) -> (children, aux)``, ``unflatten(aux, children)``.

    ``aux`` must be hashable and comparable: it is part of the tree's structure (and of the jit
    cache key), so it should hold static configuration, never arrays.
    """
    _REGISTRY[cls] = _NodeType(flatten, unflatten)
    _SEEN.pop(cls, None)
    _LEAF_CLASSES.discard(cls)


def _flatten_dict(d: dict) -> tuple[list[Any], tuple]:
    # Keys in repr order, so the order does not depend on insertion. The sort is kept per key
    # set of string keys (a parameter dict, flattened on every training step); other keys are
    # sorted each time, as equal keys of other types (1, 1.0, True) can differ in repr.
    keys = tuple(d)
    if not keys:
        return [], keys
    if set(map(type, keys)) != _STR:
        order = tuple(sorted(keys, key=repr))
    else:
        order = _DICT_ORDERS.get(keys)
        if order is None:
            if len(_DICT_ORDERS) >= _DICT_ORDERS_SIZE:
                _DICT_ORDERS.clear()
            order = _DICT_ORDERS[keys] = tuple(sorted(keys, key=repr))
    return [d[k] for k in order], order


_STR = {str}
_DICT_ORDERS: dict[tuple, tuple] = {}
_DICT_ORDERS_SIZE = 1024

register_pytree_node(tuple, lambda t: (list(t), None), lambda _, c: tuple(c))
register_pytree_node(list, lambda t: (list(t), None), lambda _, c: list(c))
register_pytree_node(dict, _flatten_dict, lambda keys, c: dict(zip(keys, c)))
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
    try:
        return _SEEN[cls]
    except KeyError:
        pass
    if isinstance(x, tuple) and hasattr(cls, "_fields"):  # namedtuple
        node = _SEEN[cls] = _NodeType(lambda t: (list(t), None), lambda _, c: cls(*c))
        return node
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        register_dataclass(cls)
        return _REGISTRY[cls]
    _SEEN[cls] = None
    _LEAF_CLASSES.add(cls)
    return None


class TreeDef:
    """The structure of a tree with its leaves taken out."""

    __slots__ = ("node", "aux", "children", "num_leaves", "_hash")

    def __init__(self, node: type | None, aux: Hashable, children: tuple[TreeDef, ...]):
        self.node = node  # None marks a leaf
        self.aux = aux
        self.children = children
        self.num_leaves = 1 if node is None else sum(map(_NUM_LEAVES, children))
        # The children's cached hashes, not the children: no Python-level call per child.
        self._hash = hash((node, aux, tuple(map(_HASH, children))))

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, TreeDef) and self._hash == other._hash and
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
        return self._build(iter(leaves))

    def _build(self, it):
        if self.node is None:
            return next(it)
        if self.children.count(LEAF) == len(self.children):  # leaves only: taken in C
            children = list(islice(it, len(self.children)))
        else:
            children = [next(it) if c is LEAF else c._build(it) for c in self.children]
        cls = self.node
        node = _REGISTRY.get(cls) or _node_type_for_class(cls)
        return node.unflatten(self.aux, children)


_NUM_LEAVES = operator.attrgetter("num_leaves")
_HASH = operator.attrgetter("_hash")
LEAF = TreeDef(None, None, ())  # every leaf's structure: one object, compared by identity


def _node_type_for_class(cls: type) -> _NodeType:
    # namedtuples are recognised by instance; rebuild their node type from the class.
    return _SEEN.get(cls) or _NodeType(lambda t: (list(t), None), lambda _, c: cls(*c))


def tree_flatten(tree: Any, is_leaf: Callable[[Any], bool] | None = None
                 ) -> tuple[list[Any], TreeDef]:
    """Leaves in a fixed order (dict keys sorted) and the structure to rebuild the tree."""
    leaves: list[Any] = []
    return leaves, _walk(tree, leaves, is_leaf)


def _walk(x: Any, leaves: list[Any], is_leaf: Callable[[Any], bool] | None) -> TreeDef:
    if is_leaf is not None and is_leaf(x):
        leaves.append(x)
        return LEAF
    cls = type(x)
    if cls is tuple or cls is list:
        children, aux = x, None  # what their registered flatten gives, without the call
    else:
        node = _REGISTRY.get(cls) or _node_type(x)
        if node is None:
            leaves.append(x)
            return LEAF
        children, aux = node.flatten(x)
    if is_leaf is None and _LEAF_CLASSES.issuperset(map(type, children)):
        # Only leaves below (a list of arrays, a dict of parameters): checked and copied
        # without a Python step per leaf; their count describes them.
        leaves.extend(children)
        defs, described = None, len(children)
    else:
        walked = []
        for c in children:
            walked.append(_walk(c, leaves, is_leaf))
        defs = tuple(walked)
        # Kept structures (below) are identified by id; leaves only, by their count, as above.
        n = len(defs)
        described = n if defs.count(LEAF) == n else tuple(map(id, defs))
    if cls is tuple or cls is list or (cls is dict and _STR.issuperset(map(type, aux))):
        # A plain container's structure is kept, one object per structure: flattening the
        # same arguments again (each jit call) builds nothing, and two structures compare by
        # identity. Only one whose children are kept structures too is kept.
        key = (cls, aux, described)
        treedef = _PLAIN.get(key)
        if treedef is None and (type(described) is int or _PLAIN_IDS.issuperset(described)):
            if len(_PLAIN) >= _PLAIN_SIZE:
                _clear_plain()
            treedef = _PLAIN[key] = TreeDef(cls, aux, (LEAF,) * described if defs is None else defs)
            _PLAIN_IDS.add(id(treedef))
        if treedef is not None:
            return treedef
    return TreeDef(cls, aux, (LEAF,) * described if defs is None else defs)


_PLAIN: dict[tuple, TreeDef] = {}  # (class, aux, ids of the children) -> the structure
_PLAIN_IDS = {id(LEAF)}  # ids of the kept structures (alive: _PLAIN holds them)
_PLAIN_SIZE = 4096


def _clear_plain() -> None:
    _PLAIN.clear()
    _PLAIN_IDS.clear()
    _PLAIN_IDS.add(id(LEAF))


def tree_unflatten(treedef: TreeDef, leaves: list[Any]) -> Any:
    return treedef._build(iter(leaves))


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
