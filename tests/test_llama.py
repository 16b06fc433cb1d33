"""The Llama family against Hugging Face transformers on small random configs.

Each variant (Llama with llama3 rope scaling, Qwen2 with q/k/v biases and tied embeddings,
Mistral with a sliding window, Llama with attention biases) is built in transformers with
random weights, copied into ember by ``load_state_dict``, and compared: logits, loss and
gradients. Then the KV cache, generation (greedy against ``transformers.generate``), saving
and loading (safetensors + config.json that transformers reads back, synthetic GGUF files).
"""

from __future__ import annotations

import json
import os
import weakref

import ml_dtypes
import numpy as np
import pytest
from tiny_models import write_gguf

import ember
from ember import nn
from ember.models import generate as gen
from ember.models import loading
from ember.models.llama import KVCache, LlamaConfig, LlamaForCausalLM
from ember.nn.init import skip_init

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

BASE = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=64, tie_word_embeddings=False, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2)

VARIANTS = {
    "llama3": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8},
                             rope_theta=500000.0)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "mistral": ("mistral", dict(sliding_window=4, head_dim=16)),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4)),
}
HF_CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}
HF_MODELS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "mistral": "MistralForCausalLM"}


def make_pair(variant: str, seed: int = 0):
    """A random transformers model and the same weights in ember."""
    family, extra = VARIANTS[variant]
    cfg = {**BASE, **extra}
    torch.manual_seed(seed)
    hf_cfg = getattr(transformers, HF_CONFIGS[family])(**cfg, attn_implementation="eager")
    hf = getattr(transformers, HF_MODELS[family])(hf_cfg).eval()
    with torch.no_grad():  # make biases non-zero so they are really checked
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    config = LlamaConfig.from_hf({**hf_cfg.to_dict(), "model_type": family})
    with skip_init():
        model = LlamaForCausalLM(config)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    model.load_state_dict(state)
    return hf, model.eval()


def tokens(shape, seed=0, vocab=BASE["vocab_size"]):
    return np.random.default_rng(seed).integers(3, vocab, size=shape).astype(np.int64)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_loss_and_grads_match_transformers(variant):
    hf, model = make_pair(variant)
    ids = tokens((2, 9))
    out = hf(torch.tensor(ids), labels=torch.tensor(ids))
    np.testing.assert_allclose(np.asarray(model(ids)), out.logits.detach().numpy(),
                               rtol=1e-4, atol=2e-5)
    loss, grads = ember.jit(nn.value_and_grad(lambda m, x: m.loss(x)))(model, ids)
    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
    out.loss.backward()
    hf_grads = {k: p.grad.numpy() for k, p in hf.named_parameters()}
    assert set(grads) == set(hf_grads)
    for name, g in grads.items():
        # Each tensor against its own scale: gradients here range from 1e-5 to 1e-1, and a
        # shared absolute floor would let a wrong (say all-zero) small one pass.
        ref = hf_grads[name]
        scale = float(np.abs(ref).max())
        assert scale > 0, name
        error = float(np.abs(np.asarray(g) - ref).max()) / scale
        assert error < 1e-4, (name, error)  # about 5e-6 at worst today


def test_padding_mask_matches_transformers():
    hf, model = make_pair("llama3")
    ids = tokens((2, 7), seed=3)
    mask = np.ones((2, 7), dtype=np.int64)
    mask[1, :3] = 0  # left padding in row 1
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.detach().numpy()
    out = np.asarray(model(ids, positions=np.maximum(np.cumsum(mask, 1) - 1, 0),
                           attention_mask=mask))
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(out[1, 3:], ref[1, 3:], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("variant", ["llama3", "mistral"])
def test_kv_cache_prefill_then_decode_equals_full_forward(variant):
    _, model = make_pair(variant)
    ids = tokens((2, 10), seed=1)
    full = np.asarray(model(ids))
    cache = KVCache.allocate(model.config, 2, 12)
    logits, cache = model(ids[:, :6], cache=cache, cache_pos=0)
    np.testing.assert_allclose(np.asarray(logits), full[:, :6], rtol=1e-4, atol=2e-5)
    for pos in range(6, 10):
        logits, cache = model(ids[:, pos:pos + 1], cache=cache, cache_pos=pos)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, pos], rtol=1e-4,
                                   atol=2e-5)


def test_decode_step_is_traced_once_and_updates_the_cache_in_place():
    _, model = make_pair("qwen2")
    decode = ember.jit(gen._extend_fn, donate_argnums=1)
    cache = KVCache.allocate(model.config, 1, 16)
    key_mask = np.ones((1, 16), dtype=bool)
    _, cache = decode(model, cache, np.array([[5]]), np.array([[0]]), np.int32(0), key_mask)
    # Weak references: a strong one would be a second holder, and a buffer that something
    # else still sees is copied before an in-place write.
    buffers = [weakref.ref(k._buffer) for k in cache.keys]
    for pos in range(1, 6):
        _, cache = decode(model, cache, np.array([[5 + pos]]), np.array([[pos]]),
                          np.int32(pos), key_mask)
    assert decode.trace_count == 1
    assert all(k._buffer is b() for k, b in zip(cache.keys, buffers)), "cache was reallocated"


