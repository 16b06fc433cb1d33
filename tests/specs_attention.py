"""Primitive specs for ``ember.ops.attention``: the attention primitive, its linear tangent
``attention_jvp`` and the fused backward ``attention_bwd``.

Collected by ``primitive_specs``. The references are the dense formulas in NumPy (the whole
``[L, S]`` score matrix, float64, or float32 for half-precision inputs), written independently
of the tiled implementation. Shapes exercise grouped-query heads (6 query heads over 2
key/value heads), ``L != S`` and a value dimension unlike the key's; ``kv_len`` and ``q_offset``
are drawn per example, so vmap maps them too. Every row sees at least one key, so the
log-sum-exp is finite and finite differences are meaningful.
"""

from __future__ import annotations

import numpy as np
from helpers import upcast
from primitive_specs import Spec

from ember import dtypes
from ember.ops import attention as A

FLOATS = (dtypes.float16, dtypes.bfloat16, dtypes.float32, dtypes.float64)
WIDE = (dtypes.float32, dtypes.float64)
Q, K, V = (2, 6, 5, 4), (2, 2, 7, 4), (2, 2, 7, 3)
SCALE = 0.7


# --- input generators ------------------------------------------------------------------------

def _data(shape):
    return lambda rng, dt, _: rng.uniform(-1.5, 1.5, size=shape).astype(dt)


def _kv_len(rng, dt, shape):
    return np.int32(rng.integers(3, K[-2] + 1))


def _q_offset(rng, dt, shape):
    return np.int32(rng.integers(0, 3))


def _bool_mask(rng, dt, shape):
    mask = rng.random((Q[0], 1, Q[2], K[2])) < 0.6
    mask[..., 0] = True  # every row sees key 0
    return mask


def _additive_mask(rng, dt, shape):
    return rng.uniform(-1, 1, size=(Q[0], Q[1], 1, K[2])).astype(dt)


def _lse_cotangent(rng, dt, shape):
    return rng.uniform(-1, 1, size=Q[:-1]).astype(A._acc_dtype(np.dtype(dt)))


# --- the dense reference ---------------------------------------------------------------------

def _dense(q, k, v, kv_len, q_offset, causal, mask=None):
    """Probabilities ``p``, ``lse``, which scores are visible, and keys/values repeated per
    query head, all in float64 (float32 for half inputs, as the primitive accumulates)."""
    wide = np.float32 if upcast(q).dtype == np.float32 else np.float64
    q, k, v = (x.astype(wide) for x in (q, k, v))
    group = q.shape[-3] // k.shape[-3]
    k, v = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    s = q @ np.swapaxes(k, -1, -2) * SCALE
    length, src = s.shape[-2:]
    visible = np.arange(src) < kv_len
    if causal:
        visible = visible & (np.arange(src) <= q_offset + np.arange(length)[:, None])
    if mask is not None and mask.dtype == bool:
        visible = visible & mask
    elif mask is not None:
        s = s + mask.astype(wide)
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    return e / total, (m + np.log(total))[..., 0], visible, q, k, v


def _grouped_sum(x, hk):
    """Sum per-query-head gradients of keys or values over each key/value head's group."""
    return x.reshape(*x.shape[:-3], hk, -1, *x.shape[-2:]).sum(axis=-3)


def _forward_ref(causal):
    def ref(q, k, v, kv_len=K[-2], q_offset=0, mask=None):
        p, lse, _, _, _, vr = _dense(q, k, v, kv_len, q_offset, causal, mask)
        return [(p @ vr).astype(q.dtype), lse.astype(A._acc_dtype(q.dtype))]
    return ref


def _jvp_ref(q, k, v, kv_len, mask, tk, tv, tm, q_offset=1):
    p, lse, visible, qw, kw, vw = _dense(q, k, v, kv_len, q_offset, True, mask)
    group = q.shape[-3] // k.shape[-3]
    tk, tv = (np.repeat(x.astype(qw.dtype), group, axis=-3) for x in (tk, tv))
    ds = np.where(visible, qw @ np.swapaxes(tk, -1, -2) * SCALE + tm, 0)
    dlse = (p * ds).sum(axis=-1)
    out = (p @ vw).astype(q.dtype).astype(qw.dtype)  # the forward's output, as passed
    dout = (p * ds) @ vw - dlse[..., None] * out + p @ tv
    return [dout.astype(q.dtype), dlse.astype(A._acc_dtype(q.dtype))]


