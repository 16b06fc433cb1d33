"""The attention primitive (``ember.ops.attention``) beyond its table specs.

Against PyTorch's ``scaled_dot_product_attention`` (values and gradients, grouped heads, KV
cache offsets, padding masks, half precision), against finite differences, under vmap and jit;
that the reference really works in tiles and reads only the filled part of a cache (garbage
there never leaks); that ``grad`` gives one fused backward equation; the Llama's decode with a
cache whose unfilled part is NaN; and the errors for bad operands.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as TF  # noqa: N812
from helpers import assert_close, numeric_grad
from tiny_models import tiny_model

import ember
import ember.numpy as enp
from ember.models.llama import KVCache
from ember.nn import functional as F  # noqa: N812
from ember.ops import attention as A

RNG = np.random.default_rng(7)
TOL = {np.float16: (5e-3, 5e-3), "bfloat16": (3e-2, 3e-2), np.float32: (2e-5, 2e-6),
       np.float64: (1e-10, 1e-12)}


def _randn(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def _close(actual, expected, dtype=np.float32, msg=""):
    rtol, atol = TOL[dtype if dtype in TOL else np.dtype(dtype).name]
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().float().numpy() if expected.dtype == torch.bfloat16 \
            else expected.detach().numpy()
    actual = np.asarray(actual)
    assert_close(actual.astype(np.float64), np.asarray(expected, np.float64), rtol=rtol,
                 atol=atol, err_msg=msg)


def _torch_attention(q, k, v, kv_len, q_offset, causal, mask=None):
    """The reference: torch SDPA on the filled keys, the causal mask shifted by the offset."""
    length = q.shape[-2]
    k, v = k[..., :kv_len, :], v[..., :kv_len, :]
    allowed = torch.ones(length, kv_len, dtype=torch.bool)
    if causal:
        allowed = torch.arange(kv_len)[None, :] <= q_offset + torch.arange(length)[:, None]
    if mask is not None:
        mask = mask[..., :kv_len]
        allowed = allowed & mask if mask.dtype == torch.bool else \
            torch.where(allowed, mask, -torch.inf)
    return TF.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           enable_gqa=q.shape[-3] != k.shape[-3])


def _vjp_against_torch(q, k, v, kv_len, q_offset, causal, mask=None, dtype=np.float32):
    """Values and gradients (of q, k, v and an additive mask) against torch."""
    args = [q, k, v] + ([mask] if mask is not None and mask.dtype != bool else [])
    w = _randn(*q.shape[:-1], v.shape[-1], dtype=np.float64)

    def ours(q, k, v, *m):
        out, _ = A.attention(q, k, v, causal=causal, kv_len=kv_len, q_offset=q_offset,
                             mask=m[0] if m else (None if mask is None else enp.asarray(mask)))
        return out

    def loss(*a):
        return enp.sum(ours(*a).astype(enp.float64) * enp.asarray(w))

    e_args = [enp.asarray(a) for a in args]
    out, grads = ember.value_and_grad(loss, tuple(range(len(args))))(*e_args)
    grads_jit = ember.jit(ember.grad(loss, tuple(range(len(args)))))(*e_args)
    t_args = [torch.tensor(a.astype(np.float32) if a.dtype.name == "bfloat16" else a)
              .requires_grad_(True) for a in args]
    if dtype == "bfloat16":
        t_args = [t.detach().bfloat16().requires_grad_(True) for t in t_args]
    t_mask = t_args[3] if len(args) == 4 else (None if mask is None else torch.tensor(mask))
    expected = _torch_attention(*t_args[:3], kv_len, q_offset, causal, t_mask)
    _close(ours(*e_args), expected, dtype, "value")
    _close(ember.jit(ours)(*e_args), expected, dtype, "value (jit)")
    (expected.double() * torch.tensor(w)).sum().backward()
    for i, (g, gj, t) in enumerate(zip(grads, grads_jit, t_args)):
        want = t.grad.double().numpy()
        if want.shape != tuple(g.shape):  # keys, values, mask: only the filled part
            want = np.concatenate([want, np.zeros((*want.shape[:-2], g.shape[-2] - kv_len,
                                                   want.shape[-1]) if i < 3 else
                                                  (*want.shape[:-1], g.shape[-1] - kv_len))],
                                  axis=-2 if i < 3 else -1)
        _close(g, want, dtype, f"grad {i}")
        _close(gj, want, dtype, f"grad {i} (jit)")


# --- against PyTorch -------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hk", [(3, 3), (6, 2), (8, 2)])
@pytest.mark.parametrize("length,src", [(5, 5), (3, 7), (7, 4)])
def test_values_and_gradients_match_torch(hq, hk, length, src, causal):
    q, k, v = _randn(2, hq, length, 8), _randn(2, hk, src, 8), _randn(2, hk, src, 8)
    _vjp_against_torch(q, k, v, src, 0, causal)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, "bfloat16"])
def test_precisions_match_torch(dtype):
    import ml_dtypes

    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    q, k, v = (_randn(1, 4, 6, 16).astype(dt), _randn(1, 2, 9, 16).astype(dt),
               _randn(1, 2, 9, 16).astype(dt))
    _vjp_against_torch(q, k, v, 9, 3, True, dtype=dtype)
    _, lse = A.attention(enp.asarray(q), enp.asarray(k), enp.asarray(v))
    assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32)


@pytest.mark.parametrize("kv_len,q_offset,length", [(6, 5, 1), (9, 5, 4), (1, 0, 1)])
def test_kv_cache_reads_only_the_filled_part(kv_len, q_offset, length):
    """Queries at ``q_offset + i`` over a cache of 12 filled to ``kv_len``; NaN beyond."""
    q, k, v = _randn(2, 6, length, 8), _randn(2, 2, 12, 8), _randn(2, 2, 12, 8)
    k[..., kv_len:, :] = np.nan
    v[..., kv_len:, :] = np.nan
    _vjp_against_torch(q, k, v, kv_len, q_offset, True)


def test_padding_masks_match_torch():
    q, k, v = _randn(2, 4, 5, 8), _randn(2, 2, 7, 8), _randn(2, 2, 7, 8)
    padding = np.ones((2, 1, 1, 7), bool)
    padding[0, ..., :2] = False  # left padding of the first sequence
    _vjp_against_torch(q, k, v, 7, 2, True, padding)
    additive = _randn(2, 4, 1, 7)
    additive[1, ..., 3] = -np.inf
    _vjp_against_torch(q, k, v, 6, 2, True, additive)  # the mask's gradient too


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    q, k, v = (enp.asarray(_randn(1, 2, 3, 4)) for _ in range(3))
    mask = np.ones((1, 1, 3, 3), bool)
    mask[..., 1, :] = False
    out, lse = A.attention(q, k, v, mask=enp.asarray(mask))
    assert np.all(np.asarray(out)[..., 1, :] == 0) and np.all(np.isneginf(lse[..., 1]))
    grads = ember.grad(lambda q, k, v: enp.sum(A.attention(q, k, v, mask=enp.asarray(mask))[0]),
                       (0, 1, 2))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    empty, lse = A.attention(q, k, v, kv_len=0)
    assert not np.asarray(empty).any() and np.isneginf(np.asarray(lse)).all()


def test_dropout_keeps_the_decomposed_formula():
    """With ``v`` the identity, the output rows are the attention weights: each one dropped
    (0) or kept and scaled by ``1 / (1 - p)``; the same key gives the same mask."""
    q, k = enp.asarray(_randn(2, 4, 5, 6)), enp.asarray(_randn(2, 2, 6, 6))
    v = enp.asarray(np.broadcast_to(np.eye(6, dtype=np.float32), (2, 2, 6, 6)))
    mask = enp.asarray(_randn(2, 1, 5, 6))
    weights = np.asarray(F.scaled_dot_product_attention(q, k, v, mask, is_causal=True,
                                                        enable_gqa=True))
    key = ember.random.key(3)
    dropped = np.asarray(F.scaled_dot_product_attention(
        q, k, v, mask, dropout_p=0.25, is_causal=True, enable_gqa=True, dropout_key=key))
    kept = dropped != 0
    assert 0.5 < kept[weights > 0].mean() < 0.95
    _close(dropped[kept], weights[kept] / 0.75)
    again = F.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.25, is_causal=True,
                                           enable_gqa=True, dropout_key=key)
    np.testing.assert_array_equal(again, dropped)


# --- derivatives, vmap, jit ------------------------------------------------------------------

def test_gradients_match_finite_differences_with_a_cache_and_the_lse():
    q, k, v = _randn(1, 4, 3, 4, dtype=np.float64), _randn(1, 2, 6, 4, dtype=np.float64), \
        _randn(1, 2, 6, 4, dtype=np.float64)
    w, u = _randn(1, 4, 3, 4, dtype=np.float64), _randn(1, 4, 3, dtype=np.float64)

    def loss(q, k, v):
        out, lse = A.attention(q, k, v, causal=True, kv_len=5, q_offset=2)
        return enp.sum(out * w) + enp.sum(lse * u)

    grads = ember.grad(loss, (0, 1, 2))(*map(enp.asarray, (q, k, v)))
    for i, g in enumerate(grads):
        def f(x, i=i):
            args = [q, k, v]
            args[i] = x
            return loss(*map(enp.asarray, args))
        np.testing.assert_allclose(g, numeric_grad(f, [q, k, v][i]), rtol=1e-6, atol=1e-8)


def test_second_derivatives_match_torch():
    """grad of a function of the gradient: the backward's own derivative (dense formulas)."""
    q, k, v = (_randn(2, 4, 3, 4, dtype=np.float64), _randn(2, 2, 6, 4, dtype=np.float64),
               _randn(2, 2, 6, 4, dtype=np.float64))
    mask = _randn(2, 1, 1, 6, dtype=np.float64)
    w = _randn(2, 4, 3, 4, dtype=np.float64)

    def outer(q, k, v, m, attend):
        gq, gk, gv, gm = attend(q, k, v, m)
        return (gq * gq).sum() + (gk * gv).sum() + (gm * gm).sum()

    def ours(q, k, v, m):
        def inner(q, k, v, m):
            out = A.attention(q, k, v, causal=True, kv_len=5, q_offset=3, mask=m)[0]
            return enp.sum(out * w)
        return ember.grad(inner, (0, 1, 2, 3))(q, k, v, m)

    def theirs(q, k, v, m):
        out = _torch_attention(q, k, v, 5, 3, True, m)
        return torch.autograd.grad((out * torch.tensor(w)).sum(), (q, k, v, m),
                                   create_graph=True)

    args = (q, k, v, mask)
    grads = ember.grad(lambda *a: outer(*a, ours), (0, 1, 2, 3))(*map(enp.asarray, args))
    t_args = [torch.tensor(a, requires_grad=True) for a in args]
    outer(*t_args, theirs).backward()
    for g, t in zip(grads, t_args):
        _close(g, t.grad, np.float64)