@pytest.mark.parametrize("variant", ["llama3", "qwen2", "mistral"])
def test_greedy_generation_matches_transformers(variant):
    hf, model = make_pair(variant)
    prompts = [list(tokens((5,), seed=7)), list(tokens((3,), seed=8))]
    out = gen.generate_ids(model, prompts, max_new_tokens=12)
    for prompt, got in zip(prompts, out):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert got == ref


def test_sampling_is_seeded_and_respects_top_k_and_stop_tokens():
    _, model = make_pair("llama3")
    prompt = [list(tokens((4,), seed=2))]
    s = gen.SamplingConfig(temperature=1.5, top_k=3, top_p=0.9, repetition_penalty=1.2, seed=5)
    a = gen.generate_ids(model, prompt, 16, s)
    assert a == gen.generate_ids(model, prompt, 16, s)
    assert a != gen.generate_ids(model, prompt, 16, gen.SamplingConfig(1.5, 3, 0.9, 1.2, 6))
    # top_k=1 is greedy whatever the temperature
    greedy = gen.generate_ids(model, prompt, 8)
    assert gen.generate_ids(model, prompt, 8, gen.SamplingConfig(temperature=2.0, top_k=1,
                                                                 seed=3)) == greedy
    stop = greedy[0][3]
    cut = gen.generate_ids(model, prompt, 8, stop_ids=[stop])
    assert cut[0] == greedy[0][:greedy[0].index(stop)]


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    seen = np.zeros((1, 4), dtype=bool)
    key = ember.random.key(0)
    draws = {int(np.asarray(gen._sample(logits, seen, key, np.int32(i), np.float32(1.0),
                                        np.float32(0.7), np.float32(1.0), False, 0, True))[0])
             for i in range(60)}
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.7: the 0.15 and 0.05 tokens are cut


def test_batched_prompts_with_padding_equal_single_runs():
    _, model = make_pair("llama3")
    prompts = [list(tokens((7,), seed=11)), list(tokens((2,), seed=12)),
               list(tokens((4,), seed=13))]
    batched = gen.generate_ids(model, prompts, 6)
    assert batched == [gen.generate_ids(model, [p], 6)[0] for p in prompts]


def test_a_prompt_read_in_chunks_gives_what_one_call_gives(monkeypatch, capsys):
    hf, model = make_pair("mistral")  # a sliding window of 4 crosses the chunk borders
    prompts = [list(tokens((23,), seed=14)), list(tokens((9,), seed=15))]
    whole = gen.generate_ids(model, prompts, 5)
    assert "reading the prompt" not in capsys.readouterr().err
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 4)
    assert gen.generate_ids(model, prompts, 5) == whole
    assert "reading the prompt" in capsys.readouterr().err  # progress for a long prompt
    ref = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=5, do_sample=False,
                      eos_token_id=None)[0, 23:].tolist()
    assert whole[0] == ref


def test_generation_rejects_bad_input():
    _, model = make_pair("qwen2")
    with pytest.raises(ember.EmberError, match="at least one token"):
        gen.generate_ids(model, [[]], 4)
    with pytest.raises(ember.EmberError, match="context"):
        gen.generate_ids(model, [[3, 4]], 100)
    with pytest.raises(ember.EmberError, match="temperature"):
        gen.SamplingConfig(temperature=-1)
    with pytest.raises(ember.EmberError, match=r"\[0, 101\)"):
        gen.generate_ids(model, [[3, 500]], 4)


@pytest.mark.parametrize("variant", ["llama3", "qwen2", "mistral"])
def test_save_pretrained_loads_in_transformers_and_back(tmp_path, variant):
    hf, model = make_pair(variant)
    loading.save_pretrained(model, None, tmp_path, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = tokens((1, 8), seed=4)
    ref = hf(torch.tensor(ids)).logits.detach().numpy()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    np.testing.assert_allclose(back(torch.tensor(ids)).logits.detach().numpy(), ref,
                               rtol=1e-4, atol=2e-5)
    again = loading.load_model(tmp_path)
    np.testing.assert_allclose(np.asarray(again(ids)), ref, rtol=1e-4, atol=2e-5)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "temporary files left"


def test_loading_errors_are_clear_and_leave_nothing_half_done(tmp_path):
    _, model = make_pair("llama3")
    loading.save_pretrained(model, None, tmp_path)
    with pytest.raises(ember.EmberError, match="no model at"):
        loading.load_model(tmp_path / "missing")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ember.EmberError, match="unsupported model_type 'gpt2'"):
        loading.load_model(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ember.EmberError, match="expected a JSON object"):
        loading.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ember.EmberError, match="hidden_size = 64 does not match the weights"):
        loading.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ember.EmberError, match="model.safetensors"):
        loading.load_model(tmp_path)
    # a failed load into an existing model changes nothing
    before = {k: np.asarray(v).copy() for k, v in model.state_dict().items()}
    bad = dict(before)
    bad["model.norm.weight"] = np.ones(3, np.float32)
    bad["model.layers.0.mlp.up_proj.weight"] = before["model.layers.0.mlp.up_proj.weight"] + 1
    with pytest.raises(ember.EmberError, match="nothing was loaded"):
        model.load_state_dict(bad)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(np.asarray(v), before[k])


