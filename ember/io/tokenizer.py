"""Text <-> token ids for the built-in models, from a Hugging Face directory or a GGUF file.

A model needs more than its BPE: which ids end generation, whether BOS is prepended, how a chat is
rendered into a prompt. A Hugging Face checkpoint spreads that over four JSON files; a GGUF file
keeps it as metadata under llama.cpp's key names and carries no ``tokenizer.json`` at all, so the
normaliser, pre-tokenizer and decoder have to be rebuilt from ``tokenizer.ggml.model`` and
``tokenizer.ggml.pre``. :class:`Tokenizer` gathers all of it into one object that behaves the same
whichever format the model came in, so generation code never branches on the file format.

The BPE itself runs in the ``tokenizers`` library (Rust); this module only assembles it.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import gguf
import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from ember.errors import EmberError
from ember.io.files import read_json, write_text_atomic
from ember.io.gguf import GGUFFile

# Tokens that close a chat turn. Chat models emit them instead of (or before) their configured EOS:
# Llama 3's EOS is <|end_of_text|> but an assistant turn ends with <|eot_id|>.
_TURN_END_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>",
    "<end_of_turn>",
)

#: A plain ChatML template, for models that ship none: ``apply_chat_template(...,
#: chat_template=CHATML_TEMPLATE)``. Not applied silently -- a wrong template quietly ruins output.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Pre-tokenizer regexes, keyed by tokenizer.ggml.pre: the split a vocabulary's merges were learned
# on. Using another split still round-trips text but gives ids the model never saw in training.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_GGUF_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}

_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
_UNKNOWN, _NORMAL = int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.NORMAL)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus what generation needs: special tokens, stop ids, chat
    template.

    Build one with :meth:`from_pretrained` or :meth:`from_gguf`. ``backend`` is the underlying
    ``tokenizers.Tokenizer`` for anything not wrapped here (offsets, padding...).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        """``add_bos_token``/``add_eos_token`` of None keep the backend's own post-processor;
        otherwise the backend's post-processor is replaced by one adding just those tokens.

        ``chat_template`` is one template or several by name (the one used by default is
        ``"default"``); ``eos_token_ids`` are extra ids that stop generation (generation_config).
        """
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        if isinstance(chat_template, str):
            chat_template = {"default": chat_template}
        self.chat_templates: dict[str, str] = dict(chat_template or {})
        self._extra_eos_ids = [int(i) for i in eos_token_ids]
        self.add_bos_token = add_bos_token and self.bos_token_id is not None
        self.add_eos_token = add_eos_token and self.eos_token_id is not None
        if add_bos_token is not None or add_eos_token is not None:
            backend.post_processor = self._bos_eos_processor()

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a Hugging Face model directory: ``tokenizer.json`` plus, when present,
        ``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json`` and
        ``chat_template.jinja``."""
        directory = os.fspath(path)
        if not os.path.isdir(directory):
            raise EmberError(f"{directory}: no such directory (expected a Hugging Face model "
                             "directory holding tokenizer.json)")
        tokenizer_file = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise EmberError(f"{directory}: no tokenizer.json (expected the Hugging Face fast "
                             "tokenizer file; tokenizer.model or vocab.json alone is unsupported)")
        try:
            backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        except Exception as err:  # the Rust side raises plain Exception
            raise EmberError(f"{tokenizer_file}: not a valid tokenizer.json ({err})") from err
        if backend.get_vocab_size(with_added_tokens=True) == 0:
            raise EmberError(f"{tokenizer_file}: empty vocabulary (expected at least one token)")

        config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(directory, "special_tokens_map.json"))
        generation = _read_json(os.path.join(directory, "generation_config.json"))
        eos_ids = generation.get("eos_token_id")
        eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else eos_ids

        def special(name: str) -> str | None:
            token = _token_text(config.get(name)) or _token_text(special_map.get(name))
            fallback = generation.get(f"{name}_id")
            if token is None and name == "eos_token" and eos_ids:
                fallback = eos_ids[0]
            if token is None and isinstance(fallback, int):
                token = backend.id_to_token(fallback)
            return token

        return cls(
            backend,
            bos_token=special("bos_token"),
            eos_token=special("eos_token"),
            unk_token=special("unk_token"),
            pad_token=special("pad_token"),
            chat_template=_hf_chat_templates(directory, config),
            add_bos_token=config.get("add_bos_token"),
            add_eos_token=config.get("add_eos_token"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_gguf(cls, source: str | os.PathLike | Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes, from its path or its metadata mapping.

        Supports ``tokenizer.ggml.model`` "gpt2" (byte-level BPE with merges) and "llama"
        (SentencePiece BPE with scores and byte fallback).
        """
        if isinstance(source, Mapping):
            return _tokenizer_from_gguf_metadata(cls, source, "GGUF metadata")
        where = os.fspath(source)
        return _tokenizer_from_gguf_metadata(cls, _read_gguf_metadata(where), where)

    # -------------------------------------------------------------------------------- properties

    def token_to_id(self, token: str | None) -> int | None:
        """The id of ``token`` (a vocabulary entry or added token), or None."""
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        """The padding id; models without one pad with EOS (the positions are masked anyway)."""
        pad = self.token_to_id(self.pad_token)
        return self.eos_token_id if pad is None else pad

    @property
    def stop_token_ids(self) -> set[int]:
        """Ids that end generation: EOS, generation_config's EOS ids, and chat turn-end tokens."""
        stops = set(self._extra_eos_ids)
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        added = {token.content for token in self.backend.get_added_tokens_decoder().values()}
        stops.update(self.token_to_id(t) for t in _TURN_END_TOKENS if t in added)
        return stops

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None when the model has none."""
        return self.chat_templates.get("default")

    # ------------------------------------------------------------------------ encode and decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS/EOS as the model wants them.

        Special tokens written in the text (``"<|im_start|>"``) become their single id.
        """
        if not isinstance(text, str):
            raise EmberError(f"Tokenizer.encode: expected a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str],
                     add_special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` for many texts at once (in parallel threads)."""
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str):
                raise EmberError(f"Tokenizer.encode_batch: expected str items, got "
                                 f"{type(text).__name__}")
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (a list, tuple or integer array)."""
        ids = [int(i) for i in ids]
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise EmberError(f"Tokenizer.decode: id {bad[0]} is outside the vocabulary "
                             f"(0..{size - 1})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        chat_template: str | None = None,
        **variables: Any,
    ) -> str | list[int]:
        """Render ``messages`` (``{"role": ..., "content": ...}`` dicts) into the model's prompt.

        ``chat_template`` picks a named template of the model or is a template itself;
        ``variables`` reach the template (``tools=...``, ``enable_thinking=...``). With
        ``tokenize`` the ids are returned, without adding BOS again (the template writes it).
        """
        template = self.chat_templates.get(chat_template or "default", chat_template)
        if template is None:
            raise EmberError("apply_chat_template: this model has no chat template (none in "
                             "tokenizer_config.json or the GGUF metadata); pass chat_template=..., "
                             "e.g. ember.io.tokenizer.CHATML_TEMPLATE")
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                    "unk_token": self.unk_token, "pad_token": self.pad_token}
        context = {name: token or "" for name, token in specials.items()}
        context.update(variables)
        try:
            text = _compile_template(template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as err:
            raise EmberError(f"apply_chat_template: the chat template failed: {err}") from err
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ----------------------------------------------------------------------------------- save

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

        Each file is written to a temporary name and renamed, so an interrupted save never leaves
        a truncated file that a later load would misread. Hugging Face's ``AutoTokenizer`` loads the
        result and gives the same ids.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        specials = {name: token for name, token in (
            ("bos_token", self.bos_token), ("eos_token", self.eos_token),
            ("unk_token", self.unk_token), ("pad_token", self.pad_token)) if token is not None}
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "clean_up_tokenization_spaces": False, **specials}
        if self.add_bos_token is not None:
            config["add_bos_token"] = bool(self.add_bos_token)
        if self.add_eos_token is not None:
            config["add_eos_token"] = bool(self.add_eos_token)
        if list(self.chat_templates) == ["default"]:
            config["chat_template"] = self.chat_template
        elif self.chat_templates:
            config["chat_template"] = [{"name": name, "template": template}
                                       for name, template in self.chat_templates.items()]
        files = {"tokenizer.json": self.backend.to_str(),
                 "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
                 "special_tokens_map.json": json.dumps(specials, indent=2, ensure_ascii=False)}
        for name, text in files.items():
            write_text_atomic(os.path.join(directory, name), text)

    def _bos_eos_processor(self) -> processors.TemplateProcessing:
        """A post-processor that adds exactly the BOS/EOS asked for (possibly nothing)."""
        before = [(self.bos_token, self.bos_token_id)] if self.add_bos_token else []
        after = [(self.eos_token, self.eos_token_id)] if self.add_eos_token else []
        single = [f"{token}:0" for token, _ in before] + ["$A:0"]
        single += [f"{token}:0" for token, _ in after]
        pair = single + [f"{token}:1" for token, _ in before] + ["$B:1"]
        pair += [f"{token}:1" for token, _ in after]
        return processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=list(dict.fromkeys(before + after)))


class StreamDecoder:
    """Turns token ids, pushed one at a time during generation, into text to print as it comes.

    Decoding each id alone goes wrong twice: a byte-level token can hold part of a UTF-8 character
    (an emoji is often 2-4 tokens), and a SentencePiece decoder drops the leading space of the first
    token it sees, so "▁world" decoded alone loses its space. So each push decodes a window that
    starts at the last emitted token boundary and returns what the window adds beyond the text
    already returned; text ending in U+FFFD (an incomplete character) waits for the next id. The
    pieces joined equal ``tokenizer.decode(all_ids)``, at a cost per push of the window, not of
    everything decoded so far.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0  # first id of the window: its text was returned by an earlier push
        self._done = 0  # ids before this have all been returned as text

    def push(self, token_id: int) -> str:
        """Add one id and return the newly completed text ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        emitted, text = self._window()
        if text.endswith("\ufffd") or len(text) <= len(emitted):
            return ""
        self._start, self._done = self._done, len(self._ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character decodes as U+FFFD)."""
        emitted, text = self._window()
        self._start = self._done = len(self._ids)
        return text[len(emitted):]

    def _window(self) -> tuple[str, str]:
        decode = functools.partial(self._tokenizer.decode,
                                   skip_special_tokens=self._skip_special_tokens)
        return decode(self._ids[self._start:self._done]), decode(self._ids[self._start:])


# --------------------------------------------------------------------------- Hugging Face files


def _read_json(path: str) -> dict[str, Any]:
    """A JSON object file's contents, or {} when the file is absent (they are all optional)."""
    return read_json(path) if os.path.isfile(path) else {}


def _token_text(value: Any) -> str | None:
    """A special token as written in the config: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_templates(directory: str, config: Mapping[str, Any]) -> dict[str, str]:
    """Chat templates by name, from tokenizer_config.json or (newer checkpoints) .jinja files."""
    templates: dict[str, str] = {}
    found = config.get("chat_template")
    if isinstance(found, str):
        templates["default"] = found
    elif isinstance(found, list):
        try:
            templates.update((entry["name"], entry["template"]) for entry in found)
        except (KeyError, TypeError) as err:
            raise EmberError(f"{directory}/tokenizer_config.json: chat_template is a list, "
                             "expected its items to be {'name': ..., 'template': ...}") from err
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if "default" not in templates and os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            templates["default"] = f.read()
    return templates


def _read_gguf_metadata(path: str) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata of a GGUF file, as plain Python values."""
    metadata = GGUFFile(path).metadata
    return {name: value for name, value in metadata.items() if name.startswith("tokenizer.")}


def _tokenizer_from_gguf_metadata(cls: type[Tokenizer], metadata: Mapping[str, Any],
                                  where: str) -> Tokenizer:
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None:
        raise EmberError(f"{where}: no tokenizer (expected the metadata key tokenizer.ggml.model)")
    tokens = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
              for t in metadata.get("tokenizer.ggml.tokens", ())]
    if not tokens:
        raise EmberError(f"{where}: empty vocabulary (expected tokens in tokenizer.ggml.tokens)")
    types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", ())]
    types = types or [_NORMAL] * len(tokens)
    merges = [str(m) for m in metadata.get("tokenizer.ggml.merges", ())]

    def token(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    if kind == "gpt2":
        pre = str(metadata.get("tokenizer.ggml.pre", "default"))
        backend = _byte_level_bpe(tokens, merges, pre, where)
    elif kind == "llama":
        scores = [float(s) for s in metadata.get("tokenizer.ggml.scores", ())]
        if len(scores) != len(tokens):
            raise EmberError(f"{where}: tokenizer.ggml.scores has {len(scores)} entries, expected "
                             f"one per token ({len(tokens)})")
        prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend = _sentencepiece_bpe(tokens, scores, types, merges, prefix, token("unknown"), where)
    else:
        raise EmberError(f"{where}: tokenizer.ggml.model is {kind!r}; expected 'gpt2' (byte-level "
                         "BPE) or 'llama' (SentencePiece BPE)")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k in (_CONTROL, _UNKNOWN)])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == _USER_DEFINED])

    templates = {}  # "tokenizer.chat_template" and named ones, "tokenizer.chat_template.<name>"
    for name, value in metadata.items():
        if name == "tokenizer.chat_template":
            templates["default"] = str(value)
        elif name.startswith("tokenizer.chat_template."):
            templates[name.removeprefix("tokenizer.chat_template.")] = str(value)
    return cls(
        backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=templates,
        # llama.cpp prepends BOS to SentencePiece vocabularies whose file does not say otherwise.
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    )


def _vocab(tokens: list[str]) -> dict[str, int]:
    """Token -> id; a duplicated token keeps its first id (later copies are unreachable)."""
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    return vocab


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]], where: str,
         **options: Any) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer(models.BPE(vocab, merges, **options))
    except Exception as err:  # the Rust side raises plain Exception
        raise EmberError(f"{where}: the vocabulary and merges do not form a BPE ({err})") from err


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str,
                    where: str) -> tokenizers.Tokenizer:
    """GPT-2 style BPE: tokens spell bytes as printable characters, text is split by a regex."""
    if not merges:
        raise EmberError(f"{where}: tokenizer.ggml.model 'gpt2' needs tokenizer.ggml.merges, "
                         "which is missing or empty")
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    if any(len(pair) != 2 for pair in pairs):
        raise EmberError(f"{where}: tokenizer.ggml.merges holds an entry without a space "
                         "(expected 'left right')")
    backend = _bpe(_vocab(tokens), pairs, where)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre, where)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_pre_tokenizer(pre: str, where: str) -> pre_tokenizers.PreTokenizer:
    if pre in _GGUF_SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_GGUF_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre not in ("default", "gpt2"):
        warnings.warn(f"{where}: unknown tokenizer.ggml.pre {pre!r}; splitting text with the "
                      "GPT-2 pattern, so some ids may differ from llama.cpp's", stacklevel=4)
    return gpt2


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int],
                       merges: list[str], add_space_prefix: bool, unk_token: str | None,
                       where: str) -> tokenizers.Tokenizer:
    """SentencePiece BPE (Llama 2, Mistral): "▁" stands for a space, unknown bytes become
    ``<0xNN>`` tokens, and merges come from the file or are derived from the scores."""
    pairs = ([tuple(merge.split(" ", 1)) for merge in merges] if merges
             else _merges_from_scores(tokens, scores, types))
    backend = _bpe(_vocab(tokens), pairs, where, unk_token=unk_token, fuse_unk=True,
                   byte_fallback=True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float],
                        types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's rule: join the adjacent pair whose union is the
    best-scoring piece. Every way to cut a piece into two pieces is a merge, ranked by the score of
    the whole (ties: lower id first); byte, control and unknown tokens never take part."""
    pieces = {token: index for index, (token, kind) in enumerate(zip(tokens, types))
              if kind in (_NORMAL, _USER_DEFINED)}
    ranked = []
    for token, index in pieces.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in pieces and right in pieces:
                ranked.append((-scores[index], index, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox (templates come with downloaded models), with the
    whitespace rules and helpers Hugging Face templates are written for."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise EmberError(f"chat template: syntax error on line {err.lineno}: "
                         f"{err.message}") from err


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """JSON without Jinja's HTML escaping: the prompt must show tool schemas verbatim."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_template_error(message: str) -> None:
    raise EmberError(f"chat template: {message}")
