"""``ember.nn.functional``: the stateless operations behind the layers, PyTorch's names.

Everything here is written with ``ember.numpy`` (attention with its own primitive), so it runs
eagerly, under ``jit`` and under every transformation, and differentiates without extra rules.
Shapes and argument names follow ``torch.nn.functional`` (attention takes
``[..., heads, length, head_dim]``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import ember.numpy as enp
from ember import lax, random
from ember.core.array import Tracer
from ember.errors import DTypeError, EmberValueError, ShapeError, op_error
from ember.nn.quantized import QuantizedWeight
from ember.numpy import special
from ember.ops.attention import attention
from ember.transforms.autodiff import stop_gradient

__all__ = ["linear", "embedding", "relu", "silu", "gelu", "sigmoid", "tanh", "softmax",
           "log_softmax", "dropout", "rms_norm", "layer_norm", "cross_entropy",
           "scaled_dot_product_attention", "rope_inv_freq", "rope_cos_sin", "apply_rotary"]


def linear(x: Any, weight: Any, bias: Any = None) -> Any:
    """``x @ weight.T + bias`` with PyTorch's ``[out_features, in_features]`` weight layout."""
    if x.shape[-1] != weight.shape[-1]:
        raise op_error(ShapeError, "linear", f"input {x.shape} has {x.shape[-1]} features, "
                       f"weight {weight.shape} expects {weight.shape[-1]}")
    if isinstance(weight, QuantizedWeight):  # packed blocks: one quant_matmul, no float copy
        return weight.linear(x, bias)
    x, weight = enp.asarray(x), enp.asarray(weight)
    if x.dtype != weight.dtype:
        common = enp.result_type(x, weight)
        x, weight = x.astype(common), weight.astype(common)
    # Contract the weight's input axis directly: no transposed copy of the weight in the graph.
    y = lax.dot_general(x, weight, (((x.ndim - 1,), (1,)), ((), ())))
    return y if bias is None else y + bias


def embedding(ids: Any, weight: Any) -> Any:
    """Rows of ``weight`` for integer ``ids`` of any shape.

    Out-of-range ids follow the rule of every read in ember: concrete ids (also constants such
    as ``enp.arange(T)`` inside ``jit``) are checked on the host and raise; ids only known when
    the compiled program runs are clamped to ``[0, num_embeddings)``.
    """
    if isinstance(weight, QuantizedWeight):  # gather packed rows, dequantise only those
        return weight.decode_rows(embedding(ids, weight.packed))
    ids = enp.asarray(ids)
    if not enp.isdtype(ids.dtype, "integral"):
        raise op_error(EmberValueError, "embedding", f"ids must be integers, got {ids.dtype}")
    rows = weight.shape[0]
    if isinstance(ids, Tracer):
        # Clamp rather than let the gather wrap negative ids to the end of the table.
        return enp.take(weight, enp.clip(ids, 0, rows - 1), axis=0)
    host = ids.to_numpy()  # read on the host: enp.min here would be traced under jit
    if host.size and (host.min() < 0 or host.max() >= rows):
        raise op_error(EmberValueError, "embedding", f"ids must be in [0, {rows}), got values "
                       f"from {host.min()} to {host.max()}")
    return enp.take(weight, ids, axis=0)


def relu(x: Any) -> Any:
    return enp.maximum(x, 0)


def sigmoid(x: Any) -> Any:
    return special.expit(x)


def tanh(x: Any) -> Any:
    return enp.tanh(x)


def silu(x: Any) -> Any:
    """``x * sigmoid(x)`` (a.k.a. swish), the gate activation of Llama's MLP."""
    return x * special.expit(x)


def gelu(x: Any, approximate: str = "none") -> Any:
    """GELU, exact (``erf``) or PyTorch's ``approximate="tanh"`` form."""
    if approximate == "tanh":
        return 0.5 * x * (1 + enp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))
    if approximate != "none":
        raise op_error(EmberValueError, "gelu", f"approximate must be 'none' or 'tanh', "
                       f"got {approximate!r}")
    return 0.5 * x * (1 + special.erf(x * (1 / math.sqrt(2))))