def _bwd_ref(q, k, v, kv_len, mask, dout, dlse, q_offset=1):
    p, _, _, qw, kw, vw = _dense(q, k, v, kv_len, q_offset, True, mask)
    dout, dlse = dout.astype(qw.dtype), dlse.astype(qw.dtype)
    out = (p @ vw).astype(q.dtype).astype(qw.dtype)  # the forward's output, as passed
    ds = p * (dout @ np.swapaxes(vw, -1, -2)
              - ((dout * out).sum(axis=-1) - dlse)[..., None])
    hk = k.shape[-3]
    grads = [ds @ kw * SCALE, _grouped_sum(np.swapaxes(ds, -1, -2) @ qw * SCALE, hk),
             _grouped_sum(np.swapaxes(p, -1, -2) @ dout, hk)]
    if mask is not None:
        grads.append(ds.sum(axis=-2, keepdims=True))
    return [g.astype(q.dtype) for g in grads]


# --- the primitives, bound directly ----------------------------------------------------------

def _attention(causal):
    def fn(q, k, v, kv_len=None, q_offset=0, mask=None):
        return list(A.attention(q, k, v, scale=SCALE, causal=causal, kv_len=kv_len,
                                q_offset=q_offset, mask=mask))
    return fn


def _residuals(q, k, v, kv_len, mask, q_offset=1):
    """The operands before the tangents or cotangents: primal inputs, then out and lse."""
    out, lse = A.attention(q, k, v, scale=SCALE, causal=True, kv_len=kv_len,
                           q_offset=q_offset, mask=mask)
    lead = [q, k, v, A._int32(kv_len, "kv_len"), A._int32(q_offset, "q_offset")]
    return [*lead, *([] if mask is None else [mask]), out, lse]


def _params(mask, which):
    return dict(scale=SCALE, causal=True, has_mask=mask is not None, which=which)


def _jvp_fn(q, k, v, kv_len, mask, tk, tv, tm):
    """Tangents of k, v and the additive mask (none of q): a ``which`` with gaps."""
    return A.attention_jvp_p.bind(*_residuals(q, k, v, kv_len, mask), tk, tv, tm,
                                  **_params(mask, (False, True, True, True)))


def _bwd_fn(q, k, v, kv_len, mask, dout, dlse):
    return A.attention_bwd_p.bind(*_residuals(q, k, v, kv_len, mask), dout, dlse,
                                  **_params(mask, (True, True, True, True)))


def specs() -> list[Spec]:
    data = [_data(Q), _data(K), _data(V)]
    return [
        Spec("attention", _attention(True), _forward_ref(True),
             [*data, _kv_len, _q_offset], FLOATS, shapes=(Q,), diff=(0, 1, 2),
             id="attention-causal-gqa"),
        Spec("attention", lambda q, k, v, m: _attention(False)(q, k, v, mask=m),
             lambda q, k, v, m: _forward_ref(False)(q, k, v, mask=m),
             [*data, _bool_mask], WIDE, shapes=(Q,), diff=(0, 1, 2), id="attention-bool-mask"),
        Spec("attention", lambda q, k, v, m, n: _attention(True)(q, k, v, n, 1, m),
             lambda q, k, v, m, n: _forward_ref(True)(q, k, v, n, 1, m),
             [*data, _additive_mask, _kv_len], WIDE, shapes=(Q,), diff=(0, 1, 2, 3),
             id="attention-additive-mask"),
        Spec("attention_jvp", _jvp_fn, _jvp_ref,
             [*data, _kv_len, _additive_mask, _data(K), _data(V), _additive_mask], FLOATS,
             shapes=(Q,), diff=(0, 1, 2, 4, 5, 6, 7)),
        Spec("attention_bwd", _bwd_fn, _bwd_ref,
             [*data, _kv_len, _additive_mask, _data(Q[:-1] + V[-1:]), _lse_cotangent], FLOATS,
             shapes=(Q,), diff=(0, 1, 2, 4, 5, 6)),
    ]
