"""Damaged model files get one clear line, never a crash, a hang or a huge allocation.

Small files are built in the test and mutated with a seeded generator: truncated at many
offsets, bits flipped in headers and metadata, lengths, counts, shapes and offsets set to huge
values, JSON made invalid or not UTF-8, config fields given wrong types and values. Every load
either succeeds (a flipped bit in tensor data is still a tensor) or raises an ``EmberError``
whose message is one line naming the file; any other exception fails the test. The parsers are
bounded by the file's size, so a hang would show as a test that does not finish.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections.abc import Callable

import ml_dtypes
import numpy as np
import pytest
from tiny_models import tiny_model, tiny_model_dir, write_gguf

from ember.errors import EmberError
from ember.io import safetensors
from ember.io.tokenizer import Tokenizer
from ember.models import loading

pytest.importorskip("gguf")


def must_fail_cleanly_or_load(load: Callable[[], object], where: str, what: str) -> bool:
    """Run ``load``; True if it raised a clear EmberError, False if it loaded."""
    try:
        load()
    except EmberError as e:
        message = str(e)
        assert "\n" not in message, f"{what}: a multi-line message: {message}"
        assert where in message, f"{what}: the message does not name {where}: {message}"
        return True
    return False


def put(blob: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(blob)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def flips(blob: bytes, count: int, seed: int, end: int | None = None) -> list[tuple[str, bytes]]:
    """``count`` copies of ``blob`` with one bit flipped in its first ``end`` bytes."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        pos = rng.randrange(min(len(blob), end or len(blob)))
        mutated = bytearray(blob)
        mutated[pos] ^= 1 << rng.randrange(8)
        out.append((f"bit flipped at byte {pos}", bytes(mutated)))
    return out


def truncations(blob: bytes, count: int, seed: int) -> list[tuple[str, bytes]]:
    """``blob`` cut at every offset of its first 64 bytes and at ``count`` random ones."""
    rng = random.Random(seed)
    offsets = sorted({*range(0, min(64, len(blob))), *(rng.randrange(len(blob))
                                                       for _ in range(count))})
    return [(f"truncated to {n} bytes", blob[:n]) for n in offsets]


# ------------------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_blob(tmp_path_factory) -> bytes:
    model = tiny_model(40)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, model.config, {k: np.asarray(v) for k, v in model.state_dict().items()})
    return path.read_bytes()


def gguf_header_mutations(blob: bytes) -> list[tuple[str, bytes]]:
    """Huge or zero counts, lengths, dimensions and offsets at the fields that size reads."""
    out = []
    tokens = blob.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens")
    embed = blob.index(b"token_embd.weight") + len(b"token_embd.weight")
    for n in (0, 2**40, 2**63 - 1, 2**64 - 1):
        out += [(f"tensor count {n}", put(blob, 8, "<Q", n)),
                (f"metadata count {n}", put(blob, 16, "<Q", n)),
                (f"first key length {n}", put(blob, 24, "<Q", n)),
                (f"token array length {n}", put(blob, tokens + 8, "<Q", n)),
                (f"first token length {n}", put(blob, tokens + 16, "<Q", n)),
                (f"embedding dimension {n}", put(blob, embed + 4, "<Q", n)),
                (f"embedding data offset {n}", put(blob, embed + 24, "<Q", n))]
    for n in (0, 5, 2**31):
        out.append((f"embedding rank {n}", put(blob, embed, "<I", n)))
    out += [("embedding type 99", put(blob, embed + 20, "<I", 99)),
            ("version 99", put(blob, 4, "<I", 99)),
            ("architecture renamed", blob.replace(b"llama", b"bert\x00", 1)),
            ("metadata not UTF-8", blob.replace(b"tokenizer.ggml.model", b"tokenizer.ggml.mod\xff",
                                                1))]
    return out


def test_damaged_gguf_files_fail_cleanly(gguf_blob, tmp_path):
    path = tmp_path / "damaged.gguf"
    cases = (truncations(gguf_blob, 40, seed=1) + flips(gguf_blob, 150, seed=2, end=4096)
             + flips(gguf_blob, 30, seed=3) + gguf_header_mutations(gguf_blob))
    failed = 0
    for what, blob in cases:
        path.write_bytes(blob)
        failed += must_fail_cleanly_or_load(lambda: loading.load(path), str(path), what)
    assert failed > len(cases) // 2  # the mutations really damaged most files


