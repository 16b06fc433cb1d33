"""``ember.nn`` against PyTorch (and Hugging Face transformers for rotary embeddings).

Functional ops are compared value-and-gradient with ``torch.nn.functional`` (eager and under
``jit``); modules are compared through their ``state_dict`` names, shapes and the outputs and
gradients of an equivalent ``torch.nn.Module`` loaded with the same weights. The remaining
tests check the module contract on its own (all-or-nothing loading, freezing, modes and
retracing, LoRA) and the error messages for bad input.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from helpers import assert_close

import ember
import ember.numpy as enp
from ember import nn
from ember.nn import functional as F  # noqa: N812

try:  # torch is a test reference only; the tests that need it are marked and skipped without it
    import torch
    import torch.nn.functional as TF  # noqa: N812
except ImportError:
    torch = TF = None


def needs_torch(fn):
    """``@pytest.mark.torch``, and skipped when torch is not installed."""
    return pytest.mark.torch(pytest.mark.skipif(torch is None, reason="needs torch")(fn))


RNG = np.random.default_rng(1234)

# (rtol, atol) for a float32 / float64 result against torch computing in the same dtype.
TOL = {np.float32: (2e-5, 2e-6), np.float64: (1e-10, 1e-12)}


def _tol(dtype):
    return TOL[np.dtype(dtype).type]


def _randn(shape, dtype=np.float32, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(dtype)


def _t(x, grad=False):
    t = torch.tensor(np.asarray(x))
    return t.requires_grad_(True) if grad else t


def _close(actual, expected, dtype=np.float32, rtol=None, atol=None, msg=""):
    r, a = _tol(dtype)
    if torch is not None and isinstance(expected, torch.Tensor):
        expected = expected.detach().numpy()
    assert_close(np.asarray(actual), np.asarray(expected), rtol=r if rtol is None else rtol,
                 atol=a if atol is None else atol, err_msg=msg)


def check_vs_torch(ember_fn, torch_fn, args, diff=(0,), dtype=np.float32, rtol=None,
                   atol=None):
    """``ember_fn`` (eager and jit) equals ``torch_fn`` on ``args``, and so does the vector-
    Jacobian product of a random cotangent with respect to the arguments in ``diff``."""
    e_args = [enp.asarray(a) for a in args]
    eager = ember_fn(*e_args)
    jitted = ember.jit(ember_fn)(*e_args)
    t_args = [_t(a, grad=i in diff) for i, a in enumerate(args)]
    expected = torch_fn(*t_args)
    _close(eager, expected, dtype, rtol, atol, "value (eager)")
    _close(jitted, expected, dtype, rtol, atol, "value (jit)")
    if not diff:
        return
    w = _randn(tuple(expected.shape), dtype)

    def loss(*a):
        return enp.sum(ember_fn(*a) * enp.asarray(w))

    grads = ember.grad(loss, argnums=tuple(diff))(*e_args)
    grads_jit = ember.jit(ember.grad(loss, argnums=tuple(diff)))(*e_args)
    (expected * _t(w)).sum().backward()
    for g, gj, i in zip(grads, grads_jit, diff):
        assert np.asarray(g).dtype == np.dtype(dtype)
        _close(g, t_args[i].grad, dtype, rtol, atol, f"grad of argument {i} (eager)")
        _close(gj, t_args[i].grad, dtype, rtol, atol, f"grad of argument {i} (jit)")


FLOAT_TYPES = [np.float32, np.float64]


# --- functional: activations and normalisations --------------------------------------------

@needs_torch
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize("name", ["relu", "sigmoid", "silu", "tanh", "gelu", "gelu_tanh"])
def test_activations_match_torch(name, dtype):
    x = _randn((3, 17), dtype, scale=3.0)
    x[0, :4] = [0.5, -0.5, 8.0, -8.0]  # away from relu's kink at 0, into the tails
    ember_fn = {"relu": F.relu, "sigmoid": F.sigmoid, "silu": F.silu, "tanh": F.tanh,
                "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[name]
    torch_fn = {"relu": TF.relu, "sigmoid": torch.sigmoid, "silu": TF.silu, "tanh": torch.tanh,
                "gelu": TF.gelu, "gelu_tanh": lambda v: TF.gelu(v, approximate="tanh")}[name]
    check_vs_torch(ember_fn, torch_fn, [x], dtype=dtype)


@needs_torch
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_and_log_softmax_match_torch(axis, dtype):
    x = _randn((4, 5, 6), dtype, scale=4.0)
    x[0, 0, 0] = 800.0  # large logits must not overflow
    check_vs_torch(lambda v: F.softmax(v, axis=axis), lambda v: TF.softmax(v, dim=axis), [x],
                   dtype=dtype)
    check_vs_torch(lambda v: F.log_softmax(v, axis=axis), lambda v: TF.log_softmax(v, dim=axis),
                   [x], dtype=dtype)


@needs_torch
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
def test_rms_norm_matches_torch_and_formula(dtype):
    x, w = _randn((2, 3, 16), dtype, 2.0), _randn((16,), dtype)
    check_vs_torch(lambda a, b: F.rms_norm(a, b, eps=1e-5),
                   lambda a, b: TF.rms_norm(a, (16,), b, eps=1e-5), [x, w], diff=(0, 1),
                   dtype=dtype)
    manual = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6) * w
    _close(F.rms_norm(enp.asarray(x), enp.asarray(w)), manual.astype(dtype), dtype, 1e-5, 1e-6)
    _close(F.rms_norm(enp.asarray(x)), TF.rms_norm(_t(x), (16,), eps=1e-6), dtype)


def test_rms_norm_half_precision_is_computed_in_float32():
    x = _randn((4, 64), np.float32, 30.0).astype(ml_dtypes.bfloat16)
    out = F.rms_norm(enp.asarray(x), enp.ones((64,), dtype=enp.bfloat16))
    assert np.asarray(out).dtype == ml_dtypes.bfloat16
    x32 = x.astype(np.float32)
    ref = (x32 / np.sqrt(np.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(out).astype(np.float32), ref.astype(np.float32))


@needs_torch
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize("shape", [(8,), (3, 8)])
def test_layer_norm_matches_torch(shape, dtype):
    x = _randn((2, 3) + shape, dtype, 2.0) + 1.5
    w, b = _randn(shape, dtype), _randn(shape, dtype)
    check_vs_torch(lambda a, g, c: F.layer_norm(a, shape, g, c, eps=1e-5),
                   lambda a, g, c: TF.layer_norm(a, shape, g, c, eps=1e-5), [x, w, b],
                   diff=(0, 1, 2), dtype=dtype)
    check_vs_torch(lambda a: F.layer_norm(a, shape), lambda a: TF.layer_norm(a, shape), [x],
                   dtype=dtype)


@needs_torch
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
def test_linear_matches_torch(dtype):
    x, w, b = _randn((2, 5, 7), dtype), _randn((4, 7), dtype), _randn((4,), dtype)
    check_vs_torch(F.linear, TF.linear, [x, w, b], diff=(0, 1, 2), dtype=dtype)
    check_vs_torch(lambda a, c: F.linear(a, c), lambda a, c: TF.linear(a, c), [x, w],
                   diff=(0, 1), dtype=dtype)


@needs_torch
def test_embedding_matches_torch_with_repeated_ids():
    ids = np.array([[0, 3, 3, 9], [9, 9, 1, 0]], dtype=np.int64)
    w = _randn((10, 6))
    check_vs_torch(lambda i, t: F.embedding(i, t), lambda i, t: TF.embedding(i, t), [ids, w],
                   diff=(1,))
    with pytest.raises(ember.EmberError):
        F.embedding(enp.asarray(ids.astype(np.float32)), enp.asarray(w))


# --- functional: cross-entropy ---------------------------------------------------------------

def _torch_ce(logits, target, **kw):
    if logits.ndim == 3:  # torch wants the classes on axis 1
        logits = logits.permute(0, 2, 1)
    return TF.cross_entropy(logits, target, **kw)


@needs_torch
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(6,), (2, 5)])
def test_cross_entropy_matches_torch(shape, smoothing, reduction, dtype):
    c = 7
    logits = _randn(shape + (c,), dtype, 3.0)
    target = RNG.integers(0, c, size=shape).astype(np.int64)
    target.reshape(-1)[[1, 3]] = -100  # ignored positions
    kw = dict(label_smoothing=smoothing, reduction=reduction)
    check_vs_torch(lambda lg, t: F.cross_entropy(lg, t, **kw),
                   lambda lg, t: _torch_ce(lg, t, **kw), [logits, target], dtype=dtype)
    out = F.cross_entropy(enp.asarray(logits), enp.asarray(target), reduction="none")
    assert np.all(np.asarray(out).reshape(-1)[[1, 3]] == 0)


@needs_torch
def test_cross_entropy_custom_ignore_index_and_int32_targets():
    logits = _randn((2, 4, 5), np.float32, 2.0)
    target = np.array([[1, 3, 0, 2], [3, 3, 4, 1]], dtype=np.int32)
    kw = dict(ignore_index=3, label_smoothing=0.2)
    check_vs_torch(lambda lg, t: F.cross_entropy(lg, t, **kw),
                   lambda lg, t: _torch_ce(lg, t.long(), **kw), [logits, target])


# --- functional: attention -------------------------------------------------------------------

def _qkv(b, hq, hk, length, src, d, dtype=np.float32):
    return (_randn((b, hq, length, d), dtype), _randn((b, hk, src, d), dtype),
            _randn((b, hk, src, d), dtype))


@needs_torch
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize("length,src", [(5, 5), (3, 6), (6, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_torch(causal, length, src, dtype):
    q, k, v = _qkv(2, 3, 3, length, src, 8, dtype)
    check_vs_torch(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal),
                   lambda a, b, c: TF.scaled_dot_product_attention(a, b, c, is_causal=causal),
                   [q, k, v], diff=(0, 1, 2), dtype=dtype)


@needs_torch
def test_sdpa_custom_scale_matches_torch():
    q, k, v = _qkv(1, 2, 2, 4, 4, 8)
    check_vs_torch(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=0.3),
                   lambda a, b, c: TF.scaled_dot_product_attention(a, b, c, scale=0.3),
                   [q, k, v], diff=(0, 1, 2))


def _bool_mask(shape):
    m = RNG.random(shape) < 0.6
    m[..., 0] = True  # no fully masked rows (torch gives NaN there)
    return m


@needs_torch
@pytest.mark.parametrize("mask_shape", [(4, 6), (2, 1, 4, 6), (2, 3, 4, 6), (1, 6)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks_match_torch(kind, mask_shape):
    q, k, v = _qkv(2, 3, 3, 4, 6, 8)
    mask = _bool_mask(mask_shape) if kind == "bool" else _randn(mask_shape, scale=2.0)
    check_vs_torch(lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m),
                   lambda a, b, c, m: TF.scaled_dot_product_attention(a, b, c, attn_mask=m),
                   [q, k, v, mask], diff=(0, 1, 2))


def test_sdpa_bool_mask_really_masks():
    q, k, v = _qkv(1, 1, 1, 3, 5, 4)
    mask = np.zeros((3, 5), bool)
    mask[:, 2] = True
    out = F.scaled_dot_product_attention(enp.asarray(q), enp.asarray(k), enp.asarray(v),
                                         attn_mask=enp.asarray(mask))
    _close(out, np.broadcast_to(v[:, :, 2:3], (1, 1, 3, 4)))


@needs_torch
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hk", [(4, 2), (6, 2), (4, 1)])
def test_sdpa_grouped_query_matches_torch(hq, hk, causal):
    q, k, v = _qkv(2, hq, hk, 5, 7, 8)

    def ours(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=causal, enable_gqa=True)

    def theirs(a, b, c):
        return TF.scaled_dot_product_attention(a, b, c, is_causal=causal, enable_gqa=True)

    check_vs_torch(ours, theirs, [q, k, v], diff=(0, 1, 2))
    # Same thing as repeating each key/value head for its group of query heads.
    rep = [np.repeat(t, hq // hk, axis=1) for t in (k, v)]
    _close(ours(*map(enp.asarray, (q, k, v))),
           F.scaled_dot_product_attention(*map(enp.asarray, (q, *rep)), is_causal=causal))


@needs_torch
@pytest.mark.parametrize("mask_shape", [(5, 7), (2, 1, 5, 7), (2, 4, 5, 7), (4, 5, 7)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_grouped_query_with_mask_matches_torch(kind, mask_shape):
    q, k, v = _qkv(2, 4, 2, 5, 7, 8)
    mask = _bool_mask(mask_shape) if kind == "bool" else _randn(mask_shape, scale=2.0)

    def ours(a, b, c, m):
        return F.scaled_dot_product_attention(a, b, c, attn_mask=m, enable_gqa=True)

    def theirs(a, b, c, m):
        return TF.scaled_dot_product_attention(a, b, c, attn_mask=m, enable_gqa=True)

    check_vs_torch(ours, theirs, [q, k, v, mask], diff=(0, 1, 2))


@needs_torch
def test_sdpa_additive_mask_with_minus_infinity_matches_torch():
    q, k, v = _qkv(1, 2, 2, 4, 5, 8)
    mask = np.where(_bool_mask((4, 5)), 0.0, -np.inf).astype(np.float32)
    check_vs_torch(lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m),
                   lambda a, b, c, m: TF.scaled_dot_product_attention(a, b, c, attn_mask=m),
                   [q, k, v, mask], diff=(0, 1, 2))


def test_sdpa_causal_and_bool_mask_combine():
    q, k, v = _qkv(1, 2, 2, 4, 4, 8)
    mask = _bool_mask((4, 4))
    both = np.logical_and(mask, np.tril(np.ones((4, 4), bool)))
    a = [enp.asarray(t) for t in (q, k, v)]
    _close(F.scaled_dot_product_attention(*a, attn_mask=enp.asarray(mask), is_causal=True),
           F.scaled_dot_product_attention(*a, attn_mask=enp.asarray(both)))


def test_sdpa_three_dimensional_inputs():
    q, k, v = (_randn((3, 4, 8)) for _ in range(3))
    out = F.scaled_dot_product_attention(*map(enp.asarray, (q, k, v)))
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    _close(out, (p / p.sum(-1, keepdims=True)) @ v, rtol=1e-5, atol=1e-6)


# --- functional: dropout ---------------------------------------------------------------------

def test_dropout_identity_cases():
    x = enp.asarray(_randn((4, 8)))
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0, training=True, key=ember.random.key(0)) is x
    np.testing.assert_array_equal(np.asarray(F.dropout(x, 1.0, key=ember.random.key(0))), 0)
    layer = nn.Dropout(0.5).eval()
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(x))
    for bad in (-0.1, 1.5):
        with pytest.raises(ember.EmberError):
            F.dropout(x, bad, key=ember.random.key(0))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_statistics_and_scaling(p):
    x = _randn((200, 250)) + 3.0
    out = np.asarray(F.dropout(enp.asarray(x), p, key=ember.random.key(7)))
    zeros = out == 0
    n = x.size
    assert abs(zeros.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(out[~zeros], x[~zeros] / (1 - p), rtol=1e-6)
    # Same key, same mask; another key, another mask.
    again = np.asarray(F.dropout(enp.asarray(x), p, key=ember.random.key(7)))
    np.testing.assert_array_equal(out, again)
    other = np.asarray(F.dropout(enp.asarray(x), p, key=ember.random.key(8)))
    assert (other == 0).tolist() != zeros.tolist()


def test_dropout_with_a_key_under_jit_is_reproducible():
    x = enp.asarray(_randn((16, 16)) + 3.0)
    key = ember.random.key(3)
    jitted = np.asarray(ember.jit(lambda v, k: F.dropout(v, 0.5, key=k))(x, key))
    np.testing.assert_array_equal(jitted, np.asarray(F.dropout(x, 0.5, key=key)))
    # The gradient is the mask scaled by 1/(1-p).
    g = np.asarray(ember.grad(lambda v: enp.sum(F.dropout(v, 0.5, key=key)))(x))
    np.testing.assert_allclose(g, (jitted != 0) * 2.0)


# --- rotary embeddings -----------------------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@needs_torch
@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3,
                                     {"type": "linear", "factor": 2.0}])
@pytest.mark.parametrize("head_dim,base", [(64, 500000.0), (32, 10000.0)])
def test_rope_inv_freq_matches_transformers(head_dim, base, scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_type": "default"} if scaling is None else dict(scaling)
    if "type" in params:  # the legacy spelling of rope_type
        params["rope_type"] = params.pop("type")
    params["rope_theta"] = base
    cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                   head_dim=head_dim, rope_parameters=params,
                                   max_position_embeddings=131072)
    if params["rope_type"] == "default":
        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg)
    ours = F.rope_inv_freq(head_dim, base, scaling)
    assert ours.shape == (head_dim // 2,)
    np.testing.assert_allclose(ours, expected.double().numpy(), rtol=1e-6)
    # Closed form, float64.
    closed = base ** (-np.arange(0, head_dim, 2) / head_dim)
    if scaling is None:
        np.testing.assert_allclose(ours, closed, rtol=1e-14)
    elif params["rope_type"] == "linear":
        np.testing.assert_allclose(ours, closed / scaling["factor"], rtol=1e-14)


def test_rope_inv_freq_llama3_bands():
    inv = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    ours = F.rope_inv_freq(128, 500000.0, LLAMA3)
    wavelen = 2 * np.pi / inv
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()
    np.testing.assert_allclose(ours[high], inv[high], rtol=1e-14)
    np.testing.assert_allclose(ours[low], inv[low] / 8, rtol=1e-14)
    assert np.all((ours[mid] < inv[mid]) & (ours[mid] > inv[mid] / 8))
    with pytest.raises(ember.EmberError):
        F.rope_inv_freq(64, 10000.0, {"rope_type": "nope", "factor": 2.0})


@needs_torch
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
def test_apply_rotary_half_layout_matches_transformers(dtype):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    b, h, hk, t, d = 2, 4, 2, 5, 16
    q, k = _randn((b, h, t, d), dtype), _randn((b, hk, t, d), dtype)
    positions = np.stack([np.arange(t), np.arange(t) + 11])  # [B, T], per-row offsets
    cfg = transformers.LlamaConfig(hidden_size=h * d, num_attention_heads=h, head_dim=d,
                                   num_key_value_heads=hk,
                                   rope_parameters={"rope_type": "default",
                                                    "rope_theta": 10000.0})
    # Hugging Face's cos/sin are the angles duplicated over both halves: [B, T, D].
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(_t(q), _t(positions))
    hf_cos, hf_sin = hf_cos.numpy(), hf_sin.numpy()
    np.testing.assert_array_equal(hf_cos[..., : d // 2], hf_cos[..., d // 2:])
    inv = F.rope_inv_freq(d, 10000.0)
    cos, sin = F.rope_cos_sin(enp.asarray(positions), inv, dtype=dtype)
    assert cos.shape == (b, t, d // 2) and np.asarray(cos).dtype == np.dtype(dtype)
    _close(cos, hf_cos[..., : d // 2], dtype, 1e-6, 1e-6)
    _close(sin, hf_sin[..., : d // 2], dtype, 1e-6, 1e-6)
    eq, ek = apply_rotary_pos_emb(_t(q), _t(k), _t(hf_cos), _t(hf_sin), unsqueeze_dim=1)
    c, s = cos[:, None], sin[:, None]
    _close(F.apply_rotary(enp.asarray(q), c, s), eq, dtype, 1e-6, 1e-6)
    _close(F.apply_rotary(enp.asarray(k), c, s), ek, dtype, 1e-6, 1e-6)
    # Gradient: rotation is orthogonal, so the vjp is the inverse rotation (angle -> -angle).
    w = _randn(q.shape, dtype)
    g = ember.grad(lambda x: enp.sum(F.apply_rotary(x, c, s) * enp.asarray(w)))(enp.asarray(q))
    _close(g, F.apply_rotary(enp.asarray(w), c, -s), dtype, 1e-5, 1e-6)


def _half_to_interleaved(x):
    """The GGUF q/k permutation: feature ``i`` and ``i + d/2`` become ``2i`` and ``2i + 1``."""
    d = x.shape[-1]
    return np.swapaxes(x.reshape(*x.shape[:-1], 2, d // 2), -1, -2).reshape(x.shape)


def test_apply_rotary_interleaved_is_the_permuted_half_layout():
    t, d = 6, 8
    x = _randn((2, 3, t, d), np.float64)
    cos, sin = F.rope_cos_sin(enp.arange(t) + 3, F.rope_inv_freq(d), dtype=enp.float64)
    half = np.asarray(F.apply_rotary(enp.asarray(x), cos, sin))
    inter = np.asarray(F.apply_rotary(enp.asarray(_half_to_interleaved(x)), cos, sin,
                                      interleaved=True))
    np.testing.assert_allclose(inter, _half_to_interleaved(half), rtol=1e-12, atol=1e-12)
    # ...and is a complex rotation of consecutive pairs.
    z = x[..., 0::2] + 1j * x[..., 1::2]
    rotated = z * np.exp(1j * (np.arange(t)[:, None] + 3) * F.rope_inv_freq(d)).astype(
        np.complex64)
    ours = np.asarray(F.apply_rotary(enp.asarray(x), cos, sin, interleaved=True))
    np.testing.assert_allclose(ours[..., 0::2], rotated.real, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours[..., 1::2], rotated.imag, rtol=1e-5, atol=1e-6)
    # Rotations keep norms and compose: position p then position q is position p + q.
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-6)
    jitted = ember.jit(lambda a, c, s: F.apply_rotary(a, c, s, interleaved=True))
    np.testing.assert_allclose(np.asarray(jitted(enp.asarray(x), cos, sin)), ours, rtol=1e-12)


# --- modules against torch -------------------------------------------------------------------

V, D, H = 11, 8, 12


class EBlock(nn.Module):
    def __init__(self):
        self.norm = nn.RMSNorm(D, eps=1e-6)
        self.up = nn.Linear(D, H)
        self.down = nn.Linear(H, D, bias=False)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class ENet(nn.Module):
    def __init__(self, n=2):
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList([EBlock() for _ in range(n)])
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, V)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln_f(x))


def _torch_net(n=2):
    class TBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(D, eps=1e-6)
            self.up = torch.nn.Linear(D, H)
            self.down = torch.nn.Linear(H, D, bias=False)

        def forward(self, x):
            return x + self.down(TF.gelu(self.up(self.norm(x))))

    class TNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(V, D)
            self.layers = torch.nn.ModuleList([TBlock() for _ in range(n)])
            self.ln_f = torch.nn.LayerNorm(D)
            self.head = torch.nn.Linear(D, V)

        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x)
            return self.head(self.ln_f(x))

    torch.manual_seed(0)
    net = TNet()
    with torch.no_grad():  # norms away from their trivial init
        for name, p in net.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return net


def _np_state(tmodule):
    return {k: v.detach().numpy().copy() for k, v in tmodule.state_dict().items()}


def _snapshot(model):
    return {k: np.asarray(v).copy() for k, v in model.state_dict().items()}


def _assert_state_equal(model, snap):
    state = model.state_dict()
    assert list(state) == list(snap)
    for k, v in snap.items():
        np.testing.assert_array_equal(np.asarray(state[k]), v, err_msg=k)


IDS = np.array([[1, 4, 4, 10, 0], [7, 2, 9, 3, 3]], dtype=np.int64)
TARGET = np.array([[4, 4, 10, 0, 2], [2, 9, 3, 3, 5]], dtype=np.int64)


def _loss(model, ids, target):
    return F.cross_entropy(model(ids), target)


@needs_torch
def test_state_dict_names_and_shapes_match_torch():
    ours, theirs = ENet(), _torch_net()
    state = ours.state_dict()
    assert list(state) == list(theirs.state_dict())
    for name, t in theirs.state_dict().items():
        assert tuple(state[name].shape) == tuple(t.shape), name
        assert np.asarray(state[name]).dtype == np.float32
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())
    assert len(ours.parameters()) == len(list(theirs.parameters()))
    names = [n for n, _ in ours.named_modules()]
    assert names == [n for n, _ in theirs.named_modules()]


@needs_torch
def test_torch_weights_give_torch_outputs_and_gradients():
    ours, theirs = ENet(), _torch_net()
    missing, unexpected = ours.load_state_dict(_np_state(theirs))
    assert missing == [] and unexpected == []
    ids, target = enp.asarray(IDS), enp.asarray(TARGET)
    expected = theirs(_t(IDS))
    _close(ours(ids), expected, rtol=1e-5, atol=1e-5)
    _close(ember.jit(lambda m, i: m(i))(ours, ids), expected, rtol=1e-5, atol=1e-5)

    loss_t = TF.cross_entropy(expected.permute(0, 2, 1), _t(TARGET))
    loss_t.backward()
    loss, grads = ember.value_and_grad(_loss)(ours, ids, target)
    _close(loss, loss_t, rtol=1e-5, atol=1e-6)
    assert type(grads) is ENet
    assert ember.tree.tree_structure(grads) == ember.tree.tree_structure(ours)
    g_state = grads.state_dict()
    assert list(g_state) == list(ours.state_dict())
    for name, p in theirs.named_parameters():
        _close(g_state[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    jit_grads = ember.jit(ember.grad(_loss))(ours, ids, target).state_dict()
    for name, g in g_state.items():
        _close(jit_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


@needs_torch
def test_sequential_matches_torch():
    torch.manual_seed(1)
    theirs = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.SiLU(),
                                 torch.nn.Linear(6, 3), torch.nn.Tanh())
    ours = nn.Sequential(nn.Linear(5, 6), nn.SiLU(), nn.Linear(6, 3), nn.Tanh())
    assert list(ours.state_dict()) == list(theirs.state_dict()) == \
        ["0.weight", "0.bias", "2.weight", "2.bias"]
    ours.load_state_dict(_np_state(theirs))
    x = _randn((4, 5))
    _close(ours(enp.asarray(x)), theirs(_t(x)), rtol=1e-5, atol=1e-6)
    assert len(ours) == 4 and isinstance(ours[1], nn.SiLU)
    manual = ours[3](ours[2](ours[1](ours[0](enp.asarray(x)))))
    np.testing.assert_array_equal(np.asarray(ours(enp.asarray(x))), np.asarray(manual))


@needs_torch
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
def test_norm_layers_match_torch_with_their_eps(dtype):
    # Small inputs, so that eps matters in the result.
    x = _randn((3, 10), dtype, scale=1e-2)
    w = _randn((10,), dtype)
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    ours, theirs = nn.RMSNorm(10, eps=1e-4, dtype=dtype), torch.nn.RMSNorm(10, 1e-4, dtype=tdtype)
    ln, tln = nn.LayerNorm(10, eps=1e-3, dtype=dtype), torch.nn.LayerNorm(10, 1e-3, dtype=tdtype)
    with torch.no_grad():
        theirs.weight.copy_(_t(w))
        tln.weight.copy_(_t(w))
    ours.load_state_dict({"weight": w})
    ln.load_state_dict({"weight": w, "bias": np.zeros(10, dtype)})
    _close(ours(enp.asarray(x)), theirs(_t(x)), dtype)
    _close(ln(enp.asarray(x)), tln(_t(x)), dtype)


def test_layer_defaults_follow_pytorch():
    lin = nn.Linear(16, 4, key=ember.random.key(0))
    w, b = np.asarray(lin.weight), np.asarray(lin.bias)
    assert w.shape == (4, 16) and b.shape == (4,)
    assert np.abs(w).max() <= 0.25 and np.abs(b).max() <= 0.25 and w.std() > 0.05
    assert nn.Linear(3, 2, bias=False).bias is None
    assert "bias" not in nn.Linear(3, 2, bias=False).state_dict()
    ln = nn.LayerNorm(6, elementwise_affine=False)
    assert ln.state_dict() == {}
    x = _randn((2, 6))
    np.testing.assert_allclose(np.asarray(ln(enp.asarray(x))),
                               (x - x.mean(-1, keepdims=True)) /
                               np.sqrt(x.var(-1, keepdims=True) + 1e-5), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(nn.RMSNorm(5).weight), np.ones(5, np.float32))
    emb = nn.Embedding(100, 50, key=ember.random.key(1))
    assert abs(float(np.asarray(emb.weight).std()) - 1.0) < 0.05
    assert nn.Linear(3, 2, dtype=enp.float64).weight.dtype == np.float64
    sm = nn.Softmax(dim=0)(enp.asarray(x))
    np.testing.assert_allclose(np.asarray(sm).sum(0), 1.0, rtol=1e-6)


# --- load_state_dict -------------------------------------------------------------------------

def _corrupt(model, change):
    state = {k: np.asarray(v) + 1.0 for k, v in model.state_dict().items()}
    change(state)
    return state


@pytest.mark.parametrize("case", ["shape", "missing", "unexpected", "dtype_kind"])
def test_load_state_dict_errors_leave_the_model_unchanged(case):
    model = ENet()
    before = _snapshot(model)

    def change(state):
        if case == "shape":
            state["layers.1.up.weight"] = np.zeros((H + 1, D), np.float32)
        elif case == "missing":
            del state["layers.0.down.weight"]
        elif case == "unexpected":
            state["layers.0.bogus.weight"] = np.zeros((2, 2), np.float32)
        else:
            state["head.bias"] = np.zeros((V,), np.int32)

    state = _corrupt(model, change)
    with pytest.raises(ember.EmberError) as info:
        model.load_state_dict(state)
    name = {"shape": "layers.1.up.weight", "missing": "layers.0.down.weight",
            "unexpected": "layers.0.bogus.weight", "dtype_kind": "head.bias"}[case]
    assert name in str(info.value)
    _assert_state_equal(model, before)


def test_load_state_dict_non_strict_returns_missing_and_unexpected():
    model = ENet()
    before = _snapshot(model)
    new = np.full((V, D), 0.5, np.float32)
    missing, unexpected = model.load_state_dict({"embed.weight": new, "extra.thing": new},
                                                strict=False)
    assert unexpected == ["extra.thing"]
    assert sorted(missing) == sorted(k for k in before if k != "embed.weight")
    np.testing.assert_array_equal(np.asarray(model.embed.weight), new)
    for k in missing:
        np.testing.assert_array_equal(np.asarray(model.state_dict()[k]), before[k])
    # A wrong shape is an error even when not strict, and nothing is loaded.
    with pytest.raises(ember.EmberError):
        model.load_state_dict({"embed.weight": new * 2, "head.bias": np.zeros(3, np.float32)},
                              strict=False)
    np.testing.assert_array_equal(np.asarray(model.embed.weight), new)


def test_load_state_dict_casts_float64_and_bfloat16():
    model = ENet()
    state64 = {k: RNG.standard_normal(np.shape(v)) for k, v in model.state_dict().items()}
    model.load_state_dict(state64)
    for k, v in model.state_dict().items():
        assert np.asarray(v).dtype == np.float32, k
        np.testing.assert_array_equal(np.asarray(v), state64[k].astype(np.float32))
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in state64.items()}
    model.load_state_dict(bf)
    for k, v in model.state_dict().items():
        assert np.asarray(v).dtype == np.float32, k
        np.testing.assert_array_equal(np.asarray(v), bf[k].astype(np.float32))
    out = model(enp.asarray(IDS))
    assert np.asarray(out).dtype == np.float32 and np.isfinite(np.asarray(out)).all()
    # And the other way: a float32 checkpoint into a bfloat16 model.
    model.astype(enp.bfloat16)
    model.load_state_dict(state64)
    assert np.asarray(model.head.weight).dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(model.head.weight).astype(np.float32),
                                  state64["head.weight"].astype(ml_dtypes.bfloat16)
                                  .astype(np.float32))


def test_load_state_dict_accepts_ember_arrays_and_roundtrips():
    a, b = ENet(), ENet()
    b.load_state_dict(a.state_dict())
    _assert_state_equal(b, _snapshot(a))
    np.testing.assert_array_equal(np.asarray(a(enp.asarray(IDS))), np.asarray(b(enp.asarray(IDS))))


class WithBuffers(nn.Module):
    def __init__(self):
        self.proj = nn.Linear(3, 3)
        self.register_buffer("scale", enp.asarray(np.full((3,), 2.0, np.float32)))
        self.register_buffer("cache", enp.zeros((4,)), persistent=False)

    def forward(self, x):
        return self.proj(x) * self.scale


def test_buffers_are_state_but_not_parameters():
    m = WithBuffers()
    assert [n for n, _ in m.named_parameters()] == ["proj.weight", "proj.bias"]
    assert list(m.state_dict()) == ["proj.weight", "proj.bias", "scale"]
    assert list(m.trainable_parameters()) == ["proj.weight", "proj.bias"]
    m.load_state_dict({**m.state_dict(), "scale": np.ones(3, np.float32)})
    np.testing.assert_array_equal(np.asarray(m.scale), 1.0)


# --- freezing, modes, transformations --------------------------------------------------------

def test_freeze_and_unfreeze():
    model = ENet()
    all_names = [n for n, _ in model.named_parameters()]
    assert list(model.trainable_parameters()) == all_names
    model.layers[0].freeze()
    trainable = list(model.trainable_parameters())
    assert trainable == [n for n in all_names if not n.startswith("layers.0.")]
    assert [n for n, _ in model.named_parameters()] == all_names  # still parameters
    assert list(model.state_dict()) == all_names
    assert model.num_parameters(trainable_only=True) < model.num_parameters()
    model.layers[0].unfreeze()
    assert list(model.trainable_parameters()) == all_names
    model.freeze()
    assert model.trainable_parameters() == {}
    model.unfreeze(recurse=False)  # only the root's own arrays (it has none)
    assert model.trainable_parameters() == {}
    model.unfreeze()
    model.head.freeze()
    model.freeze(recurse=False)  # the root only: submodules stay as they were
    assert list(model.trainable_parameters()) == [n for n in all_names
                                                  if not n.startswith("head.")]


class Noisy(nn.Module):
    def __init__(self):
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, key):
        return self.drop(self.lin(x), key=key)


def test_train_eval_flip_every_module_and_retrace():
    model = Noisy()
    outer = nn.Sequential(model, nn.Identity())
    assert all(m.training for m in outer.modules())
    assert outer.eval() is outer
    assert not any(m.training for m in outer.modules())
    outer.train()
    assert all(m.training for m in outer.modules())

    f = ember.jit(lambda m, x, k: m(x, k))
    x, key = enp.asarray(_randn((8, 4)) + 3.0), ember.random.key(0)
    train_out = np.asarray(f(model, x, key))
    assert (train_out == 0).any()
    f(model, x, ember.random.key(1))
    assert f.trace_count == 1
    model.eval()
    eval_out = np.asarray(f(model, x, key))
    assert f.trace_count == 2
    # float32 products summed in another order (compiled vs NumPy's BLAS): a few ulps apart.
    np.testing.assert_allclose(eval_out, np.asarray(model.lin(x)), rtol=1e-5, atol=1e-6)
    f(model, x + 1.0, key)
    assert f.trace_count == 2
    model.train()
    np.testing.assert_array_equal(np.asarray(f(model, x, key)), train_out)
    assert f.trace_count == 2  # both modes cached


def test_jit_over_module_does_not_retrace_for_new_weights():
    f = ember.jit(lambda m, i: m(i))
    a, b = ENet(), ENet()
    ids = enp.asarray(IDS)
    np.testing.assert_allclose(np.asarray(f(a, ids)), np.asarray(a(ids)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(f(b, ids)), np.asarray(b(ids)), rtol=1e-5, atol=1e-6)
    assert f.trace_count == 1
    f(ENet(n=3), ids)
    assert f.trace_count == 2
    b.layers[1].freeze()  # freezing is structure: a retrace, same numbers
    np.testing.assert_allclose(np.asarray(f(b, ids)), np.asarray(b(ids)), rtol=1e-5, atol=1e-6)
    assert f.trace_count == 3


def test_replace_does_not_mutate_and_update_does():
    model = ENet()
    before = _snapshot(model)
    zeros = enp.zeros((V, D), dtype=enp.float32)
    new = model.replace({"head.weight": zeros,
                         "layers.1.up.bias": enp.ones((H,), dtype=enp.float32)})
    _assert_state_equal(model, before)
    assert type(new) is ENet and new is not model
    np.testing.assert_array_equal(np.asarray(new.head.weight), 0)
    np.testing.assert_array_equal(np.asarray(new.layers[1].up.bias), 1)
    np.testing.assert_array_equal(np.asarray(new.embed.weight), before["embed.weight"])
    with pytest.raises(ember.EmberError):
        model.replace({"no.such.weight": zeros})
    assert model.update({"head.weight": zeros}) is model
    np.testing.assert_array_equal(np.asarray(model.head.weight), 0)


def test_astype_casts_floats_only():
    model = WithBuffers()
    model.register_buffer("steps", enp.asarray(np.arange(3, dtype=np.int32)))
    x = _randn((2, 3))
    ref = np.asarray(model(enp.asarray(x)))
    assert model.astype(enp.float64) is model
    assert model.proj.weight.dtype == np.float64 and model.scale.dtype == np.float64
    assert model.steps.dtype == np.int32
    out = model(enp.asarray(x.astype(np.float64)))
    assert np.asarray(out).dtype == np.float64
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)
    model.astype(enp.bfloat16)
    assert np.asarray(model.proj.weight).dtype == ml_dtypes.bfloat16


def test_nn_value_and_grad_only_trainable():
    model = ENet()
    model.embed.freeze()
    model.layers[1].freeze()
    ids, target = enp.asarray(IDS), enp.asarray(TARGET)
    loss, grads = nn.value_and_grad(_loss)(model, ids, target)
    assert isinstance(grads, dict)
    assert sorted(grads) == sorted(model.trainable_parameters())
    assert not any(k.startswith(("embed.", "layers.1.")) for k in grads)
    full_loss, full = ember.value_and_grad(_loss)(model, ids, target)
    np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-6)
    full = full.state_dict()
    for k, g in grads.items():
        assert g.shape == model.state_dict()[k].shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(full[k]), rtol=1e-5, atol=1e-7,
                                   err_msg=k)
    # Also under jit, and with has_aux.
    jitted = ember.jit(nn.value_and_grad(_loss))
    jl, jg = jitted(model, ids, target)
    np.testing.assert_allclose(float(jl), float(loss), rtol=1e-5)
    for k in grads:
        np.testing.assert_allclose(np.asarray(jg[k]), np.asarray(grads[k]), rtol=1e-4,
                                   atol=1e-6)

    def with_aux(m, i, t):
        logits = m(i)
        return F.cross_entropy(logits, t), logits

    (l2, logits), g2 = nn.value_and_grad(with_aux, has_aux=True)(model, ids, target)
    np.testing.assert_allclose(float(l2), float(loss), rtol=1e-6)
    assert logits.shape == (2, 5, V) and sorted(g2) == sorted(grads)


def test_repr_names_the_layers():
    text = repr(ENet())
    assert "ENet(" in text and "(layers): ModuleList" in text
    assert "Linear(in_features=8, out_features=12, bias=True)" in text
    assert "Embedding(11, 8)" in text
    repr(nn.Sequential(nn.GELU(), nn.Dropout(0.1), nn.Identity()))
    repr(apply_lora_model())


def test_unhashable_static_attribute_is_a_clear_error():
    class Bad(nn.Module):
        def __init__(self):
            self.lin = nn.Linear(2, 2)
            self.sizes = [1, 2]

        def forward(self, x):
            return self.lin(x)

    with pytest.raises(ember.EmberError, match="sizes"):
        ember.jit(lambda m, x: m(x))(Bad(), enp.ones((1, 2)))


# --- LoRA ------------------------------------------------------------------------------------

class Attn(nn.Module):
    def __init__(self, d=6):
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d)
        self.gate = nn.Linear(d, d)

    def forward(self, x):
        return self.o_proj(F.silu(self.gate(x)) * self.q_proj(x) + self.v_proj(x))


class AttnStack(nn.Module):
    def __init__(self):
        self.layers = nn.ModuleList([Attn(), Attn()])
        self.norm = nn.RMSNorm(6)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def apply_lora_model(**kw):
    return nn.apply_lora(AttnStack(), rank=3, alpha=6.0, targets=("q_proj", "v_proj"),
                         key=ember.random.key(5), **kw)


def test_apply_lora_keeps_outputs_and_trains_only_adapters():
    model = AttnStack()
    base_names = list(model.state_dict())
    x = enp.asarray(_randn((4, 6)))
    before = np.asarray(model(x))
    assert nn.apply_lora(model, rank=3, alpha=6.0, targets=("q_proj", "v_proj"),
                         key=ember.random.key(5)) is model
    np.testing.assert_array_equal(np.asarray(model(x)), before)
    assert type(model.layers[0].q_proj) is nn.LoRALinear
    assert type(model.layers[0].o_proj) is nn.Linear
    expected = [f"layers.{i}.{p}.lora_{m}" for i in range(2) for p in ("q_proj", "v_proj")
                for m in "AB"]
    assert list(model.trainable_parameters()) == expected
    state = model.state_dict()
    assert set(base_names) <= set(state) and set(state) - set(base_names) == set(expected)
    assert state["layers.0.q_proj.lora_A"].shape == (3, 6)
    assert state["layers.0.q_proj.lora_B"].shape == (6, 3)
    np.testing.assert_array_equal(np.asarray(state["layers.1.v_proj.lora_B"]), 0)
    assert np.abs(np.asarray(state["layers.1.v_proj.lora_A"])).max() > 0
    # The base checkpoint still loads (non-strict: the adapters are not in it).
    base = {k: np.asarray(v) for k, v in AttnStack().state_dict().items()}
    missing, unexpected = model.load_state_dict(base, strict=False)
    assert sorted(missing) == sorted(expected) and unexpected == []


@needs_torch
def test_lora_gradients_match_torch():
    model = apply_lora_model()
    lora = model.layers[0].q_proj
    x = _randn((5, 6))
    w = _randn((5, 6))
    _, grads = nn.value_and_grad(
        lambda m, a: enp.sum(m.layers[0].q_proj(a) * enp.asarray(w)))(model, enp.asarray(x))
    assert sorted(grads) == sorted(model.trainable_parameters())

    def torch_grads(a_np, b_np):
        a, b = _t(a_np, grad=True), _t(b_np, grad=True)
        y = TF.linear(_t(x), _t(lora.weight), _t(lora.bias)) + (_t(x) @ a.T @ b.T) * (6.0 / 3)
        (y * _t(w)).sum().backward()
        return a.grad, b.grad

    ga, gb = torch_grads(np.asarray(lora.lora_A), np.asarray(lora.lora_B))
    _close(grads["layers.0.q_proj.lora_B"], gb, rtol=1e-5, atol=1e-6)
    _close(grads["layers.0.q_proj.lora_A"], ga)  # zero while B is zero
    assert np.abs(gb.numpy()).max() > 0
    # Non-zero adapters: both gradients.
    b_new = _randn((6, 3))
    model.update({"layers.0.q_proj.lora_B": enp.asarray(b_new)})
    _, grads = nn.value_and_grad(
        lambda m, a: enp.sum(m.layers[0].q_proj(a) * enp.asarray(w)))(model, enp.asarray(x))
    ga, gb = torch_grads(np.asarray(lora.lora_A), b_new)
    _close(grads["layers.0.q_proj.lora_A"], ga, rtol=1e-5, atol=1e-6)
    _close(grads["layers.0.q_proj.lora_B"], gb, rtol=1e-5, atol=1e-6)
    assert grads["layers.1.q_proj.lora_B"].shape == (6, 3)


def test_merge_lora_matches_unmerged_model():
    model = apply_lora_model()
    x = enp.asarray(_randn((4, 6)))
    base_out = np.asarray(model(x))
    base_names = list(AttnStack().state_dict())
    model.update({k: enp.asarray(_randn(v.shape, scale=0.5))
                  for k, v in model.trainable_parameters().items()})
    unmerged = np.asarray(model(x))
    assert not np.allclose(unmerged, base_out, atol=1e-3)  # the adapters do something
    assert nn.merge_lora(model) is model
    assert type(model.layers[0].q_proj) is nn.Linear
    assert type(model.layers[1].v_proj) is nn.Linear
    assert list(model.state_dict()) == base_names
    assert model.layers[1].v_proj.bias is None
    np.testing.assert_allclose(np.asarray(model(x)), unmerged, rtol=1e-5, atol=1e-5)
    # The merged weights are the (frozen) base weights: apply_lora froze the whole model.
    assert model.trainable_parameters() == {}


def test_lora_layers_inherit_the_mode():
    model = AttnStack().eval()
    nn.apply_lora(model, rank=2, targets=("q_proj",), key=ember.random.key(0))
    assert not any(m.training for m in model.modules())
    nn.merge_lora(model)
    assert not any(m.training for m in model.modules())
    assert model.train() is model and all(m.training for m in model.modules())


def test_lora_under_jit_and_errors():
    model = apply_lora_model()
    x = enp.asarray(_randn((4, 6)))
    np.testing.assert_allclose(np.asarray(ember.jit(lambda m, a: m(a))(model, x)),
                               np.asarray(model(x)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ember.EmberError):
        nn.apply_lora(AttnStack(), targets=("k_proj",))
    with pytest.raises(ember.EmberError):
        nn.apply_lora(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ember.EmberError):
        nn.LoRALinear(nn.Linear(2, 2), rank=0)


# --- errors for bad input --------------------------------------------------------------------

def test_linear_wrong_features_is_a_shape_error():
    layer = nn.Linear(4, 3)
    x = enp.ones((2, 5))
    for call in (layer, ember.jit(lambda a: layer(a))):
        with pytest.raises(ember.ShapeError) as info:
            call(x)
        msg = str(info.value)
        assert "linear" in msg and "(2, 5)" in msg and "(3, 4)" in msg
        assert "test_nn.py" in msg  # names the user's line


def test_cross_entropy_bad_input():
    logits = enp.ones((2, 3, 5))
    with pytest.raises(ember.ShapeError, match="cross_entropy"):
        F.cross_entropy(logits, enp.zeros((2, 4), dtype=enp.int64))
    with pytest.raises(ember.ShapeError):
        F.cross_entropy(logits, enp.zeros((6,), dtype=enp.int64))
    with pytest.raises(ember.EmberError):
        F.cross_entropy(logits, enp.zeros((2, 3)))
    with pytest.raises(ember.EmberError):
        F.cross_entropy(logits, enp.zeros((2, 3), dtype=enp.int64), reduction="avg")


def test_sdpa_bad_input():
    q, k, v = (enp.asarray(t) for t in _qkv(1, 4, 3, 5, 5, 8))
    with pytest.raises(ember.ShapeError, match="scaled_dot_product_attention"):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # 4 % 3 != 0
    q, k, v = (enp.asarray(t) for t in _qkv(1, 4, 2, 5, 5, 8))
    with pytest.raises(ember.ShapeError, match="enable_gqa"):
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ember.ShapeError):
        F.scaled_dot_product_attention(q, k[..., :4], v, enable_gqa=True)
    with pytest.raises(ember.ShapeError):
        F.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(ember.ShapeError):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True,
                                       attn_mask=enp.ones((1, 3, 5, 5), dtype=enp.bool_))


def test_gelu_and_layer_norm_bad_arguments():
    with pytest.raises(ember.EmberError, match="approximate"):
        F.gelu(enp.ones(3), approximate="fast")
    with pytest.raises(ember.ShapeError, match="layer_norm"):
        F.layer_norm(enp.ones((2, 3)), 4)


def test_embedding_rejects_out_of_range_ids_eagerly():
    emb = nn.Embedding(5, 3)
    with pytest.raises(ember.EmberError, match=r"embedding: ids must be in \[0, 5\), got values "
                                               r"from 0 to 7"):
        emb(enp.asarray([0, 7]))


@needs_torch
def test_load_state_dict_accepts_torch_tensors():
    import torch

    lin = nn.Linear(3, 2)
    ref = torch.nn.Linear(3, 2)
    lin.load_state_dict(ref.state_dict())
    np.testing.assert_array_equal(np.asarray(lin.weight), ref.weight.detach().numpy())


def test_initialisers_follow_pytorch_bounds():
    key = ember.random.key(0)
    w = np.asarray(nn.init.xavier_uniform((64, 32), gain=2.0, key=key))
    bound = 2.0 * math.sqrt(6.0 / (64 + 32))
    assert w.dtype == np.float32 and np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.9 * bound  # really uniform over the whole range
    k = np.asarray(nn.init.kaiming_uniform((16, 100), key=key))
    assert np.abs(k).max() <= 0.1 and np.abs(k).max() > 0.09
    n = np.asarray(nn.init.normal((200, 200), std=0.02, key=key))
    assert abs(n.std() - 0.02) < 0.001
    with nn.init.skip_init():
        assert not np.asarray(nn.init.normal((3, 3), key=key)).any()
