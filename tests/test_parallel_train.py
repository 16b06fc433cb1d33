"""``ember train --devices N --plan dp=D,tp=T``: fine-tuning the tiny Llama on a mesh of virtual
devices gives one device's losses, resumes under another plan onto the same curve, and every
plan that does not fit is one error naming what is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import tiny_model, tiny_tokenizer

from ember import cli
from ember import parallel as P
from ember.io import safetensors
from ember.models import finetune
from ember.parallel.plans import PlanError, parse


@pytest.fixture(autouse=True)
def virtual_devices(monkeypatch):
    """``--devices`` sets EMBER_CPU_DEVICES: restored after each test (the job keeps the 8
    devices conftest gives it, read once; ``--devices N`` then uses the first N)."""
    monkeypatch.setenv("EMBER_CPU_DEVICES", "8")


def train_args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--steps", "4",
            "--batch-size", "2", "--seq-len", "16", "--lora-rank", "2", "--eval-every", "2",
            "--save-every", "2", *extra]


def train(model_dir, data, out, *extra):
    assert cli.main(["train", *train_args(model_dir, data, out, *extra)]) == 0
    return json.loads((out / "history.json").read_text())


def losses(history):
    return [r["loss"] for r in history["train"]], [r["loss"] for r in history["eval"]]


def test_parse_builds_the_mesh_and_the_plan():
    mesh, plan = parse("dp=2, tp=2,zero=1", P.devices()[:4])
    assert mesh.shape == {"dp": 2, "tp": 2}
    assert plan == P.plans.llama(dp="dp", tp="tp", zero=1)
    mesh, plan = parse("tp=4,sp=1", P.devices()[:4])
    assert mesh.shape == {"tp": 4} and plan == P.plans.llama(tp="tp", sp=True)
    assert parse("dp=1", P.devices()[:1]) is None


@pytest.mark.parametrize("text, words", [
    ("dp=2,pp=2", ["unknown key 'pp'", "dp (data-parallel size)"]),
    ("dp=2", ["dp x tp = 2 x 1 = 2 devices", "the job has 4"]),
    ("dp=two,tp=2", ["'dp=two' needs a whole number"]),
    ("dp=0,tp=4", ["'dp=0' needs a whole number of at least 1"]),
    ("dp=2,dp=2", ["dp is given twice"]),
    ("dp=4,sp=2", ["sp is 0 to 1, got 2"]),
    ("dp=4,zero=5", ["zero is 0 to 3, got 5"]),
])
def test_parse_errors_name_the_bad_part(text, words):
    with pytest.raises(PlanError) as e:
        parse(text, P.devices()[:4])
    for word in words:
        assert word in str(e.value)
    assert repr(text) in str(e.value)


def test_four_devices_train_like_one(model_dir, data, tmp_path, capsys):
    one = train(model_dir, data, tmp_path / "one", "--devices", "1")
    four = train(model_dir, data, tmp_path / "four", "--devices", "4", "--plan", "dp=2,tp=2")
    np.testing.assert_allclose(losses(four)[0], losses(one)[0], rtol=2e-5)
    np.testing.assert_allclose(losses(four)[1], losses(one)[1], rtol=2e-5)
    assert (tmp_path / "four" / "checkpoints" / "step-4" / "sharded").is_dir()
    assert not (tmp_path / "one" / "checkpoints" / "step-4" / "sharded").exists()
    # the adapter written is whole, as one device's run writes it
    want, got = (safetensors.load(str(tmp_path / run / "adapter.safetensors"))
                 for run in ("one", "four"))
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-4,
                                   atol=2e-5, err_msg=key)


def test_two_processes_train_like_one_device(model_dir, data, tmp_path, ember_launch):
    """Both processes train; process 0 alone draws the progress bar and prints the notes."""
    status, output, _ = ember_launch(2, "train_cli.py", "--log-dir", tmp_path,
                                     *train_args(model_dir, data, tmp_path / "mpi", "--plan",
                                                 "dp=2", "--devices", "2"), timeout=30.0)
    first, second = ((tmp_path / f"process-{i}.log").read_text() for i in (0, 1))
    assert status == 0, output + first + second
    assert "training: 100%" in first and "4/4" in first, first  # the bar, drawn to the end
    for said in ("[loading ", "[loaded ", "done: train loss"):
        assert first.count(said) == 1, (said, first)
    for said in ("training", "step", "[load", "done"):
        assert said not in second, second
    one = train(model_dir, data, tmp_path / "one")
    mpi = json.loads((tmp_path / "mpi" / "history.json").read_text())
    np.testing.assert_allclose(losses(mpi)[0], losses(one)[0], rtol=2e-5)
    np.testing.assert_allclose(losses(mpi)[1], losses(one)[1], rtol=2e-5)


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("flags, words", [
    (["--devices", "4", "--plan", "dp=2"], ["'dp=2'", "2 devices", "the job has 4"]),
    (["--devices", "4", "--plan", "tp=4"], ["2 key value heads", "'tp' (size 4)"]),
    (["--devices", "4", "--plan", "dp=4", "--batch-size", "2"],
     ["batch_size=2", "dp=4"]),
    (["--devices", "16"], ["devices=16", "8 device(s)"]),
])
def test_a_plan_that_does_not_fit_is_one_error(model_dir, data, tmp_path, capsys, flags, words):
    args = ["train", "--model", str(model_dir), "--data", str(data), "--out",
            str(tmp_path / "run"), "--steps", "2", "--seq-len", "16", *flags]
    assert cli.main(args) != 0
    line = error_line(capsys)
    assert line.startswith("ember train: error: ")
    for word in words:
        assert word in line, line


def test_devices_under_launch_must_match_the_processes(monkeypatch, capsys):
    from ember.parallel import runtime
    monkeypatch.setattr(runtime, "launched_under_mpi", lambda: True)
    monkeypatch.setattr(runtime, "process_count", lambda: 2)
    with pytest.raises(cli._UserError, match="--devices 4: this job was launched with 2 "):
        cli._use_devices(4)


def test_a_run_resumes_under_another_plan_on_the_same_curve(data, tmp_path):
    settings = dict(steps=4, batch_size=2, seq_len=16, lora_rank=2, eval_every=2,
                    save_every=2)
    tokenizer = tiny_tokenizer()
    vocab = tokenizer.vocab_size

    def run(out, on_step=None, **where):
        config = finetune.TrainConfig(**settings, **where)
        return finetune.train(tiny_model(vocab), tokenizer, data.read_text(), out, config,
                              on_step=on_step)

    want = run(tmp_path / "one")

    def stop(step, record):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "moved", stop, devices=4, plan="dp=2,tp=2,zero=1")
    assert (tmp_path / "moved" / "checkpoints" / "step-2" / "sharded").is_dir()
    got = run(tmp_path / "moved", devices=2, plan="tp=2")
    assert got["step"] == 4
    np.testing.assert_allclose(losses(got)[0], losses(want)[0], rtol=2e-5)
    np.testing.assert_allclose(losses(got)[1], losses(want)[1], rtol=2e-5)