def _write_gguf(path, hf, family: str, quantize: str | None = None, extra=None):
    """A GGUF file of ``hf``'s weights as llama.cpp's converter lays them out."""
    pytest.importorskip("gguf")
    config = LlamaConfig.from_hf({**hf.config.to_dict(), "model_type": family})
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    write_gguf(path, config, state, quantize, extra)


@pytest.mark.parametrize("variant", ["llama3", "qwen2"])
def test_gguf_weights_are_renamed_and_unpermuted(tmp_path, variant):
    family = VARIANTS[variant][0]
    hf, _ = make_pair(variant)
    if variant == "llama3":  # GGUF stores llama3 scaling as factors; use plain rope here
        hf, _ = make_pair("llama-bias")
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, hf, family)
    model = loading.load_model(path)
    ids = tokens((1, 6), seed=9)
    ref = hf(torch.tensor(ids)).logits.detach().numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), ref, rtol=1e-4, atol=2e-5)


def test_gguf_q8_0_is_close_and_unknown_architecture_is_refused(tmp_path):
    hf, _ = make_pair("qwen2")
    path = tmp_path / "q8.gguf"
    _write_gguf(path, hf, "qwen2", quantize="Q8_0")
    model = loading.load_model(path)
    ids = tokens((1, 6), seed=9)
    ref = hf(torch.tensor(ids)).logits.detach().numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), ref, atol=0.05 * np.abs(ref).max())
    data = path.read_bytes().replace(b"qwen2", b"bert\x00", 1)
    (tmp_path / "bad.gguf").write_bytes(data)
    with pytest.raises(ember.EmberError):
        loading.load_model(tmp_path / "bad.gguf")


def test_config_round_trips_through_config_json():
    for variant in VARIANTS:
        _, model = make_pair(variant)
        again = LlamaConfig.from_hf(json.loads(model.config.to_json()))
        assert again == model.config, variant


def test_gradient_checkpointing_gives_the_same_gradients():
    _, model = make_pair("llama3")
    ids = tokens((2, 8), seed=5)
    grad = nn.value_and_grad(lambda m, x: m.loss(x))
    loss, plain = grad(model, ids)
    model.gradient_checkpointing = True
    loss2, ckpt = grad(model, ids)
    assert float(loss) == pytest.approx(float(loss2), rel=1e-6)
    for k in plain:
        np.testing.assert_allclose(np.asarray(ckpt[k]), np.asarray(plain[k]), rtol=1e-5,
                                   atol=1e-7)


def test_gguf_llama3_rope_factors_tensor(tmp_path):
    """llama.cpp stores llama3 rope scaling as a ``rope_freqs`` tensor of per-frequency
    factors (frequencies are divided by them); the result must match transformers' llama3."""
    from ember.nn.functional import rope_inv_freq

    hf, model = make_pair("llama3")
    path = tmp_path / "llama3.gguf"
    _write_gguf(path, hf, "llama")
    scaling = dict(model.config.rope_scaling)
    head_dim, theta = model.config.head_dim, model.config.rope_theta
    factors = rope_inv_freq(head_dim, theta) / rope_inv_freq(head_dim, theta, scaling)
    with_factors = tmp_path / "llama3-factors.gguf"
    _write_gguf(with_factors, hf, "llama", extra={"rope_freqs.weight": factors})
    loaded = loading.load_model(with_factors)
    ids = tokens((1, 40), seed=6)
    ref = hf(torch.tensor(ids)).logits.detach().numpy()
    np.testing.assert_allclose(np.asarray(loaded(ids)), ref, rtol=1e-4, atol=2e-5)
    plain = loading.load_model(path)  # without the factors the long wavelengths differ
    assert not np.allclose(np.asarray(plain(ids)), ref, rtol=1e-4, atol=2e-5)


def test_bfloat16_model_saves_as_bf16_and_transformers_reads_it(tmp_path):
    hf, model = make_pair("qwen2")
    model.astype(ml_dtypes.bfloat16)
    loading.save_pretrained(model, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert back.dtype == torch.bfloat16
    ids = tokens((1, 6), seed=2)
    ours = np.asarray(model(ids)).astype(np.float32)
    theirs = back(torch.tensor(ids)).logits.float().detach().numpy()
    np.testing.assert_allclose(ours, theirs, atol=0.05 * np.abs(theirs).max())
