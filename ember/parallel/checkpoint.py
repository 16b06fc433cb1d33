"""Sharded checkpoints: every process writes the blocks it holds; loading reshards to any mesh.

A checkpoint is a directory (decision record 0024)::

    layout.json              each leaf: path, global shape, dtype, mesh, spec, and its blocks
    process-<i>.safetensors  the blocks process i wrote, each one tensor

:func:`save` writes each distinct block of a sharded array once (a block copied on several
devices by its first holder in mesh order), so no process ever holds more than its own part.
The blocks carry their global index ranges, so :func:`load` can lay every leaf out over any
other mesh, with any process count: each device reads, from memory-mapped files, only the bytes
of the blocks that overlap its shard.

Saving is atomic: everything goes into a hidden sibling directory that process 0 renames into
place once every process has written and synced its file, so a save interrupted at any point
leaves the previous checkpoint loadable. Every step that can fail in one process is agreed on
by all of them (:func:`_together`): a job never goes on with a checkpoint that one process
could not write, or with parameters that one process could not read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ember.core.array import Array, Tracer
from ember.errors import EmberError, EmberValueError, op_error
from ember.io import safetensors
from ember.io.files import _fsync_directory, read_json, write_text_atomic
from ember.ir.types import ArrayType
from ember.parallel import runtime
from ember.parallel.array import ShardedArray
from ember.parallel.mesh import process_count, process_index
from ember.parallel.sharding import NamedSharding
from ember.tree import TreeDef, tree_flatten

__all__ = ["save", "load", "CheckpointError", "LAYOUT_FILE", "FORMAT", "VERSION"]

FORMAT = "ember.sharded-checkpoint"
VERSION = 1
LAYOUT_FILE = "layout.json"

# Index ranges of a block in the global value: (start, stop) per dimension.
Ranges = tuple[tuple[int, int], ...]


class CheckpointError(EmberValueError):
    """A checkpoint cannot be written, or is corrupt, incomplete or not what was asked for."""


@dataclass(frozen=True)
class Block:
    """One stored block of a leaf: the file and tensor holding it, and where it sits."""

    file: str
    tensor: str
    ranges: Ranges


@dataclass(frozen=True)
class Leaf:
    """What ``layout.json`` says of one leaf of the saved tree."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    mesh: tuple[tuple[str, int], ...] | None  # axis names and sizes; None for a plain array
    spec: tuple[Any, ...] | None
    blocks: tuple[Block, ...]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "shape": list(self.shape), "dtype": self.dtype.name,
                "mesh": None if self.mesh is None else {
                    "axis_names": [n for n, _ in self.mesh], "shape": [s for _, s in self.mesh]},
                "spec": None if self.spec is None else [
                    list(e) if isinstance(e, tuple) else e for e in self.spec],
                "blocks": [{"file": b.file, "tensor": b.tensor, "index": [list(r) for r in
                                                                          b.ranges]}
                           for b in self.blocks]}


# --- save -------------------------------------------------------------------------------------