def test_grad_is_one_backward_equation():
    q, k = enp.asarray(_randn(1, 4, 3, 8)), enp.asarray(_randn(1, 2, 5, 8))

    def loss(q, k, v):
        return enp.sum(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))

    text = str(ember.jit(ember.grad(loss, (0, 1, 2))).lower(q, k, k).graph)
    assert text.count("attention[") == 1 and text.count("attention_bwd[") == 1
    assert "exp" not in text and "dot_general" not in text


def test_vmap_with_a_length_per_example_matches_a_loop():
    q, k, v = _randn(3, 4, 2, 8), _randn(3, 2, 6, 8), _randn(3, 2, 6, 8)
    lengths = np.array([2, 6, 4], np.int32)
    offsets = lengths - 2

    def one(q, k, v, n, o):
        return A.attention(q, k, v, causal=True, kv_len=n, q_offset=o)[0]

    batched = ember.vmap(one)(*map(enp.asarray, (q, k, v, lengths, offsets)))
    for i in range(3):
        _close(batched[i], one(*map(enp.asarray, (q[i], k[i], v[i], lengths[i], offsets[i]))))
    # The gradient of the batched call, too: one backward for all examples.
    grads = ember.grad(lambda k: enp.sum(ember.vmap(one)(
        *map(enp.asarray, (q, k, v, lengths, offsets)))))(enp.asarray(k))
    for i in range(3):
        _close(grads[i], ember.grad(lambda ki: enp.sum(one(
            *map(enp.asarray, (q[i], ki, v[i], lengths[i], offsets[i])))))(enp.asarray(k[i])))


