"""Attention as one primitive: ``softmax(q k^T * scale + mask) v`` without the ``[L, S]`` matrix.

Written as fifteen small equations, attention materialises the scores of every query against
every key, and a compiler could fuse it only by recognising that pattern in the forward graph
and again, differently shaped, in the backward graph. As one primitive it says what it is, so a
code generator lowers it to a tiled kernel (flash attention), and so does its backward.

Three primitives, all ``contraction``:

- ``attention(q, k, v, kv_len, q_offset[, mask]) -> (out, lse)``: the forward. ``lse`` is each
  query row's log-sum-exp of the scores, the one residual the backward needs (as flash
  attention keeps it) instead of the probabilities.
- ``attention_jvp(q, k, v, kv_len, q_offset[, mask], out, lse, *tangents) -> (dout, dlse)``:
  the forward-mode derivative, linear in the tangents of ``q``, ``k``, ``v`` (and of an additive
  mask), the ones present being listed by the ``which`` parameter.
- ``attention_bwd(q, k, v, kv_len, q_offset[, mask], out, lse, dout, dlse) -> grads``: the
  transpose of ``attention_jvp``, so ``grad`` of attention is exactly one ``attention_bwd``
  equation, which a compiler lowers to the fused flash-attention backward.

The two derived primitives are differentiated again (second derivatives) through their dense
formulas, written with primitives at the end of this module.

Shapes: ``q [..., Hq, L, D]``, ``k [..., Hk, S, D]``, ``v [..., Hk, S, Dv]`` with the same
leading axes; query head ``h`` reads key/value head ``h // (Hq // Hk)`` (grouped-query
attention, keys and values never copied). ``kv_len`` and ``q_offset`` are int32, scalars or one
per leading index: keys at ``j >= kv_len`` are never read (the unfilled part of a KV cache;
``kv_len`` is clamped to ``[0, S]`` when the program runs, which never raises), and with
``causal`` query ``i`` sits at position ``q_offset + i`` and sees keys ``j <= q_offset + i``.
Both are operands, not parameters, so a compiled decode step traces once and reads only
the filled part of its cache. ``mask`` has the rank of ``q``, each axis 1 or that of the scores
``[..., Hq, L, S]`` (so a padding mask ``[B, 1, 1, S]`` is never broadcast in memory), and is
boolean (True = may attend) or additive in ``q``'s dtype. A query row that sees no key gives
zeros and an ``lse`` of ``-inf`` (no NaN, as flash attention).

The NumPy implementations are the reference a compiled kernel is tested against: they walk
``[L, S]`` in tiles of ``BLOCK_Q x BLOCK_K`` with an online softmax, accumulating in float32
(float64 for float64 inputs), and visit only the key tiles that a causal mask and ``kv_len``
leave visible. The backward recomputes each tile's probabilities from ``lse`` (as flash
attention does) instead of storing them. The tiles are large because NumPy pays per call; a
kernel picks its own, which changes only the order of float additions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ember import dtypes
from ember.core.primitive import Primitive
from ember.core.trace import UndefinedPrimal, Zero, aval_of, to_array
from ember.errors import DTypeError, ShapeError, op_error
from ember.ir.types import ArrayType
from ember.ops import elementwise as ew
from ember.ops import structural as st
from ember.ops.linalg import dot_general
from ember.ops.reduce import reduce_sum

__all__ = ["attention"]

attention_p = Primitive("attention", kind="contraction", multiple_results=True)
attention_jvp_p = Primitive("attention_jvp", kind="contraction", multiple_results=True)
attention_bwd_p = Primitive("attention_bwd", kind="contraction", multiple_results=True)

# Tile sizes of the reference implementation (tests shrink them to exercise the tiling).
BLOCK_Q = 256
BLOCK_K = 512

_FLOATS = (dtypes.float16, dtypes.bfloat16, dtypes.float32, dtypes.float64)
_LEADING = 5  # q, k, v, kv_len, q_offset come first in every attention primitive


def attention(q: Any, k: Any, v: Any, *, scale: float | None = None, causal: bool = False,
              kv_len: Any = None, q_offset: Any = 0, mask: Any = None) -> tuple[Any, Any]:
    """``(out, lse)`` of attention over ``q [..., Hq, L, D]``, ``k, v [..., Hk, S, D]``.

    ``scale`` defaults to ``1/sqrt(D)``; ``kv_len`` (default ``S``) is how many keys are valid
    and ``q_offset`` the position of the first query for ``causal`` (both ints or int32
    arrays, scalars or one per leading index); ``mask`` is boolean or additive, one axis per
    axis of the scores, each 1 or full. See the module docstring.
    """
    d = aval_of(q).shape[-1] if aval_of(q).ndim else 0
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    s = aval_of(k).shape[-2] if aval_of(k).ndim >= 2 else 0
    args = [q, k, v, _int32(s if kv_len is None else kv_len, "kv_len"),
            _int32(q_offset, "q_offset")]
    if mask is not None:
        args.append(mask)
    out, lse = attention_p.bind(*args, scale=scale, causal=bool(causal),
                                has_mask=mask is not None)
    return out, lse


def _int32(x: Any, name: str) -> Any:
    """An int32 operand from a Python int or an integer array (lengths are int32 in the IR)."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return to_array(np.int32(x))
    aval = aval_of(x)
    if not dtypes.is_int(aval.dtype):
        raise op_error(DTypeError, "attention", f"{name} must be an integer, got {aval.dtype}")
    return ew.convert(x, dtypes.int32)


