"""ember.optim: optimizers, schedules and clipping against torch.optim / transformers (marked
``torch``) and closed forms; jit, dtypes, gradient accumulation and state checkpoints."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import ember
import ember.numpy as enp
import ember.optim as eo
from ember.errors import EmberError
from ember.optim import schedules
from ember.tree import tree_leaves, tree_map

STEPS = 6
RTOL, ATOL = 1e-6, 1e-7  # float32, after STEPS updates


def make_params(rng, dtype=np.float32):
    """A small nested dict of parameters (paths like ``blocks.0.scale``), as NumPy arrays."""
    return {"weight": rng.standard_normal((4, 3)).astype(dtype),
            "bias": rng.standard_normal(3).astype(dtype),
            "blocks": [{"scale": rng.standard_normal(5).astype(dtype)}]}


def random_grads(rng, params, steps=STEPS):
    """Per-step gradients whose overall size varies from step to step (exercises amsgrad)."""
    return [tree_map(lambda p, s=rng.uniform(0.1, 3.0): (s * rng.standard_normal(p.shape))
                     .astype(p.dtype), params) for _ in range(steps)]


def to_ember(tree):
    return tree_map(enp.asarray, tree)


def run_ember(opt, params, grads_seq, jit=False):
    update = ember.jit(opt.update) if jit else opt.update
    p, state = to_ember(params), opt.init(to_ember(params))
    for grads in grads_seq:
        p, state = update(p, to_ember(grads), state)
    return p, state, update


def torch_lib():
    return pytest.importorskip("torch")


def to_torch(x, requires_grad=False):
    torch = torch_lib()
    x = np.asarray(x)
    if x.dtype == ml_dtypes.bfloat16:
        return torch.tensor(x.astype(np.float32)).to(torch.bfloat16).requires_grad_(requires_grad)
    return torch.tensor(x, requires_grad=requires_grad)


def from_torch(t):
    return t.detach().float().numpy()


def run_torch(name, kwargs, params, grads_seq, schedule=None):
    """``torch.optim.<name>`` on the leaves of ``params``; ``schedule(opt)`` makes a LambdaLR."""
    torch = torch_lib()
    tparams = [to_torch(p, requires_grad=True) for p in tree_leaves(params)]
    opt = getattr(torch.optim, name)(tparams, foreach=False, **kwargs)
    sched = schedule(opt) if schedule is not None else None
    for grads in grads_seq:
        for t, g in zip(tparams, tree_leaves(grads)):
            t.grad = to_torch(g)
        opt.step()
        if sched is not None:
            sched.step()
    return tparams, opt


def assert_tree_close(actual, expected, rtol=RTOL, atol=ATOL):
    for a, e in zip(tree_leaves(actual), expected):
        np.testing.assert_allclose(np.asarray(a).astype(np.float64),
                                   np.asarray(e).astype(np.float64), rtol=rtol, atol=atol)


CASES = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True}),
    ("SGD", {"lr": 0.1, "weight_decay": 0.05}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}),
    ("Adam", {"lr": 1e-2}),
    ("Adam", {"lr": 1e-2, "weight_decay": 0.1}),
    ("Adam", {"lr": 1e-2, "amsgrad": True}),
    ("Adam", {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05,
              "amsgrad": True}),
    ("AdamW", {"lr": 1e-2}),
    ("AdamW", {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
]


@pytest.mark.torch
@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_matches_torch_optim(name, kwargs):
    rng = np.random.default_rng(0)
    params = make_params(rng)
    grads_seq = random_grads(rng, params)
    opt = getattr(eo, name)(**kwargs)
    p, state, _ = run_ember(opt, params, grads_seq)
    tparams, topt = run_torch(name, kwargs, params, grads_seq)
    assert_tree_close(p, [from_torch(t) for t in tparams])
    assert int(state.step) == STEPS and state.step.dtype == np.int32
    for slot in opt.slot_names():  # ember's slot names are torch's state keys
        assert_tree_close(getattr(state, slot), [from_torch(topt.state[t][slot]) for t in tparams])
    for leaf in tree_leaves(p) + tree_leaves(state)[1:]:
        assert leaf.dtype == np.float32


@pytest.mark.parametrize("name,kwargs", CASES[1::3], ids=[n for n, _ in CASES[1::3]])
def test_jit_update_equals_eager_and_traces_once(name, kwargs):
    rng = np.random.default_rng(1)
    params = make_params(rng)
    grads_seq = random_grads(rng, params)
    opt = getattr(eo, name)(**kwargs)
    eager, eager_state, _ = run_ember(opt, params, grads_seq)
    jitted, jit_state, update = run_ember(opt, params, grads_seq, jit=True)
    assert update.trace_count == 1
    assert_tree_close(jitted, tree_leaves(eager), rtol=1e-7, atol=0)
    assert_tree_close(jit_state, tree_leaves(eager_state), rtol=1e-7, atol=0)


# A small two-layer network written with ember.numpy (and the same in torch).

def init_mlp(rng):
    return {"w1": (0.5 * rng.standard_normal((4, 8))).astype(np.float32),
            "b1": np.zeros(8, np.float32),
            "w2": (0.5 * rng.standard_normal((8, 2))).astype(np.float32),
            "b2": np.zeros(2, np.float32)}


def mlp_loss(params, x, y, lib=enp):
    h = lib.tanh(x @ params["w1"] + params["b1"])
    return lib.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def make_batches(rng, n, batch=16):
    return [(rng.standard_normal((batch, 4)).astype(np.float32),
             rng.standard_normal((batch, 2)).astype(np.float32)) for _ in range(n)]


def train_step(opt, max_norm):
    def step(params, state, x, y):
        loss, grads = ember.value_and_grad(mlp_loss)(params, x, y)
        grads, norm = eo.clip_grad_norm(grads, max_norm)
        params, state = opt.update(params, grads, state)
        return params, state, loss, norm
    return step


TRAIN_CASES = [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, None),
    ("Adam", {"lr": 1e-2, "weight_decay": 0.01}, None),
    ("AdamW", {"lr": 2e-2, "weight_decay": 0.1}, (3, 10)),
]


@pytest.mark.torch
@pytest.mark.parametrize("name,kwargs,warmup_total", TRAIN_CASES,
                         ids=[n for n, _, _ in TRAIN_CASES])
def test_training_loop_matches_torch(name, kwargs, warmup_total):
    """Grads from a real loss, global-norm clipping and (for AdamW) a warm-up cosine schedule."""
    torch = torch_lib()
    from transformers import get_cosine_schedule_with_warmup

    rng = np.random.default_rng(2)
    params, batches, max_norm = init_mlp(rng), make_batches(rng, 10), 0.5
    lr = (schedules.warmup_cosine(kwargs["lr"], *warmup_total) if warmup_total
          else kwargs["lr"])
    opt = getattr(eo, name)(**{**kwargs, "lr": lr})
    step = ember.jit(train_step(opt, max_norm))
    p, state = to_ember(params), opt.init(to_ember(params))

    tparams = {k: to_torch(v, requires_grad=True) for k, v in params.items()}
    topt = getattr(torch.optim, name)(list(tparams.values()), foreach=False, **kwargs)
    sched = get_cosine_schedule_with_warmup(topt, *warmup_total) if warmup_total else None
    for x, y in batches:
        assert opt.lr_at(state) == pytest.approx(topt.param_groups[0]["lr"], rel=1e-12)
        p, state, loss, norm = step(p, state, enp.asarray(x), enp.asarray(y))
        topt.zero_grad()
        tloss = mlp_loss(tparams, torch.tensor(x), torch.tensor(y), lib=torch)
        tloss.backward()
        tnorm = torch.nn.utils.clip_grad_norm_(list(tparams.values()), max_norm)
        topt.step()
        if sched is not None:
            sched.step()
        np.testing.assert_allclose(float(loss), tloss.item(), rtol=1e-5)
        np.testing.assert_allclose(float(norm), tnorm.item(), rtol=1e-5)
    assert step.trace_count == 1
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), from_torch(tparams[k]), rtol=1e-5,
                                   atol=1e-6)


def test_jitted_training_step_equals_eager():
    rng = np.random.default_rng(3)
    params, batches = init_mlp(rng), make_batches(rng, 6)
    opt = eo.AdamW(schedules.warmup_cosine(1e-2, 2, 6), weight_decay=0.05)
    eager_step = train_step(opt, 1.0)
    jit_step = ember.jit(eager_step)
    pe = pj = to_ember(params)
    se = sj = opt.init(pe)
    for x, y in batches:
        pe, se, loss_e, _ = eager_step(pe, se, enp.asarray(x), enp.asarray(y))
        pj, sj, loss_j, _ = jit_step(pj, sj, enp.asarray(x), enp.asarray(y))
        np.testing.assert_allclose(float(loss_j), float(loss_e), rtol=1e-6)
    assert jit_step.trace_count == 1
    assert jit_step.cache_info()["hits"] == len(batches) - 1
    assert_tree_close(pj, tree_leaves(pe), rtol=1e-6, atol=1e-7)
    assert_tree_close(sj, tree_leaves(se), rtol=1e-6, atol=1e-7)


# dtypes

@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, np.float64],
                         ids=["bf16", "f16", "f32", "f64"])
@pytest.mark.parametrize("make_opt", [
    lambda: eo.SGD(0.05, momentum=0.9, weight_decay=0.01),
    lambda: eo.Adam(1e-2, amsgrad=True, weight_decay=0.01),
    lambda: eo.AdamW(schedules.warmup_linear(1e-2, 1, 4)),
], ids=["SGD", "Adam", "AdamW"])
def test_params_and_state_keep_their_dtype(dtype, make_opt):
    """Half-precision params are updated in float32 and stored back: no promotion, no retrace,
    and values close to a float32 run from the same (rounded) start."""
    rng = np.random.default_rng(4)
    params = make_params(rng, dtype)
    grads_seq = random_grads(rng, params, steps=4)
    opt = make_opt()
    p, state, update = run_ember(opt, params, grads_seq, jit=True)
    assert update.trace_count == 1
    assert state.step.dtype == np.int32
    for leaf in tree_leaves(p) + tree_leaves(state)[1:]:
        assert leaf.dtype == np.dtype(dtype)
    widen = lambda t: tree_map(lambda a: np.asarray(a).astype(np.float32), t)
    reference, _, _ = run_ember(opt, widen(params), [widen(g) for g in grads_seq])
    tol = {np.dtype(np.float16): 3e-3, np.dtype(ml_dtypes.bfloat16): 2e-2}.get(np.dtype(dtype),
                                                                               1e-6)
    assert_tree_close(p, tree_leaves(reference), rtol=tol, atol=tol)


def test_float32_params_stay_float32_with_float64_grads_and_schedule():
    params = {"w": np.ones(3, np.float32)}
    opt = eo.SGD(schedules.constant(0.5))
    p, state = opt.update(to_ember(params), {"w": enp.ones(3)}, opt.init(to_ember(params)))
    assert p["w"].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(p["w"]), np.full(3, 0.5, np.float32))


# schedules

def hf_schedules():
    import transformers as tr

    peak = 0.1
    return [
        (schedules.warmup_cosine(peak, 3, 12),
         lambda o: tr.get_cosine_schedule_with_warmup(o, 3, 12)),
        (schedules.warmup_cosine(peak, 3, 12, min_lr=0.01),
         lambda o: tr.get_cosine_with_min_lr_schedule_with_warmup(o, 3, 12, min_lr=0.01)),
        (schedules.warmup_cosine(peak, 0, 12),
         lambda o: tr.get_cosine_schedule_with_warmup(o, 0, 12)),
        (schedules.warmup_linear(peak, 4, 12),
         lambda o: tr.get_linear_schedule_with_warmup(o, 4, 12)),
        (schedules.warmup_linear(peak, 0, 12),
         lambda o: tr.get_linear_schedule_with_warmup(o, 0, 12)),
        (schedules.linear_warmup(peak, 5),
         lambda o: tr.get_constant_schedule_with_warmup(o, 5)),
        (schedules.linear_warmup(peak, 0),
         lambda o: tr.get_constant_schedule_with_warmup(o, 0)),
    ]


@pytest.mark.torch
def test_schedules_match_transformers():
    torch = torch_lib()
    pytest.importorskip("transformers")
    for ours, theirs in hf_schedules():
        topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        sched = theirs(topt)
        jitted = ember.jit(ours)
        for step in range(13):  # up to and including total_steps
            expected = topt.param_groups[0]["lr"]
            assert float(ours(step)) == pytest.approx(expected, rel=1e-12, abs=1e-15), \
                (ours, step)
            traced = jitted(enp.asarray(step, dtype=enp.int32))
            assert float(traced) == pytest.approx(expected, rel=1e-12, abs=1e-15)
            topt.step()
            sched.step()
        assert jitted.trace_count == 1


def test_schedules_closed_form():
    cosine = schedules.warmup_cosine(1.0, 4, 12, min_lr=0.1)
    assert float(cosine(0)) == 0.0  # the first update has learning rate 0, as in transformers
    assert float(cosine(2)) == pytest.approx(0.5)
    assert float(cosine(4)) == pytest.approx(1.0)
    assert float(cosine(8)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert [float(cosine(s)) for s in (12, 13, 20, 1000)] == pytest.approx([0.1] * 4)
    linear = schedules.warmup_linear(2.0, 2, 10, end_lr=0.4)
    assert float(linear(1)) == pytest.approx(1.0)
    assert float(linear(6)) == pytest.approx(0.4 + 1.6 * 0.5)
    assert [float(linear(s)) for s in (10, 11, 50)] == pytest.approx([0.4] * 3)
    assert float(schedules.constant(3e-4)(7)) == 3e-4
    assert float(schedules.linear_warmup(1.0, 4)(100)) == 1.0


def test_schedule_drives_the_update_from_step_zero():
    """The update from step t uses lr(t); lr_at(state) is the rate of the next update."""
    opt = eo.SGD(schedules.warmup_linear(1.0, 2, 4))
    p, state = {"w": enp.zeros(())}, opt.init({"w": enp.zeros(())})
    seen = []
    for _ in range(5):
        seen.append(opt.lr_at(state))
        before = float(p["w"])
        p, state = opt.update(p, {"w": enp.asarray(-1.0)}, state)
        assert float(p["w"]) - before == pytest.approx(seen[-1])
    assert seen == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert all(isinstance(lr, float) for lr in seen)
    traced = ember.jit(lambda s: opt.lr_at(s))(state)
    assert isinstance(traced, ember.Array) and float(traced) == 0.0


# clipping

@pytest.mark.torch
@pytest.mark.parametrize("scale", [10.0, 0.01], ids=["clipped", "unclipped"])
def test_clip_grad_norm_matches_torch(scale):
    torch = torch_lib()
    rng = np.random.default_rng(5)
    grads = tree_map(lambda p: scale * p, make_params(rng))
    clipped, norm = eo.clip_grad_norm(to_ember(grads), 1.0)
    tgrads = [to_torch(g) for g in tree_leaves(grads)]
    tparams = [torch.zeros_like(g, requires_grad=True) for g in tgrads]
    for t, g in zip(tparams, tgrads):
        t.grad = g
    tnorm = torch.nn.utils.clip_grad_norm_(tparams, 1.0, foreach=False)
    assert norm.dtype == np.float32
    np.testing.assert_allclose(float(norm), tnorm.item(), rtol=1e-6)
    assert_tree_close(clipped, [from_torch(t.grad) for t in tparams])
    jit_clipped, jit_norm = ember.jit(eo.clip_grad_norm, static_argnums=1)(to_ember(grads), 1.0)
    np.testing.assert_allclose(float(jit_norm), float(norm), rtol=1e-7)
    assert_tree_close(jit_clipped, tree_leaves(clipped), rtol=1e-7, atol=0)


def test_clip_grad_norm_dtypes():
    grads = {"a": enp.full((4,), 3.0, dtype=enp.bfloat16), "b": enp.full((9,), 4.0 / 3,
                                                                          dtype=enp.float16)}
    clipped, norm = eo.clip_grad_norm(grads, 1.0)
    assert norm.dtype == np.float32
    assert clipped["a"].dtype == ml_dtypes.bfloat16 and clipped["b"].dtype == np.float16
    assert float(norm) == pytest.approx(math.sqrt(4 * 9 + 9 * 16 / 9), rel=1e-3)
    assert float(eo.global_norm(clipped)) == pytest.approx(1.0, rel=1e-2)
    _, norm64 = eo.clip_grad_norm({"a": enp.ones(4, dtype=enp.float32), "b": enp.ones(4)}, 1.0)
    assert norm64.dtype == np.float64


# gradient accumulation

def linear_loss(params, x, y):
    return enp.mean((x @ params["w"] + params["b"] - y) ** 2)


@pytest.mark.parametrize("make_opt", [lambda: eo.SGD(0.1, momentum=0.9),
                                      lambda: eo.AdamW(1e-2, weight_decay=0.1)],
                         ids=["SGD", "AdamW"])
def test_accumulation_equals_one_big_batch(make_opt):
    rng = np.random.default_rng(6)
    k, micro, updates = 4, 3, 3
    params = {"w": rng.standard_normal((5, 2)).astype(np.float32),
              "b": np.zeros(2, np.float32)}
    data = [(rng.standard_normal((k * micro, 5)).astype(np.float32),
             rng.standard_normal((k * micro, 2)).astype(np.float32)) for _ in range(updates)]
    grad = ember.grad(linear_loss)

    big_opt = make_opt()
    big, big_state = to_ember(params), big_opt.init(to_ember(params))
    for x, y in data:
        big, big_state = big_opt.update(big, grad(big, enp.asarray(x), enp.asarray(y)),
                                        big_state)

    opt = eo.GradientAccumulation(make_opt(), every=k)
    step = ember.jit(lambda p, s, x, y: opt.update(p, grad(p, x, y), s))
    acc, state = to_ember(params), opt.init(to_ember(params))
    for x, y in data:
        before = acc
        for i in range(k):
            rows = slice(i * micro, (i + 1) * micro)
            acc, state = step(acc, state, enp.asarray(x[rows]), enp.asarray(y[rows]))
            if i < k - 1:  # only the k-th micro-batch moves the parameters
                for a, b in zip(tree_leaves(acc), tree_leaves(before)):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(state.micro_step) == 0
    assert step.trace_count == 1
    assert int(state.inner.step) == updates
    assert_tree_close(acc, tree_leaves(big), rtol=1e-5, atol=1e-6)
    assert all(not np.asarray(g).any() for g in tree_leaves(state.grads))


def test_accumulation_every_one_is_the_plain_optimizer():
    rng = np.random.default_rng(7)
    params = make_params(rng)
    grads_seq = random_grads(rng, params, steps=3)
    plain, _, _ = run_ember(eo.Adam(1e-2), params, grads_seq)
    wrapped, state, _ = run_ember(eo.GradientAccumulation(eo.Adam(1e-2), 1), params, grads_seq)
    assert_tree_close(wrapped, tree_leaves(plain), rtol=0, atol=0)
    assert eo.GradientAccumulation(eo.SGD(schedules.constant(0.25)), 2).lr_at(state) == 0.25


def test_accumulator_is_float32_for_half_params():
    params = {"w": np.ones(3, ml_dtypes.bfloat16)}
    opt = eo.GradientAccumulation(eo.AdamW(1e-3), every=2)
    p, state, update = run_ember(opt, params, [{"w": np.full(3, 0.1, ml_dtypes.bfloat16)}] * 3,
                                 jit=True)
    assert state.grads["w"].dtype == np.float32
    assert p["w"].dtype == ml_dtypes.bfloat16 and state.inner.exp_avg["w"].dtype == p["w"].dtype
    assert update.trace_count == 1


# checkpoints

def test_state_to_dict_names():
    params = to_ember(make_params(np.random.default_rng(8)))
    flat = eo.state_to_dict(eo.AdamW(amsgrad=True).init(params))
    slots = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    assert set(flat) == {"step"} | {f"{s}.{p}" for s in slots
                                    for p in ("weight", "bias", "blocks.0.scale")}
    assert flat["step"].dtype == np.int32 and flat["step"].shape == ()
    assert isinstance(flat["exp_avg.weight"], np.ndarray)
    assert flat["exp_avg.weight"].shape == (4, 3)
    assert set(eo.state_to_dict(eo.SGD().init(params))) == {"step"}
    acc = eo.state_to_dict(eo.GradientAccumulation(eo.SGD(momentum=0.9), 2).init(params))
    assert {"micro_step", "grads.weight", "inner.step", "inner.momentum_buffer.bias"} <= set(acc)


@pytest.mark.parametrize("make_opt", [
    lambda: eo.AdamW(schedules.warmup_cosine(1e-2, 2, 8), amsgrad=True),
    lambda: eo.SGD(0.1, momentum=0.9),
    lambda: eo.GradientAccumulation(eo.Adam(1e-2), every=3),
], ids=["AdamW", "SGD", "accumulation"])
def test_checkpoint_resume_continues_identically(make_opt, tmp_path):
    rng = np.random.default_rng(9)
    params = make_params(rng)
    grads_seq = random_grads(rng, params, steps=8)
    opt = make_opt()
    update = ember.jit(opt.update)
    p, state = to_ember(params), opt.init(to_ember(params))
    for g in grads_seq[:4]:
        p, state = update(p, to_ember(g), state)
    np.savez(tmp_path / "opt.npz", **eo.state_to_dict(state))
    with np.load(tmp_path / "opt.npz") as saved:
        restored = eo.state_from_dict(opt.init(p), dict(saved))
    resumed = p
    for g in grads_seq[4:]:
        p, state = update(p, to_ember(g), state)
        resumed, restored = update(resumed, to_ember(g), restored)
    assert update.trace_count == 1  # the restored state has the same types (no weak flags)
    for a, b in zip(tree_leaves((p, state)), tree_leaves((resumed, restored))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_state_from_dict_rejects_mismatches():
    params = to_ember(make_params(np.random.default_rng(10)))
    opt = eo.Adam()
    template = opt.init(params)
    good = eo.state_to_dict(opt.update(params, params, template)[1])
    bad = dict(good)
    del bad["exp_avg.bias"]
    bad["exp_avg.extra"] = np.zeros(2, np.float32)
    bad["exp_avg_sq.weight"] = np.zeros((3, 4), np.float32)
    bad["step"] = np.asarray(1, np.int64)
    with pytest.raises(EmberError) as info:
        eo.state_from_dict(template, bad)
    message = str(info.value)
    for text in ("missing: exp_avg.bias", "unexpected: exp_avg.extra",
                 "exp_avg_sq.weight: expected float32[4, 3], got float32[3, 4]",
                 "step: expected int32[], got int64[]"):
        assert text in message
    assert int(template.step) == 0 and not np.asarray(template.exp_avg["weight"]).any()
    restored = eo.state_from_dict(template, good)
    assert int(restored.step) == 1 and int(template.step) == 0
    with pytest.raises(EmberError, match="missing: .*max_exp_avg_sq"):
        eo.state_from_dict(eo.Adam(amsgrad=True).init(params), good)


# argument checking

def test_bad_arguments_raise_ember_errors():
    bad = [lambda: eo.SGD(0.1, nesterov=True), lambda: eo.SGD(0.1, momentum=0.9, dampening=0.1,
                                                              nesterov=True),
           lambda: eo.SGD(-1.0), lambda: eo.Adam(betas=(0.9, 1.0)), lambda: eo.AdamW(eps=-1.0),
           lambda: eo.GradientAccumulation(eo.SGD(), 0),
           lambda: schedules.warmup_cosine(1.0, 10, 5), lambda: schedules.warmup_linear(1.0, -1, 5),
           lambda: eo.clip_grad_norm({"a": enp.ones(2)}, -1.0)]
    for make in bad:
        with pytest.raises(EmberError):
            make()
    with pytest.raises(ValueError):
        eo.SGD(0.1, nesterov=True)
    with pytest.raises(EmberError, match="'steps'"):
        eo.Adam().init({"w": enp.ones(2), "steps": enp.ones(2, dtype=enp.int32)})
    opt = eo.Adam()
    state = opt.init({"w": enp.ones(2)})
    with pytest.raises(EmberError, match="structure"):
        opt.update({"w": enp.ones(2)}, {"v": enp.ones(2)}, state)
    with pytest.raises(EmberError, match="state.exp_avg has structure"):
        opt.update({"v": enp.ones(2)}, {"v": enp.ones(2)}, state)
    with pytest.raises(EmberError, match="state.max_exp_avg_sq"):
        eo.Adam(amsgrad=True).update({"w": enp.ones(2)}, {"w": enp.ones(2)}, state)


def test_reprs_show_hyperparameters():
    opt = eo.AdamW(schedules.warmup_cosine(3e-4, 10, 100))
    assert repr(opt) == ("AdamW(lr=warmup_cosine(peak_lr=0.0003, warmup_steps=10, "
                         "total_steps=100, min_lr=0.0), betas=(0.9, 0.999), eps=1e-08, "
                         "weight_decay=0.01, amsgrad=False)")
    assert repr(eo.GradientAccumulation(eo.SGD(0.1), 4)).startswith("GradientAccumulation(SGD(")
