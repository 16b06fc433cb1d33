"""The attention kernels of the compiled CPU backend (``ember/backends/cpu/attention.py``).

Compiled (``backend="cpu"``) against the NumPy backend's tiled reference, forward (out, lse)
and backward (dq, dk, dv from given cotangents of out and lse): causal and not, grouped heads
1/3/4, ``L != S``, sizes that are not multiples of the tiles, a KV cache read up to ``kv_len``
with NaN in its unfilled part (one length per example too), decode steps long enough to split
their keys across threads, boolean and additive masks, rows that see no key, half precision;
against PyTorch's sdpa; a tiny Llama's forward, gradient and decode steps. All cases of a kind
share one program (one compiler start).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as TF  # noqa: N812
from tiny_models import tiny_model

import ember
import ember.numpy as enp
from ember.backends.cpu import toolchain
from ember.backends.cpu.program import statement
from ember.models.llama import KVCache
from ember.ops.attention import attention

pytestmark = pytest.mark.skipif(not toolchain.available(), reason="no C compiler")

RNG = np.random.default_rng(11)
BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclass
class Case:
    """One attention problem: ``q [*batch, hq, length, dim]``, keys ``[*batch, hk, src, dim]``,
    values ``[*batch, hk, src, vdim]``; ``kv_len``/``q_offset`` ints or one per example; keys
    past ``kv_len`` are NaN."""

    name: str
    batch: tuple[int, ...]
    hq: int
    hk: int
    length: int
    src: int
    dim: int = 16
    vdim: int | None = None
    causal: bool = False
    kv_len: Any = None
    q_offset: Any = 0
    mask: str | None = None  # "padding" (bool [*batch, 1, 1, src]), "additive" ([1, hq, L, S])
    mask_grad: bool = False  # differentiate the additive mask too (its gradient: NumPy's)
    dtype: Any = np.float32
    spread: float = 1.0  # q's scale: wide scores, most probabilities underflow to 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        vdim = self.vdim or self.dim
        shapes = {"q": (*self.batch, self.hq, self.length, self.dim),
                  "k": (*self.batch, self.hk, self.src, self.dim),
                  "v": (*self.batch, self.hk, self.src, vdim),
                  "dout": (*self.batch, self.hq, self.length, vdim)}
        a = {n: RNG.standard_normal(s).astype(self.dtype) for n, s in shapes.items()}
        a["q"] = (a["q"] * self.spread).astype(self.dtype)
        lse_dtype = np.float64 if self.dtype == np.float64 else np.float32
        a["dlse"] = RNG.standard_normal((*self.batch, self.hq, self.length)).astype(lse_dtype)
        filled = self.src if self.kv_len is None else self.kv_len
        lengths = np.broadcast_to(np.asarray(filled), self.batch)
        for index in np.ndindex(*self.batch):
            a["k"][index][..., lengths[index]:, :] = np.nan
            a["v"][index][..., lengths[index]:, :] = np.nan
        if self.mask == "padding":
            mask = RNG.random((*self.batch, 1, 1, self.src)) > 0.3
            mask[..., 0] = True
            a["mask"] = mask
        elif self.mask == "additive":
            bias = RNG.standard_normal((*(1,) * len(self.batch), self.hq, self.length, self.src))
            bias[..., 1] = -np.inf
            a["mask"] = bias.astype(self.dtype)
        self.arrays = a

    def operands(self) -> dict[str, Any]:
        out = dict(self.arrays)
        if self.kv_len is not None:
            out["kv_len"] = np.asarray(self.kv_len, np.int32)
        out["q_offset"] = np.asarray(self.q_offset, np.int32)
        return out


CASES = [
    Case("plain", (1,), 2, 2, 5, 9),
    Case("causal_gqa3_tiles", (2,), 6, 2, 70, 70, vdim=12, causal=True),
    Case("causal_gqa4_L_gt_S", (1,), 4, 1, 45, 33, dim=8, causal=True),
    Case("noncausal_gqa4_odd", (2,), 8, 2, 33, 130, dim=24),
    Case("cache_per_example", (2,), 6, 2, 7, 150, causal=True, kv_len=[100, 131],
         q_offset=[93, 124]),
    Case("decode_split", (1,), 3, 1, 1, 1024, dim=64, causal=True, kv_len=300, q_offset=299),
    Case("decode_per_example", (3,), 4, 2, 1, 400, causal=True, kv_len=[0, 1, 390],
         q_offset=[0, 0, 389]),
    Case("causal_one_head_long", (1,), 4, 1, 100, 230, causal=True, q_offset=130),
    Case("rows_seeing_nothing", (1,), 2, 1, 6, 8, causal=True, q_offset=-3),
    Case("padding_mask", (2,), 4, 2, 9, 9, causal=True, mask="padding"),
    Case("additive_mask", (2,), 4, 2, 6, 70, mask="additive", kv_len=66),
    Case("additive_mask_grad", (2,), 4, 2, 6, 10, mask="additive", mask_grad=True),
    Case("two_batch_axes_mask", (2, 3), 2, 1, 5, 67, causal=True, mask="padding"),
    Case("bfloat16", (1,), 6, 2, 37, 40, causal=True, dtype=BF16),
    Case("float16", (2,), 4, 4, 3, 90, causal=True, kv_len=77, q_offset=74, dtype=np.float16),
    Case("float64_runs_in_numpy", (1,), 2, 1, 4, 6, causal=True, dtype=np.float64),
    # SmolLM2's heads (9 query, 3 key/value, d=64): many forward and backward query tiles, a
    # last key tile cut short; and scores so wide that most exponentials underflow.
    Case("prefill_gqa3_d64", (1,), 9, 3, 150, 150, dim=64, causal=True),
    Case("training_batch_d64", (3,), 6, 2, 80, 80, dim=64, causal=True),
    Case("wide_scores", (1,), 4, 2, 40, 70, dim=32, causal=True, q_offset=30, spread=20.0),
]


def _attend(case: Case, ops: dict[str, Any]) -> dict[str, Any]:
    """out, lse and the gradients of ``sum(out * dout) + sum(lse * dlse)``."""
    def f(q, k, v, mask):
        return attention(q, k, v, causal=case.causal, kv_len=ops.get("kv_len"),
                         q_offset=ops["q_offset"], mask=mask)

    mask = ops.get("mask")
    if case.mask_grad:
        (out, lse), pullback = ember.vjp(f, ops["q"], ops["k"], ops["v"], mask)
    else:
        (out, lse), pullback = ember.vjp(lambda q, k, v: f(q, k, v, mask), ops["q"], ops["k"],
                                         ops["v"])
    grads = pullback((ops["dout"], ops["dlse"]))
    return dict(zip(("out", "lse", "dq", "dk", "dv", "dmask"), (out, lse, *grads)))


def _all_cases(operands):
    return [_attend(case, ops) for case, ops in zip(CASES, operands)]


def _host(tree):
    return ember.tree.tree_map(np.asarray, tree)


@pytest.fixture(scope="module")
def results():
    operands = [case.operands() for case in CASES]
    compiled = _host(ember.jit(_all_cases, backend="cpu")(operands))
    reference = _host(ember.jit(_all_cases)(operands))
    return compiled, reference


def _tolerance(dtype: np.dtype, name: str) -> tuple[float, float]:
    """(rtol, atol relative to the largest value): float32 summation order, or one rounding
    of a half-precision result (lse stays float32)."""
    if name == "lse" or np.dtype(dtype) in (np.float32, np.float64):
        return 1e-5, 1e-5
    return (1e-2, 1e-2) if np.dtype(dtype) == BF16 else (2e-3, 2e-3)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.name for c in CASES])
def test_compiled_attention_matches_the_numpy_reference(results, index):
    case, compiled, reference = CASES[index], results[0][index], results[1][index]
    assert compiled.keys() == reference.keys()
    for name in compiled:
        got, want = compiled[name], reference[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert not np.isnan(got).any(), f"{name}: NaN from the unfilled cache leaked"
        rtol, atol = _tolerance(case.dtype, name)
        finite = np.isfinite(want)
        np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=name)  # -inf lse
        scale = float(np.abs(want[finite].astype(np.float64)).max(initial=1.0))
        np.testing.assert_allclose(got[finite].astype(np.float64),
                                   want[finite].astype(np.float64), rtol=rtol,
                                   atol=atol * scale, err_msg=f"{case.name}: {name}")


def test_rows_that_see_no_key_give_zeros(results):
    index = next(i for i, c in enumerate(CASES) if c.name == "rows_seeing_nothing")
    got = results[0][index]
    assert np.all(got["out"][..., :3, :] == 0) and np.all(np.isneginf(got["lse"][..., :3]))
    assert np.all(np.isfinite(got["lse"][..., 3:]))


# (wide scores are left to the reference comparison, whose tolerance scales with the values:
# gradients of q ~ 60 differ from torch's by float32 rounding times 60)
@pytest.mark.parametrize("index", [i for i, c in enumerate(CASES) if c.dtype == np.float32
                                   and c.mask is None and np.ndim(c.kv_len) == 0
                                   and np.ndim(c.q_offset) == 0 and c.spread == 1.0],
                         ids=lambda i: CASES[i].name)
def test_compiled_attention_matches_torch_sdpa(results, index):
    case, got = CASES[index], results[0][index]
    ops = case.operands()
    kv_len = case.src if case.kv_len is None else case.kv_len
    q = torch.tensor(ops["q"], requires_grad=True)
    k = torch.tensor(ops["k"][..., :kv_len, :], requires_grad=True)
    v = torch.tensor(ops["v"][..., :kv_len, :], requires_grad=True)
    allowed = torch.ones(case.length, kv_len, dtype=torch.bool)
    if case.causal:
        positions = case.q_offset + torch.arange(case.length)[:, None]
        allowed = torch.arange(kv_len)[None, :] <= positions
    seen = allowed.any(-1)
    out = TF.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                          enable_gqa=case.hq != case.hk)
    out = torch.where(seen[:, None], out, 0)  # torch gives NaN where ember gives zeros
    group = case.hq // case.hk
    scores = q @ k.repeat_interleave(group, -3).transpose(-1, -2) / case.dim ** 0.5
    lse = torch.logsumexp(scores.masked_fill(~allowed, -torch.inf), -1)
    loss = (out * torch.tensor(ops["dout"])).sum() + (lse * torch.tensor(ops["dlse"])).sum()
    loss.backward()
    expected = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for name, want in expected.items():
        g = got[name][..., :kv_len, :] if name in ("dk", "dv") else got[name]
        np.testing.assert_allclose(g, want.detach().numpy(), rtol=1e-4, atol=2e-5,
                                   err_msg=name)
    assert np.all(got["dk"][..., kv_len:, :] == 0)


def _on_threads(threads: int, case: Case, monkeypatch) -> dict[str, np.ndarray]:
    """The case's results from a program built for ``threads`` OpenMP threads."""
    monkeypatch.setenv("EMBER_NUM_THREADS", str(threads))
    return _host(ember.jit(lambda o: _attend(case, o), backend="cpu")(case.operands()))


