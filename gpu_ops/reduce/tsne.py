"""t-SNE backends: cuML (2-D only) and openTSNE."""

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
    """openTSNE (FFT-accelerated interpolation, multi-threaded); ``embedding_`` (n, n_components)."""

    def __init__(self, n_components: int = 2, perplexity: float = 30.0, seed: int = 0, n_jobs: int = -1, **_: object) -> None:
        self.n_components = n_components
        self.perplexity = perplexity
        self.seed = seed
        self.n_jobs = n_jobs

    def fit(self, X: np.ndarray) -> "OpenTSNE":
        from openTSNE import TSNE

        X = as_float32_matrix(X)
        check_perplexity(self.perplexity, X.shape[0])
        # FFT gradients are fastest for 1-2-D; Barnes-Hut is the only choice beyond that.
        method = "fft" if int(self.n_components) <= 2 else "bh"
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

    def __init__(self, n_components: int = 2, perplexity: float = 30.0, seed: int = 0, **_: object) -> None:
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
