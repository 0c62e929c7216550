"""One entry point for both clustering heads: :func:`fit_head`."""

from __future__ import annotations

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

log = logging.getLogger("gpu_ops.heads")

HEADS: dict[str, tuple[type[HeadConfig], Any]] = {"scan": (ScanConfig, train_scan), "temi": (TemiConfig, train_temi)}


def head_config(algorithm: str, **overrides: Any) -> HeadConfig:
    """The settings of head ``algorithm`` (paper defaults) with ``overrides``; InputError when bad."""
    if algorithm not in HEADS:
        raise choice_error("clustering head", algorithm, tuple(HEADS))
    return HEADS[algorithm][0].from_overrides(**overrides)


def fit_head(algorithm: str, data: Any, k: int, *, seed: int = 0, device: str = "auto",
             labels: np.ndarray | None = None, knn_backend: str = "auto", memory_mb: int | None = None,
             scratch: str | Path | None = None, **overrides: Any) -> HeadResult:
    """Train clustering head ``algorithm`` (``scan`` or ``temi``) on ``data`` and keep its best head.

    Parameters
    ----------
    data : np.ndarray or path
        Features (n, d), or an embedding store directory, streamed batch by batch.
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
        Fields of :class:`~gpu_ops.heads.scan.ScanConfig` / :class:`~gpu_ops.heads.temi.TemiConfig`.
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
    transform = InputTransform.fit(sample, cfg.pca_dim, cfg.l2_normalize, cfg.whiten)
    Z = transformed_rows(source, transform, memory_mb, Path(scratch) if scratch is not None else None)
    t_prep = time.perf_counter()
    neighbors, knn = mine_neighbors(Z, cfg.neighbors, knn_backend)
    t_knn = time.perf_counter()
    rows = Rows(Z, dev)
    log.info("%s: n=%d dim=%d->%d k=%d heads=%d neighbours=%d device=%s knn=%s", algorithm, n, transform.in_dim,
             transform.out_dim, k, cfg.n_heads, cfg.neighbors, dev, knn.backend)
    out = HEADS[algorithm][1](rows, neighbors, int(k), cfg, rng, labels)
    t_end = time.perf_counter()
    temperature = float(getattr(cfg, "student_temp", 1.0))
    return HeadResult(algorithm=algorithm, labels=out["labels"], kept_head=out["kept_head"],
                      objectives=out["objectives"], history=out["history"], model=out["model"], transform=transform,
                      device=str(dev), config=config_dict(cfg), knn_backend=knn.as_dict(),
                      timings={"prepare": round(t_prep - started, 3), "knn": round(t_knn - t_prep, 3),
                               "train": round(t_end - t_knn, 3), "total": round(t_end - started, 3)},
                      metrics=scores(labels, out["labels"]), temperature=temperature)