def test_jit_traces_once_for_every_filled_length():
    q, k, v = _randn(1, 2, 1, 8), _randn(1, 2, 10, 8), _randn(1, 2, 10, 8)
    traces = []

    def step(q, k, v, n):
        return A.attention(q, k, v, causal=True, kv_len=n, q_offset=n - 1)[0]

    def traced(*args):
        traces.append(1)
        return step(*args)

    jitted = ember.jit(traced)
    for n in (3, 7, 10):
        kn, vn = k.copy(), v.copy()
        kn[..., n:, :] = vn[..., n:, :] = np.nan
        _close(jitted(*map(enp.asarray, (q, kn, vn, np.int32(n)))),
               step(*map(enp.asarray, (q, k, v, np.int32(n)))))
    assert len(traces) == 1


# --- the reference works in tiles ------------------------------------------------------------

def test_small_tiles_give_the_same_results(monkeypatch):
    q, k, v = _randn(2, 6, 13, 8), _randn(2, 2, 17, 8), _randn(2, 2, 17, 8)
    mask = _randn(2, 1, 13, 17)

    tangents = [_randn(*x.shape) for x in (q, k, v, mask)]

    def f(q, k, v, m):
        return A.attention(q, k, v, causal=True, kv_len=15, q_offset=4, mask=m)

    def run():
        args = [enp.asarray(x) for x in (q, k, v, mask)]
        forward = ember.jvp(f, args, [enp.asarray(t) for t in tangents])
        backward = ember.grad(lambda *a: enp.sum(f(*a)[0] ** 2), (0, 1, 2, 3))(*args)
        return [*forward[0], *forward[1], *backward]

    untiled = run()
    monkeypatch.setattr(A, "BLOCK_Q", 3)
    monkeypatch.setattr(A, "BLOCK_K", 4)
    for tiled, whole in zip(run(), untiled, strict=True):
        _close(tiled, whole)


