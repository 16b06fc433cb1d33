"""Load and save safetensors checkpoints (single files and Hugging Face sharded directories).

The format is simple: an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the raw little-endian data. We parse the header ourselves and
map the data with NumPy rather than going through ``safetensors``' NumPy framework, because that
framework cannot represent bfloat16, the dtype most large checkpoints are stored in. The
``safetensors`` package still validates every file we read (overlaps, gaps, padding).

Loading is zero-copy: arrays are views of a copy-on-write memory map, so a 10 GB checkpoint costs
no RAM until it is touched, and writing into an array never modifies the file.

Saving streams each array straight to disk (no in-memory copy of the whole file) and is atomic: a
temporary file in the same directory is written, fsynced and renamed over the target, so a crash or
an error never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import IO, Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from ember.errors import EmberValueError, UnsupportedError
from ember.io.files import atomic_write

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")

_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}

# One tensor of a file being written: (name, safetensors dtype name, array).
_Item = tuple[str, str, np.ndarray]


def _corrupt(path: str, what: str) -> EmberValueError:
    return EmberValueError(f"{path}: corrupt or truncated safetensors file: {what}")


# ----------------------------------------------------------------------------------------- load


def load(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors checkpoint into NumPy arrays (bfloat16 via ml_dtypes).

    ``path`` is a ``.safetensors`` file, or a directory holding ``model.safetensors`` or a sharded
    checkpoint described by ``model.safetensors.index.json`` (then the index is authoritative: its
    names are returned, in its order, and each must be found in the shard it names).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return _load_file(path)
    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        return _load_file(os.path.join(path, SINGLE_FILE))
    if os.path.isfile(os.path.join(path, INDEX_FILE)):
        return _load_sharded(os.path.join(path, INDEX_FILE))
    raise EmberValueError(
        f"{path}: directory holds no safetensors checkpoint "
        f"(expected {SINGLE_FILE} or {INDEX_FILE})"
    )


def _load_file(path: str) -> dict[str, np.ndarray]:
    entries, data_start = _read_header(path)
    try:
        with safe_open(path, framework="numpy"):
            pass
    except SafetensorError as exc:
        raise _corrupt(path, str(exc)) from None
    if not entries:
        return {}
    # Copy-on-write: the arrays are writable, but writes stay in this process's memory.
    mapped = np.memmap(path, mode="c")
    out = {}
    for name, (dtype, shape, begin) in entries.items():
        count = math.prod(shape)
        if count == 0:
            out[name] = np.empty(shape, dtype)
        else:
            out[name] = np.frombuffer(mapped, dtype, count, data_start + begin).reshape(shape)
    return out


def _read_header(path: str) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int]], int]:
    """Parse and check the header: return {name: (dtype, shape, data offset)} and the data start."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"the file has {size} bytes, too few for the header length")
            length = int.from_bytes(prefix, "little")
            if length > size - 8:
                raise _corrupt(
                    path, f"the header length says {length} bytes but only {size - 8} bytes follow"
                )
            raw = f.read(length)
    except FileNotFoundError:
        raise EmberValueError(f"{path}: no such safetensors file") from None
    try:
        header = json.loads(raw)
    except ValueError as exc:  # also covers bad UTF-8
        raise _corrupt(path, f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    entries = {name: _parse_entry(path, name, entry, data_size) for name, entry in header.items()}
    return entries, 8 + length


def _parse_entry(
    path: str, name: str, entry: Any, data_size: int
) -> tuple[np.dtype, tuple[int, ...], int]:
    try:
        dtype_name, shape = entry["dtype"], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise _corrupt(
            path, f"tensor {name!r} needs 'dtype', 'shape' and two 'data_offsets', got {entry!r}"
        ) from None
    if dtype_name not in _DTYPES:
        raise UnsupportedError(
            f"{path}: tensor {name!r} has dtype {dtype_name!r}; supported: {', '.join(_DTYPES)}"
        )
    ints = (*shape, begin, end)
    if not all(isinstance(v, int) and v >= 0 for v in ints):
        raise _corrupt(path, f"tensor {name!r} has a bad shape or offsets: {entry!r}")
    if not begin <= end <= data_size:
        raise _corrupt(
            path,
            f"tensor {name!r} spans bytes [{begin}, {end}) but the data section has {data_size}",
        )
    dtype = _DTYPES[dtype_name]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise _corrupt(
            path,
            f"tensor {name!r} of shape {list(shape)} and dtype {dtype_name} needs "
            f"{math.prod(shape) * dtype.itemsize} bytes but spans {end - begin}",
        )
    return dtype, shape, begin


def _load_sharded(index_path: str) -> dict[str, np.ndarray]:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise EmberValueError(
            f"{index_path}: not a sharded checkpoint index (expected a JSON object with a "
            f"'weight_map' of tensor name -> shard file name)"
        ) from None
    directory = os.path.dirname(index_path)
    shards = {}
    for shard in dict.fromkeys(weight_map.values()):
        if os.path.basename(shard) != shard:
            raise EmberValueError(f"{index_path}: shard {shard!r} is not a plain file name")
        shards[shard] = _load_file(os.path.join(directory, shard))
    missing = [name for name, shard in weight_map.items() if name not in shards[shard]]
    if missing:
        raise EmberValueError(
            f"{index_path}: {len(missing)} tensors listed in the index are missing from the "
            f"shards it names, e.g. {missing[0]!r} (expected in {weight_map[missing[0]]})"
        )
    return {name: shards[shard][name] for name, shard in weight_map.items()}


# ----------------------------------------------------------------------------------------- save


def save(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write ``tensors`` as a safetensors checkpoint that Hugging Face libraries load.

    Without ``max_shard_bytes``, ``path`` is the file to write (or an existing directory, which
    gets ``model.safetensors``). With it, ``path`` is a directory (created if needed) that gets
    shards ``model-00001-of-0000N.safetensors`` of at most that many bytes of data each (a bigger
    tensor gets a shard of its own) and ``model.safetensors.index.json``. When writing into a
    directory, older weight files of those standard names are removed once the new ones are in
    place, so the directory never holds two competing checkpoints.

    Every file is replaced atomically. ``metadata`` (str -> str) goes into each file's header,
    on top of the default ``{"format": "pt"}`` that transformers expects.
    """
    path = os.fspath(path)
    items = _check_tensors(tensors)
    meta = _check_metadata(metadata)
    if max_shard_bytes is None:
        if not os.path.isdir(path):
            _write_file(path, items, meta)
            return
        _write_file(os.path.join(path, SINGLE_FILE), items, meta)
        _remove_stale(path, {SINGLE_FILE})
        return
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise EmberValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    if os.path.isfile(path):
        raise EmberValueError(f"{path}: a sharded checkpoint is written to a directory, not a file")
    os.makedirs(path, exist_ok=True)
    shards = _split(items, max_shard_bytes)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        _write_file(os.path.join(path, name), shard, meta)
    index = {
        "metadata": {"total_size": sum(a.nbytes for _, _, a in items)},
        "weight_map": {t: name for name, shard in zip(names, shards) for t, _, _ in shard},
    }
    text = json.dumps(index, indent=2) + "\n"
    atomic_write(os.path.join(path, INDEX_FILE), lambda f: f.write(text.encode()))
    _remove_stale(path, {*names, INDEX_FILE})


def _check_tensors(tensors: Mapping[str, np.ndarray]) -> list[_Item]:
    """Check every name and dtype before anything is written, so errors leave no files."""
    items = []
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise EmberValueError(f"safetensors tensor names must be str other than "
                                  f"'__metadata__', got {name!r}")
        array = np.asarray(value)
        dtype_name = _NAMES.get(array.dtype.newbyteorder("<"))
        if dtype_name is None:
            raise UnsupportedError(
                f"cannot save tensor {name!r} of dtype {array.dtype} as safetensors; supported: "
                + ", ".join(str(d) for d in _DTYPES.values())
            )
        items.append((name, dtype_name, array))
    return items


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = {"format": "pt", **(metadata or {})}
    bad = {k: v for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise EmberValueError(f"safetensors metadata must map str to str, got {bad!r}")
    return meta


def _split(items: list[_Item], max_bytes: int) -> list[list[_Item]]:
    """Group tensors, in order, into shards of at most ``max_bytes`` (unless one is bigger)."""
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item[2].nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[2].nbytes
    return shards


def _write_file(path: str, items: list[_Item], metadata: dict[str, str]) -> None:
    # The header lists tensors in the caller's order, so a load returns them in that order; the
    # data puts the widest dtypes first so that (the header being padded to 8 bytes) every
    # tensor is aligned.
    layout = sorted(items, key=lambda item: -item[2].itemsize)
    offsets = {}
    offset = 0
    for name, _, array in layout:
        offsets[name] = [offset, offset + array.nbytes]
        offset += array.nbytes
    header: dict[str, Any] = {"__metadata__": metadata}
    for name, dtype_name, array in items:
        header[name] = {"dtype": dtype_name, "shape": list(array.shape),
                        "data_offsets": offsets[name]}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(f: IO[bytes]) -> None:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, dtype_name, array in layout:
            data = np.ascontiguousarray(array, dtype=_DTYPES[dtype_name])
            f.write(data.reshape(-1).view(np.uint8))

    atomic_write(path, write)


def _remove_stale(directory: str, keep: set[str]) -> None:
    for name in os.listdir(directory):
        if name not in keep and _WEIGHT_FILE.fullmatch(name):
            os.unlink(os.path.join(directory, name))
