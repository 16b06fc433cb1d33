"""Tied parameters (``head.weight = wte.weight``), checked against PyTorch's tied modules.

A shared array must be one parameter everywhere: listed and counted once, one leaf for
``jit``/``grad`` (its gradient the sum over its uses), one optimizer state, still shared after
updates, casts and loads, and saved the way PyTorch saves tied weights (both names in
``state_dict``). See docs/decisions/0007-tied-parameters.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ember
import ember.numpy as enp
from ember import nn, optim
from ember.nn import functional as F  # noqa: N812
from ember.tree import tree_leaves

pytestmark = pytest.mark.torch

V, D = 11, 6


class Tied(nn.Module):
    def __init__(self):
        self.wte = nn.Embedding(V, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        return self.head(self.norm(self.wte(ids)))


class TorchTied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(V, D)
        self.norm = torch.nn.LayerNorm(D)
        self.head = torch.nn.Linear(D, V, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        return self.head(self.norm(self.wte(ids)))


def loss_fn(model, ids, targets):
    return F.cross_entropy(model(ids), targets)


def pair(seed=0):
    ember.random.seed(seed)
    model = Tied()
    ref = TorchTied()
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    return model, ref


def batch(seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (3, 5)), rng.integers(0, V, (3, 5))


def test_a_tied_array_is_one_parameter_with_two_names_in_the_state_dict():
    model, ref = pair()
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters())
    assert list(model.trainable_parameters()) == ["wte.weight", "norm.weight", "norm.bias"]
    sd = model.state_dict()
    assert list(sd) == list(ref.state_dict())
    assert sd["head.weight"] is sd["wte.weight"]
    assert len(tree_leaves(model)) == 3  # one leaf for jit and grad


def test_gradient_of_a_tied_weight_is_the_sum_as_in_torch():
    model, ref = pair()
    ids, targets = batch()
    loss, grads = nn.value_and_grad(loss_fn)(model, ids, targets)
    torch_loss = torch.nn.functional.cross_entropy(ref(torch.from_numpy(ids)).reshape(-1, V),
                                                   torch.from_numpy(targets).reshape(-1))
    torch_loss.backward()
    np.testing.assert_allclose(float(loss), torch_loss.item(), rtol=1e-6)
    assert set(grads) == {"wte.weight", "norm.weight", "norm.bias"}
    np.testing.assert_allclose(np.asarray(grads["wte.weight"]), ref.wte.weight.grad.numpy(),
                               rtol=1e-5, atol=1e-7)
    # ember.grad over the whole module: the same gradient, shared by both names.
    whole = ember.grad(loss_fn)(model, ids, targets)
    assert whole.head.weight is whole.wte.weight
    np.testing.assert_allclose(np.asarray(whole.wte.weight), ref.wte.weight.grad.numpy(),
                               rtol=1e-5, atol=1e-7)


def test_jitted_adamw_steps_keep_the_tie_and_match_torch():
    model, ref = pair()
    opt = optim.AdamW(lr=0.05)
    state = opt.init(model.trainable_parameters())
    assert set(state.exp_avg) == {"wte.weight", "norm.weight", "norm.bias"}
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=0.05)

    @ember.jit
    def step(model, state, ids, targets):
        loss, grads = nn.value_and_grad(loss_fn)(model, ids, targets)
        params, state = opt.update(model.trainable_parameters(), grads, state)
        return loss, params, state

    for i in range(4):
        ids, targets = batch(i)
        loss, params, state = step(model, state, ids, targets)
        model.update(params)
        assert model.head.weight is model.wte.weight
        torch_opt.zero_grad()
        torch_loss = torch.nn.functional.cross_entropy(
            ref(torch.from_numpy(ids)).reshape(-1, V), torch.from_numpy(targets).reshape(-1))
        torch_loss.backward()
        torch_opt.step()
        np.testing.assert_allclose(float(loss), torch_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(model.head.weight), ref.head.weight.detach().numpy(),
                               rtol=1e-4, atol=1e-6)
    assert step.trace_count == 1


def test_update_astype_and_replace_keep_the_tie():
    model, _ = pair()
    new = enp.zeros((V, D), dtype=enp.float32)
    copy = model.replace({"head.weight": new})  # either name reaches the shared array
    assert copy.wte.weight is new and copy.head.weight is new
    assert model.head.weight is model.wte.weight and model.wte.weight is not new
    model.update({"wte.weight": new, "head.weight": new})  # both names, the same array: fine
    assert model.head.weight is new
    with pytest.raises(ember.EmberError, match="tied to wte.weight"):
        model.update({"wte.weight": new, "head.weight": enp.ones((V, D), dtype=enp.float32)})
    assert model.head.weight is new
    model.astype(enp.bfloat16)
    assert model.head.weight is model.wte.weight
    assert model.wte.weight.dtype == enp.bfloat16


def test_load_state_dict_of_a_tied_model():
    model, _ = pair()
    other, _ = pair(seed=5)
    full = {k: np.asarray(v) for k, v in other.state_dict().items()}
    model.load_state_dict(full)  # both names, equal values (PyTorch's state_dict)
    assert model.head.weight is model.wte.weight
    np.testing.assert_array_equal(np.asarray(model.wte.weight), full["wte.weight"])
    # Hugging Face's safetensors drop the tied duplicate: one name is enough, even strictly.
    fresh, _ = pair(seed=7)
    hf = {k: v for k, v in full.items() if k != "head.weight"}
    assert fresh.load_state_dict(hf) == ([], [])
    assert fresh.head.weight is fresh.wte.weight
    np.testing.assert_array_equal(np.asarray(fresh.head.weight), full["wte.weight"])
    clash = dict(full, **{"head.weight": full["wte.weight"] + 1})
    with pytest.raises(ember.EmberError, match="tied in the model but hold different values"):
        fresh.load_state_dict(clash)
    neither = {k: v for k, v in full.items() if k not in ("wte.weight", "head.weight")}
    missing, _ = fresh.load_state_dict(neither, strict=False)
    assert missing == ["wte.weight", "head.weight"]
    with pytest.raises(ember.EmberError, match="missing from the checkpoint: wte.weight, head"):
        fresh.load_state_dict(neither)


def test_tied_and_untied_models_are_different_jit_structures():
    tied, _ = pair()
    untied, _ = pair()
    untied.head.weight = enp.array(untied.wte.weight) + 0
    f = ember.jit(lambda m, ids: m(ids))
    ids, _ = batch()
    f(tied, ids)
    f(untied, ids)
    assert f.trace_count == 2
    # atol: products summed in another order (BLAS) leave small logits a larger relative error
    np.testing.assert_allclose(np.asarray(f(untied, ids)), np.asarray(untied(ids)), rtol=1e-6,
                               atol=1e-6)


def test_a_donated_tied_model_is_donated_once_and_stays_tied():
    model, _ = pair()
    ids, targets = batch()

    def sgd(model, ids, targets):
        grads = nn.value_and_grad(loss_fn)(model, ids, targets)[1]
        return model.replace({k: v - 0.1 * grads[k]
                              for k, v in model.trainable_parameters().items()})

    expected = ember.jit(sgd)(model, ids, targets)
    stepped = ember.jit(sgd, donate_argnums=0)(model, ids, targets)
    assert stepped.head.weight is stepped.wte.weight
    np.testing.assert_array_equal(np.asarray(stepped.wte.weight), np.asarray(expected.wte.weight))


def test_the_first_name_decides_whether_a_tied_array_is_frozen():
    model, _ = pair()
    model.head.freeze()  # the second name: still trained through wte
    assert "wte.weight" in model.trainable_parameters()
    model.wte.freeze()
    assert set(model.trainable_parameters()) == {"norm.weight", "norm.bias"}
    assert model.num_parameters(trainable_only=True) == 2 * D
