"""GGML block formats: one description per format, serving whole tensors and rows of blocks.

GGUF files store most weights in *blocks*: a run of 32 (or 256) elements shares one or two float16
scale factors and packs each element into 4, 6 or 8 bits. Each format is described here once, by
a :class:`BlockFormat`: a NumPy structured dtype that mirrors the C struct of one block, a decoder
and (for the formats ``ember convert`` writes) an encoder. Blocks are unpacked by whole-array
operations on the struct's fields (no Python loop per block), in float32 and in the same order as
llama.cpp's reference C code; the tests check decoders and encoders bit for bit against the
``gguf`` package's own (slower) implementations.

Two users share the decoders: loading, which may dequantise a whole tensor once, and the
``quant_matmul`` primitive (``ember.ops.quantized``), which keeps a weight packed as rows of
blocks (``uint8 [rows, row_bytes]``) and dequantises a tile of rows at a time.

Large inputs are processed in chunks of blocks: the intermediate arrays then stay in the CPU cache,
which is about twice as fast as unpacking a 30M-element tensor in one pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType

from ember.errors import EmberValueError, UnsupportedError

__all__ = ["BlockFormat", "FLOAT_TYPES", "FORMATS", "SUPPORTED_TYPES", "block_format",
           "dequantize", "dequantize_rows", "finite_scales", "quantize_rows"]

_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
_Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
_Q6_K = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])

# How many elements one chunk of blocks unpacks to: small enough that the temporaries stay in L2.
_CHUNK_ELEMENTS = 1 << 16


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Split bytes (..., k) into (..., 2, k) 4-bit values: low nibbles first, then high nibbles."""
    return np.stack([qs & 0x0F, qs >> 4], axis=-2)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_nibbles` for 32-element blocks: element j low, element j + 16 high."""
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def _f32(x: np.ndarray) -> np.ndarray:
    """A float16 scale field as float32, with a trailing axis to broadcast over its block."""
    return x.astype(np.float32)[..., None]


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's ``roundf`` (halves away from zero); NumPy's ``round`` rounds halves to even."""
    return np.trunc(x + np.copysign(np.float32(0.5), x))


def _inverse(d: np.ndarray) -> np.ndarray:
    """``1 / d``, and 0 where ``d`` is 0 (an all-zero block)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


def _q8_0(b: np.ndarray) -> np.ndarray:
    return _f32(b["d"]) * b["qs"].astype(np.float32)


def _encode_q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    out = np.empty(len(x), _Q8_0)
    out["d"] = d[:, 0]
    out["qs"] = _round_half_away(x * _inverse(d))
    return out


def _q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b["qs"]).reshape(len(b), 32).view(np.int8) - np.int8(8)
    return _f32(b["d"]) * q.astype(np.float32)


def _encode_q4_0(x: np.ndarray) -> np.ndarray:
    # The scale maps the element of largest magnitude, with its sign, to -8.
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    d = extreme / np.float32(-8)
    q = np.minimum(np.trunc(x * _inverse(d) + np.float32(8.5)), 15)
    out = np.empty(len(x), _Q4_0)
    out["d"] = d[:, 0]
    out["qs"] = _pack_nibbles(q)
    return out


def _q4_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b["qs"]).reshape(len(b), 32).astype(np.float32)
    return _f32(b["d"]) * q + _f32(b["m"])


def _encode_q4_1(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    q = np.minimum(np.trunc((x - lo) * _inverse(d) + np.float32(0.5)), 15)
    out = np.empty(len(x), _Q4_1)
    out["d"], out["m"] = d[:, 0], lo[:, 0]
    out["qs"] = _pack_nibbles(q)
    return out


def _q4_k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12 bytes holding eight 6-bit scales and eight 6-bit mins of a Q4_K block.

    Sub-blocks 0..3 keep scale and min in the low 6 bits of bytes 0..3 and 4..7; sub-blocks 4..7
    keep their low 4 bits in the nibbles of bytes 8..11 and their top 2 bits in the spare top bits
    of bytes 0..7.
    """
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return scales, mins


def _q4_k(b: np.ndarray) -> np.ndarray:
    scales, mins = _q4_k_scales(b["scales"])
    d = _f32(b["d"]) * scales.astype(np.float32)  # (n, 8): one scale per 32-element sub-block
    m = _f32(b["dmin"]) * mins.astype(np.float32)
    # 128 bytes = 4 groups of 32 bytes; a group's low nibbles are sub-block 2g, its high ones 2g+1.
    q = _nibbles(b["qs"].reshape(len(b), 4, 32)).reshape(len(b), 8, 32).astype(np.float32)
    return d[..., None] * q - m[..., None]


_Q6_K_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]


def _q6_k(b: np.ndarray) -> np.ndarray:
    """Q6_K: two halves of 128 elements, each made of four runs of 32.

    Run r of a half takes its low 4 bits from byte l (r = 0, 2) or l + 32 (r = 1, 3) of the half's
    64 ``ql`` bytes (low nibble for r < 2, high nibble otherwise) and its top 2 bits from bits
    2r, 2r+1 of byte l of the half's 32 ``qh`` bytes; values are offset by 32. Each 16 elements
    have their own int8 scale: scale 2r + l // 16 of the half's 8.
    """
    n = len(b)
    low = _nibbles(b["ql"].reshape(n, 2, 64)).reshape(n, 2, 4, 32)
    high = (b["qh"].reshape(n, 2, 1, 32) >> _Q6_K_SHIFTS) & 3
    q = ((low | (high << 4)).view(np.int8) - np.int8(32)).astype(np.float32)
    d = _f32(b["d"])[..., None, None] * b["scales"].reshape(n, 2, 4, 2).astype(np.float32)
    return d[..., None] * q.reshape(n, 2, 4, 2, 16)


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """One GGML block format: ``block`` elements stored in one ``struct`` of bytes.

    ``decode(blocks)`` maps a 1-D array of structs to float32 values reshapable to
    ``(len(blocks), block)``; ``encode(values (n, block) float32)`` is its inverse up to rounding,
    for the formats ember writes (None for the others).
    """

    name: str
    ggml_type: GGMLQuantizationType
    block: int
    struct: np.dtype
    decode: Callable[[np.ndarray], np.ndarray]
    encode: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def block_bytes(self) -> int:
        return self.struct.itemsize

    def row_bytes(self, k: int) -> int:
        """Bytes of one packed row of ``k`` elements (``k`` a multiple of ``block``)."""
        return k // self.block * self.block_bytes

    def row_elements(self, nbytes: int) -> int:
        """Elements of one packed row of ``nbytes`` bytes."""
        return nbytes // self.block_bytes * self.block


FORMATS: dict[str, BlockFormat] = {f.name: f for f in (
    BlockFormat("q4_0", GGMLQuantizationType.Q4_0, 32, _Q4_0, _q4_0, _encode_q4_0),
    BlockFormat("q4_1", GGMLQuantizationType.Q4_1, 32, _Q4_1, _q4_1, _encode_q4_1),
    BlockFormat("q8_0", GGMLQuantizationType.Q8_0, 32, _Q8_0, _q8_0, _encode_q8_0),
    BlockFormat("q4_k", GGMLQuantizationType.Q4_K, 256, _Q4_K, _q4_k),
    BlockFormat("q6_k", GGMLQuantizationType.Q6_K, 256, _Q6_K, _q6_k),
)}
_BY_TYPE = {f.ggml_type: f for f in FORMATS.values()}

FLOAT_TYPES: dict[GGMLQuantizationType, np.dtype] = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.BF16: np.dtype(ml_dtypes.bfloat16),
}

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (*FLOAT_TYPES, *_BY_TYPE)


def _supported_names() -> str:
    return ", ".join(t.name for t in SUPPORTED_TYPES)


def _as_ggml_type(value: int | GGMLQuantizationType) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType(int(value))
    except ValueError:
        raise UnsupportedError(
            f"unknown GGML type number {int(value)}; supported: {_supported_names()}"
        ) from None


def block_format(fmt: str | int | GGMLQuantizationType) -> BlockFormat:
    """The :class:`BlockFormat` named ``fmt`` (``"q8_0"``) or of GGML type ``fmt``."""
    if isinstance(fmt, str):
        found = FORMATS.get(fmt.lower())
        if found is None:
            raise UnsupportedError(f"unknown block format {fmt!r}; supported: "
                                   f"{', '.join(FORMATS)}")
        return found
    qtype = _as_ggml_type(fmt)
    if qtype not in _BY_TYPE:
        names = ", ".join(t.name for t in _BY_TYPE)
        raise UnsupportedError(f"GGML type {qtype.name} is not a supported block format; "
                               f"supported: {names}")
    return _BY_TYPE[qtype]


def _decode_blocks(fmt: BlockFormat, blocks: np.ndarray, out: np.ndarray) -> None:
    """Decode a 1-D array of block structs into ``out`` ``(len(blocks), block)``, by chunks."""
    step = max(1, _CHUNK_ELEMENTS // fmt.block)
    for start in range(0, len(blocks), step):
        out[start:start + step] = fmt.decode(blocks[start:start + step]).reshape(-1, fmt.block)


def dequantize_rows(packed: np.ndarray, fmt: str | BlockFormat) -> np.ndarray:
    """Rows of blocks ``uint8 [..., row_bytes]`` to a new float32 array ``[..., k]``."""
    fmt = fmt if isinstance(fmt, BlockFormat) else block_format(fmt)
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if packed.ndim == 0 or packed.shape[-1] % fmt.block_bytes:
        raise EmberValueError(f"{fmt.name} rows must hold whole {fmt.block_bytes}-byte blocks, "
                              f"got rows of shape {packed.shape}")
    k = fmt.row_elements(packed.shape[-1])
    out = np.empty((*packed.shape[:-1], k), dtype=np.float32)
    _decode_blocks(fmt, packed.reshape(-1).view(fmt.struct), out.reshape(-1, fmt.block))
    return out


def finite_scales(packed: np.ndarray, fmt: str | BlockFormat) -> bool:
    """Whether every float16 scale of the blocks in ``packed`` is finite (a damaged file's
    NaN scale would make its whole block NaN), read without decoding the blocks."""
    fmt = fmt if isinstance(fmt, BlockFormat) else block_format(fmt)
    blocks = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1).view(fmt.struct)
    return all(np.isfinite(blocks[name]).all() for name, (kind, _) in fmt.struct.fields.items()
               if kind == np.dtype("<f2"))


def quantize_rows(values: np.ndarray, fmt: str | BlockFormat) -> np.ndarray:
    """Float rows ``[..., k]`` to blocks ``uint8 [..., row_bytes]``, as llama.cpp's reference
    quantisers round them (``k`` a multiple of the block size)."""
    fmt = fmt if isinstance(fmt, BlockFormat) else block_format(fmt)
    if fmt.encode is None:
        raise UnsupportedError(f"ember does not write {fmt.name} blocks; it writes "
                               f"{', '.join(n for n, f in FORMATS.items() if f.encode)}")
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 0 or values.shape[-1] % fmt.block:
        raise EmberValueError(f"{fmt.name} packs rows of whole {fmt.block}-element blocks, got "
                              f"shape {values.shape}")
    blocks = values.reshape(-1, fmt.block)
    out = np.empty(len(blocks), fmt.struct)
    step = max(1, _CHUNK_ELEMENTS // fmt.block)
    for start in range(0, len(blocks), step):
        out[start:start + step] = fmt.encode(blocks[start:start + step])
    return out.view(np.uint8).reshape(*values.shape[:-1], fmt.row_bytes(values.shape[-1]))


def dequantize(
    raw: np.ndarray, ggml_type: int | GGMLQuantizationType, n_elements: int
) -> np.ndarray:
    """Decode ``n_elements`` values of GGML type ``ggml_type`` stored in ``raw`` to float32.

    ``raw`` holds the tensor's bytes, as uint8 or as any typed array over the same bytes (the
    GGUF reader gives F32/F16 tensors typed). The result is a new, flat, writable float32 array.
    """
    qtype = _as_ggml_type(ggml_type)
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedError(
            f"cannot dequantize GGML type {qtype.name}; supported: {_supported_names()}"
        )
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    fmt = _BY_TYPE.get(qtype)
    dtype, block = (fmt.struct, fmt.block) if fmt else (FLOAT_TYPES[qtype], 1)
    n_blocks, rest = divmod(n_elements, block)
    if rest or data.size != n_blocks * dtype.itemsize:
        raise EmberValueError(
            f"{qtype.name} data for {n_elements} elements must be a whole number of "
            f"{block}-element blocks of {dtype.itemsize} bytes ({n_blocks * dtype.itemsize} "
            f"bytes), got {data.size} bytes"
        )
    blocks = data.view(dtype)
    if fmt is None:
        return blocks.astype(np.float32)
    out = np.empty((n_blocks, block), dtype=np.float32)
    _decode_blocks(fmt, blocks, out)
    return out.reshape(-1)
