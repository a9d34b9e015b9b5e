"""Tensor parallelism, Megatron-style: which slice of each weight a rank holds, and the collectives
that join the slices.

A rank holds a contiguous range of the query heads (with their K/V heads: split when there are at
least as many KV heads as ranks, else each rank keeps the one its queries read), a range of the
MLP's (and each expert's) intermediate columns, and a range of the vocabulary. Q/K/V and gate/up
are column-parallel (no communication); O and down are row-parallel (one all-reduce each); the
embedding sums its masked lookups (one all-reduce) and the LM head's logits are gathered.

At size 1 every method is the identity and no torch.distributed call is made: the model code runs
unchanged on one device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from attnserve.model.config import ModelConfig
from attnserve.model.errors import ModelLoadError


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None: the default group

    @classmethod
    def current(cls) -> TensorParallel:
        """This process's place in the initialised default group (size 1 where there is none)."""
        if not dist.is_available() or not dist.is_initialized():
            return cls()
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def enabled(self) -> bool:
        return self.size > 1

    # ------------------------------------------------------------------ shapes
    def check(self, config: ModelConfig) -> None:
        """Raise ModelLoadError where the model cannot be split into ``size`` equal shards."""
        if self.size == 1:
            return
        reasons = []
        if config.num_heads % self.size:
            reasons.append(f"its {config.num_heads} query heads")
        if config.num_kv_heads % self.size and self.size % config.num_kv_heads:
            reasons.append(f"its {config.num_kv_heads} KV heads (nor is it a multiple of them)")
        if config.intermediate_size % self.size:
            reasons.append(f"its MLP width {config.intermediate_size}")
        if config.num_experts and config.expert_intermediate_size % self.size:
            reasons.append(f"its expert width {config.expert_intermediate_size}")
        if reasons:
            raise ModelLoadError(
                f"tensor parallel size {self.size} does not divide {' or '.join(reasons)} of {config.name}; "
                "choose a size that divides them"
            )

    def part(self, total: int) -> tuple[int, int]:
        """(start, length) of this rank's equal share of ``total``."""
        length = total // self.size
        return self.rank * length, length

    def kv_heads(self, config: ModelConfig) -> tuple[int, int]:
        """(first, count) of the KV heads this rank holds: its share, or the one its query heads read."""
        if config.num_kv_heads % self.size == 0:
            return self.part(config.num_kv_heads)
        return self.rank * config.num_kv_heads // self.size, 1

    def vocab_rows(self, vocab_size: int) -> tuple[int, int]:
        """(start, rows) of this rank's vocabulary shard; shards are padded to one size (the last may
        hold rows past the vocabulary: zeros, cut off after the gather)."""
        rows = -(-vocab_size // self.size)
        return self.rank * rows, rows

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The shapes one rank's layers and KV cache have: its heads and its intermediate columns."""
        if self.size == 1:
            return config
        return config.replace(
            num_heads=config.num_heads // self.size,
            num_kv_heads=self.kv_heads(config)[1],
            intermediate_size=config.intermediate_size // self.size,
            moe_intermediate_size=config.expert_intermediate_size // self.size if config.num_experts else None,
        )

    # ------------------------------------------------------------- collectives
    def agree_min(self, value: int, device: torch.device | str) -> int:
        """The smallest of the ranks' values (sizes every rank must share, such as the KV block count)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (partial sums of a row-parallel layer)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The ranks' x concatenated along ``dim``, in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)
