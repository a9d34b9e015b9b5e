"""The native CPU kernels (model/kernels/cpu_native.cpp) against plain references, and their row invariance.

They build at first use (a C++ compiler is on every machine this project runs its tests on);
where the build fails the tests say so and skip, and the ATen fallback serves.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from attnserve.model.kernels import cpu_native
from attnserve.model.packed import PackedWeight
from attnserve.model.rope import apply_rotary
from tests.helpers import random_paged_cache, reference_paged_attention

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="native CPU kernels did not build here")
ops = torch.ops.attnserve


def _rows(lens: list[int], queries: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query row's sequence and context end: the last ``queries[i]`` positions of sequence i."""
    seqs = [i for i, n in enumerate(queries) for _ in range(n)]
    ctx = [p + 1 for length, n in zip(lens, queries, strict=True) for p in range(length - n, length)]
    return torch.tensor(seqs, dtype=torch.int32), torch.tensor(ctx, dtype=torch.int64)


def _windowed_reference(q, cache, table, seq_len, scale, window, softcap):
    """float64 attention of q (n, H, D), the last n positions, with a sliding window and soft-capping."""
    n, num_heads, head_dim = q.shape
    block_size, num_kv_heads = cache.shape[2], cache.shape[3]
    blocks = table[: -(-seq_len // block_size)].long()
    kv = cache[:, blocks].reshape(2, -1, num_kv_heads, head_dim)[:, :seq_len].double()
    k = kv[0].repeat_interleave(num_heads // num_kv_heads, dim=1)
    v = kv[1].repeat_interleave(num_heads // num_kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    pos = torch.arange(seq_len - n, seq_len)[:, None]
    keys = torch.arange(seq_len)[None, :]
    hidden = (keys > pos) | (keys <= pos - window if window else torch.zeros_like(keys, dtype=torch.bool))
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(hidden, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize(
    ("group", "head_dim", "window", "softcap"), [(1, 64, 0, 0.0), (3, 64, 0, 0.0), (4, 80, 5, 0.0), (2, 64, 7, 20.0)]
)
def test_row_attention_matches_float64_reference(group: int, head_dim: int, window: int, softcap: float) -> None:
    lens, queries = [1, 9, 40, 130], [1, 9, 3, 1]  # decode rows, a whole prompt, a chunk over cached history
    cache, tables = random_paged_cache(lens, block_size=16, num_kv_heads=2, head_dim=head_dim, seed=3)
    q = torch.randn(sum(queries), 2 * group, head_dim, generator=torch.Generator().manual_seed(4))
    seqs, ctx = _rows(lens, queries)
    out = ops.row_attention(q, cache, tables, seqs, ctx, head_dim**-0.5, window, softcap)
    start = 0
    for i, (length, n) in enumerate(zip(lens, queries, strict=True)):
        if window or softcap:
            expected = _windowed_reference(
                q[start : start + n], cache, tables[i], length, head_dim**-0.5, window, softcap
            )
        else:
            expected = reference_paged_attention(q[start : start + n], cache, tables[i], length, head_dim**-0.5)
        assert (out[start : start + n].double() - expected).abs().max().item() <= 3e-6, f"sequence {i}"
        start += n


@pytest.mark.parametrize(
    ("q_dtype", "cache_dtype"),
    [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)],
)
def test_row_attention_in_narrow_dtypes(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> None:
    lens, queries = [5, 70], [5, 1]
    cache, tables = random_paged_cache(lens, block_size=8, num_kv_heads=3, head_dim=64, dtype=cache_dtype, seed=5)
    q = torch.randn(6, 9, 64, generator=torch.Generator().manual_seed(6)).to(q_dtype)
    seqs, ctx = _rows(lens, queries)
    out = ops.row_attention(q, cache, tables, seqs, ctx, 0.125, 0, 0.0)
    assert out.dtype == q_dtype
    expected = torch.cat(
        [
            reference_paged_attention(q[:5], cache, tables[0], 5, 0.125),
            reference_paged_attention(q[5:], cache, tables[1], 70, 0.125),
        ]
    )
    assert (out.double() - expected).abs().max().item() <= 2e-2


def test_row_attention_rows_do_not_depend_on_the_batch_or_the_threads() -> None:
    """Bit for bit: every row alone, in another batch order, and on one thread or two."""
    lens, queries = [37, 5, 300, 64], [1, 5, 1, 20]
    cache, tables = random_paged_cache(lens, block_size=16, num_kv_heads=3, head_dim=64, seed=8)
    q = torch.randn(sum(queries), 9, 64, generator=torch.Generator().manual_seed(9))
    seqs, ctx = _rows(lens, queries)
    together = ops.row_attention(q, cache, tables, seqs, ctx, 0.125, 0, 0.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = ops.row_attention(q, cache, tables, seqs, ctx, 0.125, 0, 0.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, together)
    for row in range(q.shape[0]):
        alone = ops.row_attention(
            q[row : row + 1], cache, tables, seqs[row : row + 1], ctx[row : row + 1], 0.125, 0, 0.0
        )
        assert torch.equal(alone[0], together[row]), f"row {row}"
    reverse = torch.arange(q.shape[0] - 1, -1, -1)
    assert torch.equal(
        ops.row_attention(q[reverse], cache, tables, seqs[reverse], ctx[reverse], 0.125, 0, 0.0), together[reverse]
    )


@pytest.mark.parametrize(
    ("dtype", "rope_dim", "tolerance"),
    [(torch.float32, 64, 1e-6), (torch.float32, 32, 1e-6), (torch.bfloat16, 64, 1.6e-2)],
)
def test_rope_write_kv_rotates_in_place_and_stores(dtype: torch.dtype, rope_dim: int, tolerance: float) -> None:
    heads, kv_heads, head_dim, tokens = 4, 2, 64, 5
    gen = torch.Generator().manual_seed(10)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    angles = torch.randn(tokens, 1, rope_dim // 2, generator=gen).repeat(1, 1, 2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    cache = torch.zeros(2, 4, 4, kv_heads, head_dim)
    slots = torch.tensor([3, 9, 4, 15, 0])
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim).clone()
    expected = qk.clone()
    expected[..., :rope_dim] = apply_rotary(qk[..., :rope_dim].float(), cos.float(), sin.float()).to(dtype)
    v = qkv[:, (heads + kv_heads) * head_dim :].clone()
    ops.rope_write_kv(qkv, cos, sin, cache, slots, heads, kv_heads, head_dim, rope_dim)
    got = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    assert (got.double() - expected.double()).abs().max().item() <= tolerance
    flat = cache.view(2, -1, kv_heads, head_dim)
    assert torch.equal(flat[0, slots], got[:, heads:].float())
    assert torch.equal(flat[1, slots], v.view(tokens, kv_heads, head_dim).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_add_rms_norm_matches_the_eager_ops(dtype: torch.dtype, offset: float) -> None:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(7, 576, generator=gen).to(dtype)
    delta = torch.randn(7, 576, generator=gen).to(dtype)
    weight = torch.randn(576, generator=gen).to(dtype)
    summed = x + delta
    scale = weight.float() + offset if offset else weight.float()
    expected = F.rms_norm(summed.float(), (576,), scale, 1e-5)
    residual = x.clone()
    got = ops.add_rms_norm(residual, delta, weight, 1e-5, offset)
    assert torch.equal(residual, summed)  # the residual is updated in place, rounded as a + b is
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert (got.double() - expected.double()).abs().max().item() <= tolerance * expected.abs().max().item()
    alone = ops.add_rms_norm(summed[3:4].clone(), None, weight, 1e-5, offset)
    assert torch.equal(alone[0], got[3])  # row-invariant


@pytest.mark.parametrize("gelu", [False, True])
def test_gated_act_matches_the_eager_ops(gelu: bool) -> None:
    gate_up = torch.randn(3, 2 * 100, generator=torch.Generator().manual_seed(12))
    gate, up = gate_up.split(100, dim=-1)
    expected = (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up
    assert (ops.gated_act(gate_up, gelu) - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_is_the_python_call_bit_for_bit(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(13)
    weight = torch.randn(96, 64, generator=gen).to(dtype)
    packed = PackedWeight.pack(weight, torch.randn(96, generator=gen).to(dtype))
    assert packed is not None
    x = torch.randn(5, 64, generator=gen).to(dtype)
    for rows in (x[:1], x):
        packed.native = True
        native = packed(rows)
        packed.native = False
        assert torch.equal(native, packed(rows))


def test_model_serves_on_the_fallback_without_native_kernels() -> None:
    """ATTNSERVE_NATIVE_KERNELS=0 (or no compiler): the ATen path runs and gives the same greedy tokens."""
    code = (
        "import torch;from attnserve.model.kernels import cpu_native;"
        "from tests.helpers import tiny_model_greedy_tokens as g;"
        "print(cpu_native.available(), g())"
    )
    outputs = []
    for switch in ("1", "0"):
        env = {**os.environ, "ATTNSERVE_NATIVE_KERNELS": switch}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout.split(maxsplit=1))
    assert outputs[0][0] == "True" and outputs[1][0] == "False"
    assert outputs[0][1] == outputs[1][1]
