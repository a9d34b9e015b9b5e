"""Where a batch-1 decode step's time goes, beside the floor that reading the weights sets.

    python bench/step_profile.py                         # default model's shape, bf16 and fp32
    python bench/step_profile.py --dtypes float32 --context 512 --steps 50
    python bench/step_profile.py --native on off --rounds 2 --top 0   # native kernels vs ATen, side by side

For each dtype: the median wall time of one decode step (forward + argmax to the host, the
runner's own metadata build included), the bytes of weights the step reads (the packed linears
and the LM head) and the floor they set: those bytes at the best copy bandwidth measured
(best of 7 copies of 512 MiB; it drifts by up to 2x under other tenants' load, so the floor is
optimistic and the ratio conservative); then a
torch.profiler breakdown by op: calls per step, time per step, share of the step. "between
ops" is the step's wall time minus the time inside the top-level ops: Python and dispatch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from step_bench import copy_bandwidth  # run as a script: bench/ is on the path
from torch.profiler import ProfilerActivity, profile

from attnserve.model.attention import AttentionMetadata
from attnserve.model.kernels import cpu_native
from attnserve.model.kv_cache import KVCache
from attnserve.model.llama import LlamaForCausalLM
from attnserve.model.loader import cpu_flags, load_model, parse_dtype
from attnserve.model.packed import Linear


def weight_bytes_read(model: LlamaForCausalLM) -> int:
    """Bytes a decode step reads from the weights: every linear (packed copy if any), the head, the norms."""
    total = 0
    for module in model.modules():
        if isinstance(module, Linear):
            w = module.packed.weight if module.packed is not None else module.weight
            total += w.numel() * w.element_size()
    head = model._packed_head.weight if model._packed_head is not None else model.embed_tokens.weight
    if model.lm_head is None:
        total += head.numel() * head.element_size()
    norms = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    return total + norms


def decode_step(model: LlamaForCausalLM, context: int, block_size: int = 16):
    num_blocks = -(-(context + 1) // block_size)
    cache = KVCache.for_model(model, num_blocks=num_blocks, block_size=block_size)
    for layer in cache.layers:
        layer.normal_()
    table = [list(range(num_blocks))]
    ids = torch.tensor([100])

    @torch.inference_mode()
    def step() -> None:
        meta = AttentionMetadata.build(
            block_tables=table, seq_lens=[context + 1], query_lens=[1], block_size=block_size, logits_indices=[0]
        )
        model(ids, meta.positions, cache, meta).argmax(dim=-1).tolist()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy:smollm2-135m")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--top", type=int, default=14, help="ops to list (0: time the step only, no profile)")
    parser.add_argument("--native", nargs="+", choices=["on", "off"], default=["on"], help="native CPU kernels")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the settings this many times")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"cpu flags: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; model {args.model}, batch 1, context {args.context}\n")
    models = {name: load_model(args.model, dtype=parse_dtype(name)).model for name in args.dtypes}
    for _ in range(args.rounds):
        for native in args.native:
            for name, model in models.items():
                cpu_native.switch(native == "on")
                model.prepare_for_inference()
                print(f"== native kernels {native}: ", end="")
                profile_step(model, name, args.context, args.steps, args.top, bandwidth)


def profile_step(model: LlamaForCausalLM, name: str, context: int, steps: int, top: int, bandwidth: float) -> None:
    step = decode_step(model, context)
    for _ in range(5):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    wall = statistics.median(times)
    weights = weight_bytes_read(model)
    floor = weights / bandwidth
    print(
        f"{name}: step {wall * 1e3:.1f} ms (median of {steps}); weights read {weights / 1e6:.0f} MB, ",
        end="",
    )
    print(f"floor {floor * 1e3:.1f} ms; step / floor = {wall / floor:.2f}")
    if not top:
        return
    n = 10
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    per_op: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    inside_top = 0.0
    for event in prof.events():
        if event.cpu_parent is None:  # top-level ops: what the Python code called
            per_op[event.name][0] += 1
            per_op[event.name][1] += event.cpu_time_total
            inside_top += event.cpu_time_total
    profiled_wall = max(e.time_range.end for e in prof.events()) - min(e.time_range.start for e in prof.events())
    print(f"{'op':<40} {'calls/step':>10} {'ms/step':>8} {'share':>6}")
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1][1])
    for op, (calls, us) in ranked[:top]:
        print(f"{op:<40} {calls / n:>10.0f} {us / n / 1e3:>8.2f} {us / profiled_wall:>6.1%}")
    rest = sum(us for _, (_, us) in ranked[top:])
    print(f"{'(other ops)':<40} {'':>10} {rest / n / 1e3:>8.2f} {rest / profiled_wall:>6.1%}")
    between = profiled_wall - inside_top
    print(f"{'between ops (Python, dispatch)':<40} {'':>10} {between / n / 1e3:>8.2f} {between / profiled_wall:>6.1%}")
    calls = sum(c for c, _ in per_op.values()) / n
    print(f"top-level ops per step: {calls:.0f}; profiled step {profiled_wall / n / 1e3:.1f} ms\n")


if __name__ == "__main__":
    main()