def save(path: str | os.PathLike[str], tree: Any, *, overwrite: bool = False) -> None:
    """Write ``tree`` (a pytree of ``ShardedArray``\\ s and plain arrays) as a checkpoint
    directory at ``path``.

    A collective: every process of the job calls it with the same tree structure and layouts.
    Each process writes the blocks it holds; plain arrays are written by process 0. An existing
    ``path`` is an error unless ``overwrite``; it is then replaced as a whole, and until the new
    checkpoint is in place :func:`load` still finds the old one.
    """
    op = "checkpoint.save"
    target = os.path.abspath(os.fspath(path))
    staging = _sibling(target, "saving")
    leaves: list[tuple[Leaf, dict[str, np.ndarray]]] = []
    me = process_index()

    def prepare() -> None:
        leaves.extend(_describe(name, leaf, me, op) for name, leaf in _named_leaves(tree, op))
        if me != 0:
            return
        _recover(target)
        if os.path.exists(target) and not overwrite:
            raise op_error(CheckpointError, op, f"{target} exists; pass overwrite=True to "
                           f"replace it")
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that was interrupted
        os.makedirs(staging)

    def write() -> None:
        mine = {name: data for _, blocks in leaves for name, data in blocks.items()}
        if mine:  # the file's own write is atomic and synced (ember.io.files.atomic_write)
            safetensors.save(mine, os.path.join(staging, _file_of(me)),
                             metadata={"ember": FORMAT})

    def commit() -> None:
        if me != 0:
            return
        head = json.dumps({"format": FORMAT, "version": VERSION,
                           "process_count": process_count()})[:-1]
        # One leaf a line: the file stays readable (and diffable) for thousands of leaves.
        body = ",\n".join(json.dumps(leaf.to_json()) for leaf, _ in leaves)
        write_text_atomic(os.path.join(staging, LAYOUT_FILE),
                          f"{head}, \"leaves\": [\n{body}\n]}}\n")
        _publish(staging, target)

    try:
        _together(prepare, op, "prepare")
        _together(write, op, "write its blocks")
        _together(commit, op, "publish the checkpoint")
    except BaseException:
        if me == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _describe(name: str, leaf: Any, me: int, op: str) -> tuple[Leaf, dict[str, np.ndarray]]:
    """The layout entry of one leaf, and the blocks of it that process ``me`` writes."""
    if isinstance(leaf, Tracer):
        raise op_error(CheckpointError, op, f"leaf {name!r} is a traced value ({leaf.aval}); "
                       f"save concrete arrays, outside jit and grad")
    if not isinstance(leaf, ShardedArray):
        value = np.asarray(leaf)
        whole = tuple((0, n) for n in value.shape)
        block = Block(_file_of(0), _tensor_name(name, whole), whole)
        return (Leaf(name, value.shape, value.dtype, None, None, (block,)),
                {block.tensor: value} if me == 0 else {})
    sharding = leaf.sharding
    indices = sharding.indices(leaf.shape, op)
    local = dict(zip(sharding.mesh.local_devices, leaf.local_buffers()))
    blocks: dict[Ranges, Block] = {}
    mine: dict[str, np.ndarray] = {}
    for device in sharding.mesh.devices.flat:  # mesh order: a copied block's first holder
        ranges = _ranges(indices[device])
        if ranges in blocks:
            continue
        block = blocks[ranges] = Block(_file_of(device.process_index),
                                       _tensor_name(name, ranges), ranges)
        if device.process_index == me:
            mine[block.tensor] = local[device]
    return (Leaf(name, tuple(leaf.shape), np.dtype(leaf.dtype), sharding.mesh.abstract,
                 tuple(sharding.spec), tuple(blocks.values())), mine)


def _publish(staging: str, target: str) -> None:
    """Move the finished checkpoint into place. A new path takes one rename; an old
    checkpoint is first moved to the ``previous`` sibling (which :func:`load` falls back to
    while ``target`` is missing) and removed once the new one is in place."""
    previous = _sibling(target, "previous")
    if os.path.exists(target):
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(target, previous)
    os.rename(staging, target)
    _fsync_directory(os.path.dirname(target))
    shutil.rmtree(previous, ignore_errors=True)


def _recover(target: str) -> None:
    """Put back the checkpoint a save interrupted between its two renames had moved aside."""
    previous = _sibling(target, "previous")
    if not os.path.exists(target) and os.path.isfile(os.path.join(previous, LAYOUT_FILE)):
        os.rename(previous, target)


# --- load -------------------------------------------------------------------------------------