# --- shape and dtype rules -------------------------------------------------------------------

def _check(op: str, q: ArrayType, k: ArrayType, v: ArrayType, kv_len: ArrayType,
           q_offset: ArrayType, mask: ArrayType | None) -> tuple[ArrayType, ArrayType]:
    """Validate the operands every attention primitive shares; the types of ``(out, lse)``."""
    if q.dtype not in _FLOATS:
        raise op_error(DTypeError, op, f"needs float16, bfloat16, float32 or float64 inputs, "
                       f"got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise op_error(DTypeError, op, f"query, key and value must have one dtype, got "
                       f"{q.dtype}, {k.dtype} and {v.dtype}")
    if q.ndim < 3 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise op_error(ShapeError, op, f"query {q.shape}, key {k.shape} and value {v.shape} "
                       f"must all be [..., heads, length, dim] with the same leading axes")
    batch = q.shape[:-3]
    hq, length, dim = q.shape[-3:]
    hk, src = k.shape[-3:-1]
    if (k.shape[:-3] != batch or v.shape[:-3] != batch or k.shape[-1] != dim
            or v.shape[-3:-1] != (hk, src)):
        raise op_error(ShapeError, op, f"query {q.shape}, key {k.shape} and value {v.shape} "
                       f"do not fit together")
    if hk == 0 or hq % hk:
        raise op_error(ShapeError, op, f"{hq} query heads are not a multiple of {hk} key/value "
                       f"heads")
    for name, aval in (("kv_len", kv_len), ("q_offset", q_offset)):
        if aval.dtype != dtypes.int32 or aval.shape not in ((), batch):
            raise op_error(ShapeError, op, f"{name} must be an int32 scalar or of shape "
                           f"{batch}, got {aval}")
    if mask is not None:
        scores = (*batch, hq, length, src)
        if mask.dtype not in (dtypes.bool_, q.dtype):
            raise op_error(DTypeError, op, f"mask must be bool or {q.dtype} (additive), got "
                           f"{mask.dtype}")
        if mask.ndim != len(scores) or any(m not in (1, n) for m, n in zip(mask.shape, scores)):
            raise op_error(ShapeError, op, f"mask {mask.shape} must have one axis per axis of "
                           f"the scores {scores}, each 1 or equal")
    acc = _acc_dtype(q.dtype)
    return (ArrayType((*batch, hq, length, v.shape[-1]), q.dtype),
            ArrayType((*batch, hq, length), acc))


def _acc_dtype(dtype: np.dtype) -> np.dtype:
    """float32 accumulation for every input below float64."""
    return np.dtype(np.float64) if dtype == dtypes.float64 else np.dtype(np.float32)


def _split(args: Sequence[Any], has_mask: bool) -> tuple[list[Any], Any, list[Any]]:
    """``(q, k, v, kv_len, q_offset), mask or None, the remaining operands``."""
    lead = list(args[:_LEADING])
    mask = args[_LEADING] if has_mask else None
    return lead, mask, list(args[_LEADING + has_mask:])


def _differentiable(lead: Sequence[Any], mask: Any) -> list[Any]:
    """The operands attention is differentiable in: q, k, v and an additive mask."""
    return [*lead[:3], *([mask] if mask is not None else [])]


def _check_like(op: str, what: str, got: ArrayType, want: ArrayType) -> None:
    if (got.shape, got.dtype) != (want.shape, want.dtype):
        raise op_error(ShapeError, op, f"{what} must be {want}, got {got}")


@attention_p.def_abstract_eval
def _attention_rule(*avals: ArrayType, scale: float, causal: bool, has_mask: bool
                    ) -> list[ArrayType]:
    lead, mask, rest = _split(avals, has_mask)
    if rest:
        raise op_error(ShapeError, "attention", f"{len(rest)} operands too many")
    return list(_check("attention", *lead, mask))


def _check_residuals(op: str, avals: Sequence[ArrayType], has_mask: bool
                     ) -> tuple[list[ArrayType], ArrayType | None, list[ArrayType], list]:
    lead, mask, rest = _split(avals, has_mask)
    want = _check(op, *lead, mask)
    if len(rest) < 2:
        raise op_error(ShapeError, op, "needs the forward's out and lse")
    for what, got, w in zip(("out", "lse"), rest[:2], want):
        _check_like(op, what, got, w)
    return lead, mask, rest[2:], list(want)


