"""Every Llama plan's training step: time, bytes communicated and memory per device, next to one
device, on virtual devices (threads) and on MPI processes, with PyTorch DDP as the peer.

Run it from the repository root (ember importable; ``pip install 'ember[mpi]'`` for the MPI rows,
torch and transformers for the PyTorch rows):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/parallel.py \
        [--quick] [--plans 'dp=2;tp=2,sp=1;...'] [--runtimes threads,mpi] [--peers torch] \
        [--steps K]

(Unset those two variables for benchmarking only; see benchmarks/overhead.py.) The default run
(25 runs) should take about 10 minutes on 2 idle cores, ``--quick`` (a smaller
model) about 3; progress lines say how far it is, and the last line how long it took. On cores
that other work shares, every figure moves, the GEMM limit first.

What runs: a Llama of random weights (no hub; see ``SIZES``) fine-tuned in full with AdamW and
gradient clipping by the recipe ``ember train`` uses (:func:`ember.models.finetune.place` places
the model, the moments and the batches by the plan; the step is ``finetune``'s, jitted with the
plan's result layouts). Each configuration runs in a fresh process, so its device count and its
memory are its own: ``EMBER_CPU_DEVICES=N`` (N virtual devices, one thread each, sharing the
process's cores) or ``ember launch -n N`` (N processes of one device, each with
``EMBER_NUM_THREADS`` = cores / N, at least 1, so 4 processes oversubscribe 2 cores).

Columns of the table (per device unless said; MPI rows report the largest over the processes):

- ``step ms``: the median of ``--steps`` timed steps after warm-up (the first compiles);
  ``vs 1``: the one-device step's time over this one (above 1: faster); ``tok/s``: tokens of the
  global batch per second; ``% lim``: the step's FLOPs per second over the machine's float32
  GEMM rate (``benchmarks/hardware.py``) on all its cores, which every row shares;
- ``comm MiB``: bytes each device sends per step, the sum over the per-device program's
  collectives (``Lowered.explain().total_bytes``); ``collectives``: how many of each kind
  (AR all-reduce, AG all-gather, RS reduce-scatter, A2A all-to-all, CP collective-permute);
- ``held MiB``: parameters and AdamW moments held per device (the local shards' bytes);
  ``prog MiB``: the per-device program's peak (``memory_analysis()``: arguments, results and
  its arena of temporaries); ``RSS MiB``: the process's peak resident memory (``VmHWM``:
  Linux's ``getrusage`` carries the peak of the process that started this one across ``exec``;
  on virtual devices one process holds every device; the peak includes the whole model each
  process builds before it is sharded).

Then the ZeRO memory check (held bytes against the expected fraction of one device's; ZeRO-3 on
4 MPI processes against the issue's bound: the shards plus the gathered parameters alive at
once in the per-device program, with and without recomputed layers, and the processes' resident
memory) and whether every row's first loss equals one device's.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from hardware import blas_kernel, gemm_rate  # noqa: E402

import ember  # noqa: E402
from ember import parallel as P  # noqa: E402, N812
from ember.backends.cpu.program import program_threads  # noqa: E402
from ember.errors import EmberError, UnsupportedError  # noqa: E402
from ember.ir.params import bodies  # noqa: E402
from ember.models import finetune  # noqa: E402
from ember.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from ember.parallel import launch, runtime  # noqa: E402
from ember.parallel.jit import threads_per_device  # noqa: E402
from ember.tree import tree_leaves  # noqa: E402

MiB = 2**20
# ``ckpt=1``: the model's layers are recomputed in the backward pass (gradient checkpointing,
# ``ember train --checkpointing``); ZeRO-3 gathers each layer's parameters again there with
# or without it.
PLANS = ["single", "dp=2", "dp=4", "dp=2,zero=1", "dp=2,zero=2", "dp=2,zero=3", "dp=4,zero=3",
         "dp=4,zero=3,ckpt=1", "tp=2", "tp=2,sp=1", "dp=2,tp=2", "dp=2,tp=2,zero=1"]
KINDS = {"all_reduce": "AR", "all_gather": "AG", "reduce_scatter": "RS", "all_to_all": "A2A",
         "collective_permute": "CP"}
ZERO3_SLACK = 64 * 1024  # held bytes: scalars (AdamW's step) and leaves that do not split
# Resident memory saved by ZeRO-3 against held bytes saved: a fraction, plus the allocator's
# granularity (pages, arenas), which dominates the quick model's few MiB.
RSS_TOLERANCE, RSS_FLOOR = 0.25, 2 * MiB


@dataclass(frozen=True)
class Size:
    """The model and the batch: big enough that a step is compute-bound (hidden 256: a 1024-token
    step is ~27 GFLOP), small enough that every configuration runs in seconds on 2 cores.
    Every dimension divides by 4, so each plan splits every parameter evenly."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    batch: int
    seq: int
    warmup: int  # untimed steps (the first compiles)
    steps: int  # timed steps

    def config(self) -> Any:
        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden,
                           intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                           max_position_embeddings=self.seq, tie_word_embeddings=True)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def step_flops(self, params: int) -> float:
        """PaLM's count (appendix B): 6 FLOPs per parameter per token for the matmuls forward
        and backward (the tied embedding counted once, as the head's matmul; its lookup is
        free), plus 12 * layers * hidden * seq per token for attention's scores and mixing
        (the causal mask's skipped half not discounted)."""
        return self.tokens * (6 * params + 12 * self.layers * self.hidden * self.seq)


