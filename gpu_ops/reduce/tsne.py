"""t-SNE backends: cuML (2-D only) and openTSNE, and a perplexity sweep (several maps, one figure).

Three (or more) components run on openTSNE (Barnes-Hut): the registry sends ``n_components != 2``
away from cuML and logs why.
"""

from __future__ import annotations

import numpy as np

from gpu_ops._validation import as_float32_matrix
from gpu_ops.errors import InputError
from gpu_ops.reduce.pca import to_host
from gpu_ops.registry import register_backend, requires


def check_perplexity(perplexity: float, n_samples: int) -> None:
    """t-SNE needs more than 3 * perplexity samples."""
    if perplexity <= 0:
        raise InputError(f"perplexity must be positive; got {perplexity!r}")
    if n_samples <= 3 * perplexity:
        raise InputError(f"t-SNE with perplexity={perplexity} needs more than {int(3 * perplexity)} samples; got {n_samples}")


class OpenTSNE:
    """openTSNE (Barnes-Hut below 10 000 points, FFT interpolation above; multi-threaded);
    ``embedding_`` (n, n_components)."""

    def __init__(self, n_components: int = 2, perplexity: float = 30.0, seed: int = 0, n_jobs: int = -1) -> None:
        self.n_components = n_components
        self.perplexity = perplexity
        self.seed = seed
        self.n_jobs = n_jobs

    def fit(self, X: np.ndarray) -> "OpenTSNE":
        from openTSNE import TSNE

        X = as_float32_matrix(X)
        check_perplexity(self.perplexity, X.shape[0])
        # openTSNE's "auto": Barnes-Hut below 10 000 points, FFT interpolation above (FFT's grid
        # has a fixed cost: 400 digits took 22-30 s with FFT, 1.6 s with Barnes-Hut). FFT only
        # exists for 1-2 components, so 3-D is always Barnes-Hut.
        method = "auto" if int(self.n_components) <= 2 else "bh"
        tsne = TSNE(
            n_components=int(self.n_components),
            perplexity=float(self.perplexity),
            random_state=int(self.seed),
            n_jobs=int(self.n_jobs),
            negative_gradient_method=method,
            verbose=False,
        )
        self.embedding_ = np.asarray(tsne.fit(X), dtype=np.float32)
        return self

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).embedding_


class CumlTSNE:
    """cuML t-SNE on the GPU (FFT-accelerated gradients, PCA initialisation); 2-D only.

    Parameters
    ----------
    n_components : int
        Must be 2 (cuML's limit); the registry sends other values to openTSNE, logging why.
    perplexity : float
    seed : int
        cuML ``random_state``: repeated FFT runs on the same input give the same map.

    Attributes
    ----------
    embedding_ : np.ndarray of shape (n, 2), float32
    """

    def __init__(self, n_components: int = 2, perplexity: float = 30.0, seed: int = 0) -> None:
        self.n_components = n_components
        self.perplexity = perplexity
        self.seed = seed

    def fit(self, X: np.ndarray) -> "CumlTSNE":
        """Embed ``X`` of shape (n, d)."""
        problem = _cuml_tsne_unsupported({"n_components": self.n_components})
        if problem is not None:
            raise InputError(problem)
        X = as_float32_matrix(X)
        check_perplexity(self.perplexity, X.shape[0])
        from cuml.manifold import TSNE

        # PCA initialisation, like openTSNE's default, keeps the global layout comparable.
        tsne = TSNE(
            n_components=2,
            perplexity=float(self.perplexity),
            random_state=int(self.seed),
            method="fft",
            init="pca",
            output_type="numpy",
        )
        self.embedding_ = to_host(tsne.fit_transform(X)).astype(np.float32)
        return self

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).embedding_


def _cuml_tsne_unsupported(params: dict[str, object]) -> str | None:
    n_components = int(params.get("n_components", 2))  # type: ignore[arg-type]
    if n_components != 2:
        return f"cuML TSNE supports 2 components only; n_components={n_components} was requested"
    return None


@register_backend("tsne", "cuml", kind="gpu", priority=0, availability=requires("cuml", gpu=True),
                  unsupported=_cuml_tsne_unsupported, description="cuML TSNE on the GPU (FFT, 2-D only)")
