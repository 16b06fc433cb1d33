"""Dequantisation of GGML block formats to float32, written from the format definitions.

GGUF files store most weights in *blocks*: a run of 32 (or 256) elements shares one or two float16
scale factors and packs each element into 4, 6 or 8 bits. Each format is described here by a NumPy
structured dtype that mirrors the C struct of one block, so a whole tensor is unpacked by
whole-array operations on the fields (no Python loop per block). The arithmetic is done in float32
in the same order as llama.cpp's reference C code; the tests check the results bit for bit
against the ``gguf`` package's own (slower) decoder.

Large tensors are processed in chunks of blocks: the intermediate arrays then stay in the CPU cache,
which is about twice as fast as unpacking a 30M-element tensor in one pass.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType

from ember.errors import EmberValueError, UnsupportedError

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


def _f32(x: np.ndarray) -> np.ndarray:
    """A float16 scale field as float32, with a trailing axis to broadcast over its block."""
    return x.astype(np.float32)[..., None]


def _q8_0(b: np.ndarray) -> np.ndarray:
    return _f32(b["d"]) * b["qs"].astype(np.float32)


def _q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b["qs"]).reshape(len(b), 32).view(np.int8) - np.int8(8)
    return _f32(b["d"]) * q.astype(np.float32)


def _q4_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b["qs"]).reshape(len(b), 32).astype(np.float32)
    return _f32(b["d"]) * q + _f32(b["m"])


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


_BLOCK_KERNELS: dict[GGMLQuantizationType, tuple[np.dtype, int, Callable]] = {
    GGMLQuantizationType.Q4_0: (_Q4_0, 32, _q4_0),
    GGMLQuantizationType.Q4_1: (_Q4_1, 32, _q4_1),
    GGMLQuantizationType.Q8_0: (_Q8_0, 32, _q8_0),
    GGMLQuantizationType.Q4_K: (_Q4_K, 256, _q4_k),
    GGMLQuantizationType.Q6_K: (_Q6_K, 256, _q6_k),
}

_PLAIN_TYPES: dict[GGMLQuantizationType, np.dtype] = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.BF16: np.dtype(ml_dtypes.bfloat16),
}

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (*_PLAIN_TYPES, *_BLOCK_KERNELS)


def _supported_names() -> str:
    return ", ".join(t.name for t in SUPPORTED_TYPES)


def _as_ggml_type(value: int | GGMLQuantizationType) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType(int(value))
    except ValueError:
        raise UnsupportedError(
            f"unknown GGML type number {int(value)}; supported: {_supported_names()}"
        ) from None


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
    if qtype in _PLAIN_TYPES:
        dtype, block, kernel = _PLAIN_TYPES[qtype], 1, None
    else:
        dtype, block, kernel = _BLOCK_KERNELS[qtype]
    n_blocks, rest = divmod(n_elements, block)
    if rest or data.size != n_blocks * dtype.itemsize:
        raise EmberValueError(
            f"{qtype.name} data for {n_elements} elements must be a whole number of "
            f"{block}-element blocks of {dtype.itemsize} bytes ({n_blocks * dtype.itemsize} "
            f"bytes), got {data.size} bytes"
        )
    blocks = data.view(dtype)
    if kernel is None:
        return blocks.astype(np.float32)
    out = np.empty((n_blocks, block), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // block)
    for start in range(0, n_blocks, step):
        out[start : start + step] = kernel(blocks[start : start + step]).reshape(-1, block)
    return out.reshape(-1)
