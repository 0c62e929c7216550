"""One entry point for every deep clustering method: :func:`fit_deep`."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gpu_ops.deep._common import (
    degenerate_reasons,
    evaluate_labels,
    images_to_tensor,
    quick_kmeans,
    resolve_device,
    seed_everything,
)
from gpu_ops.deep.autoencoder import DEAD_VARIANCE_RATIO, AutoencoderConfig, data_fingerprint, encode_tensor, train_or_load
from gpu_ops.errors import InputError, choice_error

log = logging.getLogger("gpu_ops.deep")

METHODS = ("n2d", "dkm", "dec", "idec", "ae-kmeans")
Method = Literal["n2d", "dkm", "dec", "idec", "ae-kmeans"]


@dataclass
class DeepConfig:
    """Hyperparameters of :func:`fit_deep`; every field can be overridden by keyword.

    Defaults are tuned for MNIST-sized data on a small CPU and follow the papers otherwise.
    """

    # autoencoder (shared by every method)
    arch: Literal["dense", "conv"] = "conv"
    latent_dim: int = 10
    pretrain_epochs: int | None = None  #: None: chosen from the data size (see :meth:`resolved_epochs`)
    batch_size: int = 64
    lr: float = 1e-3
    #: Random affine augmentation while pretraining (as in DEC-DA); for images only.
    augment: bool = True
    image_size: int | None = None
    hidden: tuple[int, ...] = (500, 500, 2000)
    filters: tuple[int, ...] = (32, 64, 128)
    eval_every: int = 5  #: pretraining epochs between ACC/NMI/ARI logs (only with labels)
    #: Start the autoencoder's sigmoid output at the data's mean (against dead starts).
    output_bias_init: bool = True
    # k-means initialisation of the centroids (DKM, DEC, IDEC) and the ae-kmeans method
    kmeans_n_init: int = 20
    #: Where DKM/DEC/IDEC start: ``"manifold"``, the embedding's mean per cluster of the N2D
    #: partition (UMAP + GMM), or ``"kmeans"`` on the pretrained embedding (as in the papers; on
    #: MNIST test ~0.81 ACC to start from against ~0.95).
    cluster_init: Literal["kmeans", "manifold"] = "manifold"
    # DKM
    dkm_epochs: int = 10
    dkm_lambda: float = 5.0
    dkm_alpha0: float = 1.0
    dkm_lr: float = 1e-4
    #: Epochs before the DKM schedule in which each embedding is pulled to the centroid of its
    #: initial cluster (only with ``cluster_init="manifold"``).
    dkm_warmup_epochs: int = 5
    dkm_augment: bool = False  #: random affine augmentation in the joint phase as well (images only)
    # DEC / IDEC
    dec_max_iter: int | None = None  #: None: see :meth:`resolved_dec_max_iter`
    update_interval: int | None = None  #: iterations between target refreshes; None: half an epoch, at least 140
    #: Stop when fewer than this share of labels changed between target refreshes; None: 0.001,
    #: or 0.005 with augmentation, whose warped batches keep 0.3-0.5 % of labels flipping long
    #: after accuracy has settled (MNIST-test: flat from about 2,500 iterations to the 6,000 cap).
    tol: float | None = None
    #: Consecutive refreshes under ``tol`` before stopping; None: 1, or 2 with augmentation.
    tol_patience: int | None = None
    gamma: float = 0.1
    dec_lr: float | None = None  #: None: DEC SGD 0.01, IDEC Adam 0.001
    dec_augment: bool = True  #: DEC-DA: the KL (and IDEC's reconstruction) on warped images (images only)
    # N2D
    umap_dim: int = 10
    umap_neighbors: int = 20
    umap_min_dist: float = 0.0
    n2d_clusterer: Literal["gmm", "kmeans"] = "gmm"
    gmm_n_init: int = 5  #: GMM restarts, best likelihood kept (one restart often merges two digits)
    #: N2D starts (UMAP + mixture, each with its own seed); the one whose partition has the best
    #: silhouette on its own manifold is kept, and so starts DKM/DEC/IDEC too.
    n2d_starts: int = 3
    # run
    progress: bool = True
    num_threads: int | None = None  #: torch CPU threads for this call (None: leave as is)

    def resolved_epochs(self, n: int) -> int:
        """Pretraining epochs: explicit, else ~400k samples seen (at least 20, at most 200)."""
        if self.pretrain_epochs is not None:
            return int(self.pretrain_epochs)
        return int(min(200, max(20, round(400_000 / max(1, n)))))

    def resolved_dec_max_iter(self, n: int) -> int:
        """DEC/IDEC iteration cap: explicit, else 10 epochs of batches but at least 6,000
        iterations, and at most 40 epochs (small data)."""
        if self.dec_max_iter is not None:
            return int(self.dec_max_iter)
        batches = -(-n // self.batch_size)
        return min(40 * batches, max(6000, 10 * batches))

    def resolved_tol(self, augmented: bool) -> tuple[float, int]:
        """DEC/IDEC stopping rule: (share of labels changed, refreshes in a row under it)."""
        tol = self.tol if self.tol is not None else (0.005 if augmented else 0.001)
        patience = self.tol_patience if self.tol_patience is not None else (2 if augmented else 1)
        return float(tol), int(patience)

    def resolved_update_interval(self, n: int) -> int:
        """DEC/IDEC target refresh period: explicit, else half an epoch of batches (at least 140)."""
        if self.update_interval is not None:
            return int(self.update_interval)
        return max(140, n // (2 * self.batch_size))

    @classmethod
    def from_overrides(cls, base: "DeepConfig | None" = None, **overrides: Any) -> "DeepConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InputError(f"unknown deep clustering option(s) {', '.join(map(repr, unknown))}; "
                             f"expected some of: {', '.join(sorted(names))}")
        for name, value in overrides.items():
            check_field_value(cls, name, value)
        cfg = dataclasses.replace(base or cls(), **overrides)
        for tup in ("hidden", "filters"):
            setattr(cfg, tup, tuple(getattr(cfg, tup)))
        return cfg


def check_field_value(cls: type, name: str, value: object) -> None:
    """Refuse a value of the wrong kind for field ``name`` of dataclass ``cls``, read from its
    annotation (``int``, ``float``, ``bool``, ``tuple[int, ...]``, ``Literal[...]``, ``| None``)."""
    annotation = str(next(f.type for f in fields(cls) if f.name == name))
    if value is None:
        if "None" not in annotation:
            raise InputError(f"deep clustering option {name} must not be None")
        return
    if annotation.startswith("Literal["):
        allowed = tuple(part.strip().strip("'\"") for part in annotation[len("Literal["):-1].split(","))
        if value not in allowed:
            raise InputError(f"deep clustering option {name} must be one of {', '.join(allowed)}; got {value!r}")
        return
    kind = annotation.split("|")[0].strip()
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool),
          "tuple[int, ...]": lambda v: isinstance(v, (list, tuple)) and all(
              isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)}.get(kind)
    if ok is not None and not ok(value):
        what = {"int": "an integer", "float": "a number", "bool": "true or false",
                "tuple[int, ...]": "a list of positive integers"}[kind]
        raise InputError(f"deep clustering option {name} must be {what}; got {value!r}")


@dataclass
class DeepResult:
    """What :func:`fit_deep` returns.

    Attributes
    ----------
    method : str
    labels : np.ndarray
        (n,) int64 cluster ids in [0, n_clusters).
    embedding : np.ndarray
        (n, latent_dim) float32 autoencoder embedding after clustering.
    history : list[dict]
        One record per epoch (pretraining, then the clustering phase: DKM epochs, DEC/IDEC target
        refreshes), with ``phase``, ``epoch``, ``loss`` and ``acc``/``nmi``/``ari`` when labels were given.
        A dead autoencoder start leaves a ``pretrain-restart`` record; each N2D start an ``n2d-start``
        record with its ``seed``, ``silhouette``, ``agreement`` and ``chosen``.
    device : str
        torch device that ran the networks.
    timings : dict[str, float]
        Seconds for ``pretrain``, ``cluster`` and ``total``.
    metrics : dict[str, float]
        Final ACC/NMI/ARI when labels were given, else {}.
    pretrained_from_checkpoint : bool
    manifold : np.ndarray or None
        N2D's UMAP embedding (n, umap_dim).
    centroids : np.ndarray or None
        (k, latent_dim) for k-means based methods.
    info : dict
        Backends used (k-means, UMAP), the resolved config and the checkpoint file.
    model : torch.nn.Module or None
        The trained autoencoder (its encoder fine-tuned by DKM, DEC and IDEC).
    degenerate : list[str]
        Why the result looks degenerate (one cluster holds most images, empty clusters, an
        autoencoder that never learnt to reconstruct), in words; empty when nothing does.
    """

    method: str
    labels: np.ndarray
    embedding: np.ndarray
    history: list[dict[str, Any]]
    device: str
    timings: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)
    pretrained_from_checkpoint: bool = False
    manifold: np.ndarray | None = None
    centroids: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    degenerate: list[str] = field(default_factory=list)


def fit_deep(method: Method, images: np.ndarray, n_clusters: int, *, seed: int = 0, device: str = "auto",
             labels: np.ndarray | None = None, checkpoint_dir: Path | str | None = None, backend: str = "auto",
             config: DeepConfig | None = None, **overrides: Any) -> DeepResult:
    """Cluster ``images`` with a deep method.

    Parameters
    ----------
    method : {"n2d", "dkm", "dec", "idec", "ae-kmeans"}
        ``n2d``: AE -> UMAP -> GMM; ``dkm``: Deep K-Means; ``dec``/``idec``: (Improved) Deep
        Embedded Clustering; ``ae-kmeans``: AE embedding -> k-means (the baseline the others refine).
    images : np.ndarray
        (n, h, w) or (n, h, w, c) uint8 images, or (n, d) float vectors (dense AE only).
    n_clusters : int
    seed : int
        Seeds python, numpy and torch; results on the CPU are repeatable for a seed.
    device : "auto" | "cpu" | "cuda"
    labels : np.ndarray, optional
        Ground truth, used only to log ACC/NMI/ARI per epoch (never for training).
    checkpoint_dir : path, optional
        Where pretrained autoencoders are saved and reused (keyed by data + configuration).
    backend : str
        k-means / UMAP backend for the registry ("auto", "cpu", "gpu" or a backend name).
    config : DeepConfig, optional
        Base configuration; ``**overrides`` replace its fields (e.g. ``arch="conv"``, ``pretrain_epochs=30``).

    Returns
    -------
    DeepResult
    """
    if method not in METHODS:
        raise choice_error("deep clustering method", method, METHODS)
    cfg = DeepConfig.from_overrides(config, **overrides)
    X_np = np.asarray(images)
    n = int(X_np.shape[0]) if X_np.ndim else 0
    if not isinstance(n_clusters, (int, np.integer)) or isinstance(n_clusters, bool) or not 1 <= n_clusters <= n:
        raise InputError(f"n_clusters must be an integer in [1, {n}]; got {n_clusters!r}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise InputError(f"labels must have shape ({n},); got {labels.shape}")
    prev_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    try:
        return _fit(method, X_np, int(n_clusters), cfg, seed, device, labels, checkpoint_dir, backend)
    finally:
        if cfg.num_threads:
            torch.set_num_threads(prev_threads)


def _fit(method: str, X_np: np.ndarray, k: int, cfg: DeepConfig, seed: int, device: str,
         labels: np.ndarray | None, checkpoint_dir: Path | str | None, backend: str) -> DeepResult:
    t_start = time.perf_counter()
    dev = resolve_device(device)
    seed_everything(seed)
    X = images_to_tensor(X_np, cfg.image_size)
    n = X.shape[0]
    arch, augment = cfg.arch, cfg.augment
    if X.ndim == 2 and (arch == "conv" or augment):
        log.info("%s: inputs are vectors of length %d, not images: using the dense autoencoder without augmentation",
                 method, X.shape[1])
        arch, augment = "dense", False
    ae_cfg = AutoencoderConfig(arch=arch, latent_dim=cfg.latent_dim, epochs=cfg.resolved_epochs(n),
                               batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, augment=augment,
                               image_size=cfg.image_size, hidden=cfg.hidden, filters=cfg.filters,
                               output_bias_init=cfg.output_bias_init)
    ae_cfg.validate()
    log.info("%s: n=%d k=%d device=%s arch=%s latent=%d pretrain_epochs=%d", method, n, k, dev, arch,
             cfg.latent_dim, ae_cfg.epochs)
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    model, ae_hist = train_or_load(X, ae_cfg, dev, data_fingerprint(X_np), checkpoint_dir, cfg.progress,
                                    labels, k, cfg.eval_every)
    t_pre = time.perf_counter()
    history: list[dict[str, Any]] = list(ae_hist)
    info: dict[str, Any] = {"config": dataclasses.asdict(cfg), "pretrain_epochs": ae_cfg.epochs,
                            "checkpoint": str(ae_hist.checkpoint) if ae_hist.checkpoint else None}
    if ae_hist.from_checkpoint:
        # what the reused pretraining originally cost, so benchmarks can report end-to-end time
        info["checkpoint_pretrain_s"] = float(sum(h.get("seconds", 0.0) for h in ae_hist.checkpoint_history))
    # After a checkpoint load the RNG state differs from a fresh run; re-seed so the clustering
    # phase is the same either way.
    seed_everything(seed + 1)
    z = encode_tensor(model, X, device=dev)
    centroids = manifold = None
    if method == "n2d":
        pred, manifold, extra = _manifold_partition(z, k, cfg, seed, backend, labels, history, checkpoint_dir)
        info.update(extra)
        history.append({"phase": "n2d", "epoch": 1, "loss": None, **evaluate_labels(labels, pred)})
    else:
        if method != "ae-kmeans" and cfg.cluster_init == "manifold":
            pred, manifold, extra = _manifold_partition(z, k, cfg, seed, backend, labels, history, checkpoint_dir)
            centroids = cluster_means(z, pred, k)
            info["init"] = {"method": "manifold", **extra}
        else:
            from gpu_ops.registry import resolve_backend

            pred, centroids = quick_kmeans(z, k, seed, n_init=cfg.kmeans_n_init, max_iter=100, backend=backend)
            info["init"] = {"method": "kmeans", "kmeans_backend": resolve_backend("kmeans", backend)[1].as_dict()}
        init_metrics = evaluate_labels(labels, pred)
        history.append({"phase": f"{info['init']['method']}-init", "epoch": 0, "loss": None, **init_metrics})
        if init_metrics:
            log.info("%s: %s partition of the pretrained embedding: acc=%.4f nmi=%.4f ari=%.4f", method,
                     info["init"]["method"], init_metrics["acc"], init_metrics["nmi"], init_metrics["ari"])
        if method == "dkm":
            from gpu_ops.deep.dkm import train_dkm

            pred, centroids, hist = train_dkm(model, X, centroids, dev, epochs=cfg.dkm_epochs, batch_size=cfg.batch_size,
                                              lr=cfg.dkm_lr, lam=cfg.dkm_lambda, alpha0=cfg.dkm_alpha0,
                                              augment=cfg.dkm_augment and augment, seed=seed,
                                              init_labels=pred if cfg.cluster_init == "manifold" else None,
                                              warmup_epochs=cfg.dkm_warmup_epochs,
                                              labels=labels, progress=cfg.progress)
            history += hist
        elif method in ("dec", "idec"):
            from gpu_ops.deep.dec import train_dec

            dec_augment = cfg.dec_augment and augment
            tol, patience = cfg.resolved_tol(dec_augment)
            pred, centroids, hist = train_dec(model, X, centroids, dev, improved=method == "idec",
                                              max_iter=cfg.resolved_dec_max_iter(n), update_interval=cfg.resolved_update_interval(n),
                                              tol=tol, patience=patience, batch_size=cfg.batch_size, gamma=cfg.gamma,
                                              lr=cfg.dec_lr, augment=dec_augment, seed=seed, labels=labels, progress=cfg.progress)
            history += hist
        if method != "ae-kmeans":
            z = encode_tensor(model, X, device=dev)
    t_end = time.perf_counter()
    metrics = evaluate_labels(labels, pred)
    if metrics:
        log.info("%s done in %.1fs: acc=%.4f nmi=%.4f ari=%.4f", method, t_end - t_start, metrics["acc"],
                 metrics["nmi"], metrics["ari"])
    degenerate = degenerate_reasons(pred, k, ae_hist.checkpoint_history if ae_hist.from_checkpoint else list(ae_hist),
                                    dead_ratio=DEAD_VARIANCE_RATIO)
    for reason in degenerate:
        log.warning("%s: degenerate result: %s", method, reason)
    return DeepResult(method=method, labels=np.asarray(pred, dtype=np.int64), embedding=z.astype(np.float32),
                      history=history, device=str(dev),
                      timings={"pretrain": t_pre - t_start, "cluster": t_end - t_pre, "total": t_end - t_start},
                      metrics=metrics, pretrained_from_checkpoint=bool(ae_hist.from_checkpoint),
                      manifold=manifold, centroids=centroids, info=info, degenerate=degenerate, model=model)


def _manifold_partition(z: np.ndarray, k: int, cfg: DeepConfig, seed: int, backend: str,
                        labels: np.ndarray | None, history: list[dict[str, Any]],
                        checkpoint_dir: Path | str | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """N2D's partition of the embedding ``z`` (n, d), the best of ``cfg.n2d_starts`` starts by a
    label-free score: (labels (n,), manifold (n, umap_dim), info). Each start is appended to
    ``history`` (``n2d-start`` records; ACC/NMI/ARI only when ``labels`` are given). The starts
    are kept in ``checkpoint_dir`` and reused for the same embedding (``info["starts_reused_from"]``)."""
    from gpu_ops.deep.n2d import reused_manifold_partition

    chosen, starts, reused = reused_manifold_partition(
        z, k, checkpoint_dir, starts=cfg.n2d_starts, seed=seed, n_components=cfg.umap_dim,
        n_neighbors=cfg.umap_neighbors, min_dist=cfg.umap_min_dist, clusterer=cfg.n2d_clusterer, backend=backend,
        gmm_n_init=cfg.gmm_n_init)
    for i, start in enumerate(starts):
        scores = evaluate_labels(labels, start.labels)
        history.append({"phase": "n2d-start", "epoch": i + 1, "loss": None, **start.record(), "chosen": i == chosen,
                        **scores})
        if scores:
            log.info("N2D start %d (seed %d): silhouette %.4f, acc=%.4f nmi=%.4f%s", i + 1, start.seed,
                     start.silhouette, scores["acc"], scores["nmi"], " (kept)" if i == chosen else "")
    best = starts[chosen]
    info = {**best.info, "starts": [s.record() for s in starts], "chosen_start": chosen,
            "start_score": "silhouette on the start's UMAP manifold",
            **({"starts_reused_from": str(reused)} if reused is not None else {})}
    return best.labels, best.manifold, info


def cluster_means(z: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Mean of ``z`` (n, d) per label in [0, k): (k, d) float32; an empty cluster gets a random point."""
    from gpu_ops.cluster.sources import cluster_sums

    z = np.asarray(z, dtype=np.float32)
    sums, counts = cluster_sums(z, labels, k)
    means = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        means[empty] = z[np.random.default_rng(0).choice(len(z), len(empty), replace=False)]
    return means