def softmax(x: Any, axis: int = -1) -> Any:
    """Softmax along ``axis``; the max is subtracted first (and not differentiated: it cancels,
    and cutting the gradient before the max spares the backward pass a tie mask)."""
    x = enp.asarray(x)
    shifted = x - enp.max(stop_gradient(x), axis=axis, keepdims=True)
    e = enp.exp(shifted)
    return e * (1 / enp.sum(e, axis=axis, keepdims=True))  # one small divide, not a big one


def log_softmax(x: Any, axis: int = -1) -> Any:
    return special.log_softmax(x, axis=axis)


def dropout(x: Any, p: float = 0.5, training: bool = True, key: Any = None) -> Any:
    """Zero elements with probability ``p`` and scale the rest by ``1/(1-p)``.

    Without ``key`` the mask comes from the global generator (``ember.random.seed``), also
    under ``jit``, which threads that generator through the compiled program: each call of a
    jitted training step draws a fresh mask. Pass ``key`` for masks you control, and inside
    ``lax`` loop bodies or ``checkpoint``, where the global generator cannot be used.
    """
    if not 0.0 <= p <= 1.0:
        raise op_error(EmberValueError, "dropout", f"p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return enp.zeros_like(x)
    keep = random.bernoulli(random.next_key() if key is None else key, 1.0 - p, x.shape)
    return enp.where(keep, x / (1.0 - p), enp.zeros_like(x))


def rms_norm(x: Any, weight: Any = None, eps: float = 1e-6) -> Any:
    """Root-mean-square normalisation, computed in at least float32 (as Hugging Face Llama)."""
    x = enp.asarray(x)
    compute = enp.promote_types(x.dtype, enp.float32)
    h = x.astype(compute)
    h = h * (1 / enp.sqrt(enp.mean(h * h, axis=-1, keepdims=True) + eps))
    h = h.astype(x.dtype)
    return h if weight is None else weight * h


def layer_norm(x: Any, normalized_shape: int | tuple[int, ...], weight: Any = None,
               bias: Any = None, eps: float = 1e-5) -> Any:
    """Normalise over the trailing ``normalized_shape`` axes (biased variance, as PyTorch)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[len(x.shape) - len(shape):]) != shape:
        raise op_error(ShapeError, "layer_norm", f"input {x.shape} does not end with "
                       f"normalized_shape {shape}")
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    mean = enp.mean(x, axis=axes, keepdims=True)
    centered = x - mean
    var = enp.mean(centered * centered, axis=axes, keepdims=True)
    y = centered / enp.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def cross_entropy(logits: Any, target: Any, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean") -> Any:
    """Cross-entropy of class ``logits [..., C]`` against integer ``target [...]``.

    PyTorch's semantics, with the classes on the last axis (the layout of language-model
    logits): ``ignore_index`` targets contribute nothing and are left out of the mean;
    ``label_smoothing`` mixes in the uniform distribution.
    """
    logits, target = enp.asarray(logits), enp.asarray(target)
    if reduction not in ("mean", "sum", "none"):
        raise op_error(EmberValueError, "cross_entropy", f"reduction must be 'mean', 'sum' or "
                       f"'none', got {reduction!r}")
    if tuple(logits.shape[:-1]) != tuple(target.shape):
        raise op_error(ShapeError, "cross_entropy", f"logits {logits.shape} need targets of "
                       f"shape {logits.shape[:-1]}, got {target.shape}")
    if not enp.isdtype(target.dtype, "integral"):
        raise op_error(EmberValueError, "cross_entropy", f"targets must be integer class "
                       f"indices, got {target.dtype}")
    # -log softmax(x)[t] = logsumexp(x) - x[t]: the fewest passes over [..., C], which for a
    # language model's logits is the biggest array of the whole step.
    lse = special.logsumexp(logits, axis=-1)
    valid = target != ignore_index
    safe = enp.where(valid, target, 0)
    nll = lse - enp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    if label_smoothing:
        smooth = lse - enp.mean(logits, axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    nll = enp.where(valid, nll, enp.zeros_like(nll))
    if reduction == "none":
        return nll
    total = enp.sum(nll)
    if reduction == "sum":
        return total
    return total / enp.sum(valid).astype(nll.dtype)


def scaled_dot_product_attention(query: Any, key: Any, value: Any, attn_mask: Any = None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False,
                                 dropout_key: Any = None) -> Any:
    """Attention ``softmax(q k^T * scale + mask) v`` over ``[..., heads, length, head_dim]``.

    ``attn_mask`` is boolean (True = may attend) or additive, broadcast to
    ``[..., heads, L, S]``; ``is_causal`` masks the upper triangle (top-left aligned, as
    PyTorch). With ``enable_gqa`` the query heads are grouped over fewer key/value heads
    (query head ``h`` reads key/value head ``h // (Hq // Hkv)``), and keys and values are never
    copied. A query row that may attend to no key gives zeros (PyTorch's math kernel gives NaN).

    It is one ``attention`` primitive (:func:`ember.ops.attention.attention`): computed in
    tiles, never building the ``[L, S]`` scores, and differentiated by one fused backward
    primitive. With ``dropout_p > 0`` the attention weights must exist to be dropped, so that
    case runs the decomposed formula, which materialises them.
    """
    q, k, v = enp.asarray(query), enp.asarray(key), enp.asarray(value)
    op = "scaled_dot_product_attention"
    if q.ndim < 3 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise op_error(ShapeError, op, f"query {q.shape}, key {k.shape} and value {v.shape} "
                       f"must all be [..., heads, length, dim]")
    hq, length, dim = q.shape[-3:]
    hk, src = k.shape[-3], k.shape[-2]
    if k.shape[-1] != dim or v.shape[-3:-1] != (hk, src):
        raise op_error(ShapeError, op, f"query {q.shape}, key {k.shape} and value {v.shape} "
                       f"do not fit together")
    if hq != hk and not (enable_gqa and hk and hq % hk == 0):
        raise op_error(ShapeError, op, f"{hq} query heads and {hk} key/value heads need "
                       f"enable_gqa=True and {hq} divisible by {hk}")
    dtype = enp.result_type(q, k, v)
    if not enp.isdtype(dtype, "real floating"):
        raise op_error(DTypeError, op, f"needs floating-point query, key and value, got "
                       f"{q.dtype}, {k.dtype} and {v.dtype}")
    try:
        batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except ValueError:
        raise op_error(ShapeError, op, f"the leading axes of query {q.shape}, key {k.shape} "
                       f"and value {v.shape} do not broadcast together") from None
    q, k, v = (_leading(x.astype(dtype), batch) for x in (q, k, v))
    mask = None if attn_mask is None else \
        _attention_mask(attn_mask, dtype, (*batch, hq, length, src))
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if dropout_p:
        return _decomposed_attention(q, k, v, mask, is_causal, scale, dropout_p, dropout_key)
    out, _ = attention(q, k, v, scale=scale, causal=is_causal, mask=mask)
    return out


def _leading(x: Any, batch: tuple[int, ...]) -> Any:
    """``x`` broadcast to the leading axes ``batch`` (untouched when it has them)."""
    return x if tuple(x.shape[:-3]) == batch else enp.broadcast_to(x, (*batch, *x.shape[-3:]))


def _attention_mask(mask: Any, dtype: Any, scores: tuple[int, ...]) -> Any:
    """``mask`` with one axis per axis of the scores (each 1 or full): boolean, or additive in
    the inputs' dtype."""
    mask = enp.asarray(mask)
    if mask.ndim > len(scores):
        raise op_error(ShapeError, "scaled_dot_product_attention", f"attn_mask {mask.shape} "
                       f"has more dimensions than the scores {scores}")
    mask = mask.reshape((1,) * (len(scores) - mask.ndim) + tuple(mask.shape))
    if any(m not in (1, n) for m, n in zip(mask.shape, scores)):
        raise op_error(ShapeError, "scaled_dot_product_attention", f"attn_mask "
                       f"{mask.shape} does not broadcast to the scores {scores}")
    return mask if mask.dtype == enp.bool_ else mask.astype(dtype)


def _decomposed_attention(q: Any, k: Any, v: Any, mask: Any, is_causal: bool, scale: float,
                          dropout_p: float, dropout_key: Any) -> Any:
    """Attention as matmuls and a softmax, the ``[L, S]`` weights materialised (for dropout)."""
    *batch, hq, length, dim = q.shape
    hk, src = k.shape[-3], k.shape[-2]
    group = hq // hk
    # [..., Hk, G*L, D] @ [..., Hk, D, S]: one batched matmul per key/value head.
    qg = (q * scale).reshape(*batch, hk, group * length, dim)
    scores = enp.matmul(qg, enp.swapaxes(k, -1, -2)).reshape(*batch, hk, group, length, src)
    allowed, bias = None, None
    if is_causal:
        allowed = enp.asarray(np.tril(np.ones((length, src), dtype=bool)))
    if mask is not None:
        grouped = _group_heads(mask, hk, group)
        if mask.dtype == enp.bool_:
            allowed = grouped if allowed is None else enp.logical_and(allowed, grouped)
        else:
            bias = grouped
    if allowed is not None:
        # A large finite negative instead of -inf: a fully masked row gives finite garbage
        # that is ignored, not NaNs that poison gradients. Built in the scores' dtype.
        low = enp.asarray(float(enp.finfo(scores.dtype).min) / 2, dtype=scores.dtype)
        masked = enp.where(allowed, enp.zeros((), scores.dtype), low)
        bias = masked if bias is None else bias + masked
    if bias is not None:
        scores = scores + bias
    weights = dropout(softmax(scores, axis=-1), dropout_p, key=dropout_key)
    out = enp.matmul(weights.reshape(*batch, hk, group * length, src), v)
    return out.reshape(*batch, hq, length, v.shape[-1])


def _group_heads(mask: Any, hk: int, group: int) -> Any:
    """A mask ``[..., Hq or 1, L, S]`` as ``[..., Hk or 1, G or 1, L, S]``."""
    heads = (hk, group) if mask.shape[-3] != 1 else (1, 1)
    return mask.reshape(*mask.shape[:-3], *heads, *mask.shape[-2:])


def rope_inv_freq(head_dim: int, base: float = 10000.0, scaling: dict[str, Any] | None = None
                  ) -> np.ndarray:
    """Rotary inverse frequencies ``base^(-2i/d)``, with Hugging Face's ``rope_scaling``.

    Supported: ``None``/``default``, ``linear`` (positions divided by ``factor``) and
    ``llama3`` (long wavelengths divided by ``factor``, short ones kept, a smooth blend in
    between). Computed in float64 with NumPy: they are constants of the model.
    """
    inv = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv / factor + smooth * inv
        return np.where(wavelen > old / low, inv / factor,
                        np.where(wavelen < old / high, inv, blended))
    raise op_error(EmberValueError, "rope_inv_freq", f"unsupported rope scaling type {kind!r} "
                   f"(supported: default, linear, llama3)")


def rope_cos_sin(positions: Any, inv_freq: Any, dtype: Any = enp.float32) -> tuple[Any, Any]:
    """``cos`` and ``sin`` of ``positions[..., None] * inv_freq``: ``[..., head_dim // 2]``."""
    angles = enp.asarray(positions).astype(enp.float32)[..., None] * \
        enp.asarray(inv_freq, dtype=enp.float32)
    return enp.cos(angles).astype(dtype), enp.sin(angles).astype(dtype)


def apply_rotary(x: Any, cos: Any, sin: Any, interleaved: bool = False) -> Any:
    """Rotate pairs of features of ``x [..., head_dim]`` by the angles behind ``cos``/``sin``.

    ``interleaved=False`` pairs feature ``i`` with ``i + d/2`` (Hugging Face's rotate-half
    layout); ``interleaved=True`` pairs ``2i`` with ``2i + 1`` (GGUF/Meta's layout). ``cos`` and
    ``sin`` are ``[..., head_dim // 2]`` and broadcast against ``x``'s leading axes.
    """
    half = x.shape[-1] // 2
    if interleaved:
        pairs = x.reshape(*x.shape[:-1], half, 2)
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = enp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return out.reshape(x.shape)
    x1, x2 = x[..., :half], x[..., half:]
    return enp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