@pytest.mark.parametrize("name", ["prefill_gqa3_d64", "training_batch_d64"])
def test_the_same_bits_on_one_and_two_threads(name, monkeypatch):
    """Every row's softmax and every product sums in one order whatever the thread count; dq
    too once batch x heads gives each thread whole heads (the training batch: 6 of them),
    while fewer heads deal their key tiles into runs by thread count (the prefill's 3)."""
    case = next(c for c in CASES if c.name == name)
    one, two = _on_threads(1, case, monkeypatch), _on_threads(2, case, monkeypatch)
    same = ["out", "lse", "dk", "dv"] + (["dq"] if name == "training_batch_d64" else [])
    for key in same:
        np.testing.assert_array_equal(one[key].view(np.uint32), two[key].view(np.uint32),
                                      err_msg=key)
    np.testing.assert_allclose(one["dq"], two["dq"], rtol=1e-5, atol=1e-6)


def test_the_program_runs_the_attention_kernels_not_numpy():
    case = CASES[1]
    ops = case.operands()
    compiled = ember.jit(lambda o: _attend(case, o), backend="cpu").lower(ops).compile()
    text = compiled.as_text()
    assert "ember_attention_forward(&problem" in text
    assert "ember_attention_backward(&problem" in text
    graph = compiled.program.graph
    kernels = [e for e in graph.eqns if e.prim.name in ("attention", "attention_bwd")]
    assert len(kernels) == 2 and all(statement(e) is not None for e in kernels)


