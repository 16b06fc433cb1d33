"""Primitive specs for weight-only quantised products; collected by ``primitive_specs``.

``quant_matmul`` against ``x @ W.T`` (and ``x @ W`` for the adjoint) with ``W`` the dequantised
packed weight, and ``dequantize`` against the ``gguf`` package's decoder. The packed weight is
fixed per case (random blocks with finite scales); only ``x`` is differentiated. The block
helpers are shared with ``test_quantized``, which imports this module first: ``Spec`` is
imported where it is used, after ``primitive_specs`` has finished loading.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from ember import dtypes
from ember.io.quants import FORMATS
from ember.ops.quantized import dequantize, quant_matmul

REALS = (dtypes.float32, dtypes.float64)


def random_blocks(fmt: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """``uint8 [rows, row_bytes]`` of random ``fmt`` blocks with values of order 1: random
    codes, and float16 scales drawn in [-1, 1] divided by the largest value that the codes
    reach with unit scales (random bytes would make some scales NaN or huge)."""
    f = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    n = rows * k // f.block
    blocks = rng.integers(0, 256, size=n * f.block_bytes, dtype=np.uint8).view(f.struct)
    scales = [name for name, (kind, _) in f.struct.fields.items() if kind == np.dtype("<f2")]
    for name in scales:
        blocks[name] = 1.0
    reach = np.abs(reference_dequantize(blocks.view(np.uint8).reshape(1, -1), fmt)).max()
    for name in scales:
        blocks[name] = (rng.uniform(-1, 1, size=n) / reach).astype(np.float16)
    return blocks.view(np.uint8).reshape(rows, f.row_bytes(k))


def reference_dequantize(packed: np.ndarray, fmt: str) -> np.ndarray:
    """The ``gguf`` package's decoder: an independent reading of the block formats."""
    values = gguf.quants.dequantize(packed.reshape(-1), FORMATS[fmt].ggml_type)
    return values.reshape(packed.shape[0], -1).astype(np.float64)


def _matmul_spec(fmt: str, n: int, k: int, adjoint: bool, x_shape: tuple[int, ...]) -> Any:
    from primitive_specs import Spec, of_shape

    packed = random_blocks(fmt, n, k)
    w = reference_dequantize(packed, fmt)

    def ref(x, _):
        out = x.astype(np.float64) @ (w if adjoint else w.T)
        return out.astype(x.dtype)

    return Spec("quant_matmul", lambda x, p: quant_matmul(x, p, fmt, adjoint), ref,
                [of_shape(x_shape), lambda *_: packed.copy()], REALS, diff=(0,),
                id=f"quant_matmul-{fmt}{'-adjoint' if adjoint else ''}")


def _dequantize_spec(fmt: str) -> Any:
    from primitive_specs import Spec

    packed = random_blocks(fmt, 3, 2 * FORMATS[fmt].block, seed=1)
    return Spec("dequantize", lambda p: dequantize(p, fmt),
                lambda p: reference_dequantize(p, fmt).astype(np.float32),
                [lambda *_: packed.copy()], (dtypes.uint8,), id=f"dequantize-{fmt}")


def specs() -> list[Any]:
    out = []
    for fmt, f in FORMATS.items():
        k = 2 * f.block  # several blocks per row
        out.append(_matmul_spec(fmt, 5, k, False, (2, 3, k)))
        out.append(_matmul_spec(fmt, 5, k, True, (4, 5)))
        out.append(_dequantize_spec(fmt))
    return out
