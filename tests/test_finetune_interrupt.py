"""The fine-tuning step donates the optimizer state, and a Ctrl-C waits for the step.

AdamW's moments are written in place (the old state's arrays are given up), so a step cut
short after its program ran would leave the state a step ahead of the model: a SIGINT that
arrives during a step is raised once the step and its bookkeeping are done, the checkpoint
saved on the interrupt includes that step, and the resumed run follows the uninterrupted loss
curve.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from tiny_models import tiny_model_dir

from ember.errors import EmberError
from ember.models import finetune, loading
from ember.models.finetune import TrainConfig, train
from ember.tree import tree_leaves

TEXT = "\n\n".join(f"The {a} sat on the {b}. The {a} was happy." for a in ("cat", "dog", "owl")
                   for b in ("mat", "log")) * 4
CONFIG = TrainConfig(steps=6, batch_size=2, seq_len=16, lr=5e-3, warmup_steps=2, lora_rank=0,
                     eval_every=4, save_every=4)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def test_the_step_writes_over_the_donated_state(base_dir):
    model, _ = loading.load(base_dir)
    model.train()
    opt = finetune._optimizer(CONFIG)
    state = opt.init(model.trainable_parameters())
    step = finetune._make_step(opt, CONFIG.grad_clip)
    batch = np.random.default_rng(0).integers(0, 50, size=(1, 2, 16))
    old = tree_leaves(state)
    _, _, _, new_state = step(model, state, batch)
    for leaf in old:  # the old moments were given up to the step
        with pytest.raises(EmberError, match="donated"):
            np.asarray(leaf)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in tree_leaves(new_state))


def test_ctrl_c_during_a_step_is_raised_after_it_and_resumes_onto_the_same_curve(
        base_dir, tmp_path, monkeypatch):
    model, tok = loading.load(base_dir)
    straight = train(model, tok, TEXT, tmp_path / "a", CONFIG)
    real = finetune._make_step

    def interrupting(opt, clip):
        step, calls = real(opt, clip), []

        def run(*args):
            calls.append(1)
            if len(calls) == 3:  # Ctrl-C while the third step runs
                os.kill(os.getpid(), signal.SIGINT)
            return step(*args)
        return run
    monkeypatch.setattr(finetune, "_make_step", interrupting)
    model, tok = loading.load(base_dir)
    with pytest.raises(KeyboardInterrupt):
        train(model, tok, TEXT, tmp_path / "b", CONFIG)
    # the third step finished, and the interrupt saved it
    assert (tmp_path / "b/checkpoints/latest").read_text() == "step-3"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(finetune, "_make_step", real)
    model, tok = loading.load(base_dir)
    resumed = train(model, tok, TEXT, tmp_path / "b", CONFIG)
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in straight["train"]]
    assert resumed["eval"] == straight["eval"]
