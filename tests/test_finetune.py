"""Fine-tuning: the loss falls (LoRA and full), a killed run resumes onto the same loss
curve, the outputs are loadable, and bad settings or data are refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from tiny_models import tiny_model_dir

import ember
from ember.models import loading
from ember.models.finetune import TrainConfig, train

TEXT = "\n\n".join(
    f"The {animal} sat on the {thing}. The {animal} was happy on the {thing}."
    for animal in ("cat", "dog", "fox", "owl") for thing in ("mat", "log", "rug")) * 3


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def fresh(base_dir):
    return loading.load(base_dir)


def test_lora_fine_tune_lowers_the_loss_and_writes_loadable_outputs(base_dir, tmp_path):
    model, tok = fresh(base_dir)
    config = TrainConfig(steps=30, batch_size=4, seq_len=32, lr=2e-2, warmup_steps=3,
                         lora_rank=8, eval_every=10, save_every=10,
                         lora_targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
    history = train(model, tok, TEXT, tmp_path, config)
    losses = [r["loss"] for r in history["train"]]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert [e["step"] for e in history["eval"]] == [0, 10, 20, 30]
    assert history["eval"][-1]["loss"] < history["eval"][0]["loss"]
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json",
                 "adapter.safetensors", "loss.png", "history.json", "checkpoints/latest"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the merged model computes what the trained LoRA model computed
    ids = np.asarray([tok.encode("The cat sat on the")])
    reloaded, _ = loading.load(tmp_path / "model")
    np.testing.assert_allclose(np.asarray(reloaded(ids)), np.asarray(model(ids)), rtol=1e-4,
                               atol=1e-5)
    assert history["train"][0]["tokens_per_s"] > 0


def test_killed_run_resumes_onto_the_same_loss_curve(base_dir, tmp_path):
    config = TrainConfig(steps=8, batch_size=2, seq_len=16, lr=5e-3, warmup_steps=2,
                         lora_rank=4, eval_every=4, save_every=2)
    model, tok = fresh(base_dir)
    straight = train(model, tok, TEXT, tmp_path / "a", config)

    def kill(step, record):
        if step == 5:
            raise KeyboardInterrupt
    model, tok = fresh(base_dir)
    with pytest.raises(KeyboardInterrupt):
        train(model, tok, TEXT, tmp_path / "b", config, on_step=kill)
    # the interrupt saved the steps finished since the last checkpoint (step 4)
    assert (tmp_path / "b/checkpoints/latest").read_text() == "step-5"
    model, tok = fresh(base_dir)
    resumed = train(model, tok, TEXT, tmp_path / "b", config)
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in straight["train"]]
    assert resumed["eval"] == straight["eval"]
    again, _ = loading.load(tmp_path / "b" / "model")
    first, _ = loading.load(tmp_path / "a" / "model")
    for k, v in first.state_dict().items():
        np.testing.assert_array_equal(np.asarray(again.state_dict()[k]), np.asarray(v))


def test_ctrl_c_during_an_evaluation_resumes_onto_the_same_curve(base_dir, tmp_path,
                                                                 monkeypatch):
    from ember.models import finetune

    config = TrainConfig(steps=6, batch_size=2, seq_len=16, lr=5e-3, warmup_steps=2,
                         lora_rank=4, eval_every=3, save_every=2)
    model, tok = fresh(base_dir)
    straight = train(model, tok, TEXT, tmp_path / "a", config)
    real, calls = finetune._evaluate, []

    def evaluate(*args):
        calls.append(1)
        if len(calls) == 2:  # the evaluation after step 3, whose checkpoint is not written
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(finetune, "_evaluate", evaluate)
    model, tok = fresh(base_dir)
    with pytest.raises(KeyboardInterrupt):
        train(model, tok, TEXT, tmp_path / "b", config)
    assert (tmp_path / "b/checkpoints/latest").read_text() == "step-2"
    monkeypatch.setattr(finetune, "_evaluate", real)
    model, tok = fresh(base_dir)
    resumed = train(model, tok, TEXT, tmp_path / "b", config)
    assert resumed["eval"] == straight["eval"]
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in straight["train"]]


def test_full_fine_tune_with_accumulation_and_checkpointing(base_dir, tmp_path):
    model, tok = fresh(base_dir)
    config = TrainConfig(steps=12, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=2,
                         lora_rank=0, grad_accum=2, checkpointing=True, eval_every=6,
                         save_every=6)
    history = train(model, tok, TEXT, tmp_path, config)
    losses = [r["loss"] for r in history["train"]]
    assert losses[-1] < losses[0]
    assert not (tmp_path / "adapter.safetensors").exists()
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["train"] == history["train"]


def test_bad_data_and_settings_are_refused(base_dir, tmp_path):
    model, tok = fresh(base_dir)
    with pytest.raises(ember.EmberError, match="dataset is empty"):
        train(model, tok, "  \n\n ", tmp_path, TrainConfig(steps=1))
    with pytest.raises(ember.EmberError, match="fewer than"):
        train(model, tok, "tiny text", tmp_path, TrainConfig(steps=1, seq_len=64))
    with pytest.raises(ember.EmberError, match="invalid settings"):
        train(model, tok, TEXT, tmp_path, TrainConfig(steps=0))
    with pytest.raises(ember.EmberError, match=r"warmup_steps=5 \(must be below steps=5\)"):
        train(model, tok, TEXT, tmp_path, TrainConfig(steps=5, warmup_steps=5))
    assert TrainConfig(steps=30).warmup == 3 and TrainConfig(steps=500).warmup == 10
    config = TrainConfig(steps=2, batch_size=2, seq_len=16, lora_rank=2, save_every=1)
    train(model, tok, TEXT, tmp_path / "run", config)
    model, tok = fresh(base_dir)
    with pytest.raises(ember.EmberError, match="other settings or data"):
        train(model, tok, TEXT + " more", tmp_path / "run", config)
    assert not [f for f in os.listdir(tmp_path / "run") if f.startswith(".")]


def test_accumulated_step_equals_one_big_batch(base_dir):
    from ember.models import finetune

    config = TrainConfig(steps=10, lr=1e-2, lora_rank=0, warmup_steps=0)
    opt = finetune._optimizer(config)
    step = finetune._make_step(opt, clip=1.0)
    batches = np.random.default_rng(0).integers(0, 200, size=(2, 3, 12))
    results = []
    for stacked in (batches, batches.reshape(1, 6, 12)):
        model, _ = fresh(base_dir)
        model.train()
        state = opt.init(model.trainable_parameters())
        loss, norm, params, _ = step(model, state, stacked)
        results.append((float(loss), float(norm), params))
    (l1, n1, p1), (l2, n2, p2) = results
    assert l1 == pytest.approx(l2, rel=1e-5) and n1 == pytest.approx(n2, rel=1e-4)
    for k in p1:
        np.testing.assert_allclose(np.asarray(p1[k]), np.asarray(p2[k]), rtol=1e-4, atol=1e-6)


def test_history_records_the_learning_rate_each_step_used(base_dir, tmp_path):
    model, tok = fresh(base_dir)
    config = TrainConfig(steps=6, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=3,
                         lora_rank=2, eval_every=6, save_every=6)
    history = train(model, tok, TEXT, tmp_path, config)
    lrs = [r["lr"] for r in history["train"]]
    # transformers' cosine-with-warmup: 0, lr/3, 2lr/3 during warm-up, then cosine decay
    assert lrs[:3] == pytest.approx([0.0, 1e-2 / 3, 2e-2 / 3], rel=1e-5, abs=1e-9)
    assert lrs[3] == pytest.approx(1e-2, rel=1e-5) and lrs[3] > lrs[4] > lrs[5] > 0


def test_a_sharded_checkpoint_resumes_on_another_mesh_and_continues_the_curve(base_dir,
                                                                              tmp_path):
    """Parameters and AdamW moments sharded over 4 devices are saved as a sharded checkpoint;
    resumed on 2 devices (other splits) or on one, they hold the same values, and the next
    step's loss is the one the uninterrupted run computes."""
    from ember import parallel as P
    from ember.models import finetune
    from ember.tree import tree_leaves, tree_map

    def layout(n, dim):
        mesh = P.Mesh(P.devices()[:n], ("x",))

        def place(x):
            spec = [None] * x.ndim
            if x.ndim and x.shape[dim % x.ndim] % n == 0:
                spec[dim % x.ndim] = "x"
            return P.device_put(x, P.NamedSharding(mesh, P.PartitionSpec(*spec)))
        return place

    config = TrainConfig(steps=10, lr=1e-2, lora_rank=0, warmup_steps=0)
    opt = finetune._optimizer(config)
    step = finetune._make_step(opt, clip=1.0)
    batches = np.random.default_rng(0).integers(0, 200, size=(3, 1, 2, 12))
    history = {"fingerprint": "f", "step": 1, "train": [], "eval": []}

    def started():  # a model and its optimizer state, one step in (the moments are not zero)
        model, _ = fresh(base_dir)
        model.train()
        state = opt.init(model.trainable_parameters())
        _, _, params, state = step(model, state, batches[0])
        model.update(params)
        return model, state

    model, state = started()
    sharded_model, _ = started()
    sharded_model.update(tree_map(layout(4, 0), model.trainable_parameters()))
    finetune._save_checkpoint(str(tmp_path), sharded_model, tree_map(layout(4, 0), state),
                              history)
    saved = tmp_path / "step-1"
    assert sorted(os.listdir(saved)) == ["history.json", "sharded"]

    for place in (layout(2, -1), None):  # resumed on another mesh, or on one device
        resumed, template = started()
        if place is not None:
            resumed.update(tree_map(place, resumed.trainable_parameters()))
            template = tree_map(place, template)
        restored, _ = finetune._restore(str(tmp_path), resumed, template, history)
        for got, want in zip(tree_leaves((resumed.trainable_parameters(), restored)),
                             tree_leaves((model.trainable_parameters(), state))):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        for got, like in zip(tree_leaves(restored), tree_leaves(template)):
            assert getattr(got, "sharding", None) == getattr(like, "sharding", None)
    # On one device the resumed run's next step is the uninterrupted run's.
    loss, *_ = step(resumed, restored, batches[1])
    want, *_ = step(model, state, batches[1])
    assert float(loss) == float(want)


