"""Tiny models for tests that need a whole pipeline (tokenizer + model + files) but not real
weights: a byte-level tokenizer with a ChatML template and a random 2-layer Llama."""

from __future__ import annotations

import os

import ember
from ember.io.tokenizer import Tokenizer
from ember.models.llama import LlamaConfig, LlamaForCausalLM
from ember.models.loading import save_pretrained

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer() -> Tokenizer:
    """Bytes as tokens (no merges) plus <|endoftext|>, <|im_start|>, <|im_end|>."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    backend = Backend(models.BPE(vocab, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                     chat_template=CHATML)


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=0, initializer_range=0.3, **overrides)
    ember.random.seed(seed)
    return LlamaForCausalLM(config)


def tiny_model_dir(path: str | os.PathLike, seed: int = 0) -> str:
    """A Hugging Face directory with the tiny model and tokenizer."""
    tokenizer = tiny_tokenizer()
    save_pretrained(tiny_model(tokenizer.vocab_size, seed), tokenizer, path)
    return os.fspath(path)
