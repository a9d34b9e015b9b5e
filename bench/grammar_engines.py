"""Side by side: llguidance and xgrammar on the default model's vocabulary (49,152 tokens).

Measures, for each library: building its tokenizer view once, compiling a set of real-world
constraints (JSON schemas, a regex, a choice), and the time to compute one token mask while
following a valid answer token by token (what the server pays per constrained row per step).

    .venv/bin/python bench/grammar_engines.py [--model PATH.gguf] [--repeat 3]

xgrammar is not a dependency of the server (it depends on torch): install it next to the
project's torch to run its half (``pip install -c requirements/constraints.txt xgrammar``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attnserve.model.loader import load_model
from attnserve.model.tokenizer import Tokenizer

# Real-world shapes: an OpenAI function's parameters, a nested record, an enum-heavy form.
SCHEMAS: dict[str, dict[str, Any]] = {
    "weather_tool": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City and country"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location", "unit"],
        "additionalProperties": False,
    },
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0},
            "email": {"type": "string"},
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["street", "city"],
            },
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        },
        "required": ["name", "age", "address"],
    },
    "order_form": {
        "type": "object",
        "properties": {
            "country": {"type": "string", "enum": [f"country-{i}" for i in range(200)]},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"}},
                    "required": ["sku", "qty"],
                },
            },
            "express": {"type": "boolean"},
        },
        "required": ["country", "items"],
    },
}
ANSWERS = {
    "weather_tool": {"location": "Paris, France", "unit": "celsius"},
    "person": {
        "name": "Ada Lovelace",
        "age": 36,
        "email": "ada@example.org",
        "address": {"street": "12 St James's Square", "city": "London"},
        "tags": ["mathematics", "engines", "poetry"],
    },
    "order_form": {
        "country": "country-117",
        "items": [{"sku": "A-1", "qty": 2, "price": 9.5}, {"sku": "B-22", "qty": 1}],
        "express": True,
    },
}
REGEX = r"\d{3}-\d{3}-\d{4}"


@dataclass
class Result:
    library: str
    tokenizer_s: float
    compile_ms: dict[str, float]
    mask_us: list[float]


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bench_llguidance(tok: Tokenizer, vocab: int, repeat: int) -> Result:
    import llguidance

    from attnserve.server.engine.constraints import ll_tokenizer

    started = time.perf_counter()
    lltok = ll_tokenizer(tok, vocab)
    tokenizer_s = time.perf_counter() - started
    compile_ms: dict[str, float] = {}
    mask_us: list[float] = []
    mask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    for name, schema in SCHEMAS.items():
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
            matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)  # the first mask is part of it
            times.append(time.perf_counter() - t0)
        compile_ms[name] = 1000 * min(times)
        ids = tok.encode(json.dumps(ANSWERS[name]), add_special_tokens=False)
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        for token in ids:
            t0 = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            mask_us.append(1e6 * (time.perf_counter() - t0))
            assert matcher.consume_token(token), (name, matcher.get_error())
    t0 = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_regex(REGEX), log_level=0)
    matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
    compile_ms["regex_phone"] = 1000 * (time.perf_counter() - t0)
    return Result("llguidance", tokenizer_s, compile_ms, mask_us)


def bench_xgrammar(tok: Tokenizer, vocab: int, repeat: int) -> Result:
    import xgrammar

    started = time.perf_counter()
    encoded = [tok.backend.id_to_token(i) or "" for i in range(tok.vocab_size)]
    info = xgrammar.TokenizerInfo(
        encoded, vocab_type=xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=list(tok.eos_token_ids)
    )
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    tokenizer_s = time.perf_counter() - started
    compile_ms: dict[str, float] = {}
    mask_us: list[float] = []
    mask = xgrammar.allocate_token_bitmask(1, vocab)
    for name, schema in SCHEMAS.items():
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            compiled = compiler.compile_json_schema(json.dumps(schema))
            matcher = xgrammar.GrammarMatcher(compiled)
            matcher.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - t0)
        compile_ms[name] = 1000 * min(times)
        ids = tok.encode(json.dumps(ANSWERS[name]), add_special_tokens=False)
        matcher = xgrammar.GrammarMatcher(compiled)
        for token in ids:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            mask_us.append(1e6 * (time.perf_counter() - t0))
            assert matcher.accept_token(token), name
    t0 = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiler.compile_regex(REGEX))
    matcher.fill_next_token_bitmask(mask)
    compile_ms["regex_phone"] = 1000 * (time.perf_counter() - t0)
    return Result("xgrammar", tokenizer_s, compile_ms, mask_us)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model(args.model, dtype=torch.float32)
    tok, vocab = loaded.tokenizer, loaded.config.vocab_size
    print(f"vocabulary: {vocab} tokens ({args.model})")
    runs: list[Callable[[Tokenizer, int, int], Result]] = [bench_llguidance, bench_xgrammar]
    for run in runs:
        try:
            r = run(tok, vocab, args.repeat)
        except ImportError as exc:
            print(f"{run.__name__}: skipped ({exc})")
            continue
        compiles = ", ".join(f"{k} {v:.1f}" for k, v in r.compile_ms.items())
        print(
            f"{r.library:10s} tokenizer {r.tokenizer_s:.2f} s | compile+first mask ms: {compiles} | "
            f"mask per token: median {statistics.median(r.mask_us):.0f} us, p90 {_percentile(r.mask_us, 0.9):.0f} us, "
            f"max {max(r.mask_us):.0f} us over {len(r.mask_us)} tokens"
        )


if __name__ == "__main__":
    main()
