"""Constraints in the engine: every output matches, and a constrained row changes no other row's tokens.

The tiny random model is the real test: unconstrained, its output is byte noise that would
never parse, so a passing output is the mask's doing.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator

import jsonschema
import pytest
import torch

from attnserve.model.loader import LoadedModel, load_model
from attnserve.server.engine.constraints import ConstraintRows, GrammarCompiler, PendingMasks
from attnserve.server.engine.core import Engine
from attnserve.server.engine.errors import ConstraintError
from attnserve.server.engine.request import Constraint, ConstraintKind, FinishReason, SamplingParams
from tests.server.engine_utils import make_engine, run_alone, run_together
from tests.server.test_batch_invariance import varied_prompts

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["id", "kind", "ok", "tags"],
    "additionalProperties": False,
}
REGEX = r"[a-c]{2,5}-[0-9]{2}"
CHOICES = ("yes", "no", "maybe so")


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model("dummy:tiny", dtype=torch.float32, seed=0)


@pytest.fixture(scope="module")
def engine(model: LoadedModel) -> Iterator[Engine]:
    engine = make_engine(model, max_num_batched_tokens=64, block_size=8)
    try:
        yield engine
    finally:
        engine.shutdown(5)


def compiled(engine: Engine, constraint: Constraint) -> Constraint:
    return dataclasses.replace(constraint, grammar=engine.grammars.compile(constraint))


def constraints(engine: Engine) -> list[Constraint]:
    return [
        compiled(engine, Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))),
        compiled(engine, Constraint(ConstraintKind.REGEX, REGEX)),
        compiled(engine, Constraint(ConstraintKind.CHOICE, choices=CHOICES)),
        compiled(engine, Constraint(ConstraintKind.GRAMMAR, 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,3}/')),
    ]


def check(constraint: Constraint, text: str) -> None:
    if constraint.kind is ConstraintKind.JSON_SCHEMA:
        jsonschema.validate(json.loads(text), SCHEMA)
    elif constraint.kind is ConstraintKind.REGEX:
        assert re.fullmatch(REGEX, text), text
    elif constraint.kind is ConstraintKind.CHOICE:
        assert text in CHOICES
    else:
        assert re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", text), text


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_every_output_matches_its_constraint(engine: Engine, sampling: str) -> None:
    cs = constraints(engine)
    prompts = varied_prompts(12, engine.loaded.config.vocab_size, seed=1)
    params = [
        SamplingParams(
            max_tokens=80,
            constraint=cs[i % len(cs)],
            **({"temperature": 1.0, "seed": i} if sampling == "seeded" else {}),
        )
        for i in range(len(prompts))
    ]
    outs = run_together(engine, prompts, params)
    for out, p in zip(outs, params, strict=True):
        assert out.finish_reason is FinishReason.STOP, (p.constraint, out.text)
        assert p.constraint is not None
        check(p.constraint, out.text)


def test_unconstrained_output_would_not_match(engine: Engine) -> None:
    """The control: without the mask, the random model's text is not JSON."""
    out = run_together(engine, [[5, 6, 7]], [SamplingParams(max_tokens=30, ignore_eos=True)])[0]
    with pytest.raises(ValueError):
        json.loads(out.text)


def test_unconstrained_tokens_identical_with_or_without_constrained_neighbours(model: LoadedModel) -> None:
    prompts = varied_prompts(16, model.config.vocab_size, seed=2)
    plain = [
        SamplingParams(max_tokens=24, ignore_eos=True)
        if i % 2
        else SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.9, top_p=0.9, seed=i)
        for i in range(len(prompts))
    ]
    together_engine = make_engine(model, max_num_batched_tokens=40, block_size=8)
    alone_engine = make_engine(model, max_num_batched_tokens=40, block_size=8)
    try:
        cs = constraints(together_engine)
        neighbours = [
            SamplingParams(max_tokens=24, constraint=cs[i % len(cs)], temperature=0.7 * (i % 2), seed=100 + i)
            for i in range(len(prompts))
        ]
        mixed = run_together(together_engine, prompts + prompts, plain + neighbours)
        alone = run_alone(alone_engine, prompts, plain)
        # And the constrained ones: the same tokens alone as among the others.
        constrained_alone = run_alone(alone_engine, prompts, [dataclasses.replace(p) for p in neighbours])
    finally:
        together_engine.shutdown(5)
        alone_engine.shutdown(5)
    assert [o.token_ids for o in mixed[: len(prompts)]] == [o.token_ids for o in alone]
    assert [o.token_ids for o in mixed[len(prompts) :]] == [o.token_ids for o in constrained_alone]


def test_compile_errors_name_the_problem(engine: Engine) -> None:
    deep: dict = {"type": "string"}
    for _ in range(64):
        deep = {"type": "object", "properties": {"a": deep}}
    cases = {
        "nested more than": Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(deep)),
        "not valid JSON": Constraint(ConstraintKind.JSON_SCHEMA, "{oops"),
        "nonsense": Constraint(ConstraintKind.JSON_SCHEMA, json.dumps({"type": "nonsense"})),
        "unclosed group": Constraint(ConstraintKind.REGEX, "(abc"),
        "look-around": Constraint(ConstraintKind.REGEX, "(?=a)b"),
        "unknown name": Constraint(ConstraintKind.GRAMMAR, "start: foo"),
        "the limit is": Constraint(ConstraintKind.JSON_SCHEMA, json.dumps({"enum": [f"v{i}" for i in range(60_000)]})),
    }
    for expected, constraint in cases.items():
        with pytest.raises(ConstraintError, match=expected):
            engine.grammars.compile(constraint)


def test_compiled_grammars_are_cached_and_bounded(model: LoadedModel) -> None:
    compiler = GrammarCompiler(model.tokenizer, model.config.vocab_size, max_cached=2)
    for pattern in ("a+", "b+", "a+", "c+", "a+"):
        compiler.compile(Constraint(ConstraintKind.REGEX, pattern))
    assert compiler.num_hits == 2 and compiler.num_compiled == 3  # a+ again, then a+ after c+ evicted b+
    assert len(compiler._cache) == 2


def test_a_stuck_matcher_is_reported_dead_and_its_row_left_alone(model: LoadedModel) -> None:
    compiler = GrammarCompiler(model.tokenizer, model.config.vocab_size)
    rows = ConstraintRows(compiler)
    c = Constraint(ConstraintKind.REGEX, "ab", grammar=compiler.compile(Constraint(ConstraintKind.REGEX, "ab")))
    pending = rows.start([(0, "r", c)])
    assert isinstance(pending, PendingMasks)
    logits = torch.randn(2, model.config.vocab_size)
    masked, dead = rows.apply(logits, pending)
    assert not dead
    allowed = torch.isfinite(masked[0]).nonzero().flatten().tolist()
    assert model.tokenizer.encode("a", add_special_tokens=False)[0] in allowed
    assert torch.equal(masked[1], logits[1])  # the unconstrained row is untouched
    rows._matchers["r"].consume_token(model.tokenizer.encode("z", add_special_tokens=False)[0])  # off the grammar
    masked, dead = rows.apply(logits, rows.start([(0, "r", c)]))  # type: ignore[arg-type]
    assert "r" in dead and torch.equal(masked, logits)
    rows.close()
