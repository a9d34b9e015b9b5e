"""What constraints cost the step: TPOT at C concurrent requests with 0 %, 50 % and 100 % of them
under a JSON schema, on the default model (issue 24's benchmark), plus the masks' own time.

    .venv/bin/python bench/constrained_tpot.py [--concurrency 16] [--output-len 48] [--dtype float32]

Every request generates exactly --output-len tokens: the schema asks for a long string
(minLength), so constrained requests do not stop early, and unconstrained ones ignore EOS.
TPOT = a request's decode time / (tokens - 1), reported as the median over requests, for the
constrained and unconstrained ones separately.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import time

import torch

from attnserve.model.fetch import default_model_path
from attnserve.model.loader import load_model, parse_dtype
from attnserve.server.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from attnserve.server.engine.constraints import StepVerdicts
from attnserve.server.engine.core import Engine, build_engine
from attnserve.server.engine.outputs import RequestOutput
from attnserve.server.engine.request import Constraint, ConstraintKind, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "minLength": 400}, "year": {"type": "integer"}},
    "required": ["title", "year"],
}


def tpot(out: RequestOutput) -> float:
    assert out.timings is not None and out.timings.decode_s is not None
    return out.timings.decode_s / max(len(out.token_ids) - 1, 1)


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[RequestOutput], float]:
    async def main() -> list[RequestOutput]:
        return list(await asyncio.gather(*[engine.generate(p, sp) for p, sp in zip(prompts, params, strict=True)]))

    started = time.perf_counter()
    outs = asyncio.run(main())
    return outs, time.perf_counter() - started


def engine_thread_cost(engine: Engine, constraint: Constraint, rows: int, steps: int = 30) -> None:
    """What the engine thread itself pays per step for ``rows`` constrained rows, outside the forward:
    applying the masks (bit-unpack, -inf fill, one copy of the logits) and advancing the matchers.
    Timed apart from the mask computation (waited for first), so load elsewhere blurs it less."""
    from attnserve.server.engine.constraints import ConstraintRows

    masks = ConstraintRows(engine.grammars)
    vocab = engine.loaded.config.vocab_size
    ids = [f"r{k}" for k in range(rows)]
    token = engine.tokenizer.encode('{"title": "', add_special_tokens=False)
    apply_s = advance_s = 0.0
    logits = torch.randn(rows, vocab)
    for step in range(steps):
        pending = masks.start([(k, ids[k], constraint) for k in range(rows)])
        assert pending is not None
        pending.future.result()  # the mask thread's part, done (it overlaps the forward in the engine)
        t0 = time.perf_counter()
        masked, _ = masks.apply(logits, pending)
        t1 = time.perf_counter()
        picks = masked.argmax(dim=-1).tolist() if step >= len(token) else [token[step]] * rows
        t2 = time.perf_counter()
        masks.advance(dict(zip(ids, picks, strict=True)), StepVerdicts())
        advance_s += time.perf_counter() - t2
        apply_s += t1 - t0
    print(
        f"engine thread, {rows} constrained rows: apply {apply_s / steps * 1000:.2f} ms/step, advance "
        f"{advance_s / steps * 1000:.2f} ms/step; mask thread {masks.mask_seconds / masks.num_masks * 1e6:.0f} us/row"
    )
    masks.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the default model (make model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="the three runs, repeated (interleaved: load drifts)")
    args = parser.parse_args()
    model = args.model or str(default_model_path())
    config = EngineConfig(
        scheduler=SchedulerConfig(max_num_batched_tokens=1024, max_num_seqs=max(64, args.concurrency)),
        cache=CacheConfig(kv_cache_memory=1 << 30, enable_prefix_caching=False),
    )
    engine = build_engine(lambda: load_model(model, dtype=parse_dtype(args.dtype)), config).start()
    try:
        constraint = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))
        started = time.perf_counter()
        constraint = dataclasses.replace(constraint, grammar=engine.grammars.compile(constraint))
        print(f"model {model} ({args.dtype}), C={args.concurrency}, {args.output_len} tokens each")
        print(f"schema compile (first, with llguidance's tokenizer view): {time.perf_counter() - started:.3f} s")
        gen = torch.Generator().manual_seed(0)
        vocab = engine.loaded.config.vocab_size
        prompts = [
            torch.randint(100, vocab - 100, (args.prompt_len,), generator=gen).tolist() for _ in range(args.concurrency)
        ]
        plain = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
        constrained = dataclasses.replace(plain, constraint=constraint)
        run(engine, prompts[:4], [plain] * 4)  # warm-up
        best: dict[float, tuple[float, float]] = {}
        for fraction in (0.0, 0.5, 1.0) * args.rounds:
            k = round(fraction * args.concurrency)
            params = [constrained] * k + [plain] * (args.concurrency - k)
            rows = engine.runner.constraints
            assert rows is not None
            masks_before, mask_s_before = rows.num_masks, rows.mask_seconds
            outs, wall = run(engine, prompts, params)
            on = [tpot(o) for o in outs[:k]]
            off = [tpot(o) for o in outs[k:]]
            num_masks = rows.num_masks - masks_before
            per_mask = (rows.mask_seconds - mask_s_before) / num_masks * 1e6 if num_masks else 0.0
            lengths = {len(o.token_ids) for o in outs}
            nan = float("nan")
            med_off, med_on = statistics.median(off) if off else nan, statistics.median(on) if on else nan
            inf = float("inf")
            was = best.get(fraction, (inf, inf))
            best[fraction] = (min(was[0], med_off) if off else nan, min(was[1], med_on) if on else nan)
            print(
                f"{int(fraction * 100):3d}% constrained: TPOT median "
                f"unconstrained {statistics.median(off) * 1000 if off else float('nan'):.1f} ms, "
                f"constrained {statistics.median(on) * 1000 if on else float('nan'):.1f} ms | "
                f"wall {wall:.1f} s | {num_masks} masks, {per_mask:.0f} us each (on the mask thread, "
                f"overlapping the forward) | output lengths {sorted(lengths)}"
            )
        engine_thread_cost(engine, constraint, args.concurrency)
        # Other jobs on a shared machine only ever slow a run: the best round is the one to compare.
        print("best round per mix (median TPOT, ms):")
        for fraction, (off_s, on_s) in best.items():
            print(
                f"  {int(fraction * 100):3d}% constrained: "
                f"unconstrained {off_s * 1000:.1f}, constrained {on_s * 1000:.1f}"
            )
    finally:
        engine.shutdown(10)


if __name__ == "__main__":
    main()