def test_gguf_declaring_huge_sizes_does_not_allocate_them(gguf_blob, tmp_path):
    path = tmp_path / "huge.gguf"
    for what, blob in gguf_header_mutations(gguf_blob):
        size = what.split()[-1]
        if size.isdigit() and int(size) >= 2**31:
            path.write_bytes(blob)
            assert must_fail_cleanly_or_load(lambda: loading.load(path), str(path), what), what


def test_non_finite_gguf_weights_name_the_tensor(tmp_path):
    model = tiny_model(40)
    state = {k: np.array(v) for k, v in model.state_dict().items()}
    state["model.layers.0.mlp.up_proj.weight"][1, 2] = np.nan
    write_gguf(tmp_path / "nan.gguf", model.config, state)
    with pytest.raises(EmberError, match=r"tensor blk\.0\.ffn_up\.weight holds 1 NaN"):
        loading.load(tmp_path / "nan.gguf")


# ------------------------------------------------------------------------------ safetensors


@pytest.fixture(scope="module")
def st_blob(tmp_path_factory) -> bytes:
    rng = np.random.default_rng(0)
    tensors = {"w": rng.normal(size=(4, 3)).astype(np.float32),
               "b": rng.normal(size=5).astype(ml_dtypes.bfloat16),
               "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
               "empty": np.zeros((0, 4), np.float16)}
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    safetensors.save(tensors, path)
    return path.read_bytes()


def header_of(blob: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8: 8 + length]), blob[8 + length:]


def with_header(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def st_header_mutations(blob: bytes) -> list[tuple[str, bytes]]:
    header, data = header_of(blob)
    out = [(f"header length {n}", put(blob, 0, "<Q", n)) for n in (0, 2**40, 2**63, 2**64 - 1)]

    def edit(what: str, name: str, **changes) -> None:
        out.append((what, with_header({**header, name: {**header[name], **changes}}, data)))
    for huge in (2**62, 2**64):
        edit(f"shape {huge}", "w", shape=[huge, 3])
        edit(f"end offset {huge}", "w", data_offsets=[0, huge])
    edit("negative shape", "w", shape=[-4, -3])
    edit("shape of strings", "w", shape=["4", 3])
    edit("offsets reversed", "w", data_offsets=header["w"]["data_offsets"][::-1])
    edit("offsets overlap", "b", data_offsets=header["w"]["data_offsets"])
    edit("one offset", "w", data_offsets=[0])
    edit("unknown dtype", "w", dtype="Q4")
    edit("dtype not a string", "w", dtype=7)
    out += [("entry not an object", with_header({**header, "w": [1, 2]}, data)),
            ("header a list", with_header(b"[1, 2, 3]", data)),
            ("header not UTF-8", with_header(b'{"\xff\xfe": 1}', data)),
            ("header not JSON", with_header(b"{'w': 1}", data)),
            ("metadata not strings", with_header({**header, "__metadata__": {"a": 1}}, data)),
            ("data missing", with_header(header, b""))]
    return out


def test_damaged_safetensors_files_fail_cleanly(st_blob, tmp_path):
    path = tmp_path / "damaged.safetensors"
    length = int.from_bytes(st_blob[:8], "little")
    cases = (truncations(st_blob, 40, seed=4) + flips(st_blob, 150, seed=5, end=8 + length)
             + st_header_mutations(st_blob))
    failed = 0
    for what, blob in cases:
        path.write_bytes(blob)
        failed += must_fail_cleanly_or_load(lambda: safetensors.load(path), str(path), what)
    assert failed > len(cases) // 2


def test_damaged_shard_index_fails_cleanly(tmp_path):
    tensors = {f"t{i}": np.full((8,), i, np.float32) for i in range(4)}
    safetensors.save(tensors, tmp_path, max_shard_bytes=64)
    index = tmp_path / safetensors.INDEX_FILE
    good = index.read_bytes()
    weight_map = json.loads(good)["weight_map"]
    cases = truncations(good, 20, seed=6) + [
        ("not UTF-8", b"\xff" + good),
        ("weight_map a list", json.dumps({"weight_map": [1]}).encode()),
        ("shard outside the directory", json.dumps(
            {"weight_map": {**weight_map, "t0": "../elsewhere.safetensors"}}).encode()),
        ("shard missing", json.dumps(
            {"weight_map": {**weight_map, "t0": "model-00009-of-00009.safetensors"}}).encode()),
        ("tensor in the wrong shard", json.dumps(
            {"weight_map": {**weight_map, "t0": weight_map["t3"]}}).encode())]
    for what, blob in cases:
        index.write_bytes(blob)
        assert must_fail_cleanly_or_load(lambda: safetensors.load(tmp_path), str(tmp_path),
                                         what), what


# ------------------------------------------------------------------------------ config.json


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("fuzz-model"))


