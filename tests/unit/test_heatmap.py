"""The CLI heatmap's matrix and colour scale (standard library), and its PNGs (matplotlib)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest

from attnserve.client.heatmap import attention_matrix, parse_head, reduce_heads, render_png, scale_limits
from attnserve.v1 import generate_pb2 as pb


def row(position: int, heads: list[list[float]], *, layer: int = 0) -> pb.AttentionRow:
    flat = [w for h in heads for w in h]
    return pb.AttentionRow(
        layer=layer,
        position=position,
        num_heads=len(heads),
        context_len=len(heads[0]),
        weights=struct.pack(f"<{len(flat)}e", *flat),
        dtype=pb.WEIGHTS_DTYPE_FLOAT16,
    )


# Three query positions, two heads; the first token soaks up most of each row (a sink).
ROWS = [
    row(0, [[1.0], [1.0]]),
    row(1, [[0.75, 0.25], [0.5, 0.5]]),
    row(2, [[0.5, 0.25, 0.25], [0.875, 0.0625, 0.0625]]),
    row(2, [[0.25, 0.25, 0.5], [0.5, 0.25, 0.25]], layer=1),
]


def test_parse_head() -> None:
    assert (parse_head("mean"), parse_head("max"), parse_head("3")) == ("mean", "max", 3)
    for bad in ("first", "-1", ""):
        with pytest.raises(ValueError, match="head"):
            parse_head(bad)


def test_matrix_per_head_mean_and_max_with_the_future_masked() -> None:
    positions, mean = attention_matrix(ROWS, 0)
    assert positions == [0, 1, 2]
    assert mean[1][:2] == [0.625, 0.375] and math.isnan(mean[1][2]) and math.isnan(mean[0][1])
    assert attention_matrix(ROWS, 0, "max")[1][2] == [0.875, 0.25, 0.25]
    assert attention_matrix(ROWS, 0, 1)[1][2] == [0.875, 0.0625, 0.0625]
    assert attention_matrix(ROWS, 1, 0)[0] == [2]  # one layer at a time


def test_rows_reduced_by_the_server_are_used_as_they_are() -> None:
    assert reduce_heads([[0.5, 0.5]], "max") == [0.5, 0.5]
    with pytest.raises(ValueError, match="head_reduction 'none'"):
        reduce_heads([[0.5, 0.5]], 1)
    with pytest.raises(ValueError, match="2 head"):
        reduce_heads([[0.5, 0.5], [1.0, 0.0]], 2)


def test_scale_leaves_out_the_sink_and_spans_three_decades_on_a_log_scale() -> None:
    _, mean = attention_matrix(ROWS, 0)
    assert scale_limits(mean, hide_sink=False, log_scale=False) == (0.0, 1.0)  # row 0 attends only to itself
    assert scale_limits(mean, hide_sink=True, log_scale=False) == (0.0, 0.375)  # the sink no longer sets it
    assert scale_limits(mean, hide_sink=True, log_scale=True) == pytest.approx((0.375e-3, 0.375))
    assert scale_limits([[1.0]], hide_sink=True, log_scale=False) == (0.0, 1.0)  # nothing left: any scale


def test_image_colours_the_sink_grey_and_the_rest_on_the_readable_scale() -> None:
    pytest.importorskip("matplotlib", reason="the heatmap's PNGs need matplotlib (attnserve-client[plot])")
    import matplotlib

    from attnserve.client.heatmap import FUTURE_RGBA, SINK_RGBA, _image

    _, mean = attention_matrix(ROWS, 0)
    rgba, _ = _image(mean, hide_sink=True, log_scale=False)
    viridis = matplotlib.colormaps["viridis"]
    assert all(tuple(rgba[q][0]) == SINK_RGBA for q in range(3))
    assert tuple(rgba[0][1]) == FUTURE_RGBA
    assert tuple(rgba[1][1]) == pytest.approx(viridis(1.0))  # the largest weight past the sink: the top colour
    rgba, _ = _image(mean, hide_sink=True, log_scale=True)
    # 0.15625 is 0.42 of 0.375: log10(0.42) = -0.38 of 3 decades, 0.87 up the scale (linear: 0.42).
    assert tuple(rgba[2][1]) == pytest.approx(viridis((math.log10(0.15625 / 0.375) + 3) / 3), abs=0.01)


@pytest.mark.parametrize(
    "options",
    [{}, {"head": 1, "hide_sink": True}, {"head": "max", "log_scale": True}, {"grid": True, "hide_sink": True}],
    ids=["mean", "head-sink", "max-log", "grid"],
)
def test_render_png(tmp_path: Path, options: dict) -> None:
    pytest.importorskip("matplotlib", reason="the heatmap's PNGs need matplotlib (attnserve-client[plot])")
    path = tmp_path / "attn.png"
    render_png(str(path), ROWS, ["<s>", "Hi", "!"], layer=0, **options)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_png_refuses_what_it_cannot_draw(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the heatmap's PNGs need matplotlib (attnserve-client[plot])")
    with pytest.raises(SystemExit, match="layer 5"):
        render_png(str(tmp_path / "a.png"), ROWS, [], layer=5)
    reduced = [row(0, [[1.0]]), row(1, [[0.5, 0.5]])]
    with pytest.raises(SystemExit, match="grid"):
        render_png(str(tmp_path / "a.png"), reduced, [], layer=0, grid=True)