def load(path: str | os.PathLike[str], shardings: Any) -> Any:
    """Read the checkpoint at ``path`` laid out as ``shardings`` says.

    ``shardings`` has the structure of the saved tree, with a ``NamedSharding`` (over any mesh,
    with any process count) for each leaf to get as a ``ShardedArray``, or ``None`` for a
    leaf to get whole, as a plain ember array (or for an empty subtree: where the checkpoint
    holds no leaf, ``None`` stays ``None``). A collective when the job has several processes.
    A corrupt, incomplete or mismatched checkpoint is a :class:`CheckpointError` naming the
    file and the leaf, raised in every process; nothing is returned half loaded.
    """
    op = "checkpoint.load"
    root = _published(os.path.abspath(os.fspath(path)), op)
    targets, treedef = tree_flatten(
        shardings, is_leaf=lambda x: x is None or isinstance(x, NamedSharding))
    values: list[Any] = []

    def read() -> None:
        saved = _read_layout(root, op)
        names = _leaf_paths(treedef, op)
        # None is also an empty subtree (an optimizer's unused slot): where the checkpoint
        # holds nothing under its path it stays None.
        empty = {n for n, t in zip(names, targets) if t is None and n not in saved}
        missing = [n for n, t in zip(names, targets) if n not in saved and n not in empty]
        asked = set(names)
        extra = [n for n in saved if n not in asked]
        if missing or extra:
            raise op_error(CheckpointError, op, f"{root} does not hold the leaves asked for: "
                           + "; ".join(f"{label}: {', '.join(map(repr, items))}" for label, items
                                       in (("not in the checkpoint", missing),
                                           ("in the checkpoint but not asked for", extra))
                                       if items))
        files = _Files(root, op)
        values.extend(None if n in empty else _read_leaf(saved[n], target, files, op)
                      for n, target in zip(names, targets))

    _together(read, op, "read its shards")
    return treedef.unflatten(values)


def _read_leaf(leaf: Leaf, target: Any, files: _Files, op: str) -> Array:
    """``leaf`` laid out by ``target`` (a NamedSharding, or None for the whole value)."""
    if target is None:
        whole = tuple((0, n) for n in leaf.shape)
        value = _read_region(leaf, whole, files)
        return Array(value, ArrayType(value.shape, value.dtype))
    if not isinstance(target, NamedSharding):
        raise op_error(CheckpointError, op, f"the layout asked for leaf {leaf.path!r} is a "
                       f"{type(target).__name__}; expected an ember.parallel.NamedSharding or "
                       f"None")
    try:
        indices = target.indices(leaf.shape, op)
    except EmberError as e:
        raise op_error(CheckpointError, op, f"leaf {leaf.path!r}: {e}") from None
    regions: dict[Ranges, np.ndarray] = {}
    buffers = []
    for device in target.mesh.local_devices:
        ranges = _ranges(indices[device])
        if ranges in regions:  # a copy of a region already read: each device owns its buffer
            buffers.append(regions[ranges].copy())
        else:
            buffers.append(regions.setdefault(ranges, _read_region(leaf, ranges, files)))
    if not buffers:  # the mesh leaves out this process's devices
        return ShardedArray([], target, ArrayType(leaf.shape, leaf.dtype, False,
                                                   target.abstract(len(leaf.shape))))
    return ShardedArray.from_shards(buffers, target, leaf.shape)


def _read_region(leaf: Leaf, region: Ranges, files: _Files) -> np.ndarray:
    """The part ``region`` of ``leaf``, copied out of the stored blocks that overlap it (only
    those are opened, and of each only the overlapping bytes are touched)."""
    out = np.empty([b - a for a, b in region], leaf.dtype)
    if out.size == 0:
        return out
    for block in leaf.blocks:
        overlap = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(region, block.ranges)]
        if any(lo >= hi for lo, hi in overlap):
            continue
        stored = files.tensor(block, leaf)
        out[tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(overlap, region))] = \
            stored[tuple(slice(lo - c, hi - c) for (lo, hi), (c, _) in zip(overlap, block.ranges))]
    return out


