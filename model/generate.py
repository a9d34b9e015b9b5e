"""Single-sequence generation straight on the model: the smoke path and a test reference.

No batching, no scheduler: one prompt gets its own contiguous run of cache
blocks. The serving engine (server/) is the real thing; this is what it must
agree with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from attnserve.model.attention import AttentionMetadata
from attnserve.model.kv_cache import KVCache
from attnserve.model.llama import LlamaForCausalLM
from attnserve.model.sampling import SamplingTensors, sample, step_generator


@torch.inference_mode()
def generate_tokens(
    model: LlamaForCausalLM,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    block_size: int = 16,
) -> Iterator[int]:
    """Yield generated token ids, one per step, stopping after a stop token or max_tokens."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    total = min(len(prompt_ids) + max_tokens, model.config.max_position_embeddings)
    num_blocks = -(-total // block_size)
    cache = KVCache.for_model(model, num_blocks=num_blocks, block_size=block_size)
    table = list(range(num_blocks))
    params = SamplingTensors.from_lists(temperature=[temperature], top_k=[top_k], top_p=[top_p], device=model.device)
    ids = list(prompt_ids)
    new = list(prompt_ids)
    for step in range(total - len(prompt_ids)):
        meta = AttentionMetadata.build(
            block_tables=[table],
            seq_lens=[len(ids)],
            query_lens=[len(new)],
            block_size=block_size,
            device=model.device,
            logits_indices=[len(new) - 1],
        )
        logits = model(torch.tensor(new, device=model.device), meta.positions, cache, meta)
        gens = [None if seed is None else step_generator(seed, step, model.device)]
        token = int(sample(logits, params, generators=gens)[0])
        yield token
        if token in stop_token_ids:
            return
        ids.append(token)
        new = [token]
