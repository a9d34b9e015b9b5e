"""Reads from and writes into the residual stream of chosen rows during a forward.

A step's :class:`AttentionMetadata` may carry, per layer, a :class:`LayerHooks`: which rows of
the flattened batch to copy out at which named point (TransformerLens names), which rows get a
vector added at which residual point, and which rows' attention heads are scaled. Everything is
indexed by row, so rows nobody asked about run exactly the ops they run without hooks: another
request's steering never changes a bit of theirs.

Points of one decoder layer, in order:
``resid_pre`` (the layer's input) -> ``attn_out`` (the attention block's output, as added to the
residual) -> ``resid_mid`` (resid_pre + attn_out) -> ``mlp_out`` -> ``resid_post`` (the layer's output).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

POINTS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
STEERABLE = ("resid_pre", "resid_mid", "resid_post")


@dataclass
class LayerHooks:
    reads: dict[str, torch.Tensor] = field(default_factory=dict)  # point -> rows (long) to copy out
    steering: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # point -> (rows, deltas)
    head_scales: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, (n, H) factors on each head's output)
    captured: dict[str, torch.Tensor] = field(default_factory=dict)  # point -> (n, hidden) float32, after the forward

    def at(self, point: str, x: torch.Tensor) -> torch.Tensor:
        """Add the point's steering (in place) to x, then copy out the rows read there."""
        steer = self.steering.get(point)
        if steer is not None:
            rows, deltas = steer
            x.index_add_(0, rows, deltas.to(x.dtype))
        rows = self.reads.get(point)
        if rows is not None:
            self.captured[point] = x.index_select(0, rows).float()
        return x

    def steers(self, point: str) -> bool:
        return point in self.steering

    def scale_heads(self, out: torch.Tensor, first_head: int = 0) -> torch.Tensor:
        """out (T, H, D): the chosen rows' heads multiplied by their factors (0: ablated). Under tensor
        parallelism ``out`` holds the heads from ``first_head`` on, of the factors' whole-model heads."""
        if self.head_scales is not None:
            rows, factors = self.head_scales
            factors = factors[:, first_head : first_head + out.shape[1]]
            out[rows] = out[rows] * factors[:, :, None].to(out.dtype)
        return out
