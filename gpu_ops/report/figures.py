"""Matplotlib figures saved as PNG (Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_map(xy: np.ndarray, labels: np.ndarray, path: Path, title: str) -> Path:
    """Scatter of the 2-D map ``xy`` (n, 2) coloured by ``labels`` (n,), saved to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 7), dpi=110)
    clusters = np.unique(labels)
    cmap = plt.get_cmap("tab20" if clusters.size > 10 else "tab10")
    size = max(1.0, min(12.0, 12000.0 / max(len(xy), 1)))
    for i, c in enumerate(clusters):
        sel = labels == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=cmap(i % cmap.N), label=str(c), linewidths=0, alpha=0.8)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if clusters.size <= 20:
        ax.legend(markerscale=max(1.0, 6.0 / size), fontsize=7, loc="best", title="cluster")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
