"""One entry point for the clustering heads: :func:`fit_head`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from gpu_ops.errors import InputError, choice_error
from gpu_ops.heads.common import (
    FIT_SAMPLE_ROWS,
    HeadConfig,
    HeadResult,
    InputTransform,
    Rows,
    config_dict,
    mine_neighbors,
    resolve_torch_device,
    scores,
    seeded,
    transformed_rows,
)
from gpu_ops.heads.scan import ScanConfig, train_scan
from gpu_ops.heads.temi import TemiConfig, train_temi
from gpu_ops.heads.turtle import TurtleConfig, train_turtle

log = logging.getLogger("gpu_ops.heads")

HEADS: dict[str, tuple[type[HeadConfig], Any]] = {"scan": (ScanConfig, train_scan), "temi": (TemiConfig, train_temi),
                                                   "turtle": (TurtleConfig, train_turtle)}


def head_config(algorithm: str, **overrides: Any) -> HeadConfig:
    """The settings of head ``algorithm`` (paper defaults) with ``overrides``; InputError when bad."""
    if algorithm not in HEADS:
        raise choice_error("clustering head", algorithm, tuple(HEADS))
    return HEADS[algorithm][0].from_overrides(**overrides)


def fit_head(algorithm: str, data: Any, k: int, *, seed: int = 0, device: str = "auto",
             labels: np.ndarray | None = None, knn_backend: str = "auto", memory_mb: int | None = None,
             scratch: str | Path | None = None, **overrides: Any) -> HeadResult:
    """Train clustering head ``algorithm`` (``scan``, ``temi`` or ``turtle``) on ``data`` and keep its best head.

    Parameters
    ----------
    data : np.ndarray or path
        Features (n, d), or an embedding store directory, streamed batch by batch. ``turtle``
        treats each backbone of a store that concatenates several as its own representation space.
    k : int
        Number of clusters.
    seed : int
        Seeds the transform's sample, the initial weights and the batches: a seed repeats on the CPU.
    device : "auto" | "cpu" | "cuda"
    labels : np.ndarray, optional
        Ground truth, only for the per-epoch ACC/NMI/ARI in the history.
    knn_backend : str
        Backend setting of the ``knn`` op that mines the neighbours (FAISS/cuML on a GPU when present).
    memory_mb : int, optional
        Keep the transformed rows in memory only when they take at most half of this; else they
        are memory-mapped in ``scratch``.
    **overrides
        Fields of :class:`~gpu_ops.heads.scan.ScanConfig`, :class:`~gpu_ops.heads.temi.TemiConfig` or
        :class:`~gpu_ops.heads.turtle.TurtleConfig`.
    """
    from gpu_ops.cluster.sources import as_source

    cfg = head_config(algorithm, **overrides)
    started = time.perf_counter()
    source = as_source(str(data) if isinstance(data, Path) else data)
    n = source.count()
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= n:
        raise InputError(f"{algorithm}: k must be an integer from 2 to the number of rows ({n}); got {k!r}")
    if labels is not None and np.asarray(labels).shape != (n,):
        raise InputError(f"labels must have shape ({n},); got {np.asarray(labels).shape}")
    dev = resolve_torch_device(device)
    rng = seeded(seed)
    sample = source.subset(min(n, FIT_SAMPLE_ROWS), seed)
    extra: dict[str, Any] = {}
    if isinstance(cfg, TurtleConfig):
        spaces = feature_spaces(data, source.dim())
        widths = [min(b - a, cfg.pca_dim or b - a) for a, b in spaces]
        gain = cfg.row_norm if cfg.row_norm is not None else float(np.sqrt(np.mean(widths)))
        transform = InputTransform.fit_spaces(sample, spaces, cfg.pca_dim, gain)
        extra["spaces"] = transform.spaces
    else:
        transform = InputTransform.fit(sample, cfg.pca_dim, cfg.l2_normalize, cfg.whiten)
    Z = transformed_rows(source, transform, memory_mb, Path(scratch) if scratch is not None else None)
    t_prep = time.perf_counter()
    neighbors, knn = mine_neighbors(Z, cfg.neighbors, knn_backend) if cfg.neighbors else (None, None)
    t_knn = time.perf_counter()
    rows = Rows(Z, dev)
    log.info("%s: n=%d dim=%d->%d k=%d heads=%d neighbours=%d spaces=%d device=%s knn=%s", algorithm, n,
             transform.in_dim, transform.out_dim, k, cfg.n_heads, cfg.neighbors, len(transform.spaces), dev,
             knn.backend if knn is not None else "-")
    out = HEADS[algorithm][1](rows, neighbors, int(k), cfg, rng, labels, **extra)
    t_end = time.perf_counter()
    temperature = float(getattr(cfg, "student_temp", 1.0))
    return HeadResult(algorithm=algorithm, labels=out["labels"], kept_head=out["kept_head"],
                      objectives=out["objectives"], history=out["history"], model=out["model"], transform=transform,
                      device=str(dev), config=config_dict(cfg), knn_backend=knn.as_dict() if knn is not None else {},
                      timings={"prepare": round(t_prep - started, 3), "knn": round(t_knn - t_prep, 3),
                               "train": round(t_end - t_knn, 3), "total": round(t_end - started, 3)},
                      metrics=scores(labels, out["labels"]), temperature=temperature,
                      mean_of_heads=isinstance(cfg, TurtleConfig) or bool(out.get("mean_of_heads")))


def feature_spaces(data: Any, dim: int) -> list[tuple[int, int]]:
    """The representation spaces of ``data`` as column ranges: the backbones of a store whose
    rows concatenate several (its ``backbones`` metadata), else one space of all ``dim`` columns."""
    if not isinstance(data, (str, Path)):
        return [(0, dim)]
    from gpu_ops.store import read_manifest

    manifest, _ = read_manifest(Path(data))
    raw = ((manifest or {}).get("metadata") or {}).get("backbones")
    if not raw:
        return [(0, dim)]
    try:
        spaces = [(int(b["start"]), int(b["stop"])) for b in (json.loads(raw) if isinstance(raw, str) else raw)]
    except (TypeError, ValueError, KeyError) as exc:
        raise InputError(f"{data}: the store's backbones metadata is not a list of start/stop ranges ({exc})") from None
    if [a for a, _ in spaces] != [0] + [b for _, b in spaces[:-1]] or spaces[-1][1] != dim \
            or any(b <= a for a, b in spaces):
        raise InputError(f"{data}: the store's backbones {spaces} do not split its {dim} columns into ranges")
    return spaces
