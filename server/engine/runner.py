"""The model runner: a scheduler plan in, sampled tokens (and asked-for extras) out.

It owns the physical KV cache, allocated once from a memory budget, and turns a
plan into the flattened tensors the model takes. It returns plain data: no
tensors leave this module.
"""

from __future__ import annotations

import itertools

import torch

from attnserve.model.attention import AttentionMetadata, kv_cache_dtype
from attnserve.model.kv_cache import KVCache, kv_cache_bytes_per_block
from attnserve.model.llama import LlamaForCausalLM
from attnserve.model.sampling import SamplingTensors, fetch_sampled, sample, step_generator
from attnserve.server.engine.block_table_rows import BlockTableRows
from attnserve.server.engine.config import CacheConfig
from attnserve.server.engine.constraints import ConstraintRows, StepVerdicts
from attnserve.server.engine.graph_decode import GraphDecode
from attnserve.server.engine.inspection import StepInspection, due_positions
from attnserve.server.engine.records import AttentionRow, RunnerOutput, ScheduledRequest, SchedulerOutput, TokenLogprobs
from attnserve.server.engine.request import AttentionOptions, HeadReduction, WeightsDtype


def kv_cache_budget(config: CacheConfig, device: torch.device) -> int:
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * config.gpu_memory_utilization)
    return config.cpu_kv_cache_memory


