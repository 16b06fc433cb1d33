"""Hugging Face transformers on PyTorch, eager and under ``torch.compile``, as benchmark peers.

Both load the shipped GGUF file with transformers' own reader (dequantised to float32), so they
run the same weights as ember. The compiled peer uses the best CPU setup found for targets.md:
a static KV cache, ``mode="max-autotune-no-cudagraphs"``, ``fullgraph=True``, inductor freezing
and the C++ wrapper for inference; training compiles the model in the default mode (autotuning
a training graph takes far longer than the benchmark).
"""

from __future__ import annotations

import os
import time

import torch
import transformers

torch.set_num_threads(2)
transformers.logging.set_verbosity_error()


def load(path: str) -> torch.nn.Module:
    folder, name = os.path.split(path)
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32).eval()


class HFEager:
    name = f"transformers {transformers.__version__} eager"

    def __init__(self, path: str):
        self.model = load(path)

    def decode(self, prompt: list[int], new_tokens: int) -> float:
        """Seconds for the whole ``generate`` call, greedy, exactly ``new_tokens`` tokens."""
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        with torch.no_grad():
            self.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    def prefill(self, ids) -> float:
        """Seconds from the prompt to its first new token (last-position logits only)."""
        return self.decode(ids[0].tolist(), 1)

    def train_setup(self) -> None:
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=0.0)
        self.step_model = self.model

    def train(self, batch) -> float:
        """Seconds for forward, backward, gradient clipping and an AdamW step."""
        tb = torch.tensor(batch)
        start = time.perf_counter()
        loss = self.step_model(tb, labels=tb).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.last_loss = loss.item()
        return time.perf_counter() - start


class HFCompiled(HFEager):
    name = "torch.compile (max-autotune-no-cudagraphs, static cache)"

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path
        import torch._inductor.config as inductor

        inductor.freezing = True
        inductor.cpp_wrapper = True
        self.model.generation_config.cache_implementation = "static"
        self.model.forward = torch.compile(self.model.forward, fullgraph=True,
                                           mode="max-autotune-no-cudagraphs")

    def train_setup(self) -> None:
        import torch._inductor.config as inductor

        inductor.freezing = False  # freezing folds weights into constants: inference only
        inductor.cpp_wrapper = False
        self.model = load(self.path)  # a fresh copy: the inference one is frozen
        super().train_setup()
        self.step_model = torch.compile(self.model)
