"""Read and write GGUF files (llama.cpp's single-file model format).

Parsing is left to the ``gguf`` package's memory-mapped reader; this module turns what it finds
into what a model loader wants: metadata as plain Python values, tensors dequantised to float32 in
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
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    ReaderField,
    ReaderTensor,
)
from tqdm.auto import tqdm

from ember.errors import EmberValueError, ShapeError, UnsupportedError
from ember.io.quants import FLOAT_TYPES, SUPPORTED_TYPES, block_format, dequantize

_MAGIC = b"GGUF"
# What the reader raises on a damaged file: short reads surface as IndexError or failed reshapes.
_READER_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError)


class GGUFFile:
    """One GGUF file, memory-mapped: metadata is decoded on open, tensors on request."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._reader = _open_reader(self.path)
        self._tensors: dict[str, ReaderTensor] = {t.name: t for t in self._reader.tensors}
        # The reader also lists the header counts as pseudo-fields named GGUF.*; they are not
        # key/value metadata.
        self.metadata: dict[str, Any] = {
            name: _field_value(self.path, field)
            for name, field in self._reader.fields.items()
            if not name.startswith("GGUF.")
        }

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
        return _numpy_shape(entry), entry.tensor_type.name

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantised to a new float32 array of its NumPy-order shape."""
        entry = self._supported_entry(name)
        values = dequantize(entry.data, entry.tensor_type, entry.n_elements)
        return values.reshape(_numpy_shape(entry))

    def stored_tensor(self, name: str) -> tuple[np.ndarray, str | None]:
        """Tensor ``name`` as stored, without a copy: ``(values, None)`` for a float tensor
        (float32, float16 or bfloat16 in its NumPy-order shape), ``(rows, format)`` for a
        quantised one: ``uint8 [..., row_bytes]`` rows of ``format`` blocks (``"q4_1"``)."""
        entry = self._supported_entry(name)
        shape = _numpy_shape(entry)
        data = np.ascontiguousarray(entry.data).reshape(-1).view(np.uint8)
        if entry.tensor_type in FLOAT_TYPES:
            return data.view(FLOAT_TYPES[entry.tensor_type]).reshape(shape), None
        fmt = block_format(entry.tensor_type)
        return data.reshape(*shape[:-1], fmt.row_bytes(shape[-1])), fmt.name

    def _supported_entry(self, name: str) -> ReaderTensor:
        entry = self._entry(name)
        if entry.tensor_type not in SUPPORTED_TYPES:
            raise UnsupportedError(
                f"{self.path}: tensor {name!r} is stored as {entry.tensor_type.name}, which "
                f"Ember cannot dequantize; supported: {', '.join(t.name for t in SUPPORTED_TYPES)}"
            )
        return entry

    def _entry(self, name: str) -> ReaderTensor:
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
        for name, field in source._reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            if name in overrides:
                writer.add_uint32(name, overrides.pop(name))
                continue
            if name == "general.alignment":  # the writer must pad to it, not only record it
                writer.add_custom_alignment(int(field.contents()))
                continue
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
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


def _open_reader(path: str) -> GGUFReader:
    if not os.path.isfile(path):
        raise EmberValueError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(len(_MAGIC))
    if magic != _MAGIC:
        raise EmberValueError(
            f"{path}: not a GGUF file (expected the magic bytes {_MAGIC!r} at the start, "
            f"found {magic!r})"
        )
    try:
        with np.errstate(over="ignore"):  # a damaged offset overflows, then fails to map
            reader = GGUFReader(path)
    except _READER_ERRORS as exc:
        raise EmberValueError(
            f"{path}: corrupt or truncated GGUF file ({type(exc).__name__}: {exc})"
        ) from None
    if reader.byte_order != "I":
        raise UnsupportedError(f"{path}: big-endian GGUF files are not supported")
    return reader


def _numpy_shape(entry: ReaderTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(entry.shape.tolist()))


def _field_value(path: str, field: ReaderField) -> Any:
    """A metadata value as plain Python: str, int, float, bool, or a list of those.

    Arrays are decoded in one pass over the reader's parts (rather than its per-element
    ``contents()``), which keeps the 50k-entry vocabularies of tokenizer metadata fast. Nested
    arrays come back flattened, as the reader stores them.
    """
    try:
        if field.types[0] == GGUFValueType.ARRAY:
            if len(field.types) == 1:  # an empty array records no element type
                return []
            parts = [field.parts[i] for i in field.data]
            if field.types[-1] == GGUFValueType.STRING:
                return [part.tobytes().decode("utf-8") for part in parts]
            return np.concatenate(parts).tolist()
        if field.types[0] == GGUFValueType.STRING:
            return field.parts[-1].tobytes().decode("utf-8")
        return field.parts[-1][0].item()
    except UnicodeDecodeError as exc:
        raise EmberValueError(
            f"{path}: metadata {field.name!r} is not valid UTF-8 ({exc})"
        ) from None


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
