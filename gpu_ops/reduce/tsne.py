"""t-SNE backends: cuML (2-D only) and openTSNE, and a perplexity sweep (several maps of one input).

Three (or more) components run on openTSNE (Barnes-Hut): the registry sends ``n_components != 2``
away from cuML and logs why.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpu_ops._validation import as_float32_matrix
from gpu_ops.errors import InputError
from gpu_ops.reduce.pca import to_host
from gpu_ops.backend_table import register_backend, requires

log = logging.getLogger(__name__)


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


#: The sweep's maps in a run directory (see :meth:`PerplexitySweep.save`); the report draws them.


@dataclass
class PerplexitySweep:
    """2-D t-SNE maps of one input at several perplexities (see :func:`perplexity_sweep`).

    ``embeddings[i]`` (n, 2) float32 is the map at ``perplexities[i]``, made by ``backends[i]`` in
    ``seconds[i]``; ``skipped`` lists the perplexities that needed more points than there were.
    """

    perplexities: list[float]
    embeddings: list[np.ndarray]
    backends: list[str]
    seconds: list[float]
    skipped: list[float] = field(default_factory=list)

    def save(self, path: Path, image_ids: "list[str] | np.ndarray") -> Path:
        """Write the maps as an ``.npz`` (read back with ``np.load(path, allow_pickle=False)``)::

            perplexities  float64 (p,)
            embeddings    float32 (p, n, 2)
            backends      str (p,)
            seconds       float64 (p,)
            skipped       float64 (s,)
            image_ids     str (n,): the image of each row, in the order the maps were computed
        """
        from gpu_ops.fsutil import atomic_write_bytes

        ids = np.asarray([str(i) for i in image_ids])
        if ids.shape != (self.embeddings[0].shape[0],):
            raise ValueError(f"{len(ids)} image ids for maps of {self.embeddings[0].shape[0]} points")
        buffer = io.BytesIO()
        np.savez(buffer, perplexities=np.asarray(self.perplexities, dtype=np.float64),
                 embeddings=np.stack(self.embeddings).astype(np.float32),
                 backends=np.asarray(self.backends, dtype=str), seconds=np.asarray(self.seconds, dtype=np.float64),
                 skipped=np.asarray(self.skipped, dtype=np.float64), image_ids=ids)
        atomic_write_bytes(Path(path), buffer.getvalue())
        return Path(path)


def perplexity_sweep(X: np.ndarray, perplexities: "list[float] | tuple[float, ...]" = (5.0, 30.0, 50.0, 100.0), *,
                     backend: str = "auto", seed: int = 0) -> PerplexitySweep:
    """2-D t-SNE maps of ``X`` (n, d) at several perplexities.

    Perplexity is roughly the number of neighbours each point attends to: small values show local
    structure (and break clusters into fragments), large ones keep more of the global layout.
    One map per perplexity, each from the registry's ``tsne`` backend (cuML on a GPU, openTSNE
    here) with the same seed; perplexities that need more than n / 3 points are skipped (logged).
    The report draws the maps side by side (``tsne-sweep.png``) from :meth:`PerplexitySweep.save`'s file.

    Parameters
    ----------
    X : np.ndarray of shape (n, d)
    perplexities : sequence of float
    backend : str
    seed : int

    Returns
    -------
    PerplexitySweep
    """
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
    out = PerplexitySweep(perplexities=run, embeddings=[], backends=[], seconds=[], skipped=skipped)
    for p in run:
        t0 = time.perf_counter()
        from gpu_ops.registry import create_estimator  # the registry imports this module: not at the top

        est, res = create_estimator("tsne", backend, n_components=2, perplexity=p, seed=seed)
        out.embeddings.append(est.fit(X).embedding_)
        out.backends.append(res.backend)
        out.seconds.append(round(time.perf_counter() - t0, 3))
    return out