SIZES = {"full": Size(4096, 256, 768, 4, 8, 4, 8, 128, warmup=2, steps=4),
         "quick": Size(512, 64, 192, 2, 4, 2, 4, 32, warmup=2, steps=2)}


def plan_sizes(plan: str) -> dict[str, int]:
    """``{"dp": 2, "tp": 1, "zero": 0, "sp": 0, "ckpt": 0}`` of a plan ("single": one device)."""
    sizes = {"dp": 1, "tp": 1, "zero": 0, "sp": 0, "ckpt": 0}
    if plan != "single":
        sizes.update((k, int(v)) for k, v in (p.split("=") for p in plan.split(",")))
    return sizes


def plan_devices(plan: str) -> int:
    sizes = plan_sizes(plan)
    return sizes["dp"] * sizes["tp"]


# --- memory of this process ---------------------------------------------------------------------

def _status(field: str) -> int | None:
    """A ``/proc/self/status`` size in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resident() -> int | None:
    """Bytes resident now, once freed memory is given back: garbage collected and the C heap
    trimmed (glibc keeps freed blocks, which would count memory the process no longer uses)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return _status("VmRSS")


def reset_peak() -> None:
    """Start a new resident high-water mark (``VmHWM``) from now (Linux's ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """The process's peak resident bytes so far: ``VmHWM`` (``ru_maxrss`` off Linux; on Linux
    it carries the peak of the process that started this one across ``exec``)."""
    hwm = _status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- one configuration, in its own process ------------------------------------------------------

def nbytes(x: Any) -> int:
    """The global bytes of an ember array (sharded or not) or of an array type."""
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def held_per_device(tree: Any, devices: int) -> list[int]:
    """Bytes each of this process's ``devices`` holds of the arrays of ``tree``: a sharded
    array's local buffers, a plain array whole on every device."""
    held = [0] * devices
    for leaf in tree_leaves(tree):
        if isinstance(leaf, P.ShardedArray):
            sizes = [b.nbytes for b in leaf.local_buffers()]
        else:
            sizes = [nbytes(leaf)] * devices
        held = [h + s for h, s in zip(held, sizes)]
    return held


def build(size: Size, plan: str = "single") -> Any:
    ember.random.seed(0)
    model = LlamaForCausalLM(size.config())
    model.gradient_checkpointing = bool(plan_sizes(plan)["ckpt"])
    model.train()
    return model


