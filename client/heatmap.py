"""Render streamed attention rows as a heatmap PNG, labelled with the tokens (matplotlib, optional).

The colour scale is made to be read: the first token usually soaks up most of every row (the
attention sink), which leaves the rest of a linear scale dark; ``hide_sink`` draws that column in
grey and leaves it out of the scale, and ``log_scale`` spans three decades below the largest weight.
The matrix helpers need only the standard library; matplotlib is imported when a PNG is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from attnserve.client.attention import row_weights
from attnserve.v1 import generate_pb2 as pb

Head = str | int  # "mean", "max" or a head index
LOG_DECADES = 3  # the log scale spans this many decades below the largest weight shown
FUTURE_RGBA = (0.93, 0.93, 0.92, 1.0)  # keys after the query (the causal mask): never attended to
SINK_RGBA = (0.67, 0.67, 0.67, 1.0)  # the first-token column while it is left out of the scale


def parse_head(text: str) -> Head:
    """'mean', 'max' or a head index (the CLI's --attention-head)."""
    if text in ("mean", "max"):
        return text
    try:
        head = int(text)
    except ValueError:
        raise ValueError(f"head: 'mean', 'max' or a head index, not {text!r}") from None
    if head < 0:
        raise ValueError(f"head: a head index is >= 0, not {head}")
    return head


def reduce_heads(heads: Sequence[Sequence[float]], head: Head) -> list[float]:
    """One row's weights for ``head``. A row that came reduced by the server (one head) is used as it is."""
    if len(heads) == 1 and not isinstance(head, int):
        return list(heads[0])
    if isinstance(head, int):
        if head >= len(heads):
            raise ValueError(
                f"head {head}: the rows hold {len(heads)} head(s) (ask with head_reduction 'none' for each head)"
            )
        return list(heads[head])
    columns = list(zip(*heads, strict=True))
    return [max(c) for c in columns] if head == "max" else [sum(c) / len(c) for c in columns]


def attention_matrix(
    rows: Sequence[pb.AttentionRow], layer: int, head: Head = "mean"
) -> tuple[list[int], list[list[float]]]:
    """Query positions and their weights for one layer and head, as a square matrix over the key
    positions; keys a query cannot see (later positions) are NaN."""
    chosen = sorted((r for r in rows if r.layer == layer), key=lambda r: r.position)
    width = max((r.context_len for r in chosen), default=0)
    matrix = []
    for r in chosen:
        weights = reduce_heads(row_weights(r), head)
        matrix.append(weights + [math.nan] * (width - r.context_len))
    return [r.position for r in chosen], matrix


def num_heads(rows: Sequence[pb.AttentionRow], layer: int) -> int:
    return max((r.num_heads for r in rows if r.layer == layer), default=0)


def scale_limits(matrix: Sequence[Sequence[float]], *, hide_sink: bool, log_scale: bool) -> tuple[float, float]:
    """(vmin, vmax) of the colour scale: vmax over the visible weights (column 0 left out with
    ``hide_sink``), vmin 0 (linear) or LOG_DECADES decades below vmax (log)."""
    first = 1 if hide_sink else 0
    vmax = max((v for row in matrix for v in row[first:] if not math.isnan(v)), default=0.0)
    vmax = vmax if vmax > 0 else 1.0  # nothing to show (a one-token map with the sink hidden): any scale
    return (vmax / 10**LOG_DECADES if log_scale else 0.0), vmax


def _image(matrix: Sequence[Sequence[float]], *, hide_sink: bool, log_scale: bool) -> tuple[Any, Any]:
    """The RGBA image of one map and the ScalarMappable of its colour bar."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    vmin, vmax = scale_limits(matrix, hide_sink=hide_sink, log_scale=log_scale)
    norm = LogNorm(vmin, vmax, clip=True) if log_scale else Normalize(vmin, vmax, clip=True)
    cmap = matplotlib.colormaps["viridis"]
    values = np.asarray(matrix, dtype=np.float64).reshape(len(matrix), -1)
    rgba = cmap(norm(np.clip(np.nan_to_num(values, nan=vmin), max(vmin, 1e-30), None)))
    rgba[np.isnan(values)] = FUTURE_RGBA
    if hide_sink and values.size:
        rgba[:, 0] = SINK_RGBA
    return rgba, matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)


def _clean(label: str) -> str:
    return repr(label)[1:-1][:12]


def _scale_note(hide_sink: bool, log_scale: bool) -> str:
    notes = [f"log scale, {LOG_DECADES} decades" if log_scale else "linear scale"]
    if hide_sink:
        notes.append("first-token sink left out (grey)")
    return ", ".join(notes)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--attention-png needs matplotlib: pip install 'attnserve-client[plot]'") from None
    return plt


def render_png(
    path: str,
    rows: Sequence[pb.AttentionRow],
    labels: Sequence[str],
    *,
    layer: int,
    head: Head = "mean",
    hide_sink: bool = False,
    log_scale: bool = False,
    grid: bool = False,
) -> None:
    """Write the heatmap of ``layer`` (one ``head``: mean, max or an index), or with ``grid`` a small
    map of every head of the layer, each on its own scale."""
    plt = _pyplot()
    if not any(r.layer == layer for r in rows):
        raise SystemExit(f"no attention rows for layer {layer} came back")
    if grid:
        fig = _grid_figure(plt, rows, layer, hide_sink=hide_sink, log_scale=log_scale)
    else:
        fig = _single_figure(plt, rows, labels, layer, head, hide_sink=hide_sink, log_scale=log_scale)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _single_figure(
    plt: Any, rows: Sequence[pb.AttentionRow], labels: Sequence[str], layer: int, head: Head, **scale: bool
) -> Any:
    positions, matrix = attention_matrix(rows, layer, head)
    width = len(matrix[0])
    fig, ax = plt.subplots(figsize=(max(4.0, min(0.22 * width, 40.0)), max(3.0, min(0.22 * len(matrix), 40.0))))
    rgba, mappable = _image(matrix, **scale)
    ax.imshow(rgba, aspect="auto", interpolation="nearest")
    fig.colorbar(mappable, ax=ax, label="attention weight")
    clean = [_clean(t) for t in labels]
    ax.set_xticks(range(width), [clean[i] if i < len(clean) else str(i) for i in range(width)], rotation=90, fontsize=7)
    ax.set_yticks(range(len(positions)), [clean[p] if p < len(clean) else str(p) for p in positions], fontsize=7)
    ax.set_xlabel("attended token (key)")
    ax.set_ylabel("token being predicted from (query)")
    name = f"head {head}" if isinstance(head, int) else f"{head} over heads"
    ax.set_title(f"attention, layer {layer}, {name} ({_scale_note(**scale)})", fontsize=9)
    fig.tight_layout()
    return fig


def _grid_figure(plt: Any, rows: Sequence[pb.AttentionRow], layer: int, **scale: bool) -> Any:
    count = num_heads(rows, layer)
    if count < 2:
        raise SystemExit("a grid of heads needs every head: the rows came reduced (head_reduction 'none')")
    columns = math.ceil(math.sqrt(count))
    lines = math.ceil(count / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(2.2 * columns, 2.3 * lines + 0.4), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index < count:
            rgba, _ = _image(attention_matrix(rows, layer, index)[1], **scale)  # each head on its own scale
            ax.imshow(rgba, interpolation="nearest")
            ax.set_title(f"head {index}", fontsize=8)
    fig.suptitle(f"attention, layer {layer}, every head ({_scale_note(**scale)})", fontsize=9)
    fig.tight_layout()
    return fig
