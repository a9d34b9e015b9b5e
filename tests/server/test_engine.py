"""The engine on the tiny random model: batching changes nothing but speed."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

from attnserve.model.attention import AttentionMetadata
from attnserve.model.loader import LoadedModel
from attnserve.server.engine import block_manager
from attnserve.server.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from attnserve.server.engine.core import Engine
from attnserve.server.engine.errors import QueueFullError
from attnserve.server.engine.request import AttentionOptions, FinishReason, HeadReduction, SamplingParams, WeightsDtype
from tests.helpers import new_cache, scattered_block_tables
from tests.server.engine_utils import make_engine, run_alone, run_together


def prompts(n: int, vocab: int, seed: int = 0, lengths: tuple[int, int] = (4, 40)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1], (n,), generator=gen).tolist()
    return [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in sizes]


@pytest.fixture
def engine(tiny: LoadedModel):
    eng = make_engine(tiny)
    yield eng
    eng.shutdown(timeout=5)


def test_batch_invariance_32_prompts_48_tokens(tiny: LoadedModel) -> None:
    ps = prompts(32, tiny.config.vocab_size)
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    batched_engine, solo_engine = make_engine(tiny), make_engine(tiny)
    try:
        together = run_together(batched_engine, ps, params)
        alone = run_alone(solo_engine, ps, params)
    finally:
        batched_engine.shutdown(5)
        solo_engine.shutdown(5)
    assert all(len(o.token_ids) == 48 for o in together)
    mismatched = [i for i, (a, b) in enumerate(zip(together, alone, strict=True)) if a.token_ids != b.token_ids]
    assert not mismatched, f"requests {mismatched} differ between batched and solo runs"


def test_preemption_keeps_every_request_correct(tiny: LoadedModel) -> None:
    ps = prompts(16, tiny.config.vocab_size, seed=1, lengths=(10, 30))
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    per_block = 2 * tiny.config.num_layers * 16 * tiny.config.num_kv_heads * tiny.config.head_dim * 4
    small = make_engine(tiny, kv_cache_memory=25 * per_block)  # 24 blocks (384 slots) for ~16 x 60 tokens + scratch
    roomy = make_engine(tiny)
    try:
        assert small.runner.num_blocks == 24
        together = run_together(small, ps, params)
        alone = run_alone(roomy, ps, params)
        assert small.scheduler.num_preemptions > 0, "the cache was meant to be too small"
        assert small.block_manager.num_free_blocks == 24
    finally:
        small.shutdown(5)
        roomy.shutdown(5)
    assert [o.finish_reason for o in together] == [FinishReason.LENGTH] * 16
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_seeded_sampling_same_alone_or_batched(engine: Engine, tiny: LoadedModel) -> None:
    ps = prompts(6, tiny.config.vocab_size, seed=2)
    seeded = [
        SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=100 + i, max_tokens=24, ignore_eos=True)
        for i in range(6)
    ]
    noise = [SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)] * 6
    alone = run_alone(engine, ps, seeded)
    mixed = run_together(engine, ps + prompts(6, tiny.config.vocab_size, seed=3), seeded + noise)[:6]
    assert [o.token_ids for o in mixed] == [o.token_ids for o in alone]
    again = run_alone(engine, ps[:1], seeded[:1])
    assert again[0].token_ids == alone[0].token_ids
    assert len(set(alone[0].token_ids)) > 3, "sampling at temperature 0.9 should vary"


def test_stop_string_cut_and_never_streamed(engine: Engine, tiny: LoadedModel) -> None:
    prompt = prompts(1, tiny.config.vocab_size, seed=4)[0]
    full = run_alone(engine, [prompt], SamplingParams(max_tokens=40, ignore_eos=True))[0].text
    assert len(full) > 12
    stop = full[6:10]  # spans several byte-level tokens
    cut = full[: full.index(stop)]

    async def stream() -> list[str]:
        chunks = []
        params = SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,))
        async for out in engine.add_request(prompt, params):
            chunks.append(out.text)
            assert out.finish_reason in (None, FinishReason.STOP)
            if out.finished:
                assert out.stop_reason == stop
        return chunks

    chunks = asyncio.run(stream())
    assert "".join(chunks) == cut
    assert stop not in "".join(chunks)


def test_abort_by_closing_the_stream_frees_blocks(engine: Engine, tiny: LoadedModel) -> None:
    prompt = prompts(1, tiny.config.vocab_size, seed=5)[0]
    total = engine.block_manager.num_free_blocks

    async def read_two_then_leave() -> None:
        stream = engine.add_request(prompt, SamplingParams(max_tokens=900, ignore_eos=True))
        count = 0
        async for _ in stream:
            count += 1
            if count == 2:
                break

    asyncio.run(read_two_then_leave())
    deadline = time.monotonic() + 2
    while engine.block_manager.num_free_blocks != total and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.block_manager.num_free_blocks == total
    assert not engine.scheduler.requests


def test_timeout_finishes_with_deadline(engine: Engine, tiny: LoadedModel) -> None:
    prompt = prompts(1, tiny.config.vocab_size, seed=6)[0]

    async def go():
        return await engine.generate(prompt, SamplingParams(max_tokens=5000, ignore_eos=True), timeout_s=0.2)

    out = asyncio.run(go())
    assert out.finish_reason is FinishReason.DEADLINE
    assert 0 < len(out.token_ids) < 5000
    assert engine.block_manager.num_free_blocks == engine.runner.num_blocks


def test_waiting_queue_bound_rejects(tiny: LoadedModel) -> None:
    eng = make_engine(tiny, max_num_waiting=2, start=False)  # no engine thread: nothing drains the queue

    async def go() -> None:
        eng.add_request([5, 6, 7], SamplingParams())
        eng.add_request([5, 6, 7], SamplingParams())
        with pytest.raises(QueueFullError, match="waiting queue is full"):
            eng.add_request([5, 6, 7], SamplingParams())

    asyncio.run(go())


def test_max_model_len_stops_with_length(tiny: LoadedModel) -> None:
    eng = make_engine(tiny)
    try:
        limit = eng.max_model_len
        ids = [3 + i % 300 for i in range(limit)]
        out = asyncio.run(eng.generate(ids[: limit - 3], SamplingParams(max_tokens=100, ignore_eos=True)))
        assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 3
        with pytest.raises(ValueError, match="limit is"):
            asyncio.run(eng.generate(ids, SamplingParams()))
        with pytest.raises(ValueError, match="vocabulary"):
            asyncio.run(eng.generate([5, tiny.config.vocab_size], SamplingParams()))
    finally:
        eng.shutdown(5)


def test_logprobs_of_chosen_and_top_n(engine: Engine, tiny: LoadedModel) -> None:
    prompt = prompts(1, tiny.config.vocab_size, seed=7)[0]
    out = asyncio.run(engine.generate(prompt, SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3)))
    assert len(out.logprobs) == 5
    for token, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.top_token_ids[0] == token  # greedy: the chosen token is the most likely
        assert lp.logprob == pytest.approx(lp.top_logprobs[0])
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True) and len(lp.top_token_ids) == 3


def test_usage_and_timings(engine: Engine, tiny: LoadedModel) -> None:
    prompt = prompts(1, tiny.config.vocab_size, seed=8)[0]
    out = asyncio.run(engine.generate(prompt, SamplingParams(max_tokens=7, ignore_eos=True)))
    assert out.usage is not None and out.timings is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), 7)
    t = out.timings
    assert 0 <= t.queue_s <= t.ttft_s <= t.total_s


def test_attention_rows_match_the_explicit_path(engine: Engine, tiny: LoadedModel) -> None:
    prompt = prompts(1, tiny.config.vocab_size, seed=9, lengths=(12, 13))[0]
    options = AttentionOptions(layers=(0, 1), reduction=HeadReduction.NONE, include_prompt=True)
    out = asyncio.run(engine.generate(prompt, SamplingParams(max_tokens=3, ignore_eos=True, attention=options)))
    full = [*prompt, *out.token_ids[:-1]]  # every position whose row was returned
    # Offline: one forward over the whole sequence, explicit path on both layers.
    tables = scattered_block_tables([len(full)], 8)
    meta = AttentionMetadata.build(
        block_tables=tables, seq_lens=[len(full)], query_lens=[len(full)], block_size=8, attention_requests={0: [0, 1]}
    )
    with torch.inference_mode():
        cache = new_cache(tiny.model, tables, 8)
        tiny.model(torch.tensor(full), meta.positions, cache, meta)
        weights = {layer: tiny.model.attention_weights(meta, cache, seq=0, layer=layer)[1] for layer in (0, 1)}
    rows = {(r.layer, r.position): r for r in out.attention}
    assert set(rows) == {(layer, p) for layer in (0, 1) for p in range(len(full))}
    for (layer, position), row in rows.items():
        assert row.dtype is WeightsDtype.FLOAT16  # the default: half the bytes
        got = torch.frombuffer(bytearray(row.weights), dtype=torch.float16).float().view(row.num_heads, row.context_len)
        expected = weights[layer][:, position, : position + 1]
        assert (got - expected).abs().max().item() <= 1e-3


def test_attention_does_not_change_other_requests_tokens(engine: Engine, tiny: LoadedModel) -> None:
    ps = prompts(8, tiny.config.vocab_size, seed=10)
    plain = SamplingParams(max_tokens=16, ignore_eos=True)
    asking = SamplingParams(max_tokens=16, ignore_eos=True, attention=AttentionOptions(layers=(1,)))
    base = run_together(engine, ps, plain)
    mixed = run_together(engine, ps, [asking if i % 2 else plain for i in range(8)])
    assert [o.token_ids for o in mixed] == [o.token_ids for o in base]
    assert all(o.attention for o in mixed[1::2]) and not any(o.attention for o in mixed[0::2])
    assert all(len(o.attention) == 16 for o in mixed[1::2])  # one mean-reduced row per generated token


def test_shutdown_finishes_in_flight_then_refuses(tiny: LoadedModel) -> None:
    eng = make_engine(tiny)

    async def go():
        stream = eng.add_request([5, 6, 7, 8], SamplingParams(max_tokens=30, ignore_eos=True))
        loop = asyncio.get_running_loop()
        stopper = loop.run_in_executor(None, eng.shutdown, 10.0)
        outs = [o async for o in stream]
        await stopper
        return outs

    outs = asyncio.run(go())
    assert outs[-1].finish_reason is FinishReason.LENGTH and sum(len(o.token_ids) for o in outs) == 30
    assert not eng.is_alive


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8, 13])
def test_static_padded_decode_equals_the_dynamic_path_token_for_token(tiny: LoadedModel, batch: int) -> None:
    """The graph-decode path (static inputs padded to buckets; captured as CUDA graphs on a GPU) runs
    eagerly on CPU: its padding rows, scratch slot and query buffer change nothing."""
    config = EngineConfig(
        scheduler=SchedulerConfig(max_num_seqs=16), cache=CacheConfig(kv_cache_memory=16 << 20), graph_decode=True
    )
    static = Engine(tiny, config).start()
    dynamic = make_engine(tiny, kv_cache_memory=16 << 20, max_num_seqs=16)
    try:
        assert static.runner.graph_decode is not None and static.runner.graph_decode.buckets == [1, 2, 4, 8, 16]
        ps = prompts(batch, tiny.config.vocab_size, seed=20 + batch)
        asking = AttentionOptions(layers=(0, 1))
        params = [SamplingParams(max_tokens=12, ignore_eos=True, attention=None if i else asking) for i in range(batch)]
        got, want = run_together(static, ps, params), run_together(dynamic, ps, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert [r.weights for r in got[0].attention] == [r.weights for r in want[0].attention]
    finally:
        static.shutdown(5)
        dynamic.shutdown(5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager_token_for_token_for_every_bucket(dtype: torch.dtype) -> None:
    from attnserve.model.loader import load_model

    loaded = load_model("dummy:tiny", device="cuda", dtype=dtype)
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=32), cache=CacheConfig(kv_cache_memory=64 << 20))
    graphs = Engine(loaded, dataclasses.replace(config, graph_decode=True)).start()
    eager = Engine(loaded, dataclasses.replace(config, graph_decode=False)).start()
    try:
        assert graphs.runner.graph_decode is not None and graphs.runner.graph_decode.graphs
        for batch in graphs.runner.graph_decode.buckets:
            ps = prompts(batch, loaded.config.vocab_size, seed=40 + batch)
            params = SamplingParams(max_tokens=16, ignore_eos=True)
            got, want = run_together(graphs, ps, params), run_together(eager, ps, params)
            assert [o.token_ids for o in got] == [o.token_ids for o in want], batch
    finally:
        graphs.shutdown(5)
        eager.shutdown(5)


def test_build_engine_loads_on_a_thread_that_is_gone_and_reraises_its_failure(tiny: LoadedModel) -> None:
    """The thread that loads keeps no torch thread pool alive beside the engine's (see build_engine)."""
    from attnserve.server.engine.core import build_engine

    loaders: list[threading.Thread] = []

    def load() -> LoadedModel:
        loaders.append(threading.current_thread())
        return tiny

    engine = build_engine(load, EngineConfig(cache=CacheConfig(kv_cache_memory=8 << 20))).start()
    try:
        assert loaders[0] is not threading.main_thread() and not loaders[0].is_alive()
        assert asyncio.run(engine.generate([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))).token_ids
    finally:
        engine.shutdown(5)

    def broken() -> LoadedModel:
        raise FileNotFoundError("no such model: /nowhere.gguf")

    with pytest.raises(FileNotFoundError, match=r"/nowhere\.gguf"):
        build_engine(broken, EngineConfig())


def test_a_forced_prefix_hash_collision_never_hands_over_kv(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block key collides: the second prompt must still get its own K/V and its own tokens."""
    first, second = prompts(2, tiny.config.vocab_size, seed=11, lengths=(40, 41))
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    clean = make_engine(tiny)
    try:
        expected = run_alone(clean, [second], params)[0].token_ids
    finally:
        clean.shutdown(5)
    monkeypatch.setattr(block_manager, "chain_hash", lambda parent, token_ids: b"\x00" * 32)
    engine = make_engine(tiny)
    try:
        run_alone(engine, [first], params)
        hits = engine.block_manager.num_prefix_hits
        got = run_alone(engine, [second], params)[0].token_ids
        assert engine.block_manager.num_prefix_hits == hits, "a colliding key must not count as a hit"
    finally:
        engine.shutdown(5)
    assert got == expected
