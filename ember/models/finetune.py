"""Fine-tuning a causal language model on a text file: full or LoRA, resumable.

One optimizer step is one jitted function (forward, backward, clipping, AdamW with its
schedule, optional gradient accumulation over micro-batches), traced once. The optimizer state
is donated to it, so AdamW's moments are updated in place rather than written to fresh memory
every step; a Ctrl-C waits for the step it lands in to finish. Batches are random
windows of the tokenised text drawn from a generator seeded by ``(seed, step)``, so the data a
step sees depends only on its number: a run resumed from a checkpoint sees exactly the
batches, and therefore the losses, of an uninterrupted run.

A checkpoint is a directory ``checkpoints/step-N`` (trainable parameters and optimizer state
as safetensors, the history as JSON) published by atomically rewriting ``checkpoints/latest``
after every file is in place; a run killed mid-save resumes from the previous checkpoint. When
the parameters or the state are sharded over a mesh, they are saved instead as one sharded
checkpoint (``step-N/sharded``, :mod:`ember.parallel.checkpoint`): each process writes its own
blocks, and a run resumed on another mesh, or another process count, reads them laid out as its
own parameters are.

With ``TrainConfig(devices=4, plan="dp=2,tp=2,zero=1")`` the run is sharded by a Llama plan
(:func:`ember.parallel.plans.parse`): the model is placed with ``P.shard``, the optimizer
state and the batches by the plan, and the step is jitted with the plan's result layouts, so
every value stays where the plan says. Where a run computes does not change what it computes:
its losses are one device's, and a checkpoint resumes under any other plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import ember.numpy as enp
from ember import lax, nn, optim, random
from ember.errors import EmberError
from ember.io import safetensors
from ember.io.files import atomic_write, read_json, write_text_atomic
from ember.models.llama import LlamaForCausalLM
from ember.models.loading import save_pretrained
from ember.parallel import (
    Mesh,
    ShardedArray,
    checkpoint,
    device_put,
    devices,
    plans,
    process_allgather,
    process_count,
    process_index,
)
from ember.transforms.jit import jit
from ember.tree import tree_leaves, tree_map

__all__ = ["TrainConfig", "train", "tokenize_text", "latest_checkpoint", "ResumeMismatchError"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-4
    warmup_steps: int | None = None  # None: 10, or a tenth of ``steps`` when that is less
    min_lr: float = 0.0
    weight_decay: float = 0.0
    grad_accum: int = 1
    grad_clip: float = 1.0
    lora_rank: int = 8  # 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    eval_every: int = 50
    eval_fraction: float = 0.1
    eval_batches: int = 4
    save_every: int = 50
    checkpointing: bool = False
    seed: int = 0
    # Where it runs (not part of what a resumed run must share): the first ``devices`` devices
    # of the job (None: all of them) arranged by ``plan`` ("dp=2,tp=2,zero=1"; None: data
    # parallel over them). Neither given: one device, unsharded.
    devices: int | None = None
    plan: str | None = None

    def check(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "save_every",
                    "eval_batches")
        bad = [f"{k}={getattr(self, k)}" for k in positive if getattr(self, k) < 1]
        if self.devices is not None and self.devices < 1:
            bad.append(f"devices={self.devices}")
        if not self.lr > 0 or self.lora_rank < 0 or not 0 < self.eval_fraction < 1:
            bad.append(f"lr={self.lr}, lora_rank={self.lora_rank}, "
                       f"eval_fraction={self.eval_fraction}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            # Warm-up starts at learning rate 0: a run that is all warm-up barely trains.
            bad.append(f"warmup_steps={self.warmup_steps} (must be below steps={self.steps})")
        if bad:
            raise EmberError(f"train: invalid settings: {', '.join(bad)}")

    @property
    def warmup(self) -> int:
        """The warm-up steps this run uses."""
        if self.warmup_steps is None:
            return min(10, self.steps // 10)
        return self.warmup_steps


class ResumeMismatchError(EmberError):
    """The output directory holds a checkpoint of a run with other settings or data."""


def tokenize_text(tokenizer: Any, text: str) -> np.ndarray:
    """The whole text as one id stream (documents separated by blank lines get an EOS)."""
    if not text.strip():
        raise EmberError("train: the dataset is empty")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in (d for d in text.split("\n\n") if d.strip()):
        ids += tokenizer.encode(doc, add_special_tokens=False)
        if eos is not None:
            ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


class _Windows:
    """Random ``[batch, seq_len]`` windows of a token stream, a pure function of the step."""

    def __init__(self, ids: np.ndarray, seq_len: int, seed: int, what: str):
        if len(ids) < seq_len + 1:
            raise EmberError(f"train: the {what} split has {len(ids)} tokens, fewer than "
                             f"seq_len + 1 = {seq_len + 1}; use a longer text or a smaller "
                             f"--seq-len")
        self.ids, self.seq_len, self.seed = ids, seq_len, seed

    def batch(self, step: int, micro: int, size: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, step, micro))
        starts = rng.integers(0, len(self.ids) - self.seq_len, size=size)
        return np.stack([self.ids[s: s + self.seq_len] for s in starts])


def _fingerprint(config: TrainConfig, ids: np.ndarray) -> str:
    """What a resumed run must share with the one it continues: settings and data."""
    settings = dataclasses.asdict(dataclasses.replace(config, devices=None, plan=None))
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(ids.tobytes())
    return h.hexdigest()[:16]


def _optimizer(config: TrainConfig) -> Any:
    schedule = optim.schedules.warmup_cosine(config.lr, config.warmup, config.steps,
                                             config.min_lr)
    return optim.AdamW(lr=schedule, weight_decay=config.weight_decay)


def _loss(model: LlamaForCausalLM, batch: Any) -> Any:
    return model.loss(batch)


def _make_step(opt: Any, clip: float) -> Callable[..., Any]:
    """``step(model, state, batches [accum, batch, len]) -> (loss, norm, params, state)``.

    Micro-batches are a ``scan`` that sums gradients, so accumulation is exact (the mean loss
    over all micro-batches is differentiated) and clipping sees the accumulated gradient.
    """
    grad_fn = nn.value_and_grad(_loss)

    def step(model: LlamaForCausalLM, state: Any, batches: Any) -> tuple[Any, ...]:
        def micro(total: Any, batch: Any) -> tuple[Any, None]:
            loss, grads = grad_fn(model, batch)
            return (total[0] + loss, {k: total[1][k] + g for k, g in grads.items()}), None
        n = batches.shape[0]
        if n == 1:  # no accumulation: spare the summing and scaling passes over the gradients
            loss, grads = grad_fn(model, batches[0])
        else:
            zeros = {k: enp.zeros_like(v) for k, v in model.trainable_parameters().items()}
            (loss, grads), _ = lax.scan(micro, (enp.zeros((), enp.float32), zeros), batches)
            loss, grads = loss / n, {k: g / n for k, g in grads.items()}
        grads, norm = optim.clip_grad_norm(grads, clip)
        params, state = opt.update(model.trainable_parameters(), grads, state)
        return loss, norm, params, state
    # The state is donated: the moments are written in place (the model is not: it holds
    # buffers, such as rotary frequencies, that the step does not return).
    return jit(step, donate_argnums=1)


def _placement(config: TrainConfig) -> tuple[Mesh, plans.Plan] | None:
    """The mesh and plan ``config`` asks for, or None for one device, unsharded."""
    if config.plan is None and config.devices in (None, 1):
        return None
    job = devices()
    count = len(job) if config.devices is None else config.devices
    if count > len(job) or (process_count() > 1 and count != len(job)):
        where = (f"{process_count()} processes of one device each (ember launch -n)"
                 if process_count() > 1 else
                 f"{len(job)} device(s) (EMBER_CPU_DEVICES, read when ember first lists them)")
        raise EmberError(f"train: devices={count}, but the job has {where}")
    return plans.parse(config.plan if config.plan is not None else f"dp={count}", job[:count])


def _check_batch(config: TrainConfig, mesh: Mesh) -> None:
    dp = mesh.shape.get("dp", 1)
    if config.batch_size % dp:
        raise EmberError(f"train: batch_size={config.batch_size} does not split over the "
                         f"plan's dp={dp} (plan {config.plan!r}); use a multiple of {dp}")


def _place(model: LlamaForCausalLM, opt: Any, config: TrainConfig
           ) -> tuple[Any, Any, Callable[[np.ndarray], Any]]:
    """:func:`place` on the mesh ``config`` asks for (on one device: the state as it is, no
    layouts, batches as they are)."""
    placement = _placement(config)
    if placement is None:
        return opt.init(model.trainable_parameters()), None, np.asarray
    mesh, plan = placement
    _check_batch(config, mesh)
    return place(model, opt, mesh, plan)


def place(model: LlamaForCausalLM, opt: Any, mesh: Mesh, plan: plans.Plan
          ) -> tuple[Any, Any, Callable[[np.ndarray], Any]]:
    """Place ``model`` (in place) by ``plan`` on ``mesh``; return the optimizer's first state
    placed by the plan, the layouts of the fine-tuning step's results (``out_shardings`` of
    its jit) and how a batch is placed."""
    plans.shard(model, mesh, plan)
    state = opt.init(model.trainable_parameters())
    layout = plan.state_shardings(state, mesh)
    out_shardings = (None, None, plan.param_shardings(model, mesh, trainable=True), layout)
    return (tree_map(device_put, state, layout), out_shardings,
            lambda ids: device_put(ids, plan.batch_sharding(mesh, ids.ndim)))


def _scalar(x: Any) -> float:
    """A step's scalar result as a float (under ``ember launch`` every process calls this)."""
    return float(process_allgather(x))


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Run the block whole: a Ctrl-C during it is raised when it ends. A step updates the
    donated optimizer state in place, so one cut short after its program ran would leave the
    state a step ahead of the model and the history. Off the main thread, or under a SIGINT
    handler of the caller's, the block runs as it is."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def train(model: LlamaForCausalLM, tokenizer: Any, text: str, out_dir: str | os.PathLike,
          config: TrainConfig = TrainConfig(), resume: bool = True,
          on_step: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` (in place) on ``text``; returns the history.

    Writes checkpoints to ``out_dir/checkpoints``, the final model (LoRA merged) to
    ``out_dir/model``, the adapter alone to ``out_dir/adapter.safetensors`` and the loss curve
    to ``out_dir/loss.png``. With ``resume`` an existing checkpoint of the same settings and
    data is continued. ``on_step(step, record)`` is called after every step.
    """
    config.check()
    out_dir = os.fspath(out_dir)
    ids = tokenize_text(tokenizer, text)
    n_eval = max(int(len(ids) * config.eval_fraction), config.seq_len + 1)
    train_data = _Windows(ids[:-n_eval], config.seq_len, config.seed, "training")
    eval_data = _Windows(ids[-n_eval:], config.seq_len, config.seed + 1, "evaluation")
    if config.lora_rank:
        nn.apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets,
                      key=random.key(config.seed))
    model.gradient_checkpointing = config.checkpointing
    model.train()
    opt = _optimizer(config)
    state, out_shardings, place = _place(model, opt, config)
    history: dict[str, Any] = {"fingerprint": _fingerprint(config, ids), "step": 0,
                               "train": [], "eval": []}
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if resume:
        state, history = _restore(ckpt_dir, model, state, history)
    step_fn = _make_step(opt, config.grad_clip)
    if out_shardings is not None:  # the same step, its results left where the plan puts them
        step_fn = jit(step_fn.fun, donate_argnums=1, out_shardings=out_shardings)
    eval_fn = jit(_loss)
    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum
    # Under ember launch every process runs this: process 0 alone draws the bar and writes
    # the notes (``_note``), the others stay silent.
    bar = tqdm(total=config.steps, initial=history["step"], desc="training", unit="step",
               dynamic_ncols=True, disable=process_index() != 0)
    saved = history["step"]  # the step of the newest checkpoint on disk
    consistent = True  # model, optimizer state and history describe the same step
    try:
        if history["step"] == 0:  # the baseline the evaluation curve starts from
            bar.set_description("evaluating the starting loss")
            history["eval"].append({"step": 0,
                                    "loss": _evaluate(eval_fn, model, eval_data, config,
                                                      place)})
            bar.set_description("training")
        for step in range(history["step"], config.steps):
            start = time.perf_counter()
            lr = float(opt.lr_at(state))  # the rate this step uses
            batches = np.stack([train_data.batch(step, micro, config.batch_size)
                                for micro in range(config.grad_accum)])
            evaluate = (step + 1) % config.eval_every == 0 or step + 1 == config.steps
            with _interrupts_deferred():
                loss, norm, params, new_state = step_fn(model, state, place(batches))
                loss = _scalar(loss)
                seconds = time.perf_counter() - start
                record = {"step": step + 1, "loss": loss, "grad_norm": _scalar(norm),
                          "lr": lr, "tokens_per_s": tokens_per_step / seconds}
                model.update(params)
                state = new_state
                history["train"].append(record)
                history["step"] = step + 1
                consistent = not evaluate  # until this step's evaluation is done
            if evaluate:
                value = _evaluate(eval_fn, model, eval_data, config, place)
                history["eval"].append({"step": step + 1, "loss": value})
            consistent = True  # a resumed run would not redo this step's evaluation
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
                _save_checkpoint(ckpt_dir, model, state, history)
                saved = step + 1
            if on_step is not None:
                on_step(step + 1, record)
    except KeyboardInterrupt:
        # Keep the finished steps: Ctrl-C between checkpoints would otherwise lose them.
        if consistent and history["step"] > saved:
            _save_checkpoint(ckpt_dir, model, state, history)
        raise
    finally:
        bar.close()
    _finish(model, tokenizer, out_dir, history)
    return history


def _evaluate(eval_fn: Any, model: LlamaForCausalLM, data: _Windows, config: TrainConfig,
              place: Callable[[np.ndarray], Any]) -> float:
    model.eval()
    values = [_scalar(eval_fn(model, place(data.batch(0, i, config.batch_size))))
              for i in range(config.eval_batches)]
    model.train()
    return float(np.mean(values))


SHARDED = "sharded"  # a checkpoint's sharded parameters and optimizer state


def _save_checkpoint(ckpt_dir: str, model: LlamaForCausalLM, state: Any,
                     history: dict[str, Any]) -> None:
    target = os.path.join(ckpt_dir, f"step-{history['step']}")
    os.makedirs(target, exist_ok=True)
    params = model.trainable_parameters()
    if any(isinstance(x, ShardedArray) for x in tree_leaves((params, state))):
        # Every process takes part; what follows is written once, by process 0.
        checkpoint.save(os.path.join(target, SHARDED), {"params": params, "optimizer": state},
                        overwrite=True)
        if process_index() != 0:
            return
    else:
        safetensors.save({k: np.asarray(v) for k, v in params.items()},
                         os.path.join(target, "trainable.safetensors"))
        safetensors.save(optim.state_to_dict(state),
                         os.path.join(target, "optimizer.safetensors"))
    write_text_atomic(os.path.join(target, "history.json"), json.dumps(history))
    write_text_atomic(os.path.join(ckpt_dir, "latest"), os.path.basename(target))
    for name in os.listdir(ckpt_dir):
        if name.startswith("step-") and name != os.path.basename(target):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[str, int] | None:
    """``(directory, step)`` of the newest complete checkpoint in ``ckpt_dir``, if any."""
    try:
        with open(os.path.join(ckpt_dir, "latest"), encoding="utf-8") as f:
            name = f.read().strip()
    except OSError:
        return None
    step = name.removeprefix("step-")
    if not step.isdigit() or not os.path.isdir(os.path.join(ckpt_dir, name)):
        raise EmberError(f"train: {ckpt_dir}/latest names {name!r}, which is not a checkpoint "
                         f"directory there")
    return os.path.join(os.fspath(ckpt_dir), name), int(step)


def _restore(ckpt_dir: str, model: LlamaForCausalLM, state: Any, history: dict[str, Any]
             ) -> tuple[Any, dict[str, Any]]:
    found = latest_checkpoint(ckpt_dir)
    if found is None:
        return state, history
    source = found[0]
    saved = read_json(os.path.join(source, "history.json"))
    if saved.get("fingerprint") != history["fingerprint"]:
        raise ResumeMismatchError(f"train: the checkpoint in {ckpt_dir} was made with other "
                                  f"settings or data; use a new output directory or pass "
                                  f"resume=False")
    current = model.trainable_parameters()
    if os.path.isdir(os.path.join(source, SHARDED)):
        # Read laid out as this run's parameters and state are (on its mesh, or whole).
        layouts = tree_map(lambda x: x.sharding if isinstance(x, ShardedArray) else None,
                           {"params": current, "optimizer": state})
        saved_arrays = checkpoint.load(os.path.join(source, SHARDED), layouts)
        params, state = saved_arrays["params"], saved_arrays["optimizer"]
    else:
        params = safetensors.load(os.path.join(source, "trainable.safetensors"))
        if set(params) != set(current):
            raise EmberError(f"train: checkpoint {source} holds other parameters than the "
                             f"model")
        loaded = optim.state_from_dict(state, safetensors.load(
            os.path.join(source, "optimizer.safetensors")))
        params = {k: _laid_out_as(v, current[k]) for k, v in params.items()}
        state = tree_map(_laid_out_as, loaded, state)
    model.update(params)
    _note(f"resuming from {source} (step {saved['step']})")
    return state, saved


def _note(message: str) -> None:
    """A line for the user, printed above the progress bar, by process 0 only."""
    if process_index() == 0:
        tqdm.write(message)


def _laid_out_as(value: Any, like: Any) -> Any:
    """``value`` laid out as ``like`` is: over its mesh when it is sharded."""
    if isinstance(like, ShardedArray):
        return device_put(value, like.sharding)
    return enp.asarray(value)


def _finish(model: LlamaForCausalLM, tokenizer: Any, out_dir: str,
            history: dict[str, Any]) -> None:
    # The written model is whole: gathered from the mesh (every process takes part).
    model.update({k: enp.asarray(process_allgather(v)) for k, v in model.state_dict().items()
                  if isinstance(v, ShardedArray)})
    model.activation_sharding = None
    if process_index() != 0:
        return
    if any(isinstance(m, nn.LoRALinear) for m in model.modules()):
        adapter = {k: np.asarray(v) for k, v in model.trainable_parameters().items()}
        safetensors.save(adapter, os.path.join(out_dir, "adapter.safetensors"))
        nn.merge_lora(model)
    model.unfreeze()
    model.eval()
    tqdm.write(f"writing the model to {os.path.join(out_dir, 'model')}")
    save_pretrained(model, tokenizer, os.path.join(out_dir, "model"))
    write_text_atomic(os.path.join(out_dir, "history.json"), json.dumps(history, indent=1))
    plot_history(history, os.path.join(out_dir, "loss.png"))


def plot_history(history: dict[str, Any], path: str) -> bool:
    """Training and evaluation loss against the step, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        tqdm.write("matplotlib is not installed; skipping the loss plot "
                   "(pip install 'ember[plot]')")
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    train = history["train"]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if history["eval"]:
        ax.plot([r["step"] for r in history["eval"]], [r["loss"] for r in history["eval"]],
                "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True