def test_mask_gradient_and_float64_fall_back_to_numpy():
    for name, prim in (("additive_mask_grad", "attention_bwd"),
                       ("float64_runs_in_numpy", "attention")):
        case = next(c for c in CASES if c.name == name)
        ops = case.operands()
        lowered = ember.jit(lambda o, c=case: _attend(c, o), backend="cpu").lower(ops)
        eqns = [e for e in lowered.graph.graph.eqns if e.prim.name == prim]
        assert eqns and all(statement(e) is None for e in eqns)


# --- the Llama -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return tiny_model(vocab_size=64, seed=5)


def _forward_and_grad(model, ids):
    return model(ids), ember.value_and_grad(lambda m: m.loss(ids))(model)


def _close_trees(actual, expected, rtol=1e-4, atol=1e-5):
    for a, e in zip(ember.tree.tree_leaves(actual), ember.tree.tree_leaves(expected),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def test_llama_forward_and_gradient(llama):
    ids = RNG.integers(0, 64, size=(2, 40))
    _close_trees(ember.jit(_forward_and_grad, backend="cpu")(llama, ids),
                 ember.jit(_forward_and_grad)(llama, ids))


def _decode(model, cache, ids, pos):
    return model(ids, cache=cache, cache_pos=pos)


def test_llama_decode_with_a_poisoned_cache(llama):
    """Prefill then decode steps on a cache whose unfilled part is NaN."""
    def poisoned():
        cache = KVCache.allocate(llama.config, 1, 96)
        return KVCache([enp.asarray(np.full(c.shape, np.nan, np.float32)) for c in cache.keys],
                       [enp.asarray(np.full(c.shape, np.nan, np.float32))
                        for c in cache.values])

    step, reference = ember.jit(_decode, backend="cpu"), ember.jit(_decode)
    cache, ref_cache = poisoned(), poisoned()
    ids = RNG.integers(0, 64, size=(1, 80))
    lowered = ember.jit(_decode, backend="cpu").lower(llama, cache, ids[:, :1], np.int32(70))
    assert "ember_attention_forward(&problem" in lowered.compile().as_text()
    for pos, width in ((0, 70), (70, 1), (71, 1), (72, 8)):
        chunk = ids[:, pos:pos + width]
        logits, cache = step(llama, cache, chunk, np.int32(pos))
        ref_logits, ref_cache = reference(llama, ref_cache, chunk, np.int32(pos))
        assert np.isfinite(np.asarray(logits)).all()
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-4,
                                   atol=1e-5, err_msg=f"position {pos}")