class _Files:
    """The checkpoint's block files, each memory-mapped when first needed."""

    def __init__(self, root: str, op: str):
        self.root, self.op = root, op
        self._open: dict[str, dict[str, np.ndarray]] = {}

    def tensor(self, block: Block, leaf: Leaf) -> np.ndarray:
        path = os.path.join(self.root, block.file)
        tensors = self._open.get(block.file)
        if tensors is None:
            if not os.path.isfile(path):
                raise self._error(leaf, f"{path} is missing")
            try:
                tensors = self._open[block.file] = safetensors.load(path)
            except EmberError as e:
                raise self._error(leaf, str(e)) from None
        stored = tensors.get(block.tensor)
        shape = tuple(b - a for a, b in block.ranges)
        if stored is None:
            raise self._error(leaf, f"{path} has no tensor {block.tensor!r}")
        if stored.shape != shape or stored.dtype != leaf.dtype:
            raise self._error(leaf, f"{path}: tensor {block.tensor!r} is {stored.dtype}"
                                    f"{list(stored.shape)}, the layout says {leaf.dtype}"
                                    f"{list(shape)}")
        return stored

    def _error(self, leaf: Leaf, message: str) -> CheckpointError:
        return op_error(CheckpointError, self.op, f"leaf {leaf.path!r}: {message}")


def _published(target: str, op: str) -> str:
    """The directory holding the checkpoint saved at ``target``: itself, or the previous
    checkpoint a save interrupted between its two renames left aside."""
    if os.path.isdir(target):
        return target
    previous = _sibling(target, "previous")
    if os.path.isfile(os.path.join(previous, LAYOUT_FILE)):
        return previous
    raise op_error(CheckpointError, op, f"{target}: no such checkpoint directory")


def _read_layout(root: str, op: str) -> dict[str, Leaf]:
    """``layout.json`` checked: every leaf's blocks tile its global value exactly."""
    path = os.path.join(root, LAYOUT_FILE)
    if not os.path.isfile(path):
        raise op_error(CheckpointError, op, f"{root} holds no {LAYOUT_FILE}: not a sharded "
                       f"checkpoint, or one whose save did not finish")
    try:
        layout = read_json(path)
    except EmberError as e:
        raise op_error(CheckpointError, op, str(e)) from None
    if layout.get("format") != FORMAT or layout.get("version") != VERSION:
        raise op_error(CheckpointError, op, f"{path}: expected format {FORMAT!r} version "
                       f"{VERSION}, got {layout.get('format')!r} version "
                       f"{layout.get('version')!r}")
    leaves: dict[str, Leaf] = {}
    for i, entry in enumerate(layout.get("leaves", None) or []):
        try:
            leaf = _parse_leaf(entry)
        except (KeyError, TypeError, ValueError) as e:
            name = entry.get("path", f"#{i}") if isinstance(entry, dict) else f"#{i}"
            raise op_error(CheckpointError, op, f"{path}: leaf {name!r} is malformed "
                           f"({type(e).__name__}: {e})") from None
        problem = _tiling_problem(leaf)
        if problem:
            raise op_error(CheckpointError, op, f"{path}: leaf {leaf.path!r}: {problem}")
        leaves[leaf.path] = leaf
    return leaves


def _parse_leaf(entry: dict[str, Any]) -> Leaf:
    shape = tuple(_count(n) for n in entry["shape"])
    blocks = []
    for b in entry["blocks"]:
        ranges = tuple((_count(lo), _count(hi)) for lo, hi in b["index"])
        if os.path.basename(b["file"]) != b["file"] or not isinstance(b["tensor"], str):
            raise ValueError(f"block file {b['file']!r} is not a plain file name")
        blocks.append(Block(b["file"], b["tensor"], ranges))
    mesh = entry["mesh"]
    spec = entry["spec"]
    return Leaf(str(entry["path"]), shape, np.dtype(entry["dtype"]),
                None if mesh is None else tuple(zip(mesh["axis_names"], mesh["shape"])),
                None if spec is None else tuple(tuple(e) if isinstance(e, list) else e
                                                for e in spec),
                tuple(blocks))


def _count(value: Any) -> int:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative whole number")
    return value


