"""PyTorch habits in ``ember.nn``: position embeddings under ``jit``, PyTorch's in-place
initialisers, ``Module.update`` checks, ``load_state_dict(assign=)`` and dropout in a jitted
training step without keys. References are PyTorch (initialiser statistics and gains) and
eager execution (jit)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ember
import ember.numpy as enp
from ember import nn
from ember.nn import functional as F  # noqa: N812

pytestmark = pytest.mark.torch


# --- Embedding with enp.arange(T) inside jit (nanoGPT's position embedding) --------------------

class Positions(nn.Module):
    def __init__(self, block_size: int, dim: int):
        self.wpe = nn.Embedding(block_size, dim)

    def forward(self, x):
        return x + self.wpe(enp.arange(x.shape[-2]))


def test_position_embedding_with_arange_under_jit_matches_eager():
    ember.random.seed(0)
    model = Positions(8, 4)
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    f = ember.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(np.asarray(f(model, x)), np.asarray(model(x)))
    grads = ember.jit(ember.grad(lambda m, x: enp.sum(m(x) ** 2)))(model, x)
    eager = ember.grad(lambda m, x: enp.sum(m(x) ** 2))(model, x)
    np.testing.assert_allclose(np.asarray(grads.wpe.weight), np.asarray(eager.wpe.weight),
                               rtol=1e-6)
    assert np.all(np.asarray(grads.wpe.weight)[5:] == 0)


def test_embedding_ids_out_of_range_raise_when_concrete_and_clamp_when_traced():
    weight = np.arange(12, dtype=np.float32).reshape(4, 3)
    with pytest.raises(ember.EmberError, match=r"embedding.*\[0, 4\).*from 0 to 4"):
        ember.jit(lambda w: F.embedding(enp.arange(5), w))(weight)  # a constant: checked
    ids = np.array([[-3, 0], [3, 99]])
    out = ember.jit(F.embedding)(ids, weight)  # known only at run time: clamped
    np.testing.assert_array_equal(np.asarray(out), weight[np.clip(ids, 0, 3)])


# --- in-place initialisers ----------------------------------------------------------------------

INITS = [
    ("uniform_", {"a": -0.5, "b": 2.0}),
    ("normal_", {"mean": 0.3, "std": 0.02}),
    ("trunc_normal_", {"std": 0.5}),
    ("trunc_normal_", {"mean": 0.1, "std": 1.0, "a": -0.5, "b": 1.5}),
    ("xavier_uniform_", {"gain": 2.0}),
    ("xavier_normal_", {}),
    ("kaiming_uniform_", {"a": math.sqrt(5)}),
    ("kaiming_uniform_", {"mode": "fan_out", "nonlinearity": "relu"}),
    ("kaiming_normal_", {"nonlinearity": "tanh"}),
    ("kaiming_normal_", {"a": 0.2, "mode": "fan_out"}),
]


@pytest.mark.parametrize("name, kwargs", INITS)
def test_initialisers_match_torch_statistics(name, kwargs):
    shape = (384, 256, 3)  # a conv-shaped weight: fans count the receptive field
    ember.random.seed(1)
    x = enp.zeros(shape, dtype=enp.float32)
    same = x
    out = getattr(nn.init, name)(x, **kwargs)
    assert out is x and same is x and x.dtype == enp.float32  # the array object took the value
    ours = np.asarray(x)
    torch.manual_seed(1)
    ref = getattr(torch.nn.init, name)(torch.empty(shape), **kwargs).numpy()
    n = ours.size
    std = ref.std()
    assert abs(ours.mean() - ref.mean()) < 6 * std / math.sqrt(n)
    assert abs(ours.std() / std - 1) < 0.01
    if "uniform" in name:  # the extremes sit at the same bounds
        span = ref.max() - ref.min()
        assert abs(ours.min() - ref.min()) < 1e-3 * span
        assert abs(ours.max() - ref.max()) < 1e-3 * span
    if "trunc" in name:  # absolute bounds, not multiples of std
        assert kwargs.get("a", -2.0) <= ours.min() and ours.max() <= kwargs.get("b", 2.0)


@pytest.mark.parametrize("name, param", [("linear", None), ("sigmoid", None), ("tanh", None),
                                         ("relu", None), ("leaky_relu", None),
                                         ("leaky_relu", 0.2), ("selu", None),
                                         ("conv2d", None)])
def test_calculate_gain_matches_torch(name, param):
    assert nn.init.calculate_gain(name, param) == pytest.approx(
        torch.nn.init.calculate_gain(name, param), rel=1e-12)


def test_constant_initialisers_keep_dtype_and_reach_tied_names():
    class Tied(nn.Module):
        def __init__(self):
            self.a = nn.Linear(3, 3, dtype=enp.bfloat16)
            self.b = nn.Linear(3, 3, dtype=enp.bfloat16)
            self.b.weight = self.a.weight

    m = Tied()
    nn.init.ones_(m.a.weight)
    nn.init.constant_(m.a.bias, 0.25)
    nn.init.zeros_(m.b.bias)
    assert m.b.weight is m.a.weight and m.b.weight.dtype == enp.bfloat16
    np.testing.assert_array_equal(np.asarray(m.b.weight, dtype=np.float32), 1.0)
    np.testing.assert_array_equal(np.asarray(m.a.bias, dtype=np.float32), 0.25)
    np.testing.assert_array_equal(np.asarray(m.b.bias, dtype=np.float32), 0.0)


def test_initialisers_are_reproducible_and_skipped_inside_skip_init():
    ember.random.seed(3)
    a = nn.init.normal_(enp.zeros((4, 5), dtype=enp.float32), std=0.1)
    ember.random.seed(3)
    b = nn.init.normal_(enp.zeros((4, 5), dtype=enp.float32), std=0.1)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = nn.init.normal_(enp.zeros((4, 5), dtype=enp.float32), std=0.1, key=ember.random.key(0))
    d = nn.init.normal_(enp.zeros((4, 5), dtype=enp.float32), std=0.1, key=ember.random.key(0))
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
    with nn.init.skip_init():
        np.testing.assert_array_equal(np.asarray(nn.init.normal_(enp.ones(3))), 1.0)


def test_initialiser_bad_input():
    with pytest.raises(ember.EmberError, match="normal_.*floating-point ember array.*ndarray"):
        nn.init.normal_(np.zeros(3, dtype=np.float32))
    with pytest.raises(ember.EmberError, match="uniform_.*int64"):
        nn.init.uniform_(enp.zeros(3, dtype=enp.int64))
    with pytest.raises(ember.EmberError, match=r"xavier_uniform_.*at least 2.*\(7,\)"):
        nn.init.xavier_uniform_(enp.zeros(7, dtype=enp.float32))
    with pytest.raises(ember.EmberError, match="mode must be"):
        nn.init.kaiming_normal_(enp.zeros((2, 2), dtype=enp.float32), mode="fan_avg")
    with pytest.raises(ember.EmberError, match="unsupported nonlinearity 'gelu'"):
        nn.init.calculate_gain("gelu")


# --- Module.update checks names, shapes and dtypes at once -------------------------------------

def test_update_rejects_wrong_names_shapes_and_dtypes_all_at_once():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    before = {k: np.asarray(v) for k, v in model.state_dict().items()}
    with pytest.raises(ember.EmberError) as info:
        model.update({"0.weight": enp.zeros((7, 7), dtype=enp.float32),
                      "0.bias": enp.zeros(2, dtype=enp.float64),
                      "1.weight": [[1.0, 2.0]],
                      "2.weight": enp.zeros((1, 2), dtype=enp.float32),
                      "1.bias": enp.zeros(1, dtype=enp.float32)})
    message = str(info.value)
    for part in ("nothing was updated", "0.weight: got float32[7, 7], the model holds "
                 "float32[2, 3]", "0.bias: got float64[2], the model holds float32[2]",
                 "1.weight: expected an array, got list", "no array named '2.weight'"):
        assert part in message
    for k, v in model.state_dict().items():  # nothing replaced, not even the valid 1.bias
        np.testing.assert_array_equal(np.asarray(v), before[k])
    model.update({"1.bias": np.full(1, 4.0, dtype=np.float32)})  # NumPy arrays are accepted
    np.testing.assert_array_equal(np.asarray(model[1].bias), [4.0])


# --- load_state_dict(assign=) ----------------------------------------------------------------

def test_load_state_dict_copies_unless_assign():
    model = nn.Linear(3, 2)
    sd = {"weight": np.ones((2, 3), dtype=np.float32), "bias": np.zeros(2, dtype=np.float64)}
    model.load_state_dict(sd)
    assert not np.shares_memory(np.asarray(model.weight), sd["weight"])
    model.load_state_dict(sd, assign=True)
    assert np.shares_memory(np.asarray(model.weight), sd["weight"])
    assert model.bias.dtype == enp.float32  # a float64 value is still cast to the model's dtype
    np.testing.assert_array_equal(np.asarray(model(np.ones((1, 3), np.float32))), [[3.0, 3.0]])


# --- exact GELU: erf in float32 -------------------------------------------------------------

def test_erf_float32_is_within_4_ulp_everywhere_and_odd():
    xs = np.concatenate([np.linspace(0, 6, 600_001), np.geomspace(1e-38, 6, 20_000),
                         [np.finfo(np.float32).max, np.inf]]).astype(np.float32)
    xs = np.concatenate([xs, -xs])
    ref = np.array([math.erf(v) for v in xs.astype(np.float64)])
    got = np.asarray(ember.numpy.special.erf(enp.asarray(xs)))
    assert got.dtype == np.float32
    ulp = np.abs(got.astype(np.float64) - ref) / np.spacing(np.abs(ref).astype(np.float32))
    assert ulp.max() <= 4
    assert np.all(got[: xs.size // 2] == -got[xs.size // 2:])
    assert np.isnan(np.asarray(ember.numpy.special.erf(enp.asarray(np.float32(np.nan)))))


@pytest.mark.parametrize("dtype", [enp.float16, enp.bfloat16])
def test_erf_half_precision_is_the_float32_result_rounded_once(dtype):
    xs = np.linspace(-5, 5, 4001).astype(dtype)
    got = np.asarray(ember.numpy.special.erf(enp.asarray(xs)))
    wide = np.asarray(ember.numpy.special.erf(enp.asarray(xs.astype(np.float32))))
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, wide.astype(dtype))


def test_erf_float64_stays_a_float64_reference():
    xs = np.linspace(-7, 7, 20_001)
    ref = np.array([math.erf(v) for v in xs])
    got = np.asarray(ember.numpy.special.erf(enp.asarray(xs)))
    np.testing.assert_allclose(got, ref, rtol=4e-15, atol=1e-300)


def test_exact_gelu_matches_torch_in_float32_eagerly_and_under_jit():
    x = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32) * 3
    ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    # In the negative tail 1 + erf cancels, so erf's few ulp near -1 show as absolute error.
    np.testing.assert_allclose(np.asarray(F.gelu(enp.asarray(x))), ref, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ember.jit(F.gelu)(x)), ref, rtol=2e-5, atol=1e-6)


# --- dropout in a jitted training step without keys --------------------------------------------

class DropNet(nn.Module):
    def __init__(self):
        self.fc = nn.Linear(32, 32)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.fc(x))


def _dropout_step():
    def loss(model, x):
        return enp.sum(model(x))

    @ember.jit
    def step(model, x):
        value, grads = nn.value_and_grad(loss)(model, x)
        return value, grads["fc.bias"]
    return step


def test_dropout_in_a_jitted_training_step_needs_no_keys():
    ember.random.seed(0)
    model = DropNet()
    x = np.ones((4, 32), dtype=np.float32)
    step = _dropout_step()
    ember.random.seed(11)
    first = [np.asarray(step(model, x)[1]) for _ in range(3)]
    # The bias gradient counts the kept units per feature, scaled by 1/(1-p): it is the mask.
    assert all(set(np.unique(g)) <= {0.0, 2.0, 4.0, 6.0, 8.0} for g in first)
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])
    ember.random.seed(11)
    again = [np.asarray(step(model, x)[1]) for _ in range(3)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert step.trace_count == 1
    # The compiled step draws exactly what the eager step draws from the same seed.
    ember.random.seed(11)
    eager = nn.value_and_grad(lambda m, x: enp.sum(m(x)))(model, x)[1]["fc.bias"]
    np.testing.assert_array_equal(np.asarray(eager), first[0])
    # eval() turns dropout off (and retraces: the mode is static structure).
    model.eval()
    np.testing.assert_array_equal(np.asarray(step(model, x)[1]), np.full(32, 4.0))


# --- the module API ---------------------------------------------------------------------------

def test_apply_visits_submodules_first_as_torch():
    seen = []
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))
    assert model.apply(lambda m: seen.append(type(m).__name__)) is model
    ref = []
    torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sequential(
        torch.nn.ReLU(), torch.nn.Linear(3, 1))).apply(lambda m: ref.append(type(m).__name__))
    assert seen == ref


def test_the_examples_of_docs_nn_run():
    """docs/nn.md's code blocks, in order, as a reader would paste them."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).parent.parent / "docs" / "nn.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    scope: dict = {}
    for block in blocks[:2]:  # the module and the complete training step (LoRA needs a model)
        exec(compile(block, "docs/nn.md", "exec"), scope)
    assert scope["train_step"].trace_count == 1