def test_a_run_sharded_by_one_plan_resumes_under_another_and_continues_the_curve(tmp_path):
    """Two steps under dp=2 x tp=2 (ZeRO-1) on 4 devices, a sharded checkpoint, two more under
    ZeRO-3 on 2 devices: the losses and parameters are those of four steps on one device."""
    from tiny_models import tiny_model

    from ember import parallel as P
    from ember.models import finetune
    from ember.tree import tree_map

    vocab = 64
    rng = np.random.default_rng(0)
    data = [rng.integers(0, vocab, (1, 8, 8)).astype(np.int32) for _ in range(4)]
    opt = ember.optim.AdamW(lr=1e-2)
    history = {"fingerprint": "f", "step": 2, "train": [], "eval": []}

    def run(batches, plan=None, axes=None, resume=False):
        model = tiny_model(vocab)
        state = opt.init(model.trainable_parameters())
        step = finetune._make_step(opt, 1.0)
        place = np.asarray
        if plan is not None:
            mesh = P.Mesh(P.devices()[:int(np.prod(list(axes.values())))], tuple(axes),
                          shape=tuple(axes.values()))
            plan = P.plans.llama(**plan)
            model = P.shard(model, mesh, plan)
            layout = plan.state_shardings(state, mesh)
            state = tree_map(P.device_put, state, layout)
            params = plan.param_shardings(model, mesh)
            trained = {k: params[k] for k in model.trainable_parameters()}
            step = ember.jit(step.fun, donate_argnums=1, backend="numpy",
                             out_shardings=(None, None, trained, layout))
            batch_layout = plan.batch_sharding(mesh, 3)
            place = lambda batch: P.device_put(batch, batch_layout)  # noqa: E731
        if resume:
            state, _ = finetune._restore(str(tmp_path), model, state, history)
        losses = []
        for batch in batches:
            loss, _, new, state = step(model, state, place(batch))
            model.update(new)
            losses.append(float(np.asarray(loss)))
        return model, state, losses

    one, _, want = run(data)
    first, state, before = run(data[:2], dict(dp="dp", tp="tp", zero=1), dict(dp=2, tp=2))
    finetune._save_checkpoint(str(tmp_path), first, state, history)
    assert (tmp_path / "step-2" / "sharded" / "layout.json").is_file()
    second, _, after = run(data[2:], dict(dp="dp", zero=3), dict(dp=2), resume=True)
    np.testing.assert_allclose(before + after, want, rtol=2e-5)
    for name, value in second.trainable_parameters().items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(
            one.trainable_parameters()[name]), rtol=1e-4, atol=2e-5, err_msg=name)