def _tiling_problem(leaf: Leaf) -> str | None:
    """Why the blocks do not cover the global value exactly once, if they do not.

    Blocks of a sharded array form a grid: along each dimension their ranges cut ``[0, n)``
    into consecutive pieces, and there is one block per combination of pieces. Checked so, it
    costs a sort per dimension rather than a comparison of every pair of blocks."""
    if not leaf.blocks:
        return "it has no blocks"
    for block in leaf.blocks:
        if len(block.ranges) != len(leaf.shape) or any(
                not 0 <= a <= b <= n for (a, b), n in zip(block.ranges, leaf.shape)):
            return f"block {block.tensor!r} lies outside its shape {list(leaf.shape)}"
    pieces = 1
    for dim, n in enumerate(leaf.shape):
        cuts = sorted({block.ranges[dim] for block in leaf.blocks})
        edge = 0
        for start, stop in cuts:
            if start != edge:
                return (f"its blocks overlap in dimension {dim} ([{start}, {stop}) starts "
                        f"before {edge})" if start < edge else
                        f"its blocks leave [{edge}, {start}) of dimension {dim} uncovered")
            edge = stop
        if edge != n:
            return f"its blocks leave [{edge}, {n}) of dimension {dim} uncovered"
        pieces *= len(cuts)
    if len({block.ranges for block in leaf.blocks}) != len(leaf.blocks):
        return "a block is stored twice"
    if pieces != len(leaf.blocks):
        return (f"its blocks do not cover its shape {list(leaf.shape)} ({len(leaf.blocks)} "
                f"blocks where the grid has {pieces})")
    return None


# --- shared -----------------------------------------------------------------------------------


def _together(step: Callable[[], None], op: str, what: str) -> None:
    """Run ``step`` here, then stop every process if it failed in any (the failing ones raise
    their own error, the others one naming them): the processes always agree."""
    if process_count() == 1:
        step()
        return
    error: BaseException | None = None
    try:
        step()
    except Exception as e:  # re-raised below, once every process knows
        error = e
    failed = runtime.world().all_gather(np.array([error is not None], np.int32), axis=0)
    if error is not None:
        raise error
    if failed.any():
        ranks = ", ".join(str(int(r)) for r in np.flatnonzero(failed))
        raise op_error(CheckpointError, op, f"process(es) {ranks} could not {what} (their "
                       f"error is in their output), so every process stops here")


def _named_leaves(tree: Any, op: str) -> list[tuple[str, Any]]:
    leaves, treedef = tree_flatten(tree)
    return list(zip(_leaf_paths(treedef, op), leaves))


def _leaf_paths(treedef: TreeDef, op: str) -> list[str]:
    """Every leaf's dotted path in a tree of this structure (dict keys, field names, list
    positions), in flattening order: the name a leaf is saved and found under."""
    paths: list[str] = []

    def walk(node: TreeDef, prefix: str) -> None:
        if node.node is None:
            paths.append(prefix)
            return
        for name, child in zip(_child_names(node), node.children):
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(treedef, "")
    if len(set(paths)) != len(paths):
        twice = sorted({p for p in paths if paths.count(p) > 1})
        raise op_error(CheckpointError, op, f"several leaves are named {twice[0]!r} (dict "
                       f"keys with dots?); a checkpoint names each leaf by its path")
    return paths


def _child_names(node: TreeDef) -> list[str]:
    count = len(node.children)
    if node.node is dict:
        return [str(k) for k in node.aux]  # a dict's structure holds its keys in child order
    fields = getattr(node.node, "_fields", None)  # a namedtuple
    if fields is None and dataclasses.is_dataclass(node.node):
        fields = [f.name for f in dataclasses.fields(node.node)]
    if fields is not None and len(fields) == count:
        return list(fields)
    return [str(i) for i in range(count)]


def _ranges(index: tuple[slice, ...]) -> Ranges:
    return tuple((s.start, s.stop) for s in index)


def _tensor_name(path: str, ranges: Ranges) -> str:
    """A block's tensor name: the leaf's path and its index ranges (``w@0:4,0:8``)."""
    return f"{path}@{','.join(f'{a}:{b}' for a, b in ranges)}"


def _file_of(process: int) -> str:
    return f"process-{process}.safetensors"


def _sibling(target: str, kind: str) -> str:
    """A hidden directory next to ``target`` (same file system: renames are atomic)."""
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{kind}")

