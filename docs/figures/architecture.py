"""Draws docs/figures/architecture.svg (``make figures``): topics, the worker, the trainer and where state lives."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

TOPIC, PROCESS, STORE = "#e8f0fe", "#fde7c8", "#e6f4ea"


def box(ax, x, y, w, h, text, color, size=9):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="#555"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)


def arrow(ax, start, end, text="", dashed=False):
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "color": "#333", "lw": 1.2,
                                                      "linestyle": "--" if dashed else "-"})
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, text, ha="center", fontsize=7.5, color="#333")


def draw(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 4.6))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 4.6)
    ax.axis("off")
    box(ax, 0.1, 3.2, 1.9, 0.7, "clicks\n(view / click / cart)", TOPIC)
    box(ax, 0.1, 2.2, 1.9, 0.7, "purchases", TOPIC)
    ax.text(1.05, 4.1, "input topics, keyed by user id", ha="center", fontsize=8, style="italic")
    box(ax, 3.3, 2.3, 2.6, 1.6, "gruflow worker(s)\nmicro-batches: decode,\nGRU step per event,\nbatched top-K,"
        "\nprequential HR/MRR", PROCESS)
    box(ax, 3.5, 0.9, 2.2, 0.8, "per-user state\nRocksDB (faust Table)", STORE)
    box(ax, 3.3, 0.05, 2.6, 0.55, "<app>-user-state-changelog", TOPIC, 8)
    box(ax, 7.3, 3.4, 2.5, 0.6, "recommendations\n{user_id, items[K], ...}", TOPIC, 8)
    box(ax, 7.3, 2.5, 2.5, 0.6, "dlq (bytes + reason)", TOPIC, 8)
    box(ax, 7.3, 1.1, 2.5, 0.8, "gruflow trainer\nfine-tune, guardrail,\ngrow the vocabulary", PROCESS, 8)
    box(ax, 3.3, 4.05, 2.6, 0.45, "models (chunked checkpoints)", TOPIC, 8)
    arrow(ax, (2.0, 3.55), (3.3, 3.3))
    arrow(ax, (2.0, 2.55), (3.3, 2.8))
    arrow(ax, (5.9, 3.5), (7.3, 3.7))
    arrow(ax, (5.9, 2.9), (7.3, 2.8), "bad input")
    arrow(ax, (4.6, 2.3), (4.6, 1.7))
    ax.text(4.7, 1.95, "read / write", fontsize=7.5, color="#333")
    arrow(ax, (4.6, 0.9), (4.6, 0.6))
    arrow(ax, (2.0, 2.3), (7.3, 1.3), dashed=True)
    ax.text(2.3, 1.85, "same input topics", fontsize=7.5, color="#333", rotation=-10)
    arrow(ax, (7.3, 1.9), (5.9, 4.2))
    ax.text(6.75, 3.15, "promoted\nversions", fontsize=7.5, color="#333", ha="center")
    arrow(ax, (4.6, 4.05), (4.6, 3.9), "hot swap")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    draw(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("architecture.svg"))
