"""Model tests run on CPU; without a GPU, Triton kernels run under its interpreter on CPU tensors."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Read when triton is first imported (its standard library is @jit'd at import) and when each
    # kernel is defined, so it is set here, before any test module imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")
