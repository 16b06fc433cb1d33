"""Read and write GGUF files (llama.cpp's single-file model format).

The header is parsed here, straight from the memory-mapped file (the ``gguf`` package's reader
builds a NumPy view per string and takes seconds on a 49k-token vocabulary; this parser takes
milliseconds), every read bounded by the file's size. This module turns what it finds into what
a model loader wants: metadata as plain Python values, tensors dequantised to float32 in
NumPy's row-major shape (GGUF lists dimensions fastest-first, so every shape is reversed) or kept
as stored (quantised tensors as rows of packed blocks, see :mod:`ember.io.quants`), and errors
that say which file and tensor are at fault instead of a NumPy traceback from deep inside the
reader. :func:`write_gguf` writes a file with another file's metadata and new tensors, atomically.

llama.cpp's converter also reorders the rows of Llama query/key projections for its RoPE kernel;
:func:`unpermute_qk` undoes that so the weights match the Hugging Face layout.
"""

from __future__ import annotations

import difflib
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter
from tqdm.auto import tqdm

from ember.errors import EmberValueError, ShapeError, UnsupportedError
from ember.io.quants import FLOAT_TYPES, SUPPORTED_TYPES, block_format, dequantize

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# Scalar value types: their struct format (little-endian), which also sizes array elements.
_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
# Dimensions a tensor may have (GGML's limit is 4).
_MAX_DIMS = 8


class _CorruptError(Exception):
    """A read past the end of the file or a value no valid file holds."""


@dataclass(frozen=True)
class _Field:
    """One metadata entry: its GGUF type (and element type, for an array) and its value."""

    type: GGUFValueType
    sub_type: GGUFValueType | None
    value: Any


