"""Linear layers on weights in oneDNN's packed layout, computed row-invariantly (see PackedWeight)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnserve.model.kernels import cpu_native


def packed_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The dtype oneDNN computes this CPU weight's linear in, or None where it is not packed (CUDA).

    float32 always; bfloat16 / float16 where this CPU has oneDNN kernels for them, else in
    float32 from an upcast copy (exact inputs, float32 sums, the output rounded back).
    """
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    if weight.dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return torch.float16
    return torch.float32


@dataclass
class PackedWeight:
    """A linear's weight (and bias) in oneDNN's blocked layout, as torch.compile's CPU freezing uses:
    about 1.6x faster than F.linear (MKL) in float32 and 2x in bfloat16 on this project's machines."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype
    native: bool = False  # the call runs as one native op (model/kernels/cpu_native.py)

    @classmethod
    def pack(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedWeight | None:
        dtype = packed_dtype(weight)
        if dtype is None:
            return None
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), 16)
        return cls(packed, None if bias is None else bias.detach().to(dtype), dtype, cpu_native.available())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, in) -> (M, out), each row's sums in one order whatever M.

        oneDNN runs one row (M = 1) through a GEMV kernel whose sums run in another order than
        its GEMM kernels, which agree with each other for every M >= 2 (checked at start-up, see
        model/invariance.py): a lone row is computed as the first of two.
        """
        if self.native and x.dtype == self.dtype:  # the same call, expand and slice included, as one op
            return torch.ops.attnserve.packed_linear(x, self.weight, self.bias)
        rows, out_dtype = x.shape[0], x.dtype
        if rows == 1:
            x = x.expand(2, -1)  # a view: oneDNN reads the row twice (no copy op)
        if x.dtype != self.dtype:  # checked here: a no-op .to() still costs a dispatch, 4 per layer
            x = x.to(self.dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if rows == 1:
            y = y[:1]
        return y if y.dtype == out_dtype else y.to(out_dtype)


class Linear(nn.Linear):
    """nn.Linear that runs on a oneDNN-packed copy of its weight once ``pack()`` is called (CPU)."""

    packed: PackedWeight | None = None

    def pack(self) -> None:
        self.packed = PackedWeight.pack(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed(x)
        return F.linear(x, self.weight, self.bias)
