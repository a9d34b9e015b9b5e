"""Constrained decoding on llguidance: compile a request's constraint once, then keep one matcher
per running completion and mask the logits of constrained rows only.

Why llguidance (bench/grammar_engines.py measures it against xgrammar on the default model's
49k vocabulary): no compile step worth caching for most schemas (its Earley parser and lazy
lexer build masks on demand), masks in tens of microseconds per token, resource limits (fuel)
on every step so a hostile grammar errors out instead of stalling, and no torch pin.

Two halves:
- :class:`GrammarCompiler` (called by the service on a worker thread): constraint -> grammar
  text, validated against the tokenizer and bounded, cached in a small LRU keyed by a hash of
  the constraint. Raises :class:`ConstraintError` naming the problem.
- :class:`ConstraintRows` (owned by the runner): per-request matchers; the masks of a step
  are computed on a worker thread while the model runs that step's forward pass, then applied
  to the constrained rows' logits; each sampled token then advances its matcher.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import llguidance
import numpy as np
import torch

from attnserve.model.tokenizer import Tokenizer
from attnserve.server.engine.errors import ConstraintError
from attnserve.server.engine.request import Constraint, ConstraintKind

# Bounds on what one request may ask for (checked before llguidance sees it).
MAX_CONSTRAINT_CHARS = 256 << 10  # a schema, regex or grammar's text
MAX_SCHEMA_DEPTH = 32  # nesting of a JSON schema's objects and arrays
MAX_CHOICES = 4096
# llguidance's own limits, a little tighter than its defaults: a grammar that needs more is refused.
PARSER_LIMITS = {
    "max_grammar_size": 200_000,
    "initial_lexer_fuel": 1_000_000,
    "step_lexer_fuel": 200_000,
    "max_lexer_states": 100_000,
}
# Compact JSON: flexible whitespace lets a model pad forever, and a byte saved is a token saved.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer: every id's raw bytes (special tokens marked with a 0xFF
    prefix, so no text can produce them), EOS, and our encoder for the strings it must tokenize."""
    special = tokenizer.special_token_ids
    tokens = [
        b"\xff" + tokenizer.token_text(i).encode() if i in special else tokenizer.token_bytes(i)
        for i in range(tokenizer.vocab_size)
    ]
    tokens += [b""] * (vocab_size - len(tokens))  # the model's padded rows: never allowed

    class _Wrapper:  # the duck type llguidance.TokenizerWrapper reads
        eos_token_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else 0
        bos_token_id = tokenizer.bos_token_id
        special_token_ids = sorted(special)
        is_tokenizer_wrapper = True

        def __init__(self) -> None:
            self.tokens = tokens

        def __call__(self, text: str | bytes) -> list[int]:
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            return tokenizer.encode(text, add_special_tokens=False)

    return llguidance.LLTokenizer(
        llguidance.TokenizerWrapper(_Wrapper()), n_vocab=vocab_size, eos_token=list(tokenizer.eos_token_ids) or None
    )


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**PARSER_LIMITS)


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, stopping as soon as it passes ``limit`` (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def grammar_text(constraint: Constraint) -> str:
    """The constraint as an llguidance grammar (not yet checked against a tokenizer). Raises ConstraintError."""
    kind, value = constraint.kind, constraint.value
    if len(value) > MAX_CONSTRAINT_CHARS:
        raise ConstraintError(f"{len(value):,} characters; the limit is {MAX_CONSTRAINT_CHARS:,}")
    if kind is ConstraintKind.JSON_OBJECT:
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_OPTIONS)
    if kind is ConstraintKind.JSON_SCHEMA:
        try:
            schema = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise ConstraintError(f"the schema is not valid JSON: {exc}") from exc
        if not isinstance(schema, dict | bool):
            raise ConstraintError(f"a JSON schema is an object or a boolean, not {type(schema).__name__}")
        if (depth := _depth(schema, MAX_SCHEMA_DEPTH)) > MAX_SCHEMA_DEPTH:
            raise ConstraintError(
                f"the schema is nested more than {depth - 1} levels deep; the limit is {MAX_SCHEMA_DEPTH}"
            )
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise ConstraintError(f"invalid schema: {exc}") from exc
    if kind is ConstraintKind.REGEX:
        if not value:
            raise ConstraintError("the regex is empty")
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind is ConstraintKind.CHOICE:
        choices = constraint.choices
        if not choices or len(choices) > MAX_CHOICES:
            raise ConstraintError(f"{len(choices)} choices; give 1 to {MAX_CHOICES}")
        if any(not c for c in choices):
            raise ConstraintError("a choice is empty")
        if sum(map(len, choices)) > MAX_CONSTRAINT_CHARS:
            raise ConstraintError(f"the choices hold more than {MAX_CONSTRAINT_CHARS:,} characters")
        # Lark string literals take JSON's escapes.
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    if kind is ConstraintKind.GRAMMAR:
        if not value.strip():
            raise ConstraintError("the grammar is empty")
        return llguidance.LLMatcher.grammar_from_lark(value)
    raise ConstraintError(f"unknown constraint kind {kind}")


