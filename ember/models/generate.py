"""Text generation for causal language models with a preallocated KV cache.

Two jitted functions do the work, each traced once per shape and reused across calls and
positions: ``_extend`` runs some tokens per sequence at a traced ``cache_pos`` and writes their
keys and values into the cache (the prompt in chunks, then one token per step), and ``_sample``
turns logits into tokens (greedy, temperature, top-k, top-p, repetition penalty) on the device.
The cache is donated to ``_extend``, so its buffers are updated in place rather than
reallocated per token. Reading the prompt in chunks bounds the attention scores' memory and
shows progress on a long prompt.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import ember.numpy as enp
from ember import random
from ember.errors import EmberValueError
from ember.io.tokenizer import StreamDecoder
from ember.lax import top_k as _top_k
from ember.models.llama import KVCache, LlamaForCausalLM
from ember.transforms.jit import jit

__all__ = ["SamplingConfig", "generate", "generate_chat", "generate_ids", "prompt_ids"]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked. ``temperature == 0`` is greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        # ``not x >= 0`` rather than ``x < 0``: NaN fails every comparison and must be refused
        # (it would sample nothing).
        if not 0 <= self.temperature < math.inf:
            raise EmberValueError(f"generate: temperature must be a finite number >= 0, got "
                                  f"{self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise EmberValueError(f"generate: top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise EmberValueError(f"generate: top_k must be >= 0, got {self.top_k}")
        if not 0 < self.repetition_penalty < math.inf:
            raise EmberValueError(f"generate: repetition_penalty must be a finite number > 0, "
                                  f"got {self.repetition_penalty}")


def _extend_fn(model: LlamaForCausalLM, cache: KVCache, ids: Any, positions: Any,
               cache_pos: Any, key_mask: Any) -> tuple[Any, KVCache]:
    """Run ``ids [batch, length]`` written at ``cache_pos``: last logits and the new cache."""
    logits, cache = model(ids, positions=positions, attention_mask=key_mask, cache=cache,
                          cache_pos=cache_pos, logits_to_keep=1)
    return logits[:, -1].astype(enp.float32), cache


_extend = jit(_extend_fn, donate_argnums=1)
# Prompt tokens per prefill call: a few seconds' work on a CPU, so a long prompt shows progress.
PREFILL_CHUNK = 512


def _prefill(model: LlamaForCausalLM, cache: KVCache, ids: np.ndarray, positions: np.ndarray,
             key_mask: Any) -> tuple[Any, KVCache]:
    """Fill the cache with the (left-padded) prompts, ``PREFILL_CHUNK`` tokens at a time.

    The first chunk takes the remainder, so every other chunk has the same shape and one trace
    serves them all.
    """
    length = ids.shape[1]
    first = length % PREFILL_CHUNK or min(length, PREFILL_CHUNK)
    starts = [0, *range(first, length, PREFILL_CHUNK)]
    with tqdm(total=length, desc="reading the prompt", unit="token", leave=False,
              disable=len(starts) < 2) as bar:
        for start, end in zip(starts, [*starts[1:], length]):
            logits, cache = _extend(model, cache, ids[:, start:end], positions[:, start:end],
                                    np.int32(start), key_mask)
            bar.update(end - start)
    return logits, cache


def _sample_fn(logits: Any, seen: Any, key: Any, step: Any, temperature: Any, top_p: Any,
               penalty: Any, greedy: bool, top_k: int, use_top_p: bool) -> Any:
    """Next token ids ``[batch]`` from ``logits [batch, vocab]``."""
    # Hugging Face's repetition penalty: seen tokens' logits move towards "less likely".
    penalised = enp.where(logits > 0, logits / penalty, logits * penalty)
    logits = enp.where(seen, penalised, logits)
    if greedy:
        return enp.argmax(logits, axis=-1).astype(enp.int32)
    logits = logits / temperature
    floor = enp.finfo(enp.float32).min
    if top_k:
        kth = _top_k(logits, top_k)[0][:, -1:]
        logits = enp.where(logits < kth, floor, logits)
    if use_top_p:
        ordered = -enp.sort(-logits, axis=-1)
        probs = enp.exp(ordered - ordered[:, :1])
        probs = probs / enp.sum(probs, axis=-1, keepdims=True)
        before = enp.cumsum(probs, axis=-1) - probs  # mass strictly above each candidate
        keep = before < top_p  # always keeps the most likely token
        threshold = enp.min(enp.where(keep, ordered, enp.inf), axis=-1, keepdims=True)
        logits = enp.where(logits < threshold, floor, logits)
    return random.categorical(random.fold_in(key, step), logits).astype(enp.int32)


_sample = jit(_sample_fn, static_argnums=(7, 8, 9))


def generate_ids(model: LlamaForCausalLM, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int = 128, sampling: SamplingConfig = SamplingConfig(),
                 stop_ids: Sequence[int] = (), pad_id: int = 0,
                 on_token: Callable[[int, int], bool | None] | None = None
                 ) -> list[list[int]]:
    """New token ids for each prompt (stop token excluded), prompts batched with left padding.

    ``on_token(row, id)`` is called for every generated token as soon as it is known (used to
    stream text); returning True ends that row after this token. A row stops at its first stop
    token; the batch stops when every row has.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise EmberValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise EmberValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + max_new_tokens
    limit = model.config.max_position_embeddings
    if total > limit:
        raise EmberValueError(f"generate: prompt ({longest} tokens) + max_new_tokens "
                              f"({max_new_tokens}) = {total} exceeds the model's context of "
                              f"{limit} positions")
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise EmberValueError(f"generate: prompt token ids must be in [0, {vocab})")
    pads = np.array([longest - len(p) for p in prompts])
    ids = np.full((batch, longest), pad_id, dtype=np.int32)
    for row, p in enumerate(prompts):
        ids[row, pads[row]:] = p
    positions = np.maximum(np.arange(longest)[None, :] - pads[:, None], 0).astype(np.int32)
    key_mask = enp.asarray(np.arange(total)[None, :] >= pads[:, None])  # one copy, not per step
    seen = np.zeros((batch, vocab), dtype=bool)
    for row, p in enumerate(prompts):
        seen[row, list(p)] = True

    s = sampling
    greedy = s.temperature == 0.0
    key = random.key(s.seed)
    knobs = (np.float32(s.temperature or 1.0), np.float32(s.top_p),
             np.float32(s.repetition_penalty), greedy, s.top_k, s.top_p < 1.0)
    cache = KVCache.allocate(model.config, batch, total, model.dtype)
    logits, cache = _prefill(model, cache, ids, positions, key_mask)
    stops = set(stop_ids)
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(batch, dtype=bool)
    next_pos = (longest - pads).astype(np.int32)
    # Greedy with no penalty is the argmax of the logits (a penalty of 1 changes none): taken
    # here, on the host, it saves a program call per token.
    argmax_only = greedy and s.repetition_penalty == 1.0
    for step in range(max_new_tokens):
        if argmax_only:
            tokens = np.argmax(np.asarray(logits), axis=-1).astype(np.int32)
        else:
            tokens = np.asarray(_sample(logits, seen, key, np.int32(step), *knobs))
        for row, tok in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if tok in stops:
                done[row] = True
                continue
            out[row].append(tok)
            if on_token is not None and on_token(row, tok):
                done[row] = True
        if done.all() or step == max_new_tokens - 1:
            break
        seen[np.arange(batch), tokens] = True
        logits, cache = _extend(model, cache, tokens[:, None], next_pos[:, None] + step,
                                np.int32(longest + step), key_mask)
    return out