def recipe(model: Any, plan: str) -> tuple[Any, Any, Any]:
    """``(step, optimizer state, place)`` of ``finetune``'s full fine-tuning step: for a plan,
    the model and state placed by it and the step jitted with its result layouts (what
    ``ember train --plan`` runs); for "single", one device, unsharded."""
    config = finetune.TrainConfig(lora_rank=0, lr=1e-4, steps=1000, warmup_steps=0)
    opt = finetune._optimizer(config)
    step = finetune._make_step(opt, config.grad_clip)
    if plan == "single":
        return step, opt.init(model.trainable_parameters()), np.asarray
    # ckpt is the model's setting (``build``), not the plan's.
    text = ",".join(p for p in plan.split(",") if not p.startswith("ckpt="))
    mesh, layout = P.plans.parse(text, P.devices()[:plan_devices(plan)])
    state, out_shardings, place = finetune.place(model, opt, mesh, layout)
    return ember.jit(step.fun, donate_argnums=1, out_shardings=out_shardings), state, place


def scalar(x: Any) -> float:
    return float(P.process_allgather(x) if isinstance(x, P.ShardedArray) else np.asarray(x))


def gathered_peak(graph: Any) -> int:
    """The most bytes of all-gathered values alive at once in a per-device ``graph``: from the
    all-gather (or the ``collective_done`` that completes one) to the value's last use; a body
    (a recomputed layer, a loop) adds its own peak while it runs. Under ZeRO-3 these are the
    gathered parameters."""
    last: dict[int, int] = {}
    for i, eqn in enumerate(graph.eqns):
        for v in eqn.inputs:
            last[id(v)] = i
    for v in graph.outvars:
        last[id(v)] = len(graph.eqns)
    started: set[int] = set()  # results of all_gather_start: completed by a collective_done
    live: dict[int, int] = {}
    peak = 0
    for i, eqn in enumerate(graph.eqns):
        inner = max((gathered_peak(body.graph) for _, body in bodies(eqn)), default=0)
        peak = max(peak, sum(live.values()) + inner)
        name = eqn.prim.name
        if name == "all_gather_start":
            started.update(id(v) for v in eqn.outputs)
        elif name == "all_gather" or (name == "collective_done"
                                      and any(id(v) in started for v in eqn.inputs)):
            live.update((id(v), nbytes(v.aval)) for v in eqn.outputs)
            peak = max(peak, sum(live.values()))
        for key in [k for k in live if last.get(k, i) <= i]:
            del live[key]
    return peak


def program_report(step: Any, plan: str) -> dict[str, Any]:
    """What the per-device program of ``step`` communicates and its peak memory."""
    lowered = step.cached_lowerings()[-1]
    out: dict[str, Any] = {"comm_bytes": 0, "collectives": {}, "program_peak": None,
                           "arena": None, "traces": step.trace_count, "gathered": 0}
    if plan != "single":
        explanation = lowered.explain()
        out["comm_bytes"] = explanation.total_bytes
        out["collectives"] = dict(explanation.counts())
        out["gathered"] = gathered_peak(lowered.sharded.partitioned.graph.graph)
    try:
        report = lowered.compile().memory_analysis()
    except UnsupportedError:  # a backend without memory reports (NumPy's)
        return out
    graph = (lowered.sharded.partitioned.graph if plan != "single" else lowered.graph).graph
    out["program_peak"] = report.peak_bytes
    out["arena"] = report.temp_bytes + body_arenas(graph, lowered.backend)
    return out


def body_arenas(graph: Any, backend: str) -> int:
    """The arenas of the programs that run ``graph``'s bodies (a ZeRO-3 or recomputed layer
    is one): each is compiled once and keeps its temporaries between calls, as the step's
    own program does."""
    total = 0
    for eqn in graph.eqns:
        for _, body in bodies(eqn):
            program = body.cache.get(backend)
            if program is not None and hasattr(program, "memory_analysis"):
                total += program.memory_analysis().temp_bytes
            total += body_arenas(body.graph, backend)
    return total


