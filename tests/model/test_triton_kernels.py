"""The Triton paged-attention kernels against a plain torch reference.

Without a GPU they run under the Triton interpreter on CPU tensors: tests/model/conftest.py
sets ``TRITON_INTERPRET=1`` before anything imports triton. With a GPU they run compiled on
it. Sizes stay small: the interpreter runs every program in Python. bf16 ``tl.dot`` is wrong
under the interpreter, so bf16 is checked on a GPU only.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch

from tests.helpers import random_paged_cache, reference_paged_attention

pytest.importorskip("triton")
from attnserve.model.kernels import triton_decode, triton_prefill  # after the skip

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="no GPU, no interpreter")
F32, F16 = torch.float32, torch.float16
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _check_decode(
    decode: ModuleType, *, block_size: int, group: int, head_dim: int, dtype, splits, device, window=None, softcap=None
) -> None:
    num_kv_heads = 2
    num_heads = group * num_kv_heads
    # One token, part of a block, several blocks, long enough to split; and a padding row (0).
    lens = [1, block_size // 2 + 1, 3 * block_size + 1, 300, 0]
    cache, tables = random_paged_cache(lens, block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim)
    cache = cache.to(device, dtype)
    # q as the model hands it over: a view of the fused q|k projection, rows not contiguous.
    qk = torch.randn(len(lens), num_heads + num_kv_heads, head_dim, generator=torch.Generator().manual_seed(1))
    q = qk.to(device, dtype)[:, :num_heads]
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    out = decode.split_paged_decode_attention(
        q, cache, tables.to(device), seq_lens, scale, num_splits=splits, window=window, softcap=softcap
    )
    assert out.shape == q.shape and out.dtype == dtype
    for row, n in enumerate(lens):
        expected = reference_paged_attention(
            q[row : row + 1].cpu(), cache.cpu(), tables[row], n, scale, window=window, softcap=softcap
        )[0]
        error = (out[row].double().cpu() - expected).abs().max().item()
        assert error <= TOLERANCE[dtype], f"row {row} (context {n}): error {error:.2e}"


@pytest.mark.parametrize(
    ("block_size", "group", "head_dim", "dtype", "splits"),
    [
        (8, 1, 64, F32, None),
        (16, 3, 128, F16, None),
        (32, 4, 64, F32, 3),  # 3 splits of 128 tokens: the short rows leave splits empty
        (16, 8, 64, F16, 2),
        (8, 4, 128, F32, 5),
        (32, 3, 64, F16, 1),
    ],
)
def test_decode_kernel_matches_reference(block_size, group, head_dim, dtype, splits) -> None:
    _check_decode(
        triton_decode, block_size=block_size, group=group, head_dim=head_dim, dtype=dtype, splits=splits, device=DEVICE
    )


def _check_prefill(
    prefill: ModuleType, *, block_size: int, group: int, head_dim: int, dtype, device, window=None, softcap=None
) -> None:
    num_kv_heads = 2
    num_heads = group * num_kv_heads
    # (query_len, seq_len): fresh chunks, one longer than a query tile, and chunks continuing history.
    chunks = [(5, 5), (40, 40), (3, 20), (33, 70)]
    cache, tables = random_paged_cache(
        [s for _, s in chunks], block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim
    )
    cache = cache.to(device, dtype)
    starts = [0, 5, 47, 50]  # rows 45-46 belong to two decode rows the kernel must leave alone
    num_rows = starts[-1] + chunks[-1][0]
    qk = torch.randn(num_rows, num_heads + num_kv_heads, head_dim, generator=torch.Generator().manual_seed(2))
    q = qk.to(device, dtype)[:, :num_heads]
    out = torch.full(q.shape, 7.0, dtype=dtype, device=device)

    def int32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    scale = head_dim**-0.5
    prefill.paged_prefill_attention(
        q,
        cache,
        tables.to(device),
        int32(starts),
        int32([n for n, _ in chunks]),
        int32([s for _, s in chunks]),
        scale,
        max_query_len=max(n for n, _ in chunks),
        out=out,
        window=window,
        softcap=softcap,
    )
    assert bool((out[45:47] == 7.0).all()), "rows outside the chunks must stay untouched"
    for i, ((n, seq_len), start) in enumerate(zip(chunks, starts, strict=True)):
        expected = reference_paged_attention(
            q[start : start + n].cpu(), cache.cpu(), tables[i], seq_len, scale, window=window, softcap=softcap
        )
        error = (out[start : start + n].double().cpu() - expected).abs().max().item()
        assert error <= TOLERANCE[dtype], f"chunk {i}: error {error:.2e}"


@pytest.mark.parametrize(
    ("block_size", "group", "head_dim", "dtype"),
    [(8, 1, 64, F32), (16, 3, 128, F16), (32, 4, 64, F32), (16, 8, 64, F16)],
)
def test_prefill_kernel_matches_reference(block_size, group, head_dim, dtype) -> None:
    _check_prefill(triton_prefill, block_size=block_size, group=group, head_dim=head_dim, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    ("window", "softcap", "splits"),
    [(20, None, 3), (100, None, None), (1, None, 2), (None, 5.0, 3), (37, 2.0, 5)],
)
def test_decode_kernel_windows_and_softcaps(window, softcap, splits) -> None:
    """Mistral / Gemma: a window shorter than some contexts (whole splits skipped), one token wide,
    soft-capped scores, and both at once."""
    _check_decode(
        triton_decode,
        block_size=16,
        group=4,
        head_dim=64,
        dtype=F32,
        splits=splits,
        device=DEVICE,
        window=window,
        softcap=softcap,
    )


@pytest.mark.parametrize(("window", "softcap"), [(8, None), (37, None), (1, None), (None, 5.0), (40, 2.0)])
def test_prefill_kernel_windows_and_softcaps(window, softcap) -> None:
    """Windows shorter than a query tile and than a key tile, and rows whose first key tiles hold
    nothing they may see (the online softmax must not make NaN of them)."""
    _check_prefill(
        triton_prefill, block_size=8, group=2, head_dim=64, dtype=F32, device=DEVICE, window=window, softcap=softcap
    )


def test_default_split_count_depends_on_static_shapes_only() -> None:
    cpu = torch.device("cpu")
    assert triton_decode.num_splits_for(1, 4096, cpu) == 4  # few programs, a long table: split
    assert triton_decode.num_splits_for(64, 4096, cpu) == 1  # enough programs already
    assert triton_decode.num_splits_for(1, 100, cpu) == 1  # too short to be worth it


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernels_on_gpu(dtype) -> None:
    for group, head_dim in [(1, 64), (4, 128), (8, 64)]:
        for splits in (None, 3):
            _check_decode(
                triton_decode, block_size=16, group=group, head_dim=head_dim, dtype=dtype, splits=splits, device="cuda"
            )
        _check_prefill(triton_prefill, block_size=16, group=group, head_dim=head_dim, dtype=dtype, device="cuda")
    _check_decode(
        triton_decode, block_size=16, group=4, head_dim=64, dtype=dtype, splits=3, device="cuda", window=20, softcap=5.0
    )
    _check_prefill(
        triton_prefill, block_size=8, group=2, head_dim=64, dtype=dtype, device="cuda", window=37, softcap=2.0
    )
