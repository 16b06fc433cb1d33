"""Weight-only quantised products: ``quant_matmul`` and ``dequantize`` on packed GGUF blocks.

A quantised weight ``W [N, K]`` stays in memory exactly as a GGUF file stores it: each of its
``N`` rows is a run of blocks (32 or 256 elements sharing float16 scales, see
:mod:`ember.io.quants`), so the weight is one ``uint8 [N, K / block * block_bytes]`` array and
the block format (``q8_0``, ``q4_0``, ``q4_1``, ``q4_k``, ``q6_k``) is a parameter of the
primitives that read it. Nothing is unpacked at load; the IR shows the packed operand and the
format, and a compiled kernel reads the blocks directly.

- ``quant_matmul(x, w, format, adjoint=False)``: ``x [..., K] @ W.T -> [..., N]`` (a linear
  layer); with ``adjoint=True`` the transposed map ``g [..., N] @ W -> [..., K]``, which is the
  derivative of the first with respect to ``x``. Linear in ``x``: its jvp is itself on the
  tangent and its transpose flips ``adjoint``, so training adapters on a frozen quantised base
  (QLoRA) needs no other primitive. The packed weight has no derivative.
- ``dequantize(w, format)``: rows of blocks ``uint8 [..., row_bytes] -> float32 [..., K]``
  (an embedding lookup gathers packed rows, then dequantises only those).

The NumPy implementations are the reference a kernel must match: they dequantise ``W`` a tile of
rows at a time (never the whole matrix) and multiply with float32 accumulation (float64 for
float64 inputs); the result has ``x``'s dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ember import dtypes
from ember.core.primitive import Primitive
from ember.core.trace import UndefinedPrimal, Zero, aval_of
from ember.errors import DTypeError, EmberError, ShapeError, op_error
from ember.io.quants import FORMATS, BlockFormat, dequantize_rows
from ember.ir.types import ArrayType
from ember.ops import structural as st
from ember.ops.batching import batch_by_loop

__all__ = ["quant_matmul", "dequantize"]

quant_matmul_p = Primitive("quant_matmul", kind="contraction")
dequantize_p = Primitive("dequantize", kind="library")

# Elements of ``W`` the reference dequantises at once: 1 MiB of float32, which stays in cache.
TILE_ELEMENTS = 1 << 18

_FLOATS = (dtypes.float16, dtypes.bfloat16, dtypes.float32, dtypes.float64)


def quant_matmul(x: Any, w: Any, format: str, adjoint: bool = False) -> Any:
    """``x [..., K] @ W.T`` for ``W [N, K]`` packed as rows of ``format`` blocks in ``w``;
    ``adjoint=True``: ``x [..., N] @ W``. See the module docstring."""
    return quant_matmul_p.bind(x, w, format=str(format).lower(), adjoint=bool(adjoint))


def dequantize(w: Any, format: str) -> Any:
    """Packed rows ``uint8 [..., row_bytes]`` of ``format`` blocks as float32 ``[..., K]``."""
    return dequantize_p.bind(w, format=str(format).lower())


def _packed_rows(op: str, w: ArrayType, format: str) -> tuple[BlockFormat, int]:
    """The block format and the logical row length ``K`` of packed operand ``w``."""
    fmt = FORMATS.get(format)
    if fmt is None:
        raise op_error(EmberError, op, f"unknown block format {format!r}; supported: "
                       f"{', '.join(FORMATS)}")
    if w.dtype != dtypes.uint8 or w.ndim < 1 or w.shape[-1] % fmt.block_bytes:
        raise op_error(DTypeError, op, f"the packed weight must be uint8 rows of whole "
                       f"{fmt.block_bytes}-byte {format} blocks, got {w.dtype}{list(w.shape)}")
    return fmt, fmt.row_elements(w.shape[-1])


@quant_matmul_p.def_abstract_eval
def _quant_matmul_rule(x: ArrayType, w: ArrayType, *, format: str, adjoint: bool) -> ArrayType:
    _, k = _packed_rows("quant_matmul", w, format)
    if w.ndim != 2:
        raise op_error(ShapeError, "quant_matmul", f"the packed weight must be 2-D [N, "
                       f"row_bytes], got shape {w.shape}")
    if x.dtype not in _FLOATS:
        raise op_error(DTypeError, "quant_matmul", f"x must be floating point, got {x.dtype}")
    n = w.shape[0]
    inner, outer = (n, k) if adjoint else (k, n)
    if x.ndim < 1 or x.shape[-1] != inner:
        what = f"W [{n}, {k}]" if not adjoint else f"the adjoint of W [{n}, {k}]"
        raise op_error(ShapeError, "quant_matmul", f"x {x.shape} does not end in the {inner} "
                       f"features {what} ({format}) multiplies")
    return ArrayType((*x.shape[:-1], outer), x.dtype)


def _quant_matmul_impl(x: np.ndarray, w: np.ndarray, *, format: str, adjoint: bool
                       ) -> np.ndarray:
    fmt = FORMATS[format]
    n, k = w.shape[0], fmt.row_elements(w.shape[1])
    acc = np.promote_types(x.dtype, np.float32)
    inner, outer = (n, k) if adjoint else (k, n)
    x2 = x.reshape(-1, inner).astype(acc, copy=False)
    out = np.zeros((x2.shape[0], outer), dtype=acc)
    step = max(1, TILE_ELEMENTS // max(k, 1))
    for r0 in range(0, n, step):
        tile = dequantize_rows(w[r0:r0 + step], fmt).astype(acc, copy=False)  # [rows, K]
        if adjoint:
            out += x2[:, r0:r0 + step] @ tile
        else:
            out[:, r0:r0 + step] = x2 @ tile.T
    return out.reshape(*x.shape[:-1], outer).astype(x.dtype, copy=False)


quant_matmul_p.def_impl(_quant_matmul_impl)


def _no_weight_derivative(w: Any, format: str) -> EmberError:
    aval = aval_of(w)
    return op_error(EmberError, "quant_matmul", f"the packed {format} weight "
                    f"{aval.dtype}{list(aval.shape)} has no derivative; train adapters on top "
                    f"of it (nn.apply_lora) or dequantise it to train it")


@quant_matmul_p.def_jvp
def _quant_matmul_jvp(primals, tangents, *, format, adjoint):
    (x, w), (tx, tw) = primals, tangents
    if not isinstance(tw, Zero):
        raise _no_weight_derivative(w, format)
    out = quant_matmul_p.bind(x, w, format=format, adjoint=adjoint)
    if isinstance(tx, Zero):
        return out, Zero(aval_of(out))
    return out, quant_matmul_p.bind(tx, w, format=format, adjoint=adjoint)


@quant_matmul_p.def_transpose
def _quant_matmul_transpose(ct, x, w, *, format, adjoint):
    if isinstance(w, UndefinedPrimal):
        raise _no_weight_derivative(w, format)
    if isinstance(ct, Zero):
        return [Zero(x.aval), None]
    return [quant_matmul_p.bind(ct, w, format=format, adjoint=not adjoint), None]


@quant_matmul_p.def_batch
def _quant_matmul_batch(args, dims, *, format, adjoint):
    (x, w), (bx, bw) = args, dims
    if bw is not None:  # a batch of packed weights: one product per weight
        return batch_by_loop(quant_matmul_p, args, dims, format=format, adjoint=adjoint)
    # Leading axes of x are batch axes already; the vmapped one only must not be the last.
    return quant_matmul_p.bind(st.moveaxis(x, bx, 0), w, format=format, adjoint=adjoint), 0


@dequantize_p.def_abstract_eval
def _dequantize_rule(w: ArrayType, *, format: str) -> ArrayType:
    _, k = _packed_rows("dequantize", w, format)
    return ArrayType((*w.shape[:-1], k), dtypes.float32)


@dequantize_p.def_impl
def _dequantize_impl(w: np.ndarray, *, format: str) -> np.ndarray:
    return dequantize_rows(w, format)


@dequantize_p.def_jvp
def _dequantize_jvp(primals, tangents, *, format):
    out = dequantize_p.bind(primals[0], format=format)
    return out, Zero(aval_of(out))  # integer codes: the values are constants


@dequantize_p.def_batch
def _dequantize_batch(args, dims, *, format):
    return dequantize_p.bind(st.moveaxis(args[0], dims[0], 0), format=format), 0
