"""Composite functions (the building blocks of a transformer) and their gradients against
``torch.autograd``, in float64, eager and under jit."""

from __future__ import annotations

import numpy as np
import pytest

import ember
import ember.numpy as enp

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

RNG = np.random.default_rng(0)


def mlp_loss(lib, w1, b1, w2, x, y):
    h = lib.tanh(x @ w1 + b1)
    out = h @ w2
    return lib.mean((out - y) ** 2)


def cross_entropy(lib, logits, onehot):
    if lib is torch:
        logp = torch.log_softmax(logits, -1)
    else:
        logp = logits - enp.logsumexp(logits, axis=-1, keepdims=True)
    return -lib.sum(logp * onehot) / logits.shape[0]


def layernorm(lib, x, gamma, beta):
    if lib is torch:
        return torch.sum(torch.nn.functional.layer_norm(x, (x.shape[-1],), gamma, beta,
                                                        eps=1e-5) ** 3)
    mean = enp.mean(x, axis=-1, keepdims=True)
    var = enp.var(x, axis=-1, keepdims=True)
    return enp.sum(((x - mean) / enp.sqrt(var + 1e-5) * gamma + beta) ** 3)


def causal_attention(lib, q, k, v):
    t, d = q.shape[-2], q.shape[-1]
    scores = q @ lib.swapaxes(k, -1, -2) / np.sqrt(d)
    if lib is torch:
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    else:
        mask = enp.tril(enp.ones((t, t), dtype=enp.bool_))
        scores = enp.where(mask, scores, -enp.inf)
        probs = enp.exp(scores - enp.logsumexp(scores, axis=-1, keepdims=True))
    return lib.sum(lib.sin(probs @ v))


def logsumexp(lib, x):
    if lib is torch:
        return torch.sum(torch.logsumexp(x, dim=1) ** 2)
    return enp.sum(enp.logsumexp(x, axis=1) ** 2)


def gelu_erf(lib, x):
    if lib is torch:
        return torch.sum(torch.nn.functional.gelu(x) * x)
    from ember.ops import erf

    return enp.sum(0.5 * x * (1 + erf(x / np.sqrt(2.0))) * x)


def _onehot(n, k):
    out = np.zeros((n, k))
    out[np.arange(n), RNG.integers(0, k, n)] = 1
    return out


CASES = {
    "mlp": (mlp_loss, [RNG.normal(size=(3, 8)), RNG.normal(size=8), RNG.normal(size=(8, 2)),
                       RNG.normal(size=(5, 3)), RNG.normal(size=(5, 2))]),
    "cross_entropy": (cross_entropy, [RNG.normal(size=(4, 6)) * 3, _onehot(4, 6)]),
    "layernorm": (layernorm, [RNG.normal(size=(2, 3, 8)), RNG.normal(size=8),
                              RNG.normal(size=8)]),
    "attention": (causal_attention, [RNG.normal(size=(2, 5, 4)), RNG.normal(size=(2, 5, 4)),
                                     RNG.normal(size=(2, 5, 4))]),
    "logsumexp": (logsumexp, [RNG.normal(size=(3, 7)) * 10]),
    "gelu": (gelu_erf, [RNG.normal(size=(4, 5)) * 2]),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_value_and_grad_match_torch(name, jit):
    fn, args = CASES[name]
    targs = [torch.tensor(a, requires_grad=True) for a in args]
    expected = fn(torch, *targs)
    expected.backward()
    argnums = tuple(range(len(args)))
    vg = ember.value_and_grad(lambda *a: fn(enp, *a), argnums)
    if jit:
        vg = ember.jit(vg)
    value, grads = vg(*[enp.asarray(a) for a in args])
    np.testing.assert_allclose(np.asarray(value), expected.detach().numpy(), rtol=1e-10)
    for g, t in zip(grads, targs):
        np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), rtol=1e-9, atol=1e-12)