def _one_line(message: str, limit: int = 600) -> str:
    """llguidance's multi-line diagnostics (source excerpt, caret) as one line for a status message."""
    text = " ".join(part.strip() for part in message.splitlines() if part.strip() and set(part.strip()) != {"^"})
    return text if len(text) <= limit else text[: limit - 3] + "..."


class GrammarCompiler:
    """Constraint -> validated grammar text, cached. Thread-safe; call it off the event loop."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, *, max_cached: int = 256) -> None:
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self.max_cached = max_cached
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, str] = OrderedDict()
        self.num_hits = self.num_compiled = 0

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (about a second for a 49k vocabulary), not at start-up."""
        with self._lock:
            if self._ll is None:
                self._ll = ll_tokenizer(self._tokenizer, self.vocab_size)
            return self._ll

    @staticmethod
    def key(constraint: Constraint) -> str:
        raw = json.dumps([constraint.kind.value, constraint.value, list(constraint.choices)])
        return hashlib.sha256(raw.encode()).hexdigest()

    def compile(self, constraint: Constraint) -> str:
        """The grammar text the runner's matchers are built from. Raises ConstraintError."""
        key = self.key(constraint)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.num_hits += 1
                return self._cache[key]
        grammar = grammar_text(constraint)
        tokenizer = self.ll_tokenizer
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer, limits=_limits())
        if error:
            raise ConstraintError(_one_line(error))
        # Build a matcher and its first mask: a lexer that blows up does so here, within its fuel.
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=_limits())
        mask = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        if matcher.is_error():
            raise ConstraintError(_one_line(matcher.get_error()))
        if not bool(mask.any()):
            raise ConstraintError("no output can satisfy it (no token is allowed at the start)")
        with self._lock:
            self._cache[key] = grammar
            self.num_compiled += 1
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return grammar


@dataclass
class PendingMasks:
    """A step's masks being computed: which logits rows, and the future of the bitmask."""

    rows: list[int]  # rows of the step's sampling logits
    request_ids: list[str]
    future: Future[tuple[np.ndarray, list[bool]]]


@dataclass
class StepVerdicts:
    """After a step's tokens: requests whose constraint is complete, and those it left stuck."""

    done: set[str] = field(default_factory=set)
    dead: dict[str, str] = field(default_factory=dict)  # request id -> why