class ModelRunner:
    is_driver = True  # False on tensor-parallel workers: they run every step but sample nothing

    def __init__(self, model: LlamaForCausalLM, cache_config: CacheConfig, *, batch_invariant: bool = True) -> None:
        self.model = model
        self.device = model.device
        self.block_size = cache_config.block_size
        self.batch_invariant = batch_invariant
        self.kv_dtype = kv_cache_dtype(model.dtype, self.device, batch_invariant=batch_invariant)
        # Under tensor parallelism each rank's cache holds its KV heads only, with the same block ids.
        per_block = kv_cache_bytes_per_block(model.local_config, self.block_size, self.kv_dtype)
        # Ranks agree on the smallest count (free GPU memory differs between devices): one set of block ids.
        num_blocks = model.tp.agree_min(kv_cache_budget(cache_config, self.device) // per_block - 1, self.device)
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget does not hold two blocks ({per_block} bytes each)")
        # One block more than the block manager hands out: padding rows of a static decode write there.
        self.kv_cache = KVCache.allocate(
            model.local_config,
            num_blocks=num_blocks + 1,
            block_size=self.block_size,
            dtype=self.kv_dtype,
            device=self.device,
        )
        self.scratch_slot = num_blocks * self.block_size
        self.block_tables = BlockTableRows()
        self.graph_decode: GraphDecode | None = None
        self.constraints: ConstraintRows | None = None  # set by the engine: matchers of constrained requests

    @property
    def num_blocks(self) -> int:
        """Blocks the block manager may hand out (the cache holds one more, the scratch block)."""
        return self.kv_cache.num_blocks - 1

    def use_graph_decode(self, *, max_num_seqs: int, max_model_len: int) -> None:
        """Static, bucketed decode steps from now on; captured as CUDA graphs on a GPU."""
        self.graph_decode = GraphDecode(
            self.model,
            self.kv_cache,
            max_num_seqs=max_num_seqs,
            max_blocks_per_seq=-(-max_model_len // self.block_size),
            scratch_slot=self.scratch_slot,
            # Not captured under tensor parallelism: NCCL collectives inside a CUDA graph are untested
            # here (no multi-GPU machine has been lent); the static buckets still run.
            capture=self.device.type == "cuda" and not self.model.tp.enabled,
            batch_invariant=self.batch_invariant,
        )

    def close(self) -> None:
        """Release what the runner started (tensor-parallel workers); the engine calls it at shutdown."""

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        self.block_tables.forget(itertools.chain(plan.preempted_ids, plan.finished_ids))
        if self.constraints is not None:
            self.constraints.forget(plan.finished_ids)  # a preempted request keeps its matcher: its output stays
        items = plan.requests
        if not items:
            return RunnerOutput()
        sampling = [i for i, item in enumerate(items) if item.is_sampling]
        scoring = {i: rows for i, item in enumerate(items) if (rows := _prompt_logprob_rows(item))}
        attention = {i: due for i, item in enumerate(items) if (due := _attention_positions(item))}
        query_starts = list(itertools.accumulate((len(item.token_ids) for item in items), initial=0))
        # Logits for the sampling rows (the last of their chunk), then for the prompt rows being scored.
        logits_rows = [query_starts[i + 1] - 1 for i in sampling]
        logits_rows += [query_starts[i] + r for i, rows in scoring.items() for r in rows]
        meta = AttentionMetadata.build(
            block_tables=[item.block_table for item in items],
            seq_lens=[item.seq_len for item in items],
            query_lens=[len(item.token_ids) for item in items],
            block_size=self.block_size,
            device=self.device,
            logits_indices=logits_rows,
            attention_requests={i: items[i].params.attention.layers for i in attention},  # type: ignore[union-attr]
            attention_rows={i: _capture_range(items[i], due) for i, due in attention.items()},
            table_rows=self.block_tables.rows(items),
            token_ids=[t for item in items for t in item.token_ids],
            batch_invariant=self.batch_invariant,
        )
        inspection = StepInspection.plan(items, query_starts, num_heads=self.model.config.num_heads, device=self.device)
        meta.hooks = inspection.hooks
        input_ids = meta.input_ids
        assert input_ids is not None
        # Constrained rows' masks are computed on a worker thread while the model runs this step.
        constrained = [
            (k, items[i].request_id, c) for k, i in enumerate(sampling) if (c := items[i].params.constraint) is not None
        ]
        pending = self.constraints.start(constrained) if constrained and self.constraints is not None else None
        if self.graph_decode is not None and self.graph_decode.can_run(meta):
            logits = self.graph_decode.run(meta, input_ids)
        else:
            logits = self.model(input_ids, meta.positions, self.kv_cache, meta)

        out = RunnerOutput()
        if attention:
            out.attention = self._attention_rows(items, attention, meta)
        if inspection.reads:
            out.residuals, out.lens = inspection.collect(items, self.model)
        if not self.is_driver:  # what follows needs the logits only: rank 0 alone samples and scores
            return out
        if scoring:
            out.prompt_logprobs = _score_prompt(items, scoring, logits[len(sampling) :])
        if sampling:
            rows = [items[i] for i in sampling]
            sample_logits = logits[: len(sampling)]
            verdicts = StepVerdicts()
            if pending is not None:
                assert self.constraints is not None
                sample_logits, verdicts.dead = self.constraints.apply(sample_logits, pending)
            tokens, logprobs = self._sample(sample_logits, rows)
            for item, token in zip(rows, tokens, strict=True):
                out.sampled_token_ids[item.request_id] = token
            out.logprobs.update(logprobs)
            if pending is not None:
                assert self.constraints is not None
                self.constraints.advance({i: out.sampled_token_ids[i] for i in pending.request_ids}, verdicts)
                out.constraint_done, out.constraint_dead = verdicts.done, verdicts.dead
        return out

    def _attention_rows(
        self, items: list[ScheduledRequest], due: dict[int, list[int]], meta: AttentionMetadata
    ) -> dict[str, list[AttentionRow]]:
        """The asked-for weight rows, computed from the cache one (request, layer) at a time and
        reduced over heads at once, so at most one layer's rows are ever held in float32."""
        out: dict[str, list[AttentionRow]] = {}
        for seq, layer in sorted(meta.captured_queries):
            item, positions = items[seq], due[seq]
            options = item.params.attention
            assert options is not None
            first, weights = self.model.attention_weights(meta, self.kv_cache, seq=seq, layer=layer)  # (H, n, L)
            weights = weights[:, [p - first for p in positions]]
            if options.reduction is HeadReduction.MEAN:
                weights = weights.mean(dim=0, keepdim=True)
            elif options.reduction is HeadReduction.MAX:
                weights = weights.amax(dim=0, keepdim=True)
            if options.spans:  # each span's sum, per row: contiguous slices summed in order, row by row
                sums = torch.stack([weights[..., start:end].sum(-1) for start, end in options.spans], dim=-1)
                encoded = sums.to(_TORCH_DTYPE[options.dtype]).cpu().numpy().astype(_WIRE_DTYPE[options.dtype])
                for k, position in enumerate(positions):
                    row = encoded[:, k]  # (heads, spans)
                    out.setdefault(item.request_id, []).append(
                        AttentionRow(
                            layer,
                            position,
                            row.shape[0],
                            position + 1,
                            row.tobytes(),
                            options.dtype,
                            num_spans=row.shape[1],
                        )
                    )
                continue
            if options.top_k:
                for k, position in enumerate(positions):
                    out.setdefault(item.request_id, []).append(
                        _top_k_row(weights[:, k, : position + 1], layer, position, options)
                    )
                continue
            encoded = weights.to(_TORCH_DTYPE[options.dtype]).cpu().numpy().astype(_WIRE_DTYPE[options.dtype])
            for k, position in enumerate(positions):
                row = encoded[:, k, : position + 1]  # (heads, context): its own position and all before
                out.setdefault(item.request_id, []).append(
                    AttentionRow(layer, position, row.shape[0], row.shape[1], row.tobytes(), options.dtype)
                )
        return out

    def _sample(self, logits: torch.Tensor, rows: list[ScheduledRequest]) -> tuple[list[int], dict[str, TokenLogprobs]]:
        """Sample every row, then bring the tokens and the asked-for logprobs to the host in one transfer."""
        params = [item.params for item in rows]
        if all(p.temperature == 0 and p.repetition_penalty == 1.0 for p in params):
            tokens = logits.argmax(dim=-1)  # all greedy: skip the per-row machinery
        else:
            tensors = SamplingTensors.from_lists(
                temperature=[p.temperature for p in params],
                top_k=[p.top_k for p in params],
                top_p=[p.top_p for p in params],
                min_p=[p.min_p for p in params],
                repetition_penalty=[p.repetition_penalty for p in params],
                device=logits.device,
            )
            seen = None
            if any(item.all_token_ids is not None for item in rows):
                width = max(len(item.all_token_ids or ()) for item in rows)
                seen = torch.full((len(rows), width), -1, dtype=torch.long)
                for k, item in enumerate(rows):
                    if item.all_token_ids:
                        seen[k, : len(item.all_token_ids)] = torch.tensor(item.all_token_ids)
                seen = seen.to(logits.device)
            generators = [
                None if p.seed is None else step_generator(p.seed, item.num_output_tokens, logits.device)
                for p, item in zip(params, rows, strict=True)
            ]
            tokens = sample(logits, tensors, seen_ids=seen, generators=generators)
        num_top = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        fetched = fetch_sampled(tokens, None if num_top is None else logits, num_top=num_top or 0)
        logprobs = {}
        for k, (item, p) in enumerate(zip(rows, params, strict=True)):
            if p.logprobs is not None:
                assert fetched.logprobs is not None and fetched.top_token_ids is not None
                assert fetched.top_logprobs is not None
                logprobs[item.request_id] = TokenLogprobs(
                    fetched.logprobs[k], fetched.top_token_ids[k][: p.logprobs], fetched.top_logprobs[k][: p.logprobs]
                )
        return fetched.token_ids, logprobs


def _top_k_row(weights: torch.Tensor, layer: int, position: int, options: AttentionOptions) -> AttentionRow:
    """One row (heads, context) cut to each head's k largest weights (largest first) and their positions."""
    kept, where = weights.topk(min(options.top_k, weights.shape[1]), dim=-1)  # (heads, k)
    values = kept.to(_TORCH_DTYPE[options.dtype]).cpu().numpy().astype(_WIRE_DTYPE[options.dtype])
    keys = where.to(torch.int32).cpu().numpy().astype("<i4")
    return AttentionRow(
        layer,
        position,
        values.shape[0],
        position + 1,
        values.tobytes(),
        options.dtype,
        num_kept=values.shape[1],
        positions=keys.tobytes(),
    )


def _attention_positions(item: ScheduledRequest) -> list[int]:
    options = item.params.attention
    return [] if options is None else due_positions(item, include_prompt=options.include_prompt)


def _capture_range(item: ScheduledRequest, due: list[int]) -> tuple[int, int]:
    """(first row within the chunk, number of rows): the contiguous rows covering every due position."""
    first = due[0] - item.num_computed_tokens
    return first, len(item.token_ids) - first


def _prompt_logprob_rows(item: ScheduledRequest) -> list[int]:
    """Rows (within the chunk) whose logits score the next prompt token, for prompt_logprobs."""
    if item.params.prompt_logprobs is None or item.report_prompt_from is None:
        return []
    start, end = item.num_computed_tokens, item.seq_len
    last = min(end, item.num_prompt_tokens - 1)  # position P-1 predicts a generated token, not a prompt one
    return [p - start for p in range(max(item.report_prompt_from, start), last)]


def _score_prompt(
    items: list[ScheduledRequest], scoring: dict[int, list[int]], logits: torch.Tensor
) -> dict[str, list[TokenLogprobs]]:
    """Each scored row's logprob of the prompt token after it, and the top-n, in one transfer."""
    targets = []
    for i, rows in scoring.items():
        following = [*items[i].token_ids[1:], items[i].next_token_id]
        targets += [following[r] for r in rows]
    top_n = max(items[i].params.prompt_logprobs or 0 for i in scoring)
    target_ids = torch.tensor(targets, dtype=torch.long, device=logits.device)
    fetched = fetch_sampled(target_ids, logits, num_top=top_n)
    out: dict[str, list[TokenLogprobs]] = {}
    k = 0
    for i, rows in scoring.items():
        n = items[i].params.prompt_logprobs or 0
        out[items[i].request_id] = [
            TokenLogprobs(fetched.logprobs[k + j], fetched.top_token_ids[k + j][:n], fetched.top_logprobs[k + j][:n], t)
            for j, t in enumerate(fetched.token_ids[k : k + len(rows)])
        ]
        k += len(rows)
    return out


_TORCH_DTYPE = {WeightsDtype.FLOAT16: torch.float16, WeightsDtype.FLOAT32: torch.float32}
_WIRE_DTYPE = {WeightsDtype.FLOAT16: "<f2", WeightsDtype.FLOAT32: "<f4"}  # little-endian on the wire