@attention_jvp_p.def_abstract_eval
def _jvp_rule(*avals: ArrayType, scale: float, causal: bool, has_mask: bool,
              which: tuple[bool, ...]) -> list[ArrayType]:
    lead, mask, tangents, want = _check_residuals("attention_jvp", avals, has_mask)
    primals = [p for p, w in zip(_differentiable(lead, mask), which) if w]
    if len(which) != 3 + has_mask or len(tangents) != len(primals):
        raise op_error(ShapeError, "attention_jvp", f"which={which} does not match the "
                       f"{len(tangents)} tangents")
    for t, p in zip(tangents, primals):
        _check_like("attention_jvp", "a tangent", t, p.strong())
    return want


@attention_bwd_p.def_abstract_eval
def _bwd_rule(*avals: ArrayType, scale: float, causal: bool, has_mask: bool,
              which: tuple[bool, ...]) -> list[ArrayType]:
    lead, mask, cts, want = _check_residuals("attention_bwd", avals, has_mask)
    if len(cts) != 2 or len(which) != 3 + has_mask:
        raise op_error(ShapeError, "attention_bwd", "needs the cotangents of out and lse")
    for what, got, w in zip(("the cotangent of out", "the cotangent of lse"), cts, want):
        _check_like("attention_bwd", what, got, w)
    return [p.strong() for p, w in zip(_differentiable(lead, mask), which) if w]


# --- the tiled reference ---------------------------------------------------------------------

