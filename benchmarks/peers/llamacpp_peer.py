"""llama.cpp through llama-cpp-python, as a benchmark peer.

The shipped GGUF file (Q4_1, token embedding Q8_0) is used as it is, and re-quantised once by
llama.cpp's own ``llama_model_quantize`` to F32 and Q8_0 files kept in a cache folder, as
targets.md measures them.
"""

from __future__ import annotations

import ctypes
import os
import time

import llama_cpp
import numpy as np

FTYPES = {"f32": llama_cpp.LLAMA_FTYPE_ALL_F32, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}


def model_file(shipped: str, kind: str, cache_dir: str) -> str:
    """The shipped file for ``q4_1``; a re-quantised copy (made once) for ``f32``/``q8_0``."""
    if kind == "q4_1":
        return shipped
    out = os.path.join(cache_dir, f"smollm2-135m-{kind}.gguf")
    if not os.path.exists(out):
        os.makedirs(cache_dir, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[kind]
        params.nthread = 2
        params.allow_requantize = True
        tmp = out + f".{os.getpid()}.tmp"
        if llama_cpp.llama_model_quantize(shipped.encode(), tmp.encode(), ctypes.byref(params)):
            raise RuntimeError(f"llama_model_quantize to {kind} failed")
        os.replace(tmp, out)
    return out


class LlamaCpp:
    """One model file loaded with 2 threads; greedy decoding through llama.cpp's sampler."""

    def __init__(self, path: str, kind: str, n_ctx: int = 1024):
        self.name = f"llama.cpp {kind.upper()}"
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_ubatch=512,
                                   n_threads=2, n_threads_batch=2, verbose=False)

    def decode(self, prompt: list[int], new_tokens: int) -> float:
        """Seconds for the whole call: the prompt, then ``new_tokens`` greedy tokens."""
        self.llm.reset()  # else a repeated prompt is served from the KV cache
        start = time.perf_counter()
        got = 0
        for _ in self.llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            got += 1
            if got == new_tokens:
                break
        return time.perf_counter() - start

    def prefill(self, ids: np.ndarray) -> float:
        """Seconds from the prompt to its first new token."""
        self.llm.reset()
        start = time.perf_counter()
        next(iter(self.llm.generate(ids[0].tolist(), top_k=1, temp=0.0, reset=True)))
        return time.perf_counter() - start
