"""Tiny models for tests that need a whole pipeline (tokenizer + model + files) but not real
weights: a byte-level tokenizer with a ChatML template and a random 2-layer Llama."""

from __future__ import annotations

import os

import numpy as np

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


_GGUF_LAYER_PARTS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                     "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                     "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                     "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down"}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def write_gguf(path: str | os.PathLike, config: LlamaConfig, state: dict[str, np.ndarray],
               quantize: str | None = None, extra: dict[str, np.ndarray] | None = None) -> None:
    """A GGUF file of Hugging Face-named weights laid out as llama.cpp's converter does
    (renamed, Llama q/k rows permuted, optionally Q8_0), with a byte-level BPE vocabulary."""
    import gguf

    from ember.io.gguf import permute_qk

    arch = "qwen2" if config.model_type == "qwen2" else "llama"  # mistral files say llama
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(float(config.rope_theta))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab", *(f"t{i}" for i in range(3, config.vocab_size))])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, value in state.items():
        value = np.asarray(value, dtype=np.float32)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name in _GGUF_TOP:
            target = _GGUF_TOP[name]
        else:
            _, _, layer, *rest = name.split(".")
            part, kind = ".".join(rest[:-1]), rest[-1]
            target = f"blk.{layer}.{_GGUF_LAYER_PARTS[part]}.{kind}"
            if arch == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = (config.num_attention_heads if "q_proj" in part
                         else config.num_key_value_heads)
                value = permute_qk(value, heads)
        if quantize == "Q8_0" and value.ndim == 2 and value.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(target, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(target, value)
    for name, value in (extra or {}).items():
        w.add_tensor(name, np.asarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