class _Tiles:
    """One attention problem laid out for tiling, shared by the three implementations.

    Query-side arrays are grouped under their key/value head, ``[..., Hk, G, L, X]``: a tile
    of them is one matrix of ``G * rows`` rows per key/value head, so every product of a tile
    is one batched matmul and keys and values are never repeated per group.
    """

    def __init__(self, q, k, v, kv_len, q_offset, mask, scale, causal):
        self.acc = _acc_dtype(q.dtype)
        self.hk, self.src = k.shape[-3:-1]
        self.group = q.shape[-3] // self.hk
        self.length = q.shape[-2]
        self.scale, self.causal = scale, causal
        self.k, self.v = k, v
        kv_len = np.clip(np.asarray(kv_len), 0, self.src)
        # Lengths broadcast against [..., Hk, G, rows, cols] scores.
        self.kv_len = kv_len.reshape(kv_len.shape + (1, 1, 1, 1))
        self.q_offset = np.asarray(q_offset).reshape(q_offset.shape + (1, 1, 1, 1))
        self.min_kv_len = int(kv_len.min(initial=self.src))
        self.min_offset = int(self.q_offset.min(initial=0))
        self.mask = None if mask is None else self.grouped(mask, cast=mask.dtype != bool)

    def grouped(self, x: np.ndarray, cast: bool = True) -> np.ndarray:
        """``[..., H, L, X] -> [..., Hk, G, L, X]`` (a unit head axis stays unit)."""
        heads = (self.hk, self.group) if x.shape[-3] != 1 else (1, 1)
        x = x.reshape(*x.shape[:-3], *heads, *x.shape[-2:])
        return x.astype(self.acc, copy=False) if cast else x

    @staticmethod
    def ungrouped(x: np.ndarray) -> np.ndarray:
        """``[..., Hk, G, L, X] -> [..., H, L, X]``."""
        return x.reshape(*x.shape[:-4], x.shape[-4] * x.shape[-3], *x.shape[-2:])

    def rows(self, x: np.ndarray, i0: int, i1: int) -> np.ndarray:
        """Rows ``i0:i1`` of a grouped array, contiguous in the accumulation dtype."""
        return np.ascontiguousarray(x[..., i0:i1, :], dtype=self.acc)

    @staticmethod
    def mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a [..., Hk, G, r, X] @ b [..., Hk, X, N]`` as one ``[G * r, X]`` matrix per head."""
        out = a.reshape(*a.shape[:-3], -1, a.shape[-1]) @ b
        return out.reshape(*a.shape[:-1], b.shape[-1])

    @staticmethod
    def mm_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a^T @ b`` for ``a [..., Hk, G, r, N]``, ``b [..., Hk, G, r, X]``: summed over the
        group and the rows, ``[..., Hk, N, X]`` (a key's or value's gradient)."""
        a2 = a.reshape(*a.shape[:-3], -1, a.shape[-1])
        return np.swapaxes(a2, -1, -2) @ b.reshape(*b.shape[:-3], -1, b.shape[-1])

    def query_blocks(self) -> Iterator[tuple[int, int]]:
        for i0 in range(0, self.length, BLOCK_Q):
            yield i0, min(i0 + BLOCK_Q, self.length)

    def key_blocks(self, i1: int) -> Iterator[tuple[int, int]]:
        """The key tiles queries ``< i1`` can see: up to ``kv_len`` and, when causal, their
        last position. Keys beyond are never read."""
        end = int(self.kv_len.max(initial=0))
        if self.causal:
            end = min(end, max(int(self.q_offset.max(initial=0)) + i1, 0))
        for j0 in range(0, end, BLOCK_K):
            yield j0, min(j0 + BLOCK_K, end)

    def keys(self, x: np.ndarray, j0: int, j1: int) -> np.ndarray:
        """Rows ``j0:j1`` of ``x [..., Hk, S, X]`` in the accumulation dtype, zero past each
        ``kv_len`` (a partly filled cache may hold anything there, NaN included)."""
        tile = x[..., j0:j1, :].astype(self.acc)
        if j1 <= self.min_kv_len:
            return tile
        return np.where(np.arange(j0, j1)[:, None] < self.kv_len[..., 0], tile, 0)

    def scores(self, qb: np.ndarray, kb: np.ndarray, i0: int, i1: int, j0: int, j1: int
               ) -> np.ndarray:
        """Scores of one tile from scaled queries, ``-inf`` where a query may not see a key.
        Visibility is computed only for tiles that cross a boundary."""
        s = self.mm(qb, np.swapaxes(kb, -1, -2))
        cols = np.arange(j0, j1)
        valid = cols < self.kv_len if j1 > self.min_kv_len else None
        if self.causal and j1 - 1 > self.min_offset + i0:
            below = cols <= self.q_offset + np.arange(i0, i1)[:, None]
            valid = below if valid is None else valid & below
        if self.mask is not None:
            block = self.mask_block(self.mask, i0, i1, j0, j1)
            if block.dtype == bool:
                valid = block if valid is None else valid & block
            else:
                s += block
        return s if valid is None else np.where(valid, s, -np.inf)

    @staticmethod
    def mask_block(x: np.ndarray, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        """The tile of a mask-shaped array (a unit row or column axis is broadcast)."""
        rows = slice(i0, i1) if x.shape[-2] != 1 else slice(None)
        cols = slice(j0, j1) if x.shape[-1] != 1 else slice(None)
        return x[..., rows, cols]

    def probabilities(self, s: np.ndarray, lse: np.ndarray) -> np.ndarray:
        """``exp(s - lse)``: exact softmax weights of a tile, given the rows' log-sum-exp."""
        return np.exp(s - _finite_or_zero(lse)[..., None])


def _finite_or_zero(m: np.ndarray) -> np.ndarray:
    """A row maximum or log-sum-exp of ``-inf`` (a row that sees no key) becomes 0, so that
    ``exp(s - m)`` is 0 there instead of NaN."""
    return np.where(np.isneginf(m), 0, m)


def _attention_impl(*args, scale, causal, has_mask):
    (q, k, v, kv_len, q_offset), mask, _ = _split(args, has_mask)
    t = _Tiles(q, k, v, kv_len, q_offset, mask, scale, causal)
    qg = t.grouped(q, cast=False)
    out = np.zeros((*qg.shape[:-1], v.shape[-1]), t.acc)
    lse = np.full(qg.shape[:-1], -np.inf, t.acc)
    with np.errstate(all="ignore"):
        for i0, i1 in t.query_blocks():
            qb = t.rows(qg, i0, i1) * scale
            m = np.full(qb.shape[:-1], -np.inf, t.acc)
            total = np.zeros_like(m)
            acc = np.zeros((*m.shape, v.shape[-1]), t.acc)
            for j0, j1 in t.key_blocks(i1):
                s = t.scores(qb, t.keys(k, j0, j1), i0, i1, j0, j1)
                m_new = np.maximum(m, s.max(axis=-1))
                shift = _finite_or_zero(m_new)
                p = np.exp(s - shift[..., None])
                rescale = np.exp(m - shift)  # 0 while m is -inf
                total = total * rescale + p.sum(axis=-1)
                acc = acc * rescale[..., None] + t.mm(p, t.keys(v, j0, j1))
                m = m_new
            seen = total > 0
            divisor = np.where(seen, total, 1)
            out[..., i0:i1, :] = np.where(seen[..., None], acc / divisor[..., None], 0)
            lse[..., i0:i1] = np.where(seen, _finite_or_zero(m) + np.log(divisor), -np.inf)
    return [t.ungrouped(out).astype(q.dtype), t.ungrouped(lse[..., None])[..., 0]]


attention_p.def_impl(_attention_impl)


def _tangent_arrays(tangents: Sequence[Any], which: Sequence[bool]) -> list[Any]:
    """``[tq, tk, tv, tmask]`` with None for the tangents ``which`` leaves out."""
    it = iter(tangents)
    full = [next(it) if w else None for w in which]
    return full + [None] * (4 - len(full))


def _attention_jvp_impl(*args, scale, causal, has_mask, which):
    (q, k, v, kv_len, q_offset), mask, (out, lse, *tangents) = _split(args, has_mask)
    tq, tk, tv, tm = _tangent_arrays(tangents, which)
    t = _Tiles(q, k, v, kv_len, q_offset, mask, scale, causal)
    tq = None if tq is None else t.grouped(tq, cast=False)
    tm = None if tm is None else t.grouped(tm)
    qg, outg = t.grouped(q, cast=False), t.grouped(out)
    lseg = t.grouped(lse[..., None])[..., 0]
    dout = np.zeros(outg.shape, t.acc)
    dlse = np.zeros(lseg.shape, t.acc)
    with np.errstate(all="ignore"):
        for i0, i1 in t.query_blocks():
            qb, lse_b = t.rows(qg, i0, i1) * scale, lseg[..., i0:i1]
            tqb = None if tq is None else t.rows(tq, i0, i1) * scale
            for j0, j1 in t.key_blocks(i1):
                kb, vb = t.keys(k, j0, j1), t.keys(v, j0, j1)
                p = t.probabilities(t.scores(qb, kb, i0, i1, j0, j1), lse_b)
                ds = np.zeros_like(p)  # the tangent of the scores
                if tqb is not None:
                    ds += t.mm(tqb, np.swapaxes(kb, -1, -2))
                if tk is not None:
                    ds += t.mm(qb, np.swapaxes(t.keys(tk, j0, j1), -1, -2))
                if tm is not None:
                    ds += t.mask_block(tm, i0, i1, j0, j1)
                pds = np.where(p > 0, p * ds, 0)
                dlse[..., i0:i1] += pds.sum(axis=-1)
                dout[..., i0:i1, :] += t.mm(pds, vb)
                if tv is not None:
                    dout[..., i0:i1, :] += t.mm(p, t.keys(tv, j0, j1))
        # sum_j p (ds - dlse) v = sum_j p ds v - dlse * out: one pass over the keys.
        dout -= dlse[..., None] * outg
    return [t.ungrouped(dout).astype(q.dtype), t.ungrouped(dlse[..., None])[..., 0]]


attention_jvp_p.def_impl(_attention_jvp_impl)


def _sum_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``x`` over the axes where ``shape`` has 1 (the broadcast axes of a mask)."""
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def _attention_bwd_impl(*args, scale, causal, has_mask, which):
    (q, k, v, kv_len, q_offset), mask, (out, lse, dout, dlse) = _split(args, has_mask)
    t = _Tiles(q, k, v, kv_len, q_offset, mask, scale, causal)
    qg, dog = t.grouped(q, cast=False), t.grouped(dout, cast=False)
    lseg = t.grouped(lse[..., None])[..., 0]
    # The rows' sum_j p dp, minus the lse cotangent (d lse / d s = p), computed once.
    delta = (t.grouped(dout) * t.grouped(out)).sum(axis=-1) - t.grouped(dlse[..., None])[..., 0]
    dq = np.zeros(qg.shape, t.acc)
    dk = np.zeros(k.shape, t.acc)
    dv = np.zeros(v.shape, t.acc)
    dmask = np.zeros(t.mask.shape, t.acc) if has_mask and which[3] else None
    with np.errstate(all="ignore"):
        for i0, i1 in t.query_blocks():
            qb, dob, lse_b = t.rows(qg, i0, i1) * scale, t.rows(dog, i0, i1), lseg[..., i0:i1]
            for j0, j1 in t.key_blocks(i1):
                kb, vb = t.keys(k, j0, j1), t.keys(v, j0, j1)
                p = t.probabilities(t.scores(qb, kb, i0, i1, j0, j1), lse_b)
                dv[..., j0:j1, :] += t.mm_t(p, dob)
                ds = t.mm(dob, np.swapaxes(vb, -1, -2))
                ds -= delta[..., i0:i1, None]
                ds = np.where(p > 0, p * ds, 0)
                dq[..., i0:i1, :] += t.mm(ds, kb * scale)
                dk[..., j0:j1, :] += t.mm_t(ds, qb)  # qb holds scale * q
                if dmask is not None:
                    block = t.mask_block(dmask, i0, i1, j0, j1)
                    block += _sum_to(ds, block.shape)
    grads = [t.ungrouped(dq).astype(q.dtype), dk.astype(q.dtype), dv.astype(q.dtype)]
    if dmask is not None:
        grads.append(t.ungrouped(dmask).reshape(mask.shape).astype(mask.dtype))
    return [g for g, w in zip(grads, which) if w]


attention_bwd_p.def_impl(_attention_bwd_impl)


# --- differentiation -------------------------------------------------------------------------

@attention_p.def_jvp
def _attention_jvp(primals, tangents, *, scale, causal, has_mask):
    out, lse = attention_p.bind(*primals, scale=scale, causal=causal, has_mask=has_mask)
    t_lead, t_mask, _ = _split(tangents, has_mask)
    diff = _differentiable(t_lead, t_mask)
    which = tuple(not isinstance(x, Zero) for x in diff)
    present = [x for x in diff if not isinstance(x, Zero)]
    if not present:
        return [out, lse], [Zero(aval_of(out)), Zero(aval_of(lse))]
    t_out, t_lse = attention_jvp_p.bind(*primals, out, lse, *present, scale=scale,
                                        causal=causal, has_mask=has_mask, which=which)
    return [out, lse], [t_out, t_lse]


@attention_jvp_p.def_transpose
def _attention_jvp_transpose(cts, *args, scale, causal, has_mask, which):
    """The cotangents of the tangent operands: one ``attention_bwd``."""
    lead, mask, rest = _split(args, has_mask)
    out, lse, *tangents = rest
    linear = [isinstance(x, UndefinedPrimal) for x in tangents]
    if not any(linear):
        return [None] * len(args)
    if all(isinstance(c, Zero) for c in cts):
        return [None] * (len(args) - len(tangents)) + [
            Zero(x.aval) if u else None for x, u in zip(tangents, linear)]
    needed = iter(linear)
    bwd_which = tuple(w and next(needed) for w in which)
    grads = iter(attention_bwd_p.bind(*lead, *([mask] if has_mask else []), out, lse,
                                      *[ew.instantiate(c) for c in cts], scale=scale,
                                      causal=causal, has_mask=has_mask, which=bwd_which))
    return [None] * (len(args) - len(tangents)) + [next(grads) if u else None for u in linear]


# --- batching --------------------------------------------------------------------------------

def _roles(prim: Primitive, n_args: int, has_mask: bool, which: Sequence[bool]) -> list[str]:
    """What each operand is to the batching rule: ``"lead"`` (has the leading axes),
    ``"len"`` (kv_len, q_offset: scalar or the leading axes) or ``"mask"`` (unit axes allowed)."""
    roles = ["lead"] * 3 + ["len"] * 2 + (["mask"] if has_mask else [])
    roles += ["lead"] * (n_args - len(roles))
    if prim is attention_jvp_p and has_mask and which[3]:
        roles[-1] = "mask"  # the additive mask's tangent comes last
    return roles


def _batch(prim: Primitive, args, dims, **params):
    """Fold the mapped axis into the leading axes: one call on the whole batch."""
    has_mask, which = params["has_mask"], params.get("which", ())
    size = next(aval_of(a).shape[d] for a, d in zip(args, dims) if d is not None)
    q_shape = list(aval_of(args[0]).shape)
    if dims[0] is not None:
        del q_shape[dims[0]]
    leading = (size, *q_shape[:-3])
    # attention_bwd sums a mask's gradient over its unit axes: a mask shared by the batch
    # still needs one gradient per example.
    full_mask = prim is attention_bwd_p and has_mask and which[3]
    moved = []
    for a, d, role in zip(args, dims, _roles(prim, len(args), has_mask, which)):
        shape = aval_of(a).shape
        if d is not None:
            a = st.moveaxis(a, d, 0)
            if role == "len" and len(shape) < len(leading):  # one length per example
                a = st.broadcast_in_dim(a, leading, (0,))
        elif role == "mask" and not full_mask:
            a = st.reshape(a, (1, *shape))
        elif role != "len" or shape:
            a = st.broadcast_in_dim(a, (size, *shape), tuple(range(1, len(shape) + 1)))
        moved.append(a)
    out = prim.bind(*moved, **params)
    return out, [0] * len(out)


attention_p.def_batch(functools.partial(_batch, attention_p))
attention_jvp_p.def_batch(functools.partial(_batch, attention_jvp_p))
attention_bwd_p.def_batch(functools.partial(_batch, attention_bwd_p))


# --- second derivatives: the dense formulas, written in primitives ---------------------------
#
# ``attention_jvp`` and ``attention_bwd`` are differentiated again only for second derivatives
# (grad of grad, Hessian-vector products), rare enough that materialising ``[L, S]`` is fine.
# Their jvp rules are the forward-mode derivatives of the dense formulas written with
# primitives: linear in the tangents (so reverse mode transposes them) and differentiable again.

def _bc(*xs: Any) -> list[Any]:
    """Broadcast operands NumPy-style to one shape (primitives take equal shapes)."""
    shape = tuple(np.broadcast_shapes(*(aval_of(x).shape for x in xs)))
    return [st.broadcast_to_shape(x, shape) for x in xs]


def _add(*xs: Any) -> Any:
    out = xs[0]
    for x in xs[1:]:
        out = ew.add(*_bc(out, x))
    return out


def _sub(a: Any, b: Any) -> Any:
    return ew.sub(*_bc(a, b))


def _mul(a: Any, b: Any) -> Any:
    return ew.mul(*_bc(a, b))


def _mm(a: Any, b: Any) -> Any:
    """``a [..., M, K] @ b [..., K, N]`` over equal leading axes."""
    n = aval_of(a).ndim
    lead = tuple(range(n - 2))
    return dot_general(a, b, ((n - 1,), (n - 2,)), (lead, lead))


def _mT(x: Any) -> Any:
    n = aval_of(x).ndim
    return st.transpose(x, (*range(n - 2), n - 1, n - 2))


def _rowsum(x: Any) -> Any:
    return reduce_sum(x, (aval_of(x).ndim - 1,))


def _col(x: Any) -> Any:
    return st.expand_dims(x, aval_of(x).ndim)


class _Dense:
    """One attention problem as whole ``[..., Hq, L, S]`` arrays, in the accumulation dtype:
    keys and values repeated per query head and zero past ``kv_len``, ``visible`` the scores a
    query may see, ``bias`` an additive mask (or None)."""

    def __init__(self, q, k, v, kv_len, q_offset, mask, scale, causal):
        qa = aval_of(q)
        self.acc = _acc_dtype(qa.dtype)
        self.hq, length = qa.shape[-3:-1]
        self.hk, src = aval_of(k).shape[-3:-1]
        self.scale = scale
        self.zero = to_array(np.zeros((), self.acc))

        def lengths(x):  # [...] -> [..., 1, 1, 1]
            return st.reshape(x, (*aval_of(x).shape, 1, 1, 1))

        int32 = dtypes.int32
        self.key_ok = ew.lt(*_bc(st.iota(int32, (src, 1)), lengths(kv_len)))
        visible = ew.lt(*_bc(st.iota(int32, (1, src), 1), lengths(kv_len)))
        if causal:
            last = _add(st.iota(int32, (length, 1)), lengths(q_offset))
            visible = ew.and_(*_bc(visible, ew.le(*_bc(st.iota(int32, (1, src), 1), last))))
        self.bias = None
        if mask is not None and aval_of(mask).dtype == dtypes.bool_:
            visible = ew.and_(*_bc(visible, mask))
        elif mask is not None:
            self.bias = ew.convert(mask, self.acc)
        self.visible = visible

    def value(self, x: Any, like: Any, keys: bool = False) -> Any:
        """An operand (or tangent: zeros for a symbolic zero) in the accumulation dtype, keys
        and values repeated per query head."""
        x = ew.convert(ew.zeros_like(like) if x is None else x, self.acc)
        if not keys:
            return x
        *batch, hk, src, dim = aval_of(x).shape
        nb, group = len(batch), self.hq // hk
        x = st.broadcast_in_dim(x, (*batch, hk, group, src, dim), (*range(nb), nb, nb + 2, nb + 3))
        return ew.select(*_bc(self.key_ok, st.reshape(x, (*batch, self.hq, src, dim)), self.zero))

    def sum_groups(self, x: Any) -> Any:
        """``[..., Hq, S, X] -> [..., Hk, S, X]``: a key's gradient sums over its query heads."""
        *batch, _, src, dim = aval_of(x).shape
        return reduce_sum(st.reshape(x, (*batch, self.hk, self.hq // self.hk, src, dim)),
                          (len(batch) + 1,))

    def scores(self, a: Any, b: Any, bias: Any = None) -> Any:
        """``scale * a @ b^T (+ bias)``: the scores, or a tangent of them."""
        s = _mul(to_array(np.asarray(self.scale, self.acc)), _mm(a, _mT(b)))
        return s if bias is None else _add(s, bias)

    def probabilities(self, q: Any, keys: Any, lse: Any) -> Any:
        lse = ew.convert(lse, self.acc)
        safe = ew.select(ew.is_finite(lse), lse, ew.zeros_like(lse))
        e = ew.exp(_sub(self.scores(q, keys, self.bias), _col(safe)))
        return ew.select(*_bc(self.visible, e, self.zero))


def _reduce_to(x: Any, like: Any) -> Any:
    """Sum ``x`` over the unit axes of ``like`` and cast it to ``like``'s dtype."""
    shape = aval_of(like).shape
    axes = [i for i, (n, m) in enumerate(zip(aval_of(x).shape, shape)) if m == 1 and n != 1]
    return ew.convert(st.reshape(reduce_sum(x, axes), shape), aval_of(like).dtype)


def _nonzero(tangents: Sequence[Any]) -> list[Any]:
    """Tangents with None for symbolic zeros (``_Dense.value`` makes them zeros)."""
    return [None if isinstance(t, Zero) else t for t in tangents]


@attention_bwd_p.def_jvp
def _attention_bwd_jvp(primals, tangents, *, scale, causal, has_mask, which):
    grads = attention_bwd_p.bind(*primals, scale=scale, causal=causal, has_mask=has_mask,
                                 which=which)
    (q, k, v, *lengths), mask, (out, lse, dout, dlse) = _split(primals, has_mask)
    (tq, tk, tv, _, _), t_mask, (t_out, t_lse, t_dout, t_dlse) = _split(_nonzero(tangents),
                                                                        has_mask)
    d = _Dense(q, k, v, *lengths, mask, scale, causal)
    qw, keys, values = d.value(q, q), d.value(k, k, True), d.value(v, v, True)
    tq, tk, tv = d.value(tq, q), d.value(tk, k, True), d.value(tv, v, True)
    out, t_out = d.value(out, out), d.value(t_out, out)
    dout, t_dout = d.value(dout, dout), d.value(t_dout, dout)
    t_bias = [d.value(t_mask, mask)] if d.bias is not None else []
    p = d.probabilities(qw, keys, lse)
    t_p = _mul(p, _sub(_add(d.scores(tq, keys), d.scores(qw, tk), *t_bias),
                       _col(d.value(t_lse, lse))))
    dp = _mm(dout, _mT(values))
    t_dp = _add(_mm(t_dout, _mT(values)), _mm(dout, _mT(tv)))
    delta = _sub(_rowsum(_mul(dout, out)), d.value(dlse, dlse))
    t_delta = _sub(_rowsum(_add(_mul(t_dout, out), _mul(dout, t_out))), d.value(t_dlse, dlse))
    ds = _mul(p, _sub(dp, _col(delta)))
    t_ds = _add(_mul(t_p, _sub(dp, _col(delta))), _mul(p, _sub(t_dp, _col(t_delta))))
    scale_ = to_array(np.asarray(scale, d.acc))
    t_grads = [(_mul(scale_, _add(_mm(t_ds, keys), _mm(ds, tk))), q),
               (d.sum_groups(_mul(scale_, _add(_mm(_mT(t_ds), qw), _mm(_mT(ds), tq)))), k),
               (d.sum_groups(_add(_mm(_mT(t_p), dout), _mm(_mT(p), t_dout))), v),
               (t_ds, mask)]
    return grads, [_reduce_to(g, like) for (g, like), w in zip(t_grads, which) if w]


@attention_jvp_p.def_jvp
def _attention_jvp_jvp(primals, tangents, *, scale, causal, has_mask, which):
    outs = attention_jvp_p.bind(*primals, scale=scale, causal=causal, has_mask=has_mask,
                                which=which)
    (q, k, v, *lengths), mask, (out, lse, *lin) = _split(primals, has_mask)
    (tq, tk, tv, _, _), t_mask, (t_out, t_lse, *t_lin) = _split(_nonzero(tangents), has_mask)
    lq, lk, lv, lm = _tangent_arrays(lin, which)  # the linear operands...
    lq_, lk_, lv_, lm_ = _tangent_arrays(_nonzero(t_lin), which)  # ...and their tangents
    d = _Dense(q, k, v, *lengths, mask, scale, causal)
    qw, keys, values = d.value(q, q), d.value(k, k, True), d.value(v, v, True)
    tq, tk, tv = d.value(tq, q), d.value(tk, k, True), d.value(tv, v, True)
    lq, lk, lv = d.value(lq, q), d.value(lk, k, True), d.value(lv, v, True)
    lq_, lk_, lv_ = d.value(lq_, q), d.value(lk_, k, True), d.value(lv_, v, True)
    lm, lm_, t_bias = ([d.value(x, mask)] if d.bias is not None else []
                       for x in (lm, lm_, t_mask))
    out, t_out = d.value(out, out), d.value(t_out, out)
    p = d.probabilities(qw, keys, lse)
    t_p = _mul(p, _sub(_add(d.scores(tq, keys), d.scores(qw, tk), *t_bias),
                       _col(d.value(t_lse, lse))))
    # The linear operands' score tangent ``ds`` and its derivative.
    ds = _add(d.scores(lq, keys), d.scores(qw, lk), *lm)
    t_ds = _add(d.scores(lq_, keys), d.scores(qw, lk_), d.scores(lq, tk), d.scores(tq, lk),
                *lm_)
    pds, t_pds = _mul(p, ds), _add(_mul(t_p, ds), _mul(p, t_ds))
    dlse, t_dlse = _rowsum(pds), _rowsum(t_pds)
    t_dout = _add(_mm(t_pds, values), _mm(pds, tv), _mm(t_p, lv), _mm(p, lv_))
    t_dout = _sub(t_dout, _add(_mul(_col(t_dlse), out), _mul(_col(dlse), t_out)))
    return outs, [ew.convert(t_dout, aval_of(q).dtype), t_dlse]