@dataclass(frozen=True)
class _Tensor:
    """One tensor's header entry; ``data`` is its bytes in the mapped file, from ``offset``."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # NumPy order (the file lists the fastest dimension first)
    offset: int
    data: np.ndarray        # uint8, read-only, a view of the map

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Reads little-endian values from ``buf`` at a moving offset; never past its end."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise _CorruptError(f"a value at byte {self.pos} runs past the end") from None
        self.pos += struct.calcsize(fmt)
        return value

    def count(self, item_bytes: int) -> int:
        """A uint64 count of items of at least ``item_bytes`` bytes that the file can hold."""
        n = self.scalar("<Q")
        if n * item_bytes > len(self.buf) - self.pos:
            raise _CorruptError(f"a count of {n} at byte {self.pos - 8} exceeds the file")
        return n

    def string(self) -> str:
        n = self.count(1)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return str(raw, "utf-8")

    def value(self, kind: int) -> tuple[Any, GGUFValueType | None]:
        """A value of GGUF type ``kind``: (plain Python value, element type if an array)."""
        if kind == GGUFValueType.STRING:
            return self.string(), None
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind]), None
        if kind != GGUFValueType.ARRAY:
            raise _CorruptError(f"unknown value type {kind}")
        sub = self.scalar("<I")
        if sub in _SCALARS:  # numbers: one NumPy read for the whole array
            fmt = _SCALARS[sub]
            n = self.count(struct.calcsize(fmt))
            values = np.frombuffer(self.buf, np.dtype(fmt), n, self.pos)
            self.pos += values.nbytes
            return values.tolist(), GGUFValueType(sub)
        if sub not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            raise _CorruptError(f"unknown array element type {sub}")
        n = self.count(8)  # every string or array element starts with an 8-byte count
        return [self.value(sub)[0] for _ in range(n)], GGUFValueType(sub)


def _parse(path: str, buf: memoryview) -> tuple[dict[str, _Field], dict[str, _Tensor]]:
    """The metadata and tensors of a GGUF file mapped as ``buf`` (magic already checked)."""
    cur = _Cursor(buf)
    cur.pos = len(_MAGIC)
    version = cur.scalar("<I")
    if version & 0xFFFF == 0:  # a small version number read with the wrong byte order
        raise UnsupportedError(f"{path}: big-endian GGUF files are not supported")
    if version not in _VERSIONS:
        raise _CorruptError(f"version {version}; ember reads versions {_VERSIONS}")
    n_tensors, n_fields = cur.count(8), cur.count(12)
    fields: dict[str, _Field] = {}
    for _ in range(n_fields):
        name = cur.string()
        kind = cur.scalar("<I")
        value, sub = cur.value(kind)
        fields[name] = _Field(GGUFValueType(kind), sub, value)
    entries = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if n_dims > _MAX_DIMS:
            raise _CorruptError(f"tensor {name!r} has {n_dims} dimensions")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        kind, offset = cur.scalar("<I"), cur.scalar("<Q")
        try:
            qtype = GGMLQuantizationType(kind)
        except ValueError:
            raise _CorruptError(f"tensor {name!r} has the unknown type {kind}") from None
        entries.append((name, qtype, tuple(reversed(dims)), offset))
    alignment = fields.get("general.alignment")
    align = alignment.value if alignment is not None else _DEFAULT_ALIGNMENT
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise _CorruptError(f"general.alignment {align!r} is not a power of two")
    start = -(-cur.pos // align) * align
    data = np.frombuffer(buf, np.uint8)
    tensors = {}
    for name, qtype, shape, offset in entries:
        block, size = GGML_QUANT_SIZES[qtype]
        n = math.prod(shape)
        if n % block or (shape and shape[-1] % block):
            raise _CorruptError(f"tensor {name!r} of shape {shape} is not whole "
                                f"{qtype.name} blocks")
        begin, nbytes = start + offset, n // block * size
        if begin + nbytes > len(buf):
            raise _CorruptError(f"tensor {name!r} ends past the end of the file")
        tensors[name] = _Tensor(name, qtype, shape, begin, data[begin:begin + nbytes])
    return fields, tensors


class GGUFFile:
    """One GGUF file, memory-mapped: metadata is decoded on open, tensors on request."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fields, self._tensors = _open(self.path)
        self.metadata: dict[str, Any] = {name: f.value for name, f in self._fields.items()}

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, {self.architecture!r}, {len(self._tensors)} tensors)"

    @property
    def architecture(self) -> str:
        """The model family (``general.architecture``), e.g. ``"llama"``."""
        try:
            return self.metadata["general.architecture"]
        except KeyError:
            raise EmberValueError(f"{self.path}: no 'general.architecture' metadata") from None

    @property
    def tensor_names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._tensors)

    def tensor_info(self, name: str) -> tuple[tuple[int, ...], str]:
        """The NumPy-order shape and GGML type name (e.g. ``"Q4_1"``) of tensor ``name``."""
        entry = self._entry(name)
        return entry.shape, entry.tensor_type.name

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantised to a new float32 array of its NumPy-order shape."""
        entry = self._supported_entry(name)
        values = dequantize(entry.data, entry.tensor_type, entry.n_elements)
        return values.reshape(entry.shape)

    def stored_tensor(self, name: str) -> tuple[np.ndarray, str | None]:
        """Tensor ``name`` as stored, without a copy: ``(values, None)`` for a float tensor
        (float32, float16 or bfloat16 in its NumPy-order shape), ``(rows, format)`` for a
        quantised one: ``uint8 [..., row_bytes]`` rows of ``format`` blocks (``"q4_1"``)."""
        entry = self._supported_entry(name)
        shape, data = entry.shape, entry.data
        if entry.tensor_type in FLOAT_TYPES:
            return data.view(FLOAT_TYPES[entry.tensor_type]).reshape(shape), None
        fmt = block_format(entry.tensor_type)
        return data.reshape(*shape[:-1], fmt.row_bytes(shape[-1])), fmt.name

    def _supported_entry(self, name: str) -> _Tensor:
        entry = self._entry(name)
        if entry.tensor_type not in SUPPORTED_TYPES:
            raise UnsupportedError(
                f"{self.path}: tensor {name!r} is stored as {entry.tensor_type.name}, which "
                f"Ember cannot dequantize; supported: {', '.join(t.name for t in SUPPORTED_TYPES)}"
            )
        return entry

    def _entry(self, name: str) -> _Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._tensors, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise EmberValueError(f"{self.path}: no tensor named {name!r}{hint}") from None


def write_gguf(path: str | os.PathLike[str], source: GGUFFile,
               tensors: Sequence[tuple[str, GGMLQuantizationType, tuple[int, ...]]],
               data: Callable[[str], np.ndarray], metadata: dict[str, int] | None = None
               ) -> None:
    """Write a GGUF file holding ``source``'s metadata and ``tensors``, atomically.

    ``tensors`` lists each tensor's name, GGML type and NumPy-order shape (the header needs them
    all before any data); ``data(name)`` then returns its bytes (or an array over them) one
    tensor at a time, so a model is never held twice in memory. ``metadata`` replaces unsigned
    integer fields (``general.file_type``...). The file appears at ``path`` only once complete.
    """
    path = os.fspath(path)
    fd, staging = tempfile.mkstemp(prefix=".ember-", suffix=".gguf", dir=os.path.dirname(path)
                                   or ".")
    os.close(fd)
    try:
        writer = GGUFWriter(staging, source.architecture)
        overrides = dict(metadata or {})
        for name, field in source._fields.items():
            if name == "general.architecture":
                continue
            if name in overrides:
                writer.add_uint32(name, overrides.pop(name))
                continue
            if name == "general.alignment":  # the writer must pad to it, not only record it
                writer.add_custom_alignment(field.value)
                continue
            writer.add_key_value(name, field.value, field.type, sub_type=field.sub_type)
        for name, value in overrides.items():
            writer.add_uint32(name, value)
        for name, qtype, shape in tensors:
            block, size = GGML_QUANT_SIZES[qtype]
            nbytes = math.prod(shape) // block * size
            writer.add_tensor_info(name, (*shape[:-1], nbytes // max(1, math.prod(shape[:-1]))),
                                   np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, _, _ in tqdm(tensors, desc="writing GGUF", unit="tensor", leave=False,
                               disable=len(tensors) < 64):
            writer.write_tensor_data(np.ascontiguousarray(data(name)).reshape(-1).view(np.uint8))
        writer.close()
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def _open(path: str) -> tuple[dict[str, _Field], dict[str, _Tensor]]:
    """Map ``path`` and parse its header; a damaged file is one clear error."""
    if not os.path.isfile(path):
        raise EmberValueError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(len(_MAGIC))
        if magic != _MAGIC:
            raise EmberValueError(
                f"{path}: not a GGUF file (expected the magic bytes {_MAGIC!r} at the start, "
                f"found {magic!r})"
            )
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(path, memoryview(mapped))
    except (_CorruptError, UnicodeDecodeError) as exc:
        raise EmberValueError(f"{path}: corrupt or truncated GGUF file ({exc})") from None


def _rope_halves(w: np.ndarray, n_head: int) -> int:
    rows = w.shape[0] if w.ndim else 0
    if n_head <= 0 or rows % (2 * n_head):
        raise ShapeError(
            f"q/k permutation: {rows} rows do not split into {n_head} heads of an even size"
        )
    return rows // (2 * n_head)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from Hugging Face's rotate-half RoPE layout to GGUF's.

    Within each head, HF pairs row i with row i + head_dim/2; llama.cpp pairs adjacent rows.
    This is what llama.cpp's converter applies (with ``n_head`` = the kv-head count for k).
    """
    half = _rope_halves(w, n_head)
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: GGUF q/k rows back to Hugging Face's layout."""
    half = _rope_halves(w, n_head)
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