def _cuml(**params: object) -> CumlTSNE:
    return CumlTSNE(**params)


@register_backend("tsne", "opentsne", kind="cpu", priority=0, availability=requires("openTSNE"),
                  description="openTSNE (FFT-accelerated)")
def _opentsne(**params: object) -> OpenTSNE:
    return OpenTSNE(**params)


def perplexity_sweep(X: np.ndarray, perplexities: "list[float] | tuple[float, ...]" = (5.0, 30.0, 50.0, 100.0), *,
                     backend: str = "auto", seed: int = 0, labels: np.ndarray | None = None,
                     path: "str | None" = None, title: str | None = None) -> dict:
    """2-D t-SNE maps of ``X`` (n, d) at several perplexities, side by side in one figure.

    Perplexity is roughly the number of neighbours each point attends to: small values show local
    structure (and break clusters into fragments), large ones keep more of the global layout.
    One map per perplexity, each from the registry's ``tsne`` backend (cuML on a GPU, openTSNE
    here) with the same seed; perplexities that need more than n / 3 points are skipped (logged).

    Parameters
    ----------
    X : np.ndarray of shape (n, d)
    perplexities : sequence of float
    backend : str
    seed : int
    labels : np.ndarray of shape (n,) or None
        Colours for the points (clusters or classes); one colour when None.
    path : str or Path or None
        Where to write the PNG (a row of panels, at most four per row).
    title : str or None

    Returns
    -------
    dict with ``perplexities`` (those run), ``embeddings`` (list of (n, 2) float32), ``backends``,
    ``seconds``, ``skipped`` and ``figure`` (the PNG's path or None).
    """
    import logging
    import time
    from pathlib import Path

    from gpu_ops.registry import create_estimator

    log = logging.getLogger(__name__)
    X = as_float32_matrix(X)
    n = X.shape[0]
    if not len(perplexities):
        raise InputError("perplexity sweep needs at least one perplexity")
    run, skipped = [], []
    for p in perplexities:
        p = float(p)
        if p <= 0:
            raise InputError(f"perplexity must be positive; got {p!r}")
        (run if n > 3 * p else skipped).append(p)
    if skipped:
        log.warning("t-SNE sweep: skipping perplexities %s (need more than 3 x perplexity points; have %d)", skipped, n)
    if not run:
        raise InputError(f"no perplexity in {list(perplexities)} is usable with {n} samples (need n > 3 x perplexity)")
    out: dict = {"perplexities": run, "embeddings": [], "backends": [], "seconds": [], "skipped": skipped, "figure": None}
    for p in run:
        t0 = time.perf_counter()
        est, res = create_estimator("tsne", backend, n_components=2, perplexity=p, seed=seed)
        out["embeddings"].append(est.fit(X).embedding_)
        out["backends"].append(res.backend)
        out["seconds"].append(round(time.perf_counter() - t0, 3))
    if path is not None:
        out["figure"] = str(_sweep_figure(out, labels, Path(path), title or f"t-SNE perplexity sweep (n={n})"))
    return out


def _sweep_figure(sweep: dict, labels: np.ndarray | None, path: "Path", title: str) -> "Path":
    import matplotlib
    from matplotlib.figure import Figure

    maps = sweep["embeddings"]
    cols = min(4, len(maps))
    rows = -(-len(maps) // cols)
    fig = Figure(figsize=(3.6 * cols, 3.6 * rows + 0.4), dpi=110)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    n = maps[0].shape[0]
    size = max(0.5, min(8.0, 8000.0 / max(n, 1)))
    if labels is not None:
        labels = np.asarray(labels)
        ids, codes = np.unique(labels, return_inverse=True)
        cmap = matplotlib.colormaps["tab20" if len(ids) > 10 else "tab10"]
        colors = cmap(codes % cmap.N)
        colors[labels < 0] = (0.7, 0.7, 0.7, 1.0)  # noise / unlabelled in grey
    else:
        colors = "tab:blue"
    for ax, xy, p, backend, secs in zip(axes, maps, sweep["perplexities"], sweep["backends"], sweep["seconds"]):
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c=colors, linewidths=0)
        ax.set_title(f"perplexity {p:g} ({backend}, {secs:.0f} s)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(maps):]:
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return path