class ConstraintRows:
    """Matchers of the running constrained requests, owned by the runner (engine thread).

    The worker thread builds matchers and computes masks; the engine thread waits for it (apply)
    before it advances or forgets any, so a matcher is never touched by two threads at once.
    """

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnserve-masks")
        self._words = (compiler.vocab_size + 31) // 32
        self.mask_seconds = 0.0  # time spent computing masks (the worker's), for benchmarks
        self.num_masks = 0

    def __len__(self) -> int:
        return len(self._matchers)

    def forget(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._matchers.pop(request_id, None)

    def start(self, rows: Sequence[tuple[int, str, Constraint]]) -> PendingMasks | None:
        """Start computing the masks of these (logits row, request id, constraint) rows on the worker."""
        if not rows:
            return None
        jobs = [(request_id, constraint.grammar) for _, request_id, constraint in rows]
        future = self._pool.submit(self._fill, jobs)
        return PendingMasks([r for r, _, _ in rows], [i for _, i, _ in rows], future)

    def _fill(self, jobs: list[tuple[str, str]]) -> tuple[np.ndarray, list[bool]]:
        """On the worker: each (request id, grammar)'s matcher (built here on its first step: a large
        grammar's construction must not hold up the forward pass) and its mask."""
        # numpy, not torch, on this thread: a torch op here could start another OpenMP pool, and
        # more pool threads than cores make the engine's workers sleep between ops (see build_engine).
        started = time.perf_counter()
        mask = np.zeros((len(jobs), self._words), dtype=np.int32)
        alive = []
        for k, (request_id, grammar) in enumerate(jobs):
            matcher = self._matchers.get(request_id)
            if matcher is None:
                matcher = llguidance.LLMatcher(self.compiler.ll_tokenizer, grammar, log_level=0, limits=_limits())
                self._matchers[request_id] = matcher
            row = mask[k]
            if not matcher.is_error():
                matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
            alive.append(not matcher.is_error() and bool(row.any()))
        self.mask_seconds += time.perf_counter() - started
        self.num_masks += len(jobs)
        return mask, alive

    def apply(self, logits: torch.Tensor, pending: PendingMasks) -> tuple[torch.Tensor, dict[str, str]]:
        """``logits`` (B, V) with the constrained rows' disallowed tokens at -inf (a copy; other rows
        untouched, so their tokens cannot change). A row with no allowed token is left as it is and
        reported dead: its token is dropped and the request ends."""
        mask, alive = pending.future.result()
        dead = {pending.request_ids[k]: self._why_dead(pending.request_ids[k]) for k, ok in enumerate(alive) if not ok}
        keep = [k for k, ok in enumerate(alive) if ok]
        if not keep:
            return logits, dead
        where = [pending.rows[k] for k in keep]
        rows = torch.tensor(where, dtype=torch.long, device=logits.device)
        bits = torch.from_numpy(mask[keep]).to(logits.device)  # (K, W)
        shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).reshape(len(keep), -1)[:, : logits.shape[1]].bool()
        if allowed.shape[1] < logits.shape[1]:  # logits wider than the vocabulary the masks cover
            pad = allowed.new_zeros(len(keep), logits.shape[1] - allowed.shape[1])
            allowed = torch.cat([allowed, pad], dim=1)
        if where == list(range(logits.shape[0])):  # every row constrained, in order: no gather and scatter
            return logits.masked_fill(~allowed, float("-inf")), dead
        picked = logits.index_select(0, rows).masked_fill(~allowed, float("-inf"))
        return logits.index_copy(0, rows, picked), dead

    def _why_dead(self, request_id: str) -> str:
        matcher = self._matchers.get(request_id)
        if matcher is not None and matcher.is_error():
            return f"the constraint failed: {matcher.get_error()}"
        return "the constraint allows no next token"

    def advance(self, tokens: dict[str, int], verdicts: StepVerdicts) -> None:
        """Feed each constrained request its sampled token; a finished grammar ends the request."""
        for request_id, token in tokens.items():
            matcher = self._matchers.get(request_id)
            if matcher is None or request_id in verdicts.dead:
                continue
            if not matcher.consume_token(token):
                verdicts.dead[request_id] = self._why_dead(request_id)
            elif matcher.is_stopped():
                verdicts.done.add(request_id)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
