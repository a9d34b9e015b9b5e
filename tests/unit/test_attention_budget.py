"""What attention rows cost, known before any work: whole rows grow with the context, top-k rows do not."""

from __future__ import annotations

from attnserve.server.api.attention_budget import AttentionShape
from attnserve.server.engine.request import AttentionOptions, HeadReduction, WeightsDtype


def shape(prompt: int, **options: object) -> AttentionShape:
    asked = AttentionOptions(layers=(0, 1), reduction=HeadReduction.NONE, include_prompt=True, **options)  # type: ignore[arg-type]
    return AttentionShape.of(asked, num_prompt_tokens=prompt, max_tokens=16, num_completions=1, num_heads=9)


def test_whole_rows_grow_with_the_context_and_top_k_rows_do_not() -> None:
    # 2 layers x 9 heads x (16 generated rows over 4096..4111 positions + 4095 prompt rows over 1..4095).
    whole = shape(4096, dtype=WeightsDtype.FLOAT16)
    assert whole.num_bytes == 2 * 9 * (16 * 4096 + 16 * 15 // 2 + 4095 * 4096 // 2) * 2
    # top-k: k weights (2 bytes) and k int32 positions per head row, whatever the context.
    top = shape(4096, dtype=WeightsDtype.FLOAT16, top_k=8)
    assert top.num_bytes == 2 * 9 * (16 + 4095) * 8 * (2 + 4)
    assert top.num_bytes * 80 < whole.num_bytes  # 86x smaller at 4,096
    # Twice the prompt, twice the rows: linear in the rows, not quadratic in the context.
    assert shape(8192, dtype=WeightsDtype.FLOAT16, top_k=8).num_bytes < 2.01 * top.num_bytes
    assert "top 8 per row" in top.describe()


def test_span_sums_cost_one_weight_per_span_per_head_row() -> None:
    spans = shape(4096, dtype=WeightsDtype.FLOAT32, spans=((0, 100), (100, 4096)))
    assert spans.num_bytes == 2 * 9 * (16 + 4095) * 2 * 4
