"""Optimizer state as a flat ``{name: numpy array}`` dict, for checkpoints and resuming.

Names are dotted paths through the state tree (``"step"``, ``"exp_avg.layers.0.weight"``):
dict keys, NamedTuple and dataclass field names, list and tuple indices, and child positions for
other registered nodes. A checkpoint is thus readable and can be stored by any format that holds
named arrays (``np.savez``, safetensors).
Restoring goes through a *template* state (``opt.init(params)``) that fixes the structure, so a
checkpoint from a different model or optimizer is rejected with every difference listed, rather
than failing later inside an update.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

import ember.numpy as enp
from ember.errors import EmberError
from ember.tree import tree_flatten, tree_unflatten

__all__ = ["named_leaves", "state_from_dict", "state_to_dict"]


def named_leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted path, leaf)`` for every leaf of ``tree``, in ``tree_flatten`` order."""
    children, treedef = tree_flatten(tree, is_leaf=lambda x: x is not tree)
    if treedef.node is None:
        return [(prefix, tree)]
    out: list[tuple[str, Any]] = []
    for name, child in zip(_child_names(tree, treedef.aux, len(children)), children):
        out.extend(named_leaves(child, f"{prefix}.{name}" if prefix else name))
    return out


def _child_names(node: Any, aux: Any, count: int) -> list[str]:
    if isinstance(node, dict):
        return [str(k) for k in aux]  # a dict's structure records its keys in child order
    if isinstance(node, tuple) and hasattr(type(node), "_fields"):
        return list(node._fields)
    if dataclasses.is_dataclass(node) and len(dataclasses.fields(node)) == count:
        return [f.name for f in dataclasses.fields(node)]
    return [str(i) for i in range(count)]


def state_to_dict(state: Any) -> dict[str, np.ndarray]:
    """Every array of ``state`` as a NumPy array under its dotted path."""
    flat: dict[str, np.ndarray] = {}
    for name, leaf in named_leaves(state):
        if name in flat:
            raise EmberError(f"state_to_dict: two entries are both named {name!r}")
        flat[name] = np.asarray(leaf)
    return flat


def state_from_dict(template: Any, flat: dict[str, Any]) -> Any:
    """A state shaped like ``template`` holding the arrays of ``flat`` (from ``state_to_dict``).

    Raises ``EmberError`` listing the missing, unexpected and mismatched (shape or dtype)
    entries. ``template`` is only read; the result is a new tree of new arrays.
    """
    entries = named_leaves(template)
    names = {name for name, _ in entries}
    missing = [name for name in names if name not in flat]
    unexpected = [name for name in flat if name not in names]
    mismatched = []
    for name, leaf in entries:
        if name in flat:
            got = np.asarray(flat[name])
            if got.shape != tuple(leaf.shape) or got.dtype != leaf.dtype:
                mismatched.append(f"{name}: expected {leaf.dtype}{list(leaf.shape)}, "
                                  f"got {got.dtype}{list(got.shape)}")
    if missing or unexpected or mismatched:
        problems = [f"{label}: {', '.join(sorted(items))}" for label, items in
                    (("missing", missing), ("unexpected", unexpected),
                     ("mismatched", mismatched)) if items]
        raise EmberError("state_from_dict: the checkpoint does not fit the template state; "
                         + "; ".join(problems))
    treedef = tree_flatten(template)[1]
    return tree_unflatten(treedef, [enp.asarray(np.asarray(flat[name])) for name, _ in entries])
