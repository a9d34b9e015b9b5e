"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks each token's top-k experts.

Each expert is a SwiGLU MLP. The tokens routed to one expert are gathered and run through it
as one matrix product (a grouped matmul: one GEMM per expert over exactly its tokens, never the
whole batch per expert), then scattered back, weighted by the router. Every linear is a
``PackedWeight``, whose rows do not depend on how many tokens share the call, and a token's
k expert outputs are summed in expert order: a token's result does not depend on its batch.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from attnserve.model.config import ModelConfig
from attnserve.model.packed import Linear, PackedWeight
from attnserve.model.parallel import TensorParallel

# Checkpoint names below "model.layers.N." -> (our parameter, shard): fused 3-D expert tensors
# (transformers 5), or one matrix per expert (the published Mixtral / Qwen3-MoE files).
_PER_EXPERT = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PART = {"gate_proj": ("gate_up", 0), "w1": ("gate_up", 0), "up_proj": ("gate_up", 1), "w3": ("gate_up", 1)}
MoEShard = tuple[int, int | None]  # (expert, part of gate_up: 0 gate, 1 up; None for down)


def moe_param_for(rest: str) -> tuple[str, MoEShard | None] | None:
    """Our parameter (under ``mlp.``) for a checkpoint name below ``model.layers.N.``; None if not MoE."""
    if rest in ("mlp.gate.weight", "block_sparse_moe.gate.weight"):
        return "mlp.router.weight", None
    if rest == "mlp.experts.gate_up_proj":
        return "mlp.gate_up", None
    if rest == "mlp.experts.down_proj":
        return "mlp.down", None
    match = _PER_EXPERT.match(rest)
    if match is None:
        return None
    expert, kind = int(match.group(1)), match.group(2)
    if kind in ("down_proj", "w2"):
        return "mlp.down", (expert, None)
    name, part = _PART[kind]
    return f"mlp.{name}", (expert, part)


class SparseMoE(nn.Module):
    """Under tensor parallelism ``config`` is the rank's shard: every expert's columns are split
    (the router is whole on every rank) and the routed sum is all-reduced, like a dense MLP's."""

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp or TensorParallel()
        e, h, i = config.num_experts, config.hidden_size, config.expert_intermediate_size
        self.num_experts, self.top_k, self.intermediate = e, config.num_experts_per_tok, i
        self.normalize = config.norm_topk_prob
        self.router = Linear(h, e, bias=False)  # packed too: a token's experts must not depend on its batch
        self.gate_up = nn.Parameter(torch.empty(e, 2 * i, h))  # [gate; up] per expert, as transformers 5 keeps it
        self.down = nn.Parameter(torch.empty(e, h, i))
        self.packed: list[tuple[PackedWeight, PackedWeight]] | None = None

    def expert_view(self, name: str, shard: MoEShard) -> torch.Tensor:
        """The slice of a fused expert tensor that one per-expert checkpoint matrix fills."""
        expert, part = shard
        if name.endswith("down"):
            return self.down[expert]
        return self.gate_up[expert].narrow(0, (part or 0) * self.intermediate, self.intermediate)

    def pack(self) -> None:
        pairs = [
            (PackedWeight.pack(self.gate_up[e], None), PackedWeight.pack(self.down[e], None))
            for e in range(self.num_experts)
        ]
        self.packed = None if any(g is None or d is None for g, d in pairs) else pairs  # type: ignore[misc]

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            gate_up, down = self.packed[e]
            gate, up = gate_up(x).split(self.intermediate, dim=-1)
            return down(F.silu(gate) * up)
        gate, up = F.linear(x, self.gate_up[e]).split(self.intermediate, dim=-1)
        return F.linear(F.silu(gate) * up, self.down[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, hidden)
        probs = torch.softmax(self.router(x).float(), dim=-1)  # (T, E)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (T, k)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        # Token-expert pairs grouped by expert (stable: a token's pairs keep their order).
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the group sizes, on the host
        token = order // self.top_k
        grouped = x[token]  # (T*k, hidden)
        outputs, start = [], 0
        for e, count in enumerate(counts):
            if count:
                outputs.append(self._expert(e, grouped[start : start + count]))
                start += count
        routed = torch.cat(outputs) * weights.flatten()[order][:, None]
        out = torch.zeros_like(x)
        # index_add_ adds each token's outputs in the order given: by expert, as transformers does.
        return self.tp.all_reduce(out.index_add_(0, token, routed))