def worker(plan: str, size: Size, steps: int) -> None:
    """Measure one configuration in this process (under ``ember launch``: in every process);
    process 0 prints one ``RESULT {json}`` line."""
    baseline = resident()
    model = build(size, plan)
    whole = sum(nbytes(p) for p in model.trainable_parameters().values())
    layers = [sum(nbytes(p) for p in layer.parameters()) for layer in model.model.layers]
    layer = max([*layers, nbytes(model.model.embed_tokens.weight)])  # the largest layer
    step, state, place = recipe(model, plan)
    local = len(P.local_devices()) if plan != "single" else 1
    held = held_per_device((model.trainable_parameters(), state), local)
    batch = np.random.default_rng(0).integers(0, size.vocab, (1, size.batch, size.seq),
                                              dtype=np.int32)
    losses, times = [], []
    for i in range(size.warmup + steps):
        if i == size.warmup:
            peak, before = peak_rss(), resident()
            reset_peak()
        start = time.perf_counter()
        loss, _, params, state = step(model, state, place(batch))
        model.update(params)
        times.append(time.perf_counter() - start)
        losses.append(loss)
    step_peak = peak_rss()
    peak = max(peak, step_peak)
    after = resident()
    report = program_report(step, plan)
    mine = [statistics.median(times[size.warmup:]), max(held), peak,
            (after - baseline) if after and baseline else -1,
            (step_peak - before) if before else -1]
    ranks = np.asarray(runtime.world().all_gather(np.asarray([mine], np.float64)))
    first_loss = scalar(losses[0])
    if runtime.process_index() != 0:
        return
    worst = ranks.max(axis=0)
    result = {"plan": plan, "devices": plan_devices(plan), "processes": runtime.process_count(),
              "threads": threads_per_device(local),
              "step_s": worst[0], "held": int(worst[1]), "rss_peak": int(worst[2]),
              "rss_growth": int(worst[3]), "step_growth": int(worst[4]), "whole": 3 * whole,
              "layer": layer, "loss": first_loss, "params": model.num_parameters(),
              "first_s": times[0], **report}
    print("RESULT " + json.dumps(result), flush=True)


# --- the PyTorch peer: the same model and step, DDP over gloo -----------------------------------

