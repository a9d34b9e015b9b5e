"""Every prefill chunk of a step in one Triton launch, reading K/V in place through the block tables.

A chunk is a run of consecutive rows of the flattened batch: the new tokens of one sequence,
the last ``query_len`` of its ``seq_len`` positions (so it may continue cached history). Their
K/V are already in the cache. One program handles BLOCK_M query rows of one chunk and one
query head; it walks the context up to the tile's last position, with the causal mask
applied per row, and keeps an online softmax in float32. With a sliding ``WINDOW`` it starts at
the tile's first visible key and masks each row to its own window; with ``SOFTCAP`` the scores
are soft-capped (cap * tanh(score / cap)) before the softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnserve.model.kernels.triton_decode import _tanh

BLOCK_M = 32  # query rows per program
BLOCK_N = 32  # context tokens per inner iteration


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    tables_ptr,
    starts_ptr,
    query_lens_ptr,
    seq_lens_ptr,
    scale,
    q_stride_t,
    q_stride_h,
    out_stride_t,
    out_stride_h,
    kv_stride_block,
    kv_stride_slot,
    kv_stride_head,
    table_stride,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    WINDOW: tl.constexpr,  # 0: the whole context
    SOFTCAP: tl.constexpr,  # 0.0: none
):
    chunk = tl.program_id(0)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    query_len = tl.load(query_lens_ptr + chunk)
    if tile * BLOCK_M >= query_len:  # the grid is sized for the longest chunk
        return
    first_row = tl.load(starts_ptr + chunk)
    seq_len = tl.load(seq_lens_ptr + chunk)
    history = seq_len - query_len

    index = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    row_ok = index < query_len
    positions = history + index  # (M,) each query sees keys 0..position
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q_offsets = (first_row + index)[:, None] * q_stride_t + head * q_stride_h + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # (M, D)

    kv_head = head // GROUP
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    offsets = tl.arange(0, BLOCK_N)
    table = tables_ptr + chunk * table_stride
    end = tl.minimum(seq_len, history + (tile + 1) * BLOCK_M)  # one past the tile's last visible key
    begin = 0
    if WINDOW > 0:  # the tile's first row sees nothing before its window: skip those tiles of keys
        begin = tl.maximum(history + tile * BLOCK_M - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    for start in range(begin, end, BLOCK_N):
        tokens = start + offsets
        token_ok = tokens < end
        block = tl.load(table + tokens // BLOCK_SIZE, mask=token_ok, other=0).to(tl.int64)
        base = block * kv_stride_block + (tokens % BLOCK_SIZE) * kv_stride_slot + kv_head * kv_stride_head  # (N,)
        kv_mask = token_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + base[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # (N, D)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (M, N)
        if SOFTCAP > 0.0:
            scores = SOFTCAP * _tanh(scores / SOFTCAP)
        visible = token_ok[None, :] & (tokens[None, :] <= positions[:, None])
        if WINDOW > 0:
            visible = visible & (tokens[None, :] > positions[:, None] - WINDOW)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # A row may see nothing in a tile before its window starts: a finite stand-in keeps
        # exp(-inf - -inf) from making NaN (its weights are exp(-inf) = 0 all the same).
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(row_max - safe_max)
        p = tl.exp(scores - safe_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        v = tl.load(v_ptr + base[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # (N, D)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max

    out = acc / row_sum[:, None]
    out_offsets = (first_row + index)[:, None] * out_stride_t + head * out_stride_h + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def paged_prefill_attention(
    q: torch.Tensor,  # (T, H, D): the step's flattened batch
    layer_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D), the chunks' K/V already written
    block_tables: torch.Tensor,  # (P, max_blocks) int32, one row per chunk
    query_starts: torch.Tensor,  # (P,) int32: first row of each chunk in q
    query_lens: torch.Tensor,  # (P,) int32
    seq_lens: torch.Tensor,  # (P,) int32: context length after this step
    scale: float,
    *,
    max_query_len: int,
    out: torch.Tensor,  # (T, H, D): the chunks' rows are written, the others left alone
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of every chunk's rows over its sequence's cached context (each row's last
    ``window`` positions), scores soft-capped by ``softcap``, in one launch."""
    _, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = layer_cache.shape
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and layer_cache.stride(-1) == 1, "head_dim must be contiguous"
    keys, values = layer_cache[0], layer_cache[1]  # (num_blocks, block_size, Hkv, D)
    grid = (block_tables.shape[0], num_heads, triton.cdiv(max_query_len, BLOCK_M))
    _prefill_kernel[grid](
        q,
        keys,
        values,
        out,
        block_tables,
        query_starts,
        query_lens,
        seq_lens,
        scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        PRECISION="ieee" if q.dtype == torch.float32 else None,  # fp32 dots in full precision, not TF32
        WINDOW=window or 0,
        SOFTCAP=float(softcap or 0.0),
    )
    return out
