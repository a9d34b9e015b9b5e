"""bfloat16 fidelity on the default model: our bf16 logits against transformers in bf16 and against our fp32.

    python bench/bf16_fidelity.py            # ~2 minutes on 2 cores

Over a set of chat prompts, at every prompt position:
  - top-1 agreement: the argmax of our bf16 logits equals the reference's;
  - mean KL(reference || ours) of the next-token distributions;
and greedy agreement over 32 generated tokens (how many sequences are identical, and the
mean number of leading tokens that agree). References: transformers (GGUF de-quantised to
dense weights, eager attention) in bfloat16, and our own float32. The CPU flags are printed:
bf16 matmuls run native on AVX512-BF16 / AMX and emulated elsewhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from attnserve.model.attention import AttentionMetadata
from attnserve.model.fetch import default_model_path
from attnserve.model.generate import generate_tokens
from attnserve.model.kv_cache import KVCache
from attnserve.model.llama import LlamaForCausalLM
from attnserve.model.loader import cpu_flags, load_model

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Who wrote Hamlet?",
    "Describe a cat in one sentence.",
    "What is photosynthesis?",
    "How many legs does a spider have?",
    "Write a haiku about autumn.",
    "Why is the sky blue?",
    "List two programming languages.",
    "How do bees make honey?",
    "Explain gravity briefly.",
    "What is democracy?",
    "What is a prime number?",
    "Tell me a fun fact about octopuses.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Give three tips for writing clear code.",
]


@torch.inference_mode()
def our_logits(model: LlamaForCausalLM, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """(len, vocab) float32 logits of every prompt position, one sequence in one forward."""
    num_blocks = -(-len(ids) // block_size)
    cache = KVCache.for_model(model, num_blocks=num_blocks, block_size=block_size)
    meta = AttentionMetadata.build(
        block_tables=[list(range(num_blocks))], seq_lens=[len(ids)], query_lens=[len(ids)], block_size=block_size
    )
    return model(torch.tensor(ids), meta.positions, cache, meta).float()


def compare(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
    agree = positions = 0
    kl = 0.0
    for a, b in zip(ours, reference, strict=True):
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += a.shape[0]
        kl += float(F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="sum"))
    return {"top1_agreement": agree / positions, "mean_kl": kl / positions, "positions": positions}


def greedy_agreement(ours: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    identical = sum(a == b for a, b in zip(ours, reference, strict=True))
    leading = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        for a, b in zip(ours, reference, strict=True)
    ]
    return {"identical": identical, "of": len(ours), "mean_leading_tokens": sum(leading) / len(leading)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=Path("bench/results/bf16_fidelity.json"))
    args = parser.parse_args()
    import transformers

    ours = {dtype: load_model(args.model, dtype=dtype) for dtype in (torch.bfloat16, torch.float32)}
    tok = ours[torch.float32].tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        args.model.parent,
        gguf_file=args.model.name,
        dtype=torch.bfloat16,
        attn_implementation="eager",
        quantization_config=transformers.GgufConfig(dequantize=True),
    ).eval()

    logits = {dtype: [our_logits(m.model, p) for p in prompts] for dtype, m in ours.items()}
    with torch.inference_mode():
        hf_logits = [hf(torch.tensor([p])).logits[0].float() for p in prompts]
        hf_greedy = [
            hf.generate(torch.tensor([p]), max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]
    greedy = {
        dtype: [list(generate_tokens(m.model, p, max_tokens=args.tokens)) for p in prompts] for dtype, m in ours.items()
    }
    results = {
        "cpu_flags": cpu_flags(),
        "bf16_vs_transformers_bf16": compare(logits[torch.bfloat16], hf_logits),
        "bf16_vs_our_fp32": compare(logits[torch.bfloat16], logits[torch.float32]),
        "fp32_vs_transformers_bf16": compare(logits[torch.float32], hf_logits),
        "greedy_bf16_vs_transformers_bf16": greedy_agreement(greedy[torch.bfloat16], hf_greedy),
        "greedy_bf16_vs_our_fp32": greedy_agreement(greedy[torch.bfloat16], greedy[torch.float32]),
    }
    print(f"CPU flags: {results['cpu_flags']}; {len(prompts)} chat prompts, {args.tokens} greedy tokens")
    for name, row in results.items():
        if name != "cpu_flags":
            shown = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            print(f"{name}: " + ", ".join(shown))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