def test_a_long_sequence_never_holds_the_score_matrix(monkeypatch):
    monkeypatch.setattr(A, "BLOCK_Q", 64)
    monkeypatch.setattr(A, "BLOCK_K", 64)
    n, d = 1024, 16
    q, k, v = (enp.asarray(_randn(1, 1, n, d)) for _ in range(3))
    tracemalloc.start()
    try:
        out, _ = A.attention(q, k, v, causal=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < n * n * 4 / 8, f"peak {peak} bytes: a [L, S] float32 matrix is {n * n * 4}"
    s = np.asarray(q)[0, 0] @ np.asarray(k)[0, 0].T / 4
    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    _close(np.asarray(out)[0, 0], p / p.sum(-1, keepdims=True) @ np.asarray(v)[0, 0])


def test_only_visible_key_tiles_are_read(monkeypatch):
    monkeypatch.setattr(A, "BLOCK_Q", 4)
    monkeypatch.setattr(A, "BLOCK_K", 4)
    read = []
    keys = A._Tiles.keys
    monkeypatch.setattr(A._Tiles, "keys", lambda self, x, j0, j1: (read.append(j1),
                                                                   keys(self, x, j0, j1))[1])
    q, k = enp.asarray(_randn(1, 1, 1, 8)), enp.asarray(_randn(1, 1, 64, 8))
    A.attention(q, k, k, causal=True, kv_len=10, q_offset=9)  # a decode step
    assert max(read) == 10
    read.clear()
    q = enp.asarray(_randn(1, 1, 16, 8))
    A.attention(q, enp.asarray(_randn(1, 1, 16, 8)), enp.asarray(_randn(1, 1, 16, 8)),
                causal=True)
    # Causal prefill: keys and values of the 1 + 2 + 3 + 4 tiles on or below the diagonal.
    assert len(read) == 2 * (1 + 2 + 3 + 4)


# --- the Llama -------------------------------------------------------------------------------

def test_llama_decode_ignores_garbage_in_the_unfilled_cache():
    model = tiny_model(vocab_size=16)
    ids = np.array([[3, 1, 4, 1, 5]], np.int32)
    full = np.asarray(model(enp.asarray(ids)))
    cache = KVCache.allocate(model.config, 1, 8)
    poisoned = KVCache(
        [enp.asarray(np.full(c.shape, np.nan, np.float32)) for c in cache.keys],
        [enp.asarray(np.full(c.shape, np.nan, np.float32)) for c in cache.values])
    step = ember.jit(lambda m, c, i, p: m(i, cache=c, cache_pos=p))
    logits, poisoned = step(model, poisoned, enp.asarray(ids[:, :3]), np.int32(0))
    for pos in (3, 4):
        logits, poisoned = step(model, poisoned, enp.asarray(ids[:, pos:pos + 1]),
                                np.int32(pos))
        _close(np.asarray(logits)[:, 0], full[:, pos], msg=f"position {pos}")
    text = str(ember.jit(lambda m, c, i, p: m(i, cache=c, cache_pos=p)[0]).lower(
        model, cache, enp.asarray(ids[:, :1]), np.int32(3)).graph)
    assert text.count("attention[") == model.config.num_hidden_layers
    assert "[1,1,1,8]" not in text  # no [batch, 1, queries, keys] mask is built


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shapes,kw,match", [
    (((2, 4, 3, 8), (2, 3, 5, 8), (2, 3, 5, 8)), {}, r"4 query heads are not a multiple of 3"),
    (((2, 4, 3, 8), (2, 2, 5, 6), (2, 2, 5, 8)), {}, r"do not fit together"),
    (((4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8)), {}, r"same leading axes"),
    (((2, 4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8)), {"mask": np.ones((2, 4, 3, 4), bool)},
     r"mask \(2, 4, 3, 4\) must have one axis per axis of the scores \(2, 4, 3, 5\)"),
    (((2, 4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8)), {"mask": np.ones((3, 5), bool)},
     r"mask \(3, 5\) must have one axis per axis"),
    (((2, 4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8)), {"kv_len": np.ones(3, np.int32)},
     r"kv_len must be an int32 scalar or of shape \(2,\)"),
    (((2, 4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8)), {"q_offset": 1.5},
     r"q_offset must be an integer, got float64"),
])
def test_bad_operands_raise_errors_naming_attention_and_the_line(shapes, kw, match):
    args = [enp.asarray(_randn(*s)) for s in shapes]
    kw = {k: enp.asarray(v) for k, v in kw.items()}
    for run in (lambda *a: A.attention(*a, **kw), ember.jit(lambda *a: A.attention(*a, **kw))):
        with pytest.raises(ember.EmberError, match="attention: .*" + match) as info:
            run(*args)
        assert "test_attention.py" in str(info.value)


def test_integer_inputs_are_refused():
    x = enp.asarray(np.ones((1, 2, 3), np.int32))
    with pytest.raises(ember.EmberError, match="needs floating-point query"):
        F.scaled_dot_product_attention(x, x, x)
    with pytest.raises(ember.EmberError, match="attention: needs float16, bfloat16"):
        A.attention(x, x, x)
