"""A nanoGPT-style character model, written from docs/nn.md, trains in ember and PyTorch from
the same initial weights to the same losses (float32).

It has what Karpathy's nanoGPT has: token and position embeddings (``wpe(enp.arange(T))``
inside the jitted step), pre-norm blocks of causal self-attention and a GELU MLP, PyTorch's
initialisers by name (``normal_``, ``zeros_``, the scaled ``c_proj`` init) applied with
``Module.apply``, the language-model head tied to the token embedding, AdamW with gradient
clipping. The PyTorch twin is loaded from the ember model's ``state_dict``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ember
import ember.numpy as enp
from ember import nn, optim
from ember.nn import functional as F  # noqa: N812

pytestmark = pytest.mark.torch

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
        "First Citizen: You are all resolved rather to die than to famish? All: Resolved. "
        "resolved. First Citizen: First, you know Caius Marcius is chief enemy to the people.")
CHARS = sorted(set(TEXT))
DATA = np.array([CHARS.index(c) for c in TEXT])
VOCAB, BLOCK, EMBD, HEADS, LAYERS = len(CHARS), 16, 32, 4, 2
BATCH, STEPS, LR = 8, 30, 3e-3


# --- the ember model ----------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self):
        self.c_attn = nn.Linear(EMBD, 3 * EMBD)
        self.c_proj = nn.Linear(EMBD, EMBD)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = enp.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (h.reshape(b, t, HEADS, c // HEADS).transpose(0, 2, 1, 3) for h in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(0, 2, 1, 3).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self):
        self.c_fc = nn.Linear(EMBD, 4 * EMBD)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * EMBD, EMBD)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self):
        self.ln_1 = nn.LayerNorm(EMBD)
        self.attn = CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(EMBD)
        self.mlp = MLP()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self):
        self.wte = nn.Embedding(VOCAB, EMBD)
        self.wpe = nn.Embedding(BLOCK, EMBD)
        self.h = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.ln_f = nn.LayerNorm(EMBD)
        self.lm_head = nn.Linear(EMBD, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * LAYERS))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(enp.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


# --- the PyTorch twin -----------------------------------------------------------------------

class TorchAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = torch.nn.Linear(EMBD, 3 * EMBD)
        self.c_proj = torch.nn.Linear(EMBD, EMBD)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(EMBD, dim=2)
        q, k, v = (h.view(b, t, HEADS, c // HEADS).transpose(1, 2) for h in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(EMBD)
        self.attn = TorchAttention()
        self.ln_2 = torch.nn.LayerNorm(EMBD)
        self.mlp = torch.nn.ModuleDict({"c_fc": torch.nn.Linear(EMBD, 4 * EMBD),
                                        "gelu": torch.nn.GELU(),
                                        "c_proj": torch.nn.Linear(4 * EMBD, EMBD)})

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        m = self.mlp
        return x + m["c_proj"](m["gelu"](m["c_fc"](self.ln_2(x))))


class TorchGPT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(VOCAB, EMBD)
        self.wpe = torch.nn.Embedding(BLOCK, EMBD)
        self.h = torch.nn.ModuleList([TorchBlock() for _ in range(LAYERS)])
        self.ln_f = torch.nn.LayerNorm(EMBD)
        self.lm_head = torch.nn.Linear(EMBD, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def batches():
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        starts = rng.integers(0, len(DATA) - BLOCK - 1, BATCH)
        x = np.stack([DATA[s:s + BLOCK] for s in starts])
        y = np.stack([DATA[s + 1:s + BLOCK + 1] for s in starts])
        yield x, y


@pytest.fixture
def one_torch_thread():
    """Tiny matrices: torch's thread pool only costs time here (10x, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_nanogpt_trains_to_the_same_losses_as_pytorch(one_torch_thread):
    ember.random.seed(0)
    model = GPT()
    assert model.lm_head.weight is model.wte.weight
    stds = {n: float(np.asarray(p).std()) for n, p in model.named_parameters()}
    assert 0.015 < stds["wte.weight"] < 0.025 and stds["h.0.mlp.c_proj.weight"] < 0.012
    ref = TorchGPT()
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters())

    opt = optim.AdamW(lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    state = opt.init(model.trainable_parameters())
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)

    @ember.jit
    def train_step(model, state, x, y):
        loss, grads = nn.value_and_grad(loss_fn)(model, x, y)
        grads, norm = optim.clip_grad_norm(grads, max_norm=1.0)
        params, state = opt.update(model.trainable_parameters(), grads, state)
        return loss, params, state

    ours, theirs = [], []
    for x, y in batches():
        loss, params, state = train_step(model, state, x, y)
        model.update(params)
        ours.append(float(loss))
        torch_opt.zero_grad()
        logits = ref(torch.from_numpy(x))
        torch_loss = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB),
                                                       torch.from_numpy(y).view(-1))
        torch_loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        torch_opt.step()
        theirs.append(torch_loss.item())

    assert train_step.trace_count == 1
    assert model.lm_head.weight is model.wte.weight
    assert ours[-1] < 0.8 * ours[0]  # it learns
    np.testing.assert_allclose(ours, theirs, rtol=2e-6)
    sd = ref.state_dict()
    for name, value in model.state_dict().items():
        ours_w, theirs_w = np.asarray(value), sd[name].detach().numpy()
        if name.endswith("c_attn.bias"):
            # The key bias adds the same q.b to every score of a query: softmax cancels it, its
            # true gradient is 0, and Adam turns rounding noise into steps. Compare q and v.
            keep = np.r_[0:EMBD, 2 * EMBD:3 * EMBD]
            ours_w, theirs_w = ours_w[keep], theirs_w[keep]
        np.testing.assert_allclose(ours_w, theirs_w, rtol=1e-3, atol=2e-5, err_msg=name)