def _generate_text(model: LlamaForCausalLM, tokenizer: Any, ids: list[list[int]],
                   sampling: SamplingConfig, max_new_tokens: int,
                   stream: Callable[[str], None] | None, stop: Sequence[str] = ()) -> list[str]:
    decoders = [StreamDecoder(tokenizer, skip_special_tokens=True) for _ in ids]
    pieces: list[list[str]] = [[] for _ in ids]
    shown = [0]  # characters of row 0 already streamed

    def on_token(row: int, tok: int) -> bool:
        pieces[row].append(decoders[row].push(tok))
        text = "".join(pieces[row])
        cut = _stop_at(text, stop)
        if row == 0 and stream is not None:
            # Hold back a tail that could still grow into a stop string.
            safe = cut if cut is not None else len(text) - _partial_stop(text, stop)
            if safe > shown[0]:
                stream(text[shown[0]:safe])
                shown[0] = safe
        return cut is not None

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generate_ids(model, ids, max_new_tokens, sampling, sorted(tokenizer.stop_token_ids), pad,
                 on_token)
    outs = []
    for row, decoder in enumerate(decoders):
        text = "".join(pieces[row]) + decoder.flush()
        cut = _stop_at(text, stop)
        outs.append(text if cut is None else text[:cut])
    if stream is not None and len(outs[0]) > shown[0]:
        stream(outs[0][shown[0]:])
    return outs


def _stop_at(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text`` (None if none occurs)."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


def _partial_stop(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def generate(model: LlamaForCausalLM, tokenizer: Any, prompt: str | Sequence[str],
             max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
             chat: bool = False, stream: Callable[[str], None] | None = None,
             stop: Sequence[str] = ()) -> str | list[str]:
    """Generate text for one prompt (a string) or a batch (a list of strings).

    ``chat=True`` wraps each prompt as a user message in the model's chat template.
    ``stream`` receives text pieces as they are decoded (first prompt of a batch only).
    ``stop`` strings end a row where they first appear (they are not part of the result).
    """
    single = isinstance(prompt, str)
    texts = [prompt] if single else list(prompt)
    if not texts or any(not t.strip() for t in texts):
        raise EmberValueError("generate: the prompt is empty")
    sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty, seed)
    ids = [prompt_ids(tokenizer, t, chat) for t in texts]
    outs = _generate_text(model, tokenizer, ids, sampling, max_new_tokens, stream, stop)
    return outs[0] if single else outs


def prompt_ids(tokenizer: Any, prompt: str, chat: bool = False) -> list[int]:
    """The token ids :func:`generate` feeds the model for ``prompt`` (``chat``: wrapped as a
    user message in the chat template)."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt, add_special_tokens=True)


def generate_chat(model: LlamaForCausalLM, tokenizer: Any, messages: list[dict[str, str]],
                  max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
                  stream: Callable[[str], None] | None = None, stop: Sequence[str] = ()) -> str:
    """The assistant's reply to a conversation (``[{"role": ..., "content": ...}, ...]``)."""
    if not messages or not messages[-1].get("content", "").strip():
        raise EmberValueError("generate_chat: the last message is empty")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty, seed)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return _generate_text(model, tokenizer, [ids], sampling, max_new_tokens, stream, stop)[0]
