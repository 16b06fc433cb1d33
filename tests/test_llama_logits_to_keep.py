"""``LlamaForCausalLM(..., logits_to_keep=n)``: the logits of the last ``n`` positions only.

Generation reads only the last position's logits, and the vocabulary product of every
position is a large share of a prefill, so the model can skip it. Compared with transformers'
argument of the same name, with and without a KV cache, eager and compiled (``cpu``).
"""

from __future__ import annotations

import numpy as np
import pytest

import ember
from ember.errors import EmberError
from ember.models.llama import KVCache, LlamaConfig, LlamaForCausalLM

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

CONFIG = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
              max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1,
              eos_token_id=2)
IDS = np.random.default_rng(2).integers(0, 97, size=(2, 9))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**CONFIG, attn_implementation="eager")).eval()
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    state.pop("lm_head.weight")  # tied to the embedding
    model.load_state_dict(state)
    return hf, model.eval()


@pytest.mark.parametrize("keep", [1, 3, 9, 20])
def test_last_positions_match_transformers(pair, keep):
    hf, model = pair
    with torch.no_grad():
        expected = hf(torch.tensor(IDS), logits_to_keep=keep).logits.numpy()
    got = np.asarray(model(IDS, logits_to_keep=keep))
    assert got.shape == (2, min(keep, IDS.shape[1]), CONFIG["vocab_size"])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_with_a_cache_the_last_logits_are_those_of_the_full_forward(pair, backend):
    _, model = pair
    full = np.asarray(model(IDS))

    def step(model, cache, ids):
        return model(ids, cache=cache, cache_pos=0, logits_to_keep=1)
    cache = KVCache.allocate(model.config, 2, 16)
    logits, _ = ember.jit(step, backend=backend)(model, cache, IDS)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_values_are_refused(pair, bad):
    _, model = pair
    with pytest.raises(EmberError, match="logits_to_keep must be an integer >= 0"):
        model(IDS, logits_to_keep=bad)