def torch_worker(size: Size, steps: int) -> None:
    """transformers' Llama of the same shape, AdamW and clipping; with ``WORLD_SIZE`` > 1 wrapped
    in DistributedDataParallel over gloo, each process on its share of the batch."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    c = size.config()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True,
        attn_implementation="sdpa"))
    model.train()
    params = list(model.parameters())
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids = np.random.default_rng(0).integers(0, size.vocab, (size.batch, size.seq))
    local = torch.from_numpy(np.split(ids, world)[rank])
    times = []
    for _ in range(size.warmup + steps):
        start = time.perf_counter()
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    moments = sum(t.numel() * t.element_size() for s in opt.state.values()
                  for t in s.values() if t.ndim > 0)
    mine = torch.tensor([statistics.median(times[size.warmup:]), param_bytes + moments,
                         peak_rss()], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        dist.destroy_process_group()
    if rank == 0:
        # DDP all-reduces every gradient once, in buckets; gloo's ring sends 2 (n-1)/n of them.
        print("RESULT " + json.dumps({
            "plan": "single" if world == 1 else f"dp={world}", "devices": world,
            "processes": world, "threads": torch.get_num_threads(), "step_s": float(mine[0]),
            "held": int(mine[1]), "rss_peak": int(mine[2]),
            "comm_bytes": int(2 * (world - 1) / world * param_bytes), "collectives": {},
            "program_peak": None, "params": sum(p.numel() for p in params)}), flush=True)


# --- the driver ---------------------------------------------------------------------------------

@dataclass
class Row:
    runtime: str  # "threads", "MPI", "torch", "torch DDP"
    result: dict[str, Any] | None  # None: the configuration failed
    error: str = ""


def _environment(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run(command: list[str], env: dict[str, str], timeout: float) -> tuple[dict | None, str]:
    """Run a worker; its RESULT, or None and the end of what it printed."""
    try:
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), ""
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return None, f"exit status {done.returncode}: " + " | ".join(tail)


def run_ember(plan: str, where: str, size_name: str, steps: int, timeout: float) -> Row:
    """Run ``plan`` in a fresh process (``where`` is "threads": N virtual devices) or in N
    (``where`` is "mpi")."""
    worker_args = [os.path.abspath(__file__), "--worker", plan, "--size", size_name,
                   "--steps", str(steps)]
    n = plan_devices(plan)
    if where == "threads":
        command = [sys.executable, *worker_args]
        env = _environment(EMBER_CPU_DEVICES=str(n))
    else:
        threads = max(1, (os.cpu_count() or 1) // n)
        command = [sys.executable, "-m", "ember", "launch", "-n", str(n), "python", *worker_args]
        env = _environment(EMBER_CPU_DEVICES=None, EMBER_NUM_THREADS=str(threads))
    result, error = _run(command, env, timeout)
    return Row("threads" if where == "threads" else "MPI", result, error)


def run_torch(world: int, size_name: str, steps: int, timeout: float) -> Row:
    command = [sys.executable, os.path.abspath(__file__), "--torch-worker", "--size", size_name,
               "--steps", str(steps)]
    if world == 1:
        result, error = _run(command, _environment(), timeout)
        return Row("torch", result, error)
    with socket.socket() as s:  # a free port for gloo's rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_environment(
                                  RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=port))
             for r in range(world)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            outputs.append(p.communicate())
    for line in outputs[0][0].splitlines():
        if line.startswith("RESULT "):
            return Row("torch DDP", json.loads(line[len("RESULT "):]))
    tail = "".join(o + e for o, e in outputs).strip().splitlines()[-3:]
    return Row("torch DDP", None, " | ".join(tail))


def torch_peers_missing() -> str | None:
    """Why the PyTorch rows cannot run here, or None."""
    try:
        import torch.distributed as dist
        import transformers  # noqa: F401
    except ImportError as e:
        return f"{e}"
    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch wheel has no torch.distributed gloo backend"
    return None


def mpi_missing() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py missing (pip install 'ember[mpi]')"
    try:
        launch.find_mpiexec()
    except EmberError as e:
        return str(e).splitlines()[0]
    return None


def _mib(b: float | None) -> str:
    return "-" if b is None or b < 0 else f"{b / MiB:.2f}"


def _collectives(counts: dict[str, int]) -> str:
    return " ".join(f"{KINDS.get(k, k)}{n}" for k, n in sorted(counts.items())) or "-"


HEADER = (f"{'plan':<18}{'dev':>4} {'runtime':<14}{'step ms':>9}{'vs 1':>6}{'tok/s':>8}"
          f"{'% lim':>7}{'comm MiB':>10}  {'collectives':<22}{'held MiB':>9}{'prog MiB':>9}"
          f"{'RSS MiB':>9}")


def table_row(row: Row, size: Size, reference: float | None, gemm: float) -> str:
    r = row.result
    if r is None:
        return f"  FAILED ({row.runtime}): {row.error}"
    runtime = f"{row.runtime} {r['processes'] if row.runtime != 'threads' else r['devices']}" \
              f"x{r['threads']}"
    ratio = f"{reference / r['step_s']:.2f}" if reference else "-"
    pct = 100 * size.step_flops(r["params"]) / r["step_s"] / gemm
    return (f"{r['plan']:<18}{r['devices']:>4} {runtime:<14}{r['step_s'] * 1e3:>9.0f}{ratio:>6}"
            f"{size.tokens / r['step_s']:>8.0f}{pct:>6.1f}%{_mib(r['comm_bytes']):>10}  "
            f"{_collectives(r['collectives']):<22}{_mib(r['held']):>9}"
            f"{_mib(r['program_peak']):>9}{_mib(r['rss_peak']):>9}")


def zero_report(rows: list[Row]) -> list[str]:
    """Held bytes of the ZeRO rows against one device's, and the issue's ZeRO-3 bound."""
    single = next((r.result for r in rows if r.result and r.result["plan"] == "single"
                   and r.runtime == "threads"), None)
    lines = ["", "ZeRO: parameters + AdamW moments held per device, as a fraction of one "
             "device's (P + 2P)"]
    if single is None:
        return lines + ["  (no one-device row to compare with)"]
    for row in rows:
        r = row.result
        if r is None or row.runtime.startswith("torch"):
            continue
        sizes = plan_sizes(r["plan"])
        if not sizes["zero"] or sizes["tp"] > 1:
            continue
        dp = sizes["dp"]
        expected = 1 / dp if sizes["zero"] == 3 else (1 + 2 / dp) / 3
        formula = f"1/{dp}" if sizes["zero"] == 3 else f"(1 + 2/{dp})/3"
        lines.append(f"  {r['plan']:<20} {row.runtime:<8} {_mib(r['held']):>8} MiB  "
                     f"{r['held'] / single['held']:.3f} (expected {formula} = {expected:.3f})")
    mpi = {r.result["plan"]: r.result for r in rows if r.runtime == "MPI" and r.result}
    zero3, checkpointed = mpi.get("dp=4,zero=3"), mpi.get("dp=4,zero=3,ckpt=1")
    if zero3 is None and checkpointed is None:
        return lines + ["ZeRO-3 on 4 MPI processes: not run (needs the MPI runtime and plan "
                        "dp=4,zero=3 or dp=4,zero=3,ckpt=1)"]
    lines.append("ZeRO-3 on 4 MPI processes: parameters + moments per process, the shards held "
                 "plus the gathered parameters alive at once in a step (the per-device "
                 "program's all-gather results, by liveness), <= a quarter + one layer (the "
                 f"largest: the embedding counts) + {ZERO3_SLACK // 1024} KiB")
    verdicts = {}
    for r in (zero3, checkpointed):
        if r is None:
            continue
        used, bound = r["held"] + r["gathered"], r["whole"] / 4 + r["layer"] + ZERO3_SLACK
        verdicts[r["plan"]] = used <= bound
        lines.append(f"  {r['plan']:<20} {_mib(r['held'])} + {_mib(r['gathered'])} = "
                     f"{_mib(used)} MiB <= {_mib(r['whole'])}/4 + {_mib(r['layer'])} + "
                     f"{_mib(ZERO3_SLACK)} = {_mib(bound)} MiB: "
                     f"{'PASS' if used <= bound else 'FAIL'}")
    ok = all(verdicts.values())
    plain = mpi.get("dp=4")
    if plain is not None and zero3 is not None and zero3["arena"] is not None \
            and min(zero3["rss_growth"], plain["rss_growth"]) >= 0:
        # Resident memory each process gained over its own baseline (after imports, before
        # the model), both read after a garbage collection and malloc_trim, less the programs'
        # arenas (temporaries, kept between calls; the bodies' too): its shards, plus code
        # and Python objects, which are the same with or without ZeRO. So what ZeRO-3 saves
        # against dp=4 on resident memory should be what it saves on held bytes.
        lines.append("  resident memory gained over the process's baseline, less the programs' "
                     "arenas (largest over the processes):")
        for r in (plain, zero3):
            lines.append(f"    {r['plan']:<12} {_mib(r['rss_growth'] - r['arena']):>8} MiB "
                         f"(gained {_mib(r['rss_growth'])}, arena {_mib(r['arena'])}, held "
                         f"{_mib(r['held'])}; peak in a step +{_mib(r['step_growth'])})")
        saved = (plain["rss_growth"] - plain["arena"]) - (zero3["rss_growth"] - zero3["arena"])
        expected = plain["held"] - zero3["held"]
        fits = abs(saved - expected) <= RSS_TOLERANCE * expected + RSS_FLOOR
        lines.append(f"  saved by ZeRO-3: {_mib(saved)} MiB resident for {_mib(expected)} MiB "
                     f"held, within {RSS_TOLERANCE:.0%} + {RSS_FLOOR // MiB} MiB: "
                     f"{'PASS' if fits else 'FAIL'}")
        ok = ok and fits
    lines.append(f"ZeRO-3 check: {'PASS' if ok else 'FAIL'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, fewer steps")
    parser.add_argument("--plans", default=";".join(PLANS[1:]),
                        help="plans separated by ';', each as ember train's --plan "
                             "(one device always runs first, as the reference)")
    parser.add_argument("--runtimes", default="threads,mpi")
    parser.add_argument("--peers", default="torch", help="'torch' or 'none'")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per configuration")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size_name = args.size or ("quick" if args.quick else "full")
    size = SIZES[size_name]
    steps = args.steps or size.steps
    if args.worker:
        return worker(args.worker, size, steps)
    if args.torch_worker:
        return torch_worker(size, steps)
    drive(args, size_name, size, steps)


def drive(args: argparse.Namespace, size_name: str, size: Size, steps: int) -> None:
    began = time.perf_counter()
    cores = program_threads()
    plans = [p.strip() for p in args.plans.split(";") if p.strip() not in ("", "single")]
    runtimes = args.runtimes.split(",")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"warning: {var}={os.environ[var]} is set; the GEMM limit may read low. Run "
                  f"with: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python "
                  f"benchmarks/parallel.py")
    n = 1024 if size_name == "quick" else 2048  # quick: a rough limit, measured in a blink
    gemm = gemm_rate(cores, n)
    print(f"hardware: {cores} cores, float32 GEMM {gemm / 1e9:.0f} GFLOP/s on {cores} threads "
          f"({n}x{n}, best of NumPy and PyTorch); {blas_kernel()}")
    print(f"model ({size_name}): Llama hidden {size.hidden}, {size.layers} layers, "
          f"{size.heads} heads ({size.kv_heads} kv), vocab {size.vocab}, tied embedding; "
          f"batch {size.batch} x {size.seq}; full fine-tuning, AdamW, clipping; median of "
          f"{steps} steps after {size.warmup} warm-up", flush=True)
    configs = [("single", "threads")] + [(p, "threads") for p in plans if "threads" in runtimes]
    if "mpi" in runtimes:
        why = mpi_missing()
        if why:
            print(f"skipped: MPI rows ({why})")
        else:
            configs += [(p, "mpi") for p in plans if plan_devices(p) > 1]
    rows: list[Row] = []
    started = time.perf_counter()
    for i, (plan, where) in enumerate(configs, 1):
        row = run_ember(plan, where, size_name, steps, args.timeout)
        rows.append(row)
        r = row.result
        done = (f"{r['step_s'] * 1e3:.0f} ms/step (first step {r['first_s']:.1f} s)" if r
                else f"FAILED: {row.error}")
        print(f"  [{i}/{len(configs)}] {plan} on {plan_devices(plan)} "
              f"{'virtual devices' if where == 'threads' else 'MPI processes'}: {done} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    if args.peers == "torch":
        why = torch_peers_missing()
        if why:
            print(f"skipped: PyTorch rows ({why})")
        else:
            for world in (1, 2):
                rows.append(run_torch(world, size_name, steps, args.timeout))
                r = rows[-1].result
                print(f"  torch {'DDP dp=2 (gloo)' if world > 1 else 'one process'}: "
                      + (f"{r['step_s'] * 1e3:.0f} ms/step" if r else
                         f"FAILED: {rows[-1].error}"), flush=True)
    reference = rows[0].result["step_s"] if rows[0].result else None
    print(f"\nTraining step per plan ({cores} cores shared by every row: N virtual devices run "
          f"as N threads of one process, N MPI processes as N processes; 'runtime' says "
          f"devices or processes x threads each)")
    print(HEADER)
    for row in rows:
        print(table_row(row, size, reference, gemm))
    print(f"GEMM limit: {size.step_flops(rows[0].result['params']) / gemm * 1e3:.0f} ms for "
          f"one step's {size.step_flops(rows[0].result['params']) / 1e9:.1f} GFLOP"
          if rows[0].result else "")
    print("\n".join(zero_report(rows)))
    single = rows[0].result
    if single:
        ember_rows = [r.result for r in rows if r.result and not r.runtime.startswith("torch")]
        gap = max(abs(r["loss"] - single["loss"]) for r in ember_rows)
        print(f"first-step loss: one device {single['loss']:.6f}; every ember row within "
              f"{gap:.1e} of it")
        retraced = [r["plan"] for r in ember_rows if r["traces"] != 1]
        if retraced:
            print(f"warning: the step was traced more than once under {', '.join(retraced)}")
    print(f"whole run: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
