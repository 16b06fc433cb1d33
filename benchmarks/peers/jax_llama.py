"""The Llama architecture in plain JAX, as a benchmark peer (XLA on the CPU).

Written for ``benchmarks/llama.py`` only: the same weights as ember's model (Hugging Face
names and layouts, taken from ``model.state_dict()``), a static KV cache, and three jitted
programs: a single-token decode step with the cache donated, a forward pass over a whole
prompt (every position's logits), and a training step (loss, gradients and AdamW in one
program). It is what a careful JAX user would write, not a port of ember's code.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def params_from(state: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Stack the per-layer weights so one ``lax.scan``-free Python loop indexes them."""
    host = {k: jnp.asarray(np.asarray(v)) for k, v in state.items()}
    layer = lambda i, name: host[f"model.layers.{i}.{name}.weight"]  # noqa: E731
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
             "post_attention_layernorm"]
    return {"embed": host["model.embed_tokens.weight"], "norm": host["model.norm.weight"],
            "layers": [{n.split(".")[-1]: layer(i, n) for n in names} for i in range(n_layers)]}


def _rms_norm(x, w, eps):
    var = jnp.mean(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + eps) * w


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _cos_sin(positions, head_dim, theta):
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    angles = positions[..., None].astype(jnp.float32) * inv
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]  # [B, 1, T, D]


def forward(params, ids, positions, cache, cache_pos, cfg):
    """Logits ``[B, T, V]`` and the updated cache (``None`` without one)."""
    b, t = ids.shape
    hq, hk, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = params["embed"][ids]
    cos, sin = _cos_sin(positions, hd, cfg.rope_theta)
    src = t if cache is None else cache[0].shape[3]
    query_pos = jnp.arange(t)[:, None] + cache_pos
    mask = jnp.arange(src)[None, :] <= query_pos  # [T, S]
    new_k, new_v = [], []
    for i, p in enumerate(params["layers"]):
        h = _rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps)
        q = (h @ p["q_proj"].T).reshape(b, t, hq, hd).transpose(0, 2, 1, 3)
        k = (h @ p["k_proj"].T).reshape(b, t, hk, hd).transpose(0, 2, 1, 3)
        v = (h @ p["v_proj"].T).reshape(b, t, hk, hd).transpose(0, 2, 1, 3)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache[0][i], k, (0, 0, cache_pos, 0))
            v = jax.lax.dynamic_update_slice(cache[1][i], v, (0, 0, cache_pos, 0))
            new_k.append(k)
            new_v.append(v)
        qg = q.reshape(b, hk, hq // hk * t, hd)
        scores = (qg @ k.transpose(0, 1, 3, 2)).reshape(b, hk, hq // hk, t, src) / np.sqrt(hd)
        scores = jnp.where(mask, scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1).reshape(b, hk, hq // hk * t, src)
        attn = (weights @ v).reshape(b, hq, t, hd).transpose(0, 2, 1, 3).reshape(b, t, hq * hd)
        x = x + attn @ p["o_proj"].T
        h = _rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps)
        x = x + (jax.nn.silu(h @ p["gate_proj"].T) * (h @ p["up_proj"].T)) @ p["down_proj"].T
    logits = _rms_norm(x, params["norm"], cfg.rms_norm_eps) @ params["embed"].T
    return logits, (None if cache is None else (jnp.stack(new_k), jnp.stack(new_v)))


class JaxLlama:
    """The three jitted programs, built once from ember's weights."""

    name = f"JAX {jax.__version__}"

    def __init__(self, state: dict[str, Any], cfg: Any):
        self.cfg = cfg
        self.params = params_from(state, cfg.num_hidden_layers)

        def step(params, cache, token, pos):
            logits, cache = forward(params, token, pos[None, None], cache, pos, cfg)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

        self._step = jax.jit(step, donate_argnums=1)
        self._prefill = jax.jit(lambda params, ids: forward(
            params, ids, jnp.arange(ids.shape[1])[None], None, 0, cfg)[0])

        def loss(params, ids):
            logits = forward(params, ids, jnp.arange(ids.shape[1])[None], None, 0, cfg)[0]
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

        def train_step(params, m, v, count, ids, lr=1e-5, b1=0.9, b2=0.999, eps=1e-8):
            value, grads = jax.value_and_grad(loss)(params, ids)
            norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
            scale = jnp.minimum(1.0, 1.0 / (norm + 1e-6))
            count = count + 1
            m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g * scale, m, grads)
            v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * (g * scale) ** 2, v, grads)
            c1, c2 = 1 - b1 ** count, 1 - b2 ** count
            params = jax.tree.map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps),
                                  params, m, v)
            return value, params, m, v, count

        self._train = jax.jit(train_step, donate_argnums=(0, 1, 2))

    def decode(self, prompt: list[int], new_tokens: int) -> float:
        """Seconds for ``new_tokens`` compiled single-token greedy steps after ``prompt`` (fed
        through the same step first, untimed), as targets.md measures JAX."""
        cfg = self.cfg
        total = len(prompt) + new_tokens
        shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, total, cfg.head_dim)
        cache = (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
        for pos, tok in enumerate(prompt):
            token, cache = self._step(self.params, cache, jnp.array([[tok]], jnp.int32),
                                      jnp.int32(pos))
        token.block_until_ready()
        start = time.perf_counter()
        for i in range(new_tokens):
            token, cache = self._step(self.params, cache, token[:, None],
                                      jnp.int32(len(prompt) + i))
        token.block_until_ready()
        return time.perf_counter() - start

    def prefill(self, ids: np.ndarray) -> float:
        start = time.perf_counter()
        self._prefill(self.params, jnp.asarray(ids)).block_until_ready()
        return time.perf_counter() - start

    def train_setup(self) -> None:
        zeros = lambda: jax.tree.map(jnp.zeros_like, self.params)  # noqa: E731
        self._state = [self.params, zeros(), zeros(), jnp.int32(0)]

    def train(self, batch: np.ndarray) -> float:
        start = time.perf_counter()
        value, *self._state = self._train(*self._state, jnp.asarray(batch))
        value.block_until_ready()
        return time.perf_counter() - start
