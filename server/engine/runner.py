"""The model runner: a scheduler plan in, sampled tokens (and asked-for extras) out.

It owns the physical KV cache, allocated once from a memory budget, and turns a
plan into the flattened tensors the model takes. It returns plain data: no
tensors leave this module.
"""

from __future__ import annotations

import torch

from attnserve.model.attention import AttentionMetadata
from attnserve.model.kv_cache import KVCache, kv_cache_bytes_per_block
from attnserve.model.llama import LlamaForCausalLM
from attnserve.model.sampling import SamplingTensors, sample, step_generator, top_logprobs
from attnserve.server.engine.config import CacheConfig
from attnserve.server.engine.records import AttentionRow, RunnerOutput, ScheduledRequest, SchedulerOutput, TokenLogprobs
from attnserve.server.engine.request import HeadReduction


def kv_cache_budget(config: CacheConfig, device: torch.device) -> int:
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * config.gpu_memory_utilization)
    return config.cpu_kv_cache_memory


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache_config: CacheConfig) -> None:
        self.model = model
        self.device = model.device
        self.block_size = cache_config.block_size
        per_block = kv_cache_bytes_per_block(model.config, self.block_size, model.dtype)
        num_blocks = kv_cache_budget(cache_config, self.device) // per_block
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget does not hold one block ({per_block} bytes)")
        self.kv_cache = KVCache.allocate(
            model.config, num_blocks=num_blocks, block_size=self.block_size, dtype=model.dtype, device=self.device
        )

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        items = plan.requests
        if not items:
            return RunnerOutput()
        sampling_rows = [i for i, item in enumerate(items) if item.is_sampling]
        # The last token of each sampling request gives the logits.
        ends, total = [], 0
        for item in items:
            total += len(item.token_ids)
            ends.append(total - 1)
        attention_requests = {
            i: item.params.attention.layers for i, item in enumerate(items) if item.params.attention is not None
        }
        meta = AttentionMetadata.build(
            block_tables=[item.block_table for item in items],
            seq_lens=[item.seq_len for item in items],
            query_lens=[len(item.token_ids) for item in items],
            block_size=self.block_size,
            device=self.device,
            logits_indices=[ends[i] for i in sampling_rows],
            attention_requests=attention_requests,
        )
        input_ids = torch.tensor([t for item in items for t in item.token_ids], dtype=torch.long, device=self.device)
        logits = self.model(input_ids, meta.positions, self.kv_cache, meta)

        out = RunnerOutput()
        if attention_requests:
            out.attention = _attention_rows(items, meta)
        if not sampling_rows:
            return out
        rows = [items[i] for i in sampling_rows]
        tokens = self._sample(logits, rows)
        token_list = tokens.tolist()
        for item, token in zip(rows, token_list, strict=True):
            out.sampled_token_ids[item.request_id] = token
        wanting = [k for k, item in enumerate(rows) if item.params.logprobs is not None]
        if wanting:
            top_n = max(rows[k].params.logprobs or 0 for k in wanting)
            index = torch.tensor(wanting, device=logits.device)
            chosen, values, ids = top_logprobs(logits[index], tokens[index], top_n)
            for j, k in enumerate(wanting):
                n = rows[k].params.logprobs or 0
                out.logprobs[rows[k].request_id] = TokenLogprobs(
                    float(chosen[j]), ids[j, :n].tolist(), values[j, :n].tolist()
                )
        return out

    def _sample(self, logits: torch.Tensor, rows: list[ScheduledRequest]) -> torch.Tensor:
        params = [item.params for item in rows]
        if all(p.temperature == 0 and p.repetition_penalty == 1.0 for p in params):
            return logits.argmax(dim=-1)  # all greedy: skip the per-row machinery
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
        return sample(logits, tensors, seen_ids=seen, generators=generators)


def _attention_rows(items: list[ScheduledRequest], meta: AttentionMetadata) -> dict[str, list[AttentionRow]]:
    """Per request, the weight rows it asked for: every prompt row if include_prompt, else the row
    behind the next token (the last query of a sampling chunk)."""
    out: dict[str, list[AttentionRow]] = {}
    for (seq, layer), weights in sorted(meta.captured_attention.items()):
        item = items[seq]
        options = item.params.attention
        assert options is not None
        first = item.num_computed_tokens
        queries = range(weights.shape[1])
        if not options.include_prompt or item.num_output_tokens > 0:
            queries = range(weights.shape[1] - 1, weights.shape[1]) if item.is_sampling else range(0)
        for q in queries:
            row = weights[:, q, : first + q + 1]  # (H, context) up to and including its own position
            if options.reduction is HeadReduction.MEAN:
                row = row.mean(dim=0, keepdim=True)
            elif options.reduction is HeadReduction.MAX:
                row = row.amax(dim=0, keepdim=True)
            row = row.contiguous().cpu()
            out.setdefault(item.request_id, []).append(
                AttentionRow(layer, first + q, row.shape[0], row.shape[1], row.numpy().tobytes())
            )
    return out
