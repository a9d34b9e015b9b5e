"""Tokenizer on the `tokenizers` library, plus the model's chat template (jinja2).

Built from a Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json``), from a
GGUF file's vocabulary and merges, or as a plain byte-level vocabulary for dummy
models.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from attnserve.model.errors import ModelLoadError

# ChatML, used by dummy models and as a fallback when a model ships no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Pre-tokenizer regexes by llama.cpp's `tokenizer.ggml.pre` name: how the text was
# split when the merges were learned.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
# llama.cpp pre-tokenizers that isolate every digit (\p{N}) before the GPT-2 regex.
# transformers' GGUF converter does not know them and splits "  0" as " ", " 0";
# llama.cpp and the models' own tokenizer.json split it "  ", "0", as we do.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4
_GIL_FREE_ABOVE_CHARS = 4096
_GGUF_NORMAL = 1


def _merges_by_score(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a normal piece into two
    pieces of the vocabulary, the merged piece's score deciding the order (ties: by the halves' ids)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, score, kind in zip(tokens, scores, types, strict=True):
        if kind != _GGUF_NORMAL:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        chat_template: str | None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.chat_template = chat_template

    # ---------------------------------------------------------------- factories
    @classmethod
    def from_hf_folder(cls, folder: Path) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder} has no tokenizer.json")
        try:
            backend = Backend.from_file(str(path))
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a valid tokenizer file: {exc}") from exc
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()

        def token_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, dict):
                token = token.get("content")
            return backend.token_to_id(token) if token else None

        eos = token_id("eos_token")
        return cls(
            backend,
            bos_token_id=token_id("bos_token"),
            eos_token_ids=() if eos is None else (eos,),
            chat_template=template if isinstance(template, str) else None,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if kind == "llama":
            return cls._from_gguf_sentencepiece(meta)
        if kind != "gpt2":
            raise ModelLoadError(
                f"GGUF tokenizer type {kind!r} is not supported (supported: gpt2 byte-level BPE, "
                "llama sentencepiece BPE); load the model's Hugging Face folder, which carries tokenizer.json"
            )
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
        backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre in _SPLITS:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        elif pre in _DIGIT_SPLIT_PRE:  # GPT-2 split, every digit on its own
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
            )
        else:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        backend.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, k in zip(tokens, types, strict=True)
                if k == _GGUF_CONTROL
            ]
        )
        backend.add_tokens(
            [AddedToken(t, normalized=False) for t, k in zip(tokens, types, strict=True) if k == _GGUF_USER_DEFINED]
        )
        return cls._from_gguf_backend(backend, meta, tokens, add_bos_default=False)

    @classmethod
    def _from_gguf_sentencepiece(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """llama.cpp's "llama" vocabulary (sentencepiece BPE: Llama 2, Mistral, Gemma, Phi-3): pieces
        spell spaces as U+2581, unknown characters fall back to <0xNN> byte pieces, and merges, which
        the file does not list, follow the pieces' scores (llama.cpp's llm_tokenizer_spm does the
        same: the best-scoring adjacent pair first)."""
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = Backend(
            models.BPE(vocab=vocab, merges=_merges_by_score(tokens, scores, types), byte_fallback=True, unk_token=None)
        )
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        steps = [normalizers.Prepend("\u2581")] if prefix else []
        backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
        decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence([*decode, decoders.Strip(" ", 1, 0)] if prefix else decode)
        typed = list(zip(tokens, types, strict=True))
        specials = [AddedToken(t, special=True, normalized=False) for t, k in typed if k == _GGUF_CONTROL]
        backend.add_special_tokens(specials)
        backend.add_tokens([AddedToken(t, normalized=False) for t, k in typed if k == _GGUF_USER_DEFINED])
        return cls._from_gguf_backend(backend, meta, tokens, add_bos_default=True)  # llama.cpp's default for spm

    @classmethod
    def _from_gguf_backend(
        cls, backend: Backend, meta: Mapping[str, Any], tokens: list[str], *, add_bos_default: bool
    ) -> Tokenizer:
        """The BOS a GGUF asks for, its EOS and its chat template, around a built vocabulary."""
        bos = meta.get("tokenizer.ggml.bos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token", add_bos_default) and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 $B:1", special_tokens=[(tokens[bos], bos)]
            )
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=() if eos is None else (int(eos),),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def byte_level(cls, vocab_size: int) -> Tokenizer:
        """A tokenizer for dummy models: three ChatML specials, the 256 bytes, then fillers."""
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        byte_chars = list(_bytes_to_unicode().values())
        if vocab_size < len(specials) + len(byte_chars):
            raise ModelLoadError(f"a byte-level vocabulary needs at least 259 tokens, the model has {vocab_size}")
        fillers = [f"<unused_{i}>" for i in range(vocab_size - len(specials) - len(byte_chars))]
        vocab = {t: i for i, t in enumerate(specials + byte_chars + fillers)}
        backend = Backend(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return cls(backend, bos_token_id=1, eos_token_ids=(2,), chat_template=CHATML_TEMPLATE)

    # ------------------------------------------------------------------- coding
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def max_token_chars(self) -> int:
        """Characters of the longest vocabulary entry (special tokens included). A text of c characters
        has at least c / max_token_chars tokens, so a too-long prompt can be refused before encoding it."""
        return max(len(token) for token in self.backend.get_vocab(with_added_tokens=True))

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if len(text) < _GIL_FREE_ABOVE_CHARS:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        # encode() holds the GIL for its whole run (0.35 s for 640k characters here); encode_batch()
        # releases it, so a long prompt tokenized on a worker thread does not stall the others.
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, token_ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Readable text of one token (for labels), bytes decoded leniently."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token: a piece of a multi-byte character stays its own bytes
        (token_text would show U+FFFD). Byte-level BPE maps each character of a vocabulary entry
        to one byte; other vocabularies fall back to the token's text in UTF-8."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id not in self.special_token_ids and isinstance(self.backend.decoder, decoders.ByteLevel):
            table = _unicode_to_bytes()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        return self.token_text(token_id).encode()

    # ------------------------------------------------------------ chat template
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Render messages with the model's jinja2 chat template (ChatML if it has none). ``tools``
        (OpenAI function specs) are passed to the template as transformers passes them."""
        template = _compile_template(self.chat_template or CHATML_TEMPLATE)
        bos = self.backend.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.backend.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""
        return template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=list(tools) if tools else None,
            bos_token=bos or "",
            eos_token=eos or "",
        )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


_TEMPLATE_CACHE: dict[str, jinja2.Template] = {}


def _compile_template(source: str) -> jinja2.Template:
    if source not in _TEMPLATE_CACHE:
        # The same environment Hugging Face renders chat templates in: sandboxed,
        # trimmed blocks, loop controls, `raise_exception` and `strftime_now`.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATE_CACHE[source] = env.from_string(source)
    return _TEMPLATE_CACHE[source]


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {ch: b for b, ch in _bytes_to_unicode().items()}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (the byte-level alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(mapping.items()))
