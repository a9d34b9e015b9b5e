"""Mixture-of-experts MLP: the grouped matmul (one GEMM per expert over exactly its tokens) against
a per-expert loop that finds each expert's tokens with a mask (transformers' loop) and against
running every expert over every token (dense), side by side in one run.

    python bench/moe_bench.py                   # Mixtral-like routing at small widths, bf16 and fp32
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from attnserve.model.config import ModelConfig
from attnserve.model.loader import cpu_flags, parse_dtype
from attnserve.model.moe import SparseMoE


def masked_loop(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """transformers' loop: for each expert, a mask over all tokens, then its tokens through it."""
    probs = torch.softmax(moe.router(x).float(), dim=-1)
    weights, experts = probs.topk(moe.top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    hit = F.one_hot(experts, moe.num_experts).permute(2, 1, 0)  # (E, k, T)
    for e in range(moe.num_experts):
        slot, token = torch.where(hit[e])
        if token.numel():
            out.index_add_(0, token, moe._expert(e, x[token]) * weights[token, slot, None])
    return out


def dense(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert over every token, weighted by the router (zero for the unpicked)."""
    probs = torch.softmax(moe.router(x).float(), dim=-1)
    weights, experts = probs.topk(moe.top_k, dim=-1)
    full = torch.zeros_like(probs).scatter_(1, experts, weights / weights.sum(-1, keepdim=True)).to(x.dtype)
    return sum(moe._expert(e, x) * full[:, e : e + 1] for e in range(moe.num_experts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    config = ModelConfig(
        architecture="mixtral",
        vocab_size=512,
        hidden_size=1024,
        intermediate_size=1792,
        num_layers=1,
        num_heads=16,
        num_kv_heads=4,
        head_dim=64,
        max_position_embeddings=1024,
        num_experts=8,
        num_experts_per_tok=2,
    )
    print(f"cpu flags: {cpu_flags()}; {torch.get_num_threads()} threads; 8 experts, top-2, hidden 1024, expert 1792")
    print("| dtype | tokens | grouped ms | masked loop ms | dense ms | loop / grouped | dense / grouped |")
    print("|---|---|---|---|---|---|---|")
    for name in args.dtypes:
        torch.manual_seed(0)
        moe = SparseMoE(config)
        with torch.no_grad():
            for p in moe.parameters():
                p.normal_(0, 0.02)
        moe = moe.to(parse_dtype(name))
        moe.router.pack()
        moe.pack()
        for tokens in args.tokens:
            x = torch.randn(tokens, 1024).to(parse_dtype(name))
            times: dict[str, list[float]] = {"grouped": [], "loop": [], "dense": []}
            with torch.inference_mode():
                assert torch.allclose(moe(x).float(), masked_loop(moe, x).float(), atol=1e-2)
                for _ in range(args.repeats + 1):  # alternating, the first round a warm-up
                    paths = (("grouped", moe), ("loop", partial(masked_loop, moe)), ("dense", partial(dense, moe)))
                    for label, fn in paths:
                        start = time.perf_counter()
                        fn(x)
                        times[label].append(time.perf_counter() - start)
            med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
            print(
                f"| {name} | {tokens} | {med['grouped']:.2f} | {med['loop']:.2f} | {med['dense']:.2f} | "
                f"{med['loop'] / med['grouped']:.2f} | {med['dense'] / med['grouped']:.2f} |"
            )


if __name__ == "__main__":
    main()