BAD_VALUES = [None, -1, 0, 1.5, "32", [], {}, True, 2**62, float("nan")]
CONFIG_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                 "rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings",
                 "model_type", "sliding_window", "rope_parameters"]


def test_damaged_config_json_fails_cleanly(model_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(model_dir, directory)
    config_path = directory / "config.json"
    good = config_path.read_bytes()
    config = json.loads(good)
    cases = [(f"{field} = {value!r}", json.dumps({**config, field: value}).encode())
             for field in CONFIG_FIELDS for value in BAD_VALUES]
    cases += [(f"rope_parameters = {value!r}",
               json.dumps({**config, "rope_parameters": value}).encode())
              for value in ({"rope_type": "llama3"}, {"rope_type": "yarn", "factor": 2},
                            {"rope_type": "linear", "factor": "x"}, {"type": "dynamic"},
                            {"rope_type": 5}, {"rope_type": "llama3", "factor": 8,
                                               "low_freq_factor": 1, "high_freq_factor": 1,
                                               "original_max_position_embeddings": 8})]
    cases += [(f"{field} removed", json.dumps({k: v for k, v in config.items() if k != field}
                                              ).encode()) for field in CONFIG_FIELDS]
    cases += truncations(good, 20, seed=7) + [("not UTF-8", good.replace(b'"', b'\xff"', 1)),
                                              ("a JSON list", b"[1, 2]")]
    for what, blob in cases:
        config_path.write_bytes(blob)
        must_fail_cleanly_or_load(lambda: loading.load_model(directory), "config.json", what)
    config_path.write_bytes(json.dumps({**config, "hidden_size": "32"}).encode())
    with pytest.raises(EmberError, match="hidden_size must be a positive integer, got '32'"):
        loading.load_model(directory)


# --------------------------------------------------------------------------- tokenizer.json


def test_damaged_tokenizer_files_fail_cleanly(model_dir, tmp_path):
    directory = tmp_path / "tok"
    shutil.copytree(model_dir, directory)
    tokenizer_json = directory / "tokenizer.json"
    good = tokenizer_json.read_bytes()
    cases = (truncations(good, 30, seed=8) + flips(good, 60, seed=9)
             + [("not UTF-8", b"\xff\xfe" + good), ("empty", b"")])
    failed = 0
    for what, blob in cases:
        tokenizer_json.write_bytes(blob)
        failed += must_fail_cleanly_or_load(lambda: Tokenizer.from_pretrained(directory),
                                            "tokenizer.json", what)
    assert failed > len(cases) // 2
    tokenizer_json.write_bytes(good)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    for field in ("chat_template", "bos_token", "eos_token", "pad_token", "add_bos_token"):
        for value in (5, [1], [{"name": 1}], {"content": 3}, "{% if %}", None):
            config_path.write_text(json.dumps({**config, field: value}))
            must_fail_cleanly_or_load(lambda: Tokenizer.from_pretrained(directory),
                                      "tokenizer_config.json", f"{field} = {value!r}")
    config_path.write_bytes(b"\xff{")
    assert must_fail_cleanly_or_load(lambda: Tokenizer.from_pretrained(directory),
                                     "tokenizer_config.json", "not UTF-8")


def test_a_directory_with_nothing_usable_fails_cleanly(tmp_path):
    os.mkdir(tmp_path / "empty")
    assert must_fail_cleanly_or_load(lambda: loading.load(tmp_path / "empty"),
                                     str(tmp_path / "empty"), "empty directory")
    (tmp_path / "x.gguf").write_bytes(b"")
    assert must_fail_cleanly_or_load(lambda: loading.load(tmp_path / "x.gguf"),
                                     str(tmp_path / "x.gguf"), "empty GGUF file")
