"""Start-up check that a linear's row results do not depend on how many rows share the call.

The batch-invariant path relies on oneDNN computing every row of a GEMM with the same
order of sums whatever M (M = 1 is made a 2-row call, see ``PackedWeight``). That holds for
the kernels measured on this project's machines, but it is a property of the library and
the CPU, not a promise: the engine runs this check on the loaded model's own weights and
reports what it found (GetServerInfo, /v1/models) instead of assuming it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnserve.model.llama import LlamaForCausalLM
from attnserve.model.packed import Linear

# Row counts a step's linears see: one decode row, a few, a busy decode batch, a prefill chunk.
_BATCH_SIZES = (1, 2, 3, 8, 31, 67)


def linear_row_invariance_failures(model: LlamaForCausalLM, *, seed: int = 0) -> list[str]:
    """The linears (one per distinct shape) whose rows come out with other bits when the call
    has another number of rows; empty when every checked linear is row-invariant."""
    checks: dict[tuple[int, int], tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            checks.setdefault((module.in_features, module.out_features), (name, module))
    if model._packed_head is not None:
        head = model.embed_tokens.weight
        checks.setdefault((head.shape[1], head.shape[0]), ("lm_head (tied)", model._packed_head))
    gen = torch.Generator().manual_seed(seed)
    failures = []
    with torch.inference_mode():
        for (in_features, _), (name, linear) in checks.items():
            x = torch.randn(max(_BATCH_SIZES), in_features, generator=gen).to(model.dtype)
            reference = linear(x)
            for rows in _BATCH_SIZES:
                # The last rows of each call: with the row count, their place in the tiles moves too.
                if not torch.equal(linear(x[-rows:]), reference[-rows:]):
                    failures.append(f"{name} ({in_features}->{reference.shape[1]}) at {rows} rows")
                    break
    return failures
