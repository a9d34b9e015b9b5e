"""Render streamed attention rows as a heatmap PNG, labelled with the tokens (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence

from attnserve.v1 import generate_pb2 as pb


def attention_matrix(rows: Sequence[pb.AttentionRow], layer: int) -> tuple[list[int], list[list[float]]]:
    """Query positions and their (head-mean) weights, padded to the widest row, for one layer."""
    chosen = sorted((r for r in rows if r.layer == layer), key=lambda r: r.position)
    width = max((r.context_len for r in chosen), default=0)
    matrix = []
    for r in chosen:
        w = list(r.weights)
        heads = max(r.num_heads, 1)
        mean = [sum(w[h * r.context_len + j] for h in range(heads)) / heads for j in range(r.context_len)]
        matrix.append(mean + [0.0] * (width - r.context_len))
    return [r.position for r in chosen], matrix


def render_png(path: str, rows: Sequence[pb.AttentionRow], labels: Sequence[str], *, layer: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--attention-png needs matplotlib: pip install 'attnserve[plot]'") from None
    positions, matrix = attention_matrix(rows, layer)
    if not matrix:
        raise SystemExit(f"no attention rows for layer {layer} came back")
    width = len(matrix[0])
    size = max(4.0, min(0.22 * width, 40.0))
    fig, ax = plt.subplots(figsize=(size, max(3.0, min(0.22 * len(matrix), 40.0))))
    image = ax.imshow(matrix, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="attention weight")
    clean = [repr(t)[1:-1][:12] for t in labels]
    ax.set_xticks(range(width), [clean[i] if i < len(clean) else str(i) for i in range(width)], rotation=90, fontsize=7)
    ax.set_yticks(range(len(positions)), [clean[p] if p < len(clean) else str(p) for p in positions], fontsize=7)
    ax.set_xlabel("attended token (key)")
    ax.set_ylabel("token being predicted from (query)")
    ax.set_title(f"attention, layer {layer}, mean over heads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
