"""Matplotlib figures saved as PNG, drawn off-screen (Agg canvas; no display, no pyplot state).

Each function draws data computed elsewhere (:mod:`gpu_ops.report.data`) and returns what it
drew where that is worth checking (thumbnail positions), else the path it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _figure(figsize: tuple[float, float], dpi: int = 110):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi)


def _tight_layout(fig: Any, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    """``fig.tight_layout()`` without leaving a layout engine on the figure: with one, ``savefig``
    draws every artist once more before drawing it for real (hundreds of thumbnails, twice)."""
    from matplotlib.layout_engine import TightLayoutEngine

    TightLayoutEngine(rect=rect).execute(fig)


def _cmap(n: int):
    import matplotlib

    return matplotlib.colormaps["tab20" if n > 10 else "tab10"]


def label_colors(ids: Sequence[int]) -> dict[int, tuple[float, float, float, float]]:
    """A stable colour per id (sorted order, tab10 up to 10 ids, tab20 beyond; cycles after 20)."""
    ids = sorted({int(i) for i in ids})
    cmap = _cmap(len(ids))
    return {c: cmap(i % cmap.N) for i, c in enumerate(ids)}


def _scatter(ax: Any, xy: np.ndarray, labels: np.ndarray, names: dict[int, str] | None,
             legend_title: str, alpha: float = 0.8, size: float | None = None) -> float:
    colors = label_colors(np.unique(labels).tolist())
    size = size if size is not None else max(1.0, min(12.0, 12000.0 / max(len(xy), 1)))
    for c, color in colors.items():
        sel = labels == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=color, label=(names or {}).get(c, str(c)),
                   linewidths=0, alpha=alpha)
    ax.set_xticks([])
    ax.set_yticks([])
    if 0 < len(colors) <= 20:
        ax.legend(markerscale=max(1.0, 6.0 / size), fontsize=7, loc="best", title=legend_title)
    return size


def scatter_map(xy: np.ndarray, labels: np.ndarray, path: Path, title: str, *,
                names: dict[int, str] | None = None, legend_title: str = "cluster") -> Path:
    """Scatter of the 2-D map ``xy`` (n, 2) coloured by ``labels`` (n,), saved to ``path``.

    ``names`` maps a label to the text shown in the legend (class names); ``legend_title`` heads it.
    """
    fig = _figure((7, 7))
    ax = fig.subplots()
    _scatter(ax, np.asarray(xy), np.asarray(labels), names, legend_title)
    ax.set_title(title)
    _tight_layout(fig)
    fig.savefig(path)
    return Path(path)


def thumbnail_map(xy: np.ndarray, labels: np.ndarray, placements: Sequence[tuple[str, float, float]],
                  tiles: dict[str, np.ndarray], path: Path, title: str,
                  frame_labels: dict[str, int] | None = None, tile_px: float = 28.0) -> list[tuple[str, float, float]]:
    """The map (faint points coloured by ``labels``) with image thumbnails drawn at ``placements``.

    ``tiles`` maps image_id -> (s, s, 3) uint8; placements without a tile are skipped. Each
    thumbnail's frame takes its cluster's colour (``frame_labels``: image_id -> cluster). Returns
    the (image_id, x, y) anchors actually drawn, read back from the artists.
    """
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    dpi = 100
    fig = _figure((12, 12), dpi=dpi)
    ax = fig.subplots()
    labels = np.asarray(labels)
    _scatter(ax, np.asarray(xy), labels, None, "cluster", alpha=0.5,
             size=max(1.0, min(10.0, 10000.0 / max(len(xy), 1))))
    ax.set_title(title)
    _tight_layout(fig)  # before the thumbnails: they sit inside the axes, and measuring each costs
    colors = label_colors(np.unique(labels).tolist())
    drawn: list[tuple[str, float, float]] = []
    for image_id, x, y in placements:
        tile = tiles.get(image_id)
        if tile is None:
            continue
        image = OffsetImage(tile, zoom=tile_px / tile.shape[0], resample=False)
        image.image.axes = ax
        edge = colors.get(int(frame_labels[image_id]), "black") if frame_labels and image_id in frame_labels else "black"
        box = AnnotationBbox(image, (x, y), xycoords="data", frameon=True, pad=0.05,
                             bboxprops={"edgecolor": edge, "linewidth": 1.2})
        box.set_gid(image_id)
        ax.add_artist(box)
        drawn.append((image_id, float(box.xy[0]), float(box.xy[1])))
    fig.savefig(path)
    return drawn


def save_image(array: np.ndarray, path: Path) -> Path:
    """Write an (H, W, 3) uint8 array as PNG."""
    from PIL import Image

    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, optimize=True)
    return Path(path)


def dendrogram_figure(Z: np.ndarray, k: int, cut: float, path: Path, title: str, p: int = 40) -> Path:
    """scipy dendrogram of linkage ``Z`` ((n-1, 4)), truncated to its last ``p`` merges when
    n > p, coloured below the height ``cut`` that yields ``k`` clusters (dashed line)."""
    from scipy.cluster.hierarchy import dendrogram, set_link_color_palette

    n = Z.shape[0] + 1
    fig = _figure((10, 4.5))
    ax = fig.subplots()
    truncate = n > p
    # scipy's default palette includes grey, which reads as "above the cut": use tab10 without it
    set_link_color_palette(["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                            "#bcbd22", "#17becf"])
    try:
        dendrogram(Z, ax=ax, truncate_mode="lastp" if truncate else None, p=p, color_threshold=cut,
                   above_threshold_color="#555555", show_leaf_counts=True, leaf_rotation=90, leaf_font_size=7,
                   no_labels=False)
    finally:
        set_link_color_palette(None)
    ax.axhline(cut, color="black", linestyle="--", linewidth=0.8)
    ax.text(ax.get_xlim()[1], cut, f" k={k}", va="bottom", ha="right", fontsize=8)
    ax.set_ylabel("merge distance")
    ax.set_xlabel(f"leaves: the last {p} merges (counts in parentheses)" if truncate else "images")
    ax.set_title(title)
    _tight_layout(fig)
    fig.savefig(path)
    return Path(path)


def k_selection_figure(sel: dict[str, Any], path: Path) -> Path:
    """The curves of ``k=auto`` side by side: elbow (inertia over k), silhouette and, when the
    selection has it, the modularity that chose k; the elbow and the chosen k marked."""
    ks = np.asarray(sel["ks"])
    curves = [("elbow: k-means inertia", sel["inertia"], "tab:blue"),
              ("silhouette (sampled)", sel["silhouette"], "tab:green")]
    if sel.get("modularity"):
        curves.append(("modularity of merged micro-clusters", sel["modularity"], "tab:purple"))
    fig = _figure((5 * len(curves), 4))
    for ax, (title, values, color) in zip(np.atleast_1d(fig.subplots(1, len(curves))), curves):
        ax.plot(ks, values, marker="o", markersize=3, color=color)
        ax.set_title(title)
        ax.set_xlabel("k")
        if sel.get("elbow_k") is not None:
            ax.axvline(sel["elbow_k"], color="tab:orange", linestyle=":", label=f"elbow k={sel['elbow_k']}")
        if sel.get("chosen_k") is not None:
            ax.axvline(sel["chosen_k"], color="tab:red", linestyle="--", label=f"chosen k={sel['chosen_k']}")
        ax.legend(fontsize=8)
    _tight_layout(fig)
    fig.savefig(path)
    return Path(path)


def perplexity_sweep_figure(maps: np.ndarray, titles: Sequence[str], labels: np.ndarray | None, path: Path,
                            title: str, names: dict[int, str] | None = None) -> Path:
    """2-D maps ``maps`` (p, n, 2) side by side, at most four to a row, each under its title.

    Points are coloured by ``labels`` (n,) (-1: unlabelled, grey; the legend uses ``names``), or
    all one colour when None.
    """
    maps = np.asarray(maps)
    cols = min(4, len(maps))
    rows = -(-len(maps) // cols)
    colors: dict[int, tuple[float, float, float, float]] = {}
    point_colors: Any = "tab:blue"
    if labels is not None:
        labels = np.asarray(labels)
        colors = label_colors(np.unique(labels[labels >= 0]).tolist())
        point_colors = np.array([colors.get(int(c), (0.7, 0.7, 0.7, 1.0)) for c in labels])
    legend_in = 0.3 * -(-len(colors) // 10) if 0 < len(colors) <= 20 else 0.0  # inches for the legend rows
    fig = _figure((3.6 * cols, 3.6 * rows + 0.4 + legend_in))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    size = max(0.5, min(8.0, 8000.0 / max(maps.shape[1], 1)))
    for ax, xy, sub in zip(axes, maps, titles):
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c=point_colors, linewidths=0)
        ax.set_title(sub, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(maps):]:
        ax.set_axis_off()
    if legend_in:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", linestyle="", color=color, label=(names or {}).get(c, str(c)))
                   for c, color in colors.items()]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 10), fontsize=7)
    fig.suptitle(title)
    _tight_layout(fig, rect=(0, legend_in / fig.get_figheight(), 1, 1))
    fig.savefig(path)
    return Path(path)


#: Rows or columns of a confusion matrix beyond which its figure stops growing and drops its tick labels.
CONFUSION_TICKS = 60


def confusion_figure(matrix: np.ndarray, classes: np.ndarray, clusters: np.ndarray, path: Path, title: str,
                     class_names: Sequence[str] | None = None) -> Path:
    """Heatmap of a (n_classes, n_clusters) confusion matrix after Hungarian mapping, counts written in."""
    n_cls, n_clu = matrix.shape
    # one tick per row and column up to CONFUSION_TICKS; beyond, a fixed 10 x 9 in heatmap without
    # labels (a 1000 x 1000 matrix drawn at 0.45 in per column took 20 GB of pixels)
    large = max(n_cls, n_clu) > CONFUSION_TICKS
    fig = _figure((10.0, 9.0) if large else (max(5.0, 0.45 * n_clu + 2.5), max(4.0, 0.4 * n_cls + 1.8)))
    ax = fig.subplots()
    im = ax.imshow(matrix, cmap="Blues", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04)
    names = [class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c) for c in classes]
    if n_cls <= CONFUSION_TICKS:
        ax.set_yticks(range(n_cls), names, fontsize=8)
    if n_clu <= CONFUSION_TICKS:
        ax.set_xticks(range(n_clu), [str(c) for c in clusters], fontsize=8)
    ax.set_xlabel("cluster (ordered by matched class)")
    ax.set_ylabel("true class")
    ax.set_title(title)
    _tight_layout(fig)  # before the counts: they sit inside the axes, and measuring each costs
    if n_cls * n_clu <= 900:
        top = matrix.max() if matrix.size else 0
        for i in range(n_cls):
            for j in range(n_clu):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=6,
                            color="white" if matrix[i, j] > 0.6 * top else "black")
    fig.savefig(path)
    return Path(path)


def timings_figure(rows: Sequence[tuple[str, float]], path: Path) -> Path:
    """Horizontal bars: seconds per stage."""
    fig = _figure((7, 0.35 * len(rows) + 1.2))
    ax = fig.subplots()
    names = [r[0] for r in rows][::-1]
    secs = [r[1] for r in rows][::-1]
    ax.barh(names, secs, color="tab:blue")
    for i, s in enumerate(secs):
        ax.text(s, i, f" {s:.2f} s", va="center", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(secs + [1e-3]) * 1.25)
    ax.set_title("time per stage")
    _tight_layout(fig)
    fig.savefig(path)
    return Path(path)
