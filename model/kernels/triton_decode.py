"""Paged decode attention for CUDA: a Triton kernel that reads K/V in place through the block table.

One program handles one sequence, one KV head and one split of the context. The G query
heads that share the KV head are the rows of a small matrix, so each K/V row is loaded once
for all of them (GQA). Long contexts are cut into splits that run in parallel
(flash-decoding); a small second kernel merges the splits' partial softmax sums. Scores,
softmax and the weighted sum accumulate in float32. With a sliding ``WINDOW`` a split starts no
earlier than the window (older blocks are never read); with ``SOFTCAP`` the scores are
soft-capped (cap * tanh(score / cap), Gemma 2) before the softmax.

Every shape the kernels see is fixed by the step's buffers (batch rows, block-table width),
so a CUDA graph can capture a call. Rows with ``seq_len == 0`` (bucket padding) produce zeros.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # context tokens per inner iteration
MIN_SPLIT_TOKENS = 256  # a split shorter than this costs more to merge than it saves


@triton.jit
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    acc_ptr,
    max_ptr,
    sum_ptr,
    scale,
    q_stride_b,
    q_stride_h,
    kv_stride_block,
    kv_stride_slot,
    kv_stride_head,
    table_stride,
    tokens_per_split,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
    WINDOW: tl.constexpr,  # 0: the whole context
    SOFTCAP: tl.constexpr,  # 0.0: none
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    seq_len = tl.load(lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    if WINDOW > 0:  # the query (position seq_len - 1) sees the last WINDOW positions only
        start = tl.maximum(start, seq_len - WINDOW)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    q_offsets = seq * q_stride_b + heads[:, None] * q_stride_h + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # (G, D)

    row_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    offsets = tl.arange(0, BLOCK_N)
    table = tables_ptr + seq * table_stride
    for tile in range(start, end, BLOCK_N):
        tokens = tile + offsets
        token_ok = tokens < end
        block = tl.load(table + tokens // BLOCK_SIZE, mask=token_ok, other=0).to(tl.int64)
        base = block * kv_stride_block + (tokens % BLOCK_SIZE) * kv_stride_slot + kv_head * kv_stride_head  # (N,)
        kv_mask = token_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + base[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # (N, D)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (G, N)
        if SOFTCAP > 0.0:
            scores = SOFTCAP * _tanh(scores / SOFTCAP)
        scores = tl.where(token_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.exp(row_max - new_max)
        p = tl.exp(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        v = tl.load(v_ptr + base[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # (N, D)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max

    out_rows = (seq * num_heads + heads) * NUM_SPLITS + split  # (G,) rows of the (B, H, S) partials
    tl.store(max_ptr + out_rows, row_max, mask=row_ok)
    tl.store(sum_ptr + out_rows, row_sum, mask=row_ok)
    tl.store(acc_ptr + out_rows[:, None] * DIM_PAD + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _tanh(x):
    """tanh from the sigmoid (in every Triton version and the interpreter): 2 * sigmoid(2x) - 1."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _merge_kernel(
    acc_ptr,
    max_ptr,
    sum_ptr,
    out_ptr,
    out_stride_b,
    out_stride_h,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    dims = tl.arange(0, DIM_PAD)
    split_max = tl.load(max_ptr + row * NUM_SPLITS + splits, mask=split_ok, other=float("-inf"))
    split_sum = tl.load(sum_ptr + row * NUM_SPLITS + splits, mask=split_ok, other=0.0)
    # Empty splits weigh exp(-inf) = 0; the floor keeps padded rows (every split empty) free of inf - inf.
    overall = tl.maximum(tl.max(split_max, axis=0), -3.0e38)
    weight = tl.exp(split_max - overall)  # (S,)
    total = tl.sum(weight * split_sum, axis=0)
    acc_offsets = (row * NUM_SPLITS + splits)[:, None] * DIM_PAD + dims[None, :]
    acc = tl.load(acc_ptr + acc_offsets, mask=split_ok[:, None], other=0.0)  # (S, D)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)  # (D,)
    out_offsets = seq * out_stride_b + head * out_stride_h + dims
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits_for(batch_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per sequence: enough programs to fill the GPU twice over, none shorter than MIN_SPLIT_TOKENS.

    Depends only on static shapes (batch rows, block-table width), so a captured graph keeps it.
    """
    programs = 2 * _num_sms(device.index or 0) if device.type == "cuda" else 4
    wanted = triton.cdiv(programs, max(batch_kv_heads, 1))
    return max(1, min(wanted, triton.cdiv(max_context, MIN_SPLIT_TOKENS)))


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 dots in full precision (TF32 would cost ~1e-3 relative error); other dtypes use the default."""
    return "ieee" if dtype == torch.float32 else None


def split_paged_decode_attention(
    q: torch.Tensor,  # (B, H, D)
    layer_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    seq_lens: torch.Tensor,  # (B,) int32; 0 = padding row
    scale: float,
    *,
    num_splits: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its cached context (its last ``window`` positions,
    scores soft-capped by ``softcap``), each context split in up to ``num_splits`` parts (a program
    each) and merged. Returns (B, H, D) in q's dtype.

    The Triton launcher behind model.attention.paged_decode_attention (which picks the device's path).
    """
    batch, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = layer_cache.shape
    group = num_heads // num_kv_heads
    assert q.stride(-1) == 1 and layer_cache.stride(-1) == 1, "head_dim must be contiguous"
    max_context = block_tables.shape[1] * block_size
    splits = num_splits or num_splits_for(batch * num_kv_heads, max_context, q.device)
    tokens_per_split = triton.cdiv(triton.cdiv(max_context, splits), BLOCK_N) * BLOCK_N
    dim_pad = triton.next_power_of_2(head_dim)

    partial_acc = torch.empty(batch, num_heads, splits, dim_pad, dtype=torch.float32, device=q.device)
    partial_max = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
    partial_sum = torch.empty_like(partial_max)
    keys, values = layer_cache[0], layer_cache[1]  # (num_blocks, block_size, Hkv, D)
    _split_kernel[(batch, num_kv_heads, splits)](
        q,
        keys,
        values,
        block_tables,
        seq_lens,
        partial_acc,
        partial_max,
        partial_sum,
        scale,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        block_tables.stride(0),
        tokens_per_split,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),  # tl.dot needs at least 16 rows
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_N=BLOCK_N,
        NUM_SPLITS=splits,
        PRECISION=dot_precision(q.dtype),
        WINDOW=window or 0,
        SOFTCAP=float(softcap or 0.0),
    )
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    _merge_kernel[(batch, num_heads)](
        partial_acc,
        partial_max,
        partial_sum,
        out,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        NUM_SPLITS=splits,
        SPLITS_PAD=triton.next_power_of_2(splits),
    )
    return out
