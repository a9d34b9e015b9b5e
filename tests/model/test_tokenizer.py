"""Tokenizer parity with transformers, the chat template, and streaming detokenization."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from attnserve.model.detokenizer import IncrementalDetokenizer, StopStringMatcher
from attnserve.model.gguf_file import GGUFFile
from attnserve.model.tokenizer import Tokenizer

_PIECES = [
    "Hello",
    "world",
    "the",
    "Paris",
    "naïve",
    "café",
    "Größe",
    "Ελληνικά",
    "русский",
    "中文字符",
    "日本語のテキスト",
    "한국어",
    "العربية",
    "עברית",
    "हिन्दी",
    "😀",
    "👍🏽",
    "👩‍👩‍👧‍👦",
    "🇫🇷",
    "🤖✨",
    "∑∫√∞",
    "→←",
    "…",
    "“quoted”",
    "def f(x):",
    "return x**2",
    '{"key": [1, 2, 3]}',
    "</div>",
    "#include <stdio.h>",
    "SELECT * FROM t;",
    "0",
    "42",
    "3.14159",
    "1,000,000",
    "2024-11-22",
    "0xDEADBEEF",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    "  \n  ",
    "don't",
    "I'm",
    "we'll",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "a",
    "Z",
    "_",
    "@@",
    "~~~",
    "\\n",
]


def varied_strings(count: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts = [rng.choice(_PIECES) for _ in range(rng.randint(1, 8))]
        seps = [rng.choice(["", " ", "  ", "\n", "\t", " ", " "]) for _ in parts]
        out.append("".join(p + s for p, s in zip(parts, seps, strict=True)))
    return out


@pytest.fixture(scope="module")
def ours(default_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(GGUFFile(default_gguf).metadata)


@pytest.fixture(scope="module")
def theirs(default_gguf: Path):
    """transformers' tokenizer for the model, with the model's own pre-tokenizer.

    transformers builds the tokenizer from the GGUF vocabulary and merges, but its
    GGUF converter does not know llama.cpp's `smollm` pre-tokenizer and drops the
    digit split. SmolLM2's tokenizer.json (and llama.cpp) isolate every digit
    before the GPT-2 split, so we put that pre-tokenizer back; vocabulary,
    merges, special tokens and decoder all stay transformers' own.
    """
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    tok = transformers.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tok


@pytest.fixture(scope="module")
def theirs_unpatched(default_gguf: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)


@pytest.mark.e2e
@pytest.mark.xdist_group("smollm")
def test_without_digits_we_match_transformers_gguf_tokenizer_as_is(ours: Tokenizer, theirs_unpatched) -> None:
    strings = [s for s in varied_strings(1000) if not any(c.isdigit() for c in s)]
    assert len(strings) > 300
    assert [ours.encode(s) for s in strings] == [theirs_unpatched.encode(s) for s in strings]
    # Where the digit split matters: "Z  0" is "Z", "  ", "0" for SmolLM2 and llama.cpp.
    assert [ours.backend.id_to_token(i) for i in ours.encode("Z  0x")] == ["Z", "ĠĠ", "0", "x"]


@pytest.mark.e2e
@pytest.mark.xdist_group("smollm")
def test_encode_decode_match_transformers_on_1000_strings(ours: Tokenizer, theirs) -> None:
    strings = varied_strings(1000)
    assert len(set(strings)) > 950
    mismatches = []
    for text in strings:
        ids = ours.encode(text)
        if ids != theirs.encode(text):
            mismatches.append(("encode", text))
        elif ours.decode(ids) != theirs.decode(ids):
            mismatches.append(("decode", text))
        elif ours.decode(ids) != text:
            mismatches.append(("roundtrip", text))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"


@pytest.mark.e2e
@pytest.mark.xdist_group("smollm")
def test_incremental_detokenizer_streams_without_broken_characters(ours: Tokenizer) -> None:
    prompt = ours.encode("Some prompt text: ")
    for text in varied_strings(1000, seed=99):
        detok = IncrementalDetokenizer(ours, prompt, skip_special_tokens=False)
        deltas = [detok.push(t) for t in ours.encode(text)]
        deltas.append(detok.flush())
        assert "".join(deltas) == text
        assert all("\ufffd" not in d for d in deltas), f"broken character streamed for {text!r}"


@pytest.mark.e2e
@pytest.mark.xdist_group("smollm")
def test_chat_template_renders_chatml(ours: Tokenizer, theirs) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = ours.apply_chat_template(messages)
    assert rendered == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ours.eos_token_ids == (2,)


def test_byte_level_detokenizer_holds_partial_utf8() -> None:
    tok = Tokenizer.byte_level(384)
    ids = tok.encode("é😀")  # 2 + 4 bytes, one token per byte
    assert len(ids) == 6
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert deltas == ["", "é", "", "", "", "😀"]


def test_detokenizer_flush_releases_an_incomplete_tail() -> None:
    tok = Tokenizer.byte_level(384)
    detok = IncrementalDetokenizer(tok)
    assert detok.push(tok.encode("😀")[0]) == ""
    assert detok.flush() == "\ufffd"


@pytest.mark.parametrize(
    ("deltas", "stops", "released", "stopped"),
    [
        (["Hello ", "wor", "ld! bye"], ["world"], "Hello ", "world"),
        (["ab", "c", "d"], ["cd"], "ab", "cd"),  # across token boundaries
        (["x<", "/s", ">tail"], ["</s>"], "x", "</s>"),
        (["abc", "abd"], ["abx"], "abcabd", None),  # partial matches released when they fail
        (["one two"], ["two", "one"], "", "one"),  # earliest wins
        (["no stop here"], [], "no stop here", None),
    ],
)
def test_stop_string_matcher(deltas: list[str], stops: list[str], released: str, stopped: str | None) -> None:
    matcher = StopStringMatcher(stops)
    out = []
    for d in deltas:
        piece = matcher.feed(d)
        # Nothing released may ever contain the start of a stop string that later completes.
        out.append(piece)
    out.append(matcher.flush())
    assert "".join(out) == released
    assert matcher.stopped == stopped


def test_stop_string_matcher_holds_back_undecided_prefix() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abc ST") == "abc "
    assert matcher.feed("O") == ""
    assert matcher.feed("x") == "STOx"
