"""What ``gpuclust assign`` predicts with: one saved model per clustering algorithm of a run.

The protocol, for every algorithm::

    save_model(run, algorithm, fitted)          # during the cluster stage: what predicting needs
    finish_model(run, algorithm, X, labels)     # at the end of the run: the novelty threshold
    model = load_model(run, algorithm)          # later
    prediction = model.predict(X)               # labels, distance (and confidence) per row
    novel = model.novel(prediction)             # far from every cluster

``X`` is what the model reads (``model.input``): the run's embeddings for every algorithm but the
deep ones, which read images (uint8 (m, h, w[, c]) in the run's item shape) through their encoder.

Kinds of saved model (``model-<algorithm>.npz`` + ``model-<algorithm>.json``):

- ``centroids`` (kmeans; dkm, dec, idec in their encoder's latent space): the nearest centre;
  distance = Euclidean distance to it. (DEC's Student-t soft assignment is monotone in that
  distance, so its argmax is the nearest centre too.)
- ``gmm``: the scikit-learn mixture's weights, means and covariances; label = the most probable
  component, confidence = its posterior, distance = the negative log-likelihood of the row.
- ``neighbours`` (umap-kmeans, agglomerative, hdbscan; n2d in its latent space): the cluster of the
  nearest labelled row of the run (the similar-image index when it holds the embeddings, else
  the embeddings saved with the model); distance = the distance to that row. These algorithms have no out-of-sample rule of their own (UMAP's
  ``transform`` would need the pickled UMAP model and its numba compilation in every process).

A clustering head (``scan``, ``temi``) is its saved ``model-<algorithm>.pt``, read with
:func:`gpu_ops.heads.load_head`: its label is the argmax of ``predict_proba(X)``, its confidence
the maximum probability, its distance ``1 - confidence``.

Novelty: for each cluster, the :data:`NOVEL_QUANTILE` quantile of the run's own members' distances
(for ``neighbours``: each member's distance to its nearest *other* labelled row); an image is novel
when its distance exceeds the threshold of the cluster it was assigned to (clusters with fewer
than :data:`MIN_MEMBERS` members use the quantile over all rows). The thresholds and this meaning
are in ``model-<algorithm>.json`` and in the metadata of every assignment file.

Deep methods also flag an image whose autoencoder reconstruction error exceeds the
:data:`NOVEL_QUANTILE` quantile of the run's own images' errors: an encoder maps any input to some
code, and images unlike the run's (photos given to a digits run) can land near a centre, but the
decoder, trained to rebuild the run's images only, rebuilds them badly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gpu_ops.config import HEAD_ALGORITHMS
from gpu_ops.errors import InputError
from gpu_ops.fsutil import atomic_path, atomic_write_json
from gpu_ops.rundir import RunDir

log = logging.getLogger(__name__)

#: The share of a cluster's own members that are *not* novel: 0.99 flags 1 % of the run's images.
NOVEL_QUANTILE = 0.99
#: Clusters with fewer members use the quantile over every row instead of their own.
MIN_MEMBERS = 20
#: Rows sampled to set the thresholds of ``neighbours`` models (each needs a nearest-neighbour search).
THRESHOLD_SAMPLE_ROWS = 10_000
#: Neighbours searched to find the nearest labelled row (HDBSCAN leaves noise rows unlabelled).
NEIGHBOUR_CANDIDATES = 16

MEANINGS = {
    "centroids": "Euclidean distance to the assigned cluster's centre",
    "gmm": "negative log-likelihood of the row under the Gaussian mixture",
    "neighbours": "Euclidean distance to the nearest labelled image of the run",
    "head": "1 - the head's probability of the assigned cluster",
}

@dataclass
class Prediction:
    """``labels`` (m,) int64 (-1: no cluster), ``distance`` (m,) float32 (the model's own measure,
    :data:`MEANINGS`), ``confidence`` (m,) float32 posterior when the model has one, else None."""

    labels: np.ndarray
    distance: np.ndarray
    confidence: np.ndarray | None = None
    reconstruction: np.ndarray | None = None  #: (m,) a deep method's autoencoder reconstruction error


class ClusterModel(Protocol):
    """What :func:`load_model` returns."""

    algorithm: str
    kind: str
    input: str  #: ``embedding`` or ``image``

    def predict(self, X: np.ndarray) -> Prediction: ...


# ------------------------------------------------------------------------------ predictors


class CentroidModel:
    """Nearest centre (Euclidean)."""

    kind = "centroids"
    input = "embedding"

    def __init__(self, algorithm: str, centroids: np.ndarray) -> None:
        self.algorithm = algorithm
        self.centroids = np.asarray(centroids, dtype=np.float32)

    def predict(self, X: np.ndarray) -> Prediction:
        from gpu_ops.cluster.sources import NearestCentre

        labels, sq = NearestCentre(self.centroids)(X)
        return Prediction(labels, np.sqrt(sq).astype(np.float32))


class GaussianMixtureModel:
    """A scikit-learn ``GaussianMixture`` rebuilt from its saved parameters."""

    kind = "gmm"
    input = "embedding"

    def __init__(self, algorithm: str, arrays: dict[str, np.ndarray]) -> None:
        from sklearn.mixture import GaussianMixture

        self.algorithm = algorithm
        gmm = GaussianMixture(n_components=len(arrays["weights"]), covariance_type=str(arrays["covariance_type"]))
        gmm.weights_, gmm.means_, gmm.covariances_ = arrays["weights"], arrays["means"], arrays["covariances"]
        gmm.precisions_cholesky_ = arrays["precisions_cholesky"]
        self._gmm = gmm

    def predict(self, X: np.ndarray) -> Prediction:
        X = np.asarray(X, dtype=np.float64)
        proba = self._gmm.predict_proba(X)
        labels = proba.argmax(axis=1).astype(np.int64)
        nll = -self._gmm.score_samples(X)
        return Prediction(labels, nll.astype(np.float32), proba.max(axis=1).astype(np.float32))


class NeighbourModel:
    """The cluster of the nearest labelled row: the run's similar-image index for embeddings, or
    saved latent codes (exact search) for a deep method's encoder space."""

    kind = "neighbours"
    input = "embedding"

    def __init__(self, algorithm: str, labels: np.ndarray, search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]) -> None:
        self.algorithm = algorithm
        self.labels = np.asarray(labels, dtype=np.int64)
        self._search = search

    def predict(self, X: np.ndarray, exclude: np.ndarray | None = None) -> Prediction:
        """``exclude`` (m,): a row of the run to skip per query (its own row, for the thresholds)."""
        k = min(NEIGHBOUR_CANDIDATES + (exclude is not None), len(self.labels))
        dist, rows = self._search(np.asarray(X, dtype=np.float32), k)
        valid = rows >= 0
        lab = np.where(valid, self.labels[np.where(valid, rows, 0)], -1)
        usable = lab >= 0
        if exclude is not None:
            usable &= rows != np.asarray(exclude)[:, None]
        first = np.argmax(usable, axis=1)
        found = usable[np.arange(len(first)), first]
        labels = np.where(found, lab[np.arange(len(first)), first], -1).astype(np.int64)
        distance = np.where(found, dist[np.arange(len(first)), first], np.inf).astype(np.float32)
        return Prediction(labels, distance)


class HeadModel:
    """A clustering head saved as ``model-<algorithm>.pt`` (:func:`gpu_ops.heads.load_head`)."""

    kind = "head"
    input = "embedding"

    def __init__(self, algorithm: str, head: Any) -> None:
        self.algorithm = algorithm
        self._head = head

    def predict(self, X: np.ndarray) -> Prediction:
        proba = np.asarray(self._head.predict_proba(np.asarray(X, dtype=np.float32)))
        confidence = proba.max(axis=1).astype(np.float32)
        return Prediction(proba.argmax(axis=1).astype(np.int64), 1.0 - confidence, confidence)


class EncodedModel:
    """A deep method: images -> its trained encoder's latent codes -> an inner model there."""

    kind = "deep"
    input = "image"

    def __init__(self, algorithm: str, encoder: Any, inner: Any) -> None:
        self.algorithm = algorithm
        self.encoder = encoder
        self.inner = inner

    def encode(self, images: np.ndarray) -> np.ndarray:
        from gpu_ops.deep import encode

        return encode(self.encoder, images, device="cpu" if not _cuda() else "auto")

    def encode_with_error(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes, reconstruction errors) of ``images``."""
        from gpu_ops.deep import encode_with_error

        return encode_with_error(self.encoder, images, device="cpu" if not _cuda() else "auto")

    def predict(self, X: np.ndarray) -> Prediction:
        codes, errors = self.encode_with_error(X)
        prediction = self.inner.predict(codes)
        prediction.reconstruction = errors
        return prediction


def _cuda() -> bool:
    from gpu_ops.device import cuda_available

    return cuda_available()


# ------------------------------------------------------------------------------ saving


def save_model(run: RunDir, algorithm: str, fitted: Any) -> None:
    """Save what predicting ``algorithm``'s clusters needs, from its fitted estimator (the cluster
    stage calls this): k-means centres, a Gaussian mixture's parameters, or nothing for the
    algorithms that predict from the nearest labelled row (:func:`finish_model` writes those)."""
    if algorithm == "kmeans":
        arrays = {"kind": np.array("centroids"), "centroids": np.asarray(fitted.cluster_centers_, np.float32)}
    elif algorithm == "gmm":
        gmm = getattr(fitted, "mixture_", fitted)
        arrays = {"kind": np.array("gmm"), "weights": gmm.weights_, "means": gmm.means_,
                  "covariances": gmm.covariances_, "precisions_cholesky": gmm.precisions_cholesky_,
                  "covariance_type": np.array(gmm.covariance_type)}
    else:
        return
    with atomic_path(run.model(algorithm)) as tmp:
        np.savez(tmp, **arrays)


def save_deep_model(run: RunDir, algorithm: str, result: Any) -> None:
    """Save a deep method's trained encoder (``encoder-<algorithm>.pt``, the autoencoder checkpoint
    format) and its centres (dkm, dec, idec) or latent codes (n2d) from its ``DeepResult``."""
    import torch

    checkpoint = result.info.get("checkpoint")
    if result.model is None or not checkpoint:
        log.warning("%s: no trained encoder to save; gpuclust assign will not predict it", algorithm)
        return
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = {k: state[k] for k in ("config", "input_shape")}
    state["state_dict"] = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    with atomic_path(run.encoder(algorithm)) as tmp:
        torch.save(state, tmp)
    if algorithm == "n2d" or result.centroids is None:
        arrays = {"kind": np.array("neighbours"), "codes": np.asarray(result.embedding, np.float32),
                  "labels": np.asarray(result.labels, np.int64)}
    else:
        arrays = {"kind": np.array("centroids"), "centroids": np.asarray(result.centroids, np.float32)}
    with atomic_path(run.model(algorithm)) as tmp:
        np.savez(tmp, **arrays)


def save_neighbour_model(run: RunDir, algorithm: str, X: np.ndarray, labels: np.ndarray) -> None:
    """Save ``algorithm``'s labelled rows ``X`` (store order) for nearest-labelled-row prediction:
    for runs whose similar-image index holds another space than the embeddings ``X``."""
    arrays = {"kind": np.array("neighbours"), "codes": np.asarray(X, np.float32),
              "labels": np.asarray(labels, np.int64)}
    with atomic_path(run.model(algorithm)) as tmp:
        np.savez(tmp, **arrays)


def learned_space(run: RunDir, algorithms: list[str]) -> str | None:
    """The first of ``algorithms`` that learned its own embedding (a deep method whose encoder the
    run saved), or None: the run's similar-image index is built over that encoder's codes."""
    from gpu_ops.config import DEEP_ALGORITHMS

    return next((a for a in algorithms if a in DEEP_ALGORITHMS and run.encoder(a).is_file()), None)


def encoder_codes(run: RunDir, algorithm: str, images: np.ndarray) -> np.ndarray:
    """(m, latent) float32: ``images`` (uint8, the run's item shape) through ``algorithm``'s saved encoder."""
    model = load_model(run, algorithm)
    if not isinstance(model, EncodedModel):
        raise InputError(f"{run.path}: {algorithm} has no saved encoder ({run.encoder(algorithm).name})")
    return np.asarray(model.encode(images), dtype=np.float32)


def _exact_search(codes: np.ndarray) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    from gpu_ops.registry import create_estimator

    knn, _ = create_estimator("knn", "auto", metric="euclidean")
    knn.fit(codes)
    return lambda Q, k: knn.kneighbors(Q, n_neighbors=min(k, len(codes)))


def _read_arrays(run: RunDir, algorithm: str) -> dict[str, np.ndarray] | None:
    path = run.model(algorithm)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _inner_model(run: RunDir, algorithm: str, arrays: dict[str, np.ndarray] | None,
                 run_labels: np.ndarray | None, search_index: Any) -> Any:
    """The model over embeddings (or latent codes) from the saved arrays; None when nothing is saved."""
    if arrays is None:
        if run_labels is None or search_index is None:
            return None
        if search_index.info.encoder is not None:
            raise InputError(f"{run.path}: {algorithm} has no saved model ({run.model(algorithm).name} is missing) "
                             f"and the similar-image index holds {search_index.info.space} codes, not embeddings")
        return NeighbourModel(algorithm, run_labels, search_index.search)
    kind = str(arrays["kind"])
    if kind == "centroids":
        return CentroidModel(algorithm, arrays["centroids"])
    if kind == "gmm":
        return GaussianMixtureModel(algorithm, arrays)
    if kind == "neighbours":
        return NeighbourModel(algorithm, arrays["labels"], _exact_search(arrays["codes"]))
    raise InputError(f"{run.model(algorithm)}: unknown saved model kind {kind!r}")


def load_model(run: RunDir, algorithm: str, run_labels: np.ndarray | None = None,
               search_index: Any = None) -> ClusterModel:
    """The saved model of ``algorithm`` in ``run``.

    ``run_labels`` (store order) and ``search_index`` (:class:`~gpu_ops.explore.search.SearchIndex`)
    serve the algorithms predicted from the nearest labelled row; they are read from the run when
    not given.
    """
    head = run.head(algorithm)
    if algorithm in HEAD_ALGORITHMS and head.is_file():
        from gpu_ops.heads import load_head

        return HeadModel(algorithm, load_head(head))
    arrays = _read_arrays(run, algorithm)
    if arrays is None and (run_labels is None or search_index is None):
        run_labels = run_labels if run_labels is not None else run_assignments(run)[algorithm]
        if search_index is None:
            from gpu_ops.explore.search import SearchIndex

            search_index = SearchIndex(run)
    inner = _inner_model(run, algorithm, arrays, run_labels, search_index)
    if run.encoder(algorithm).is_file():
        from gpu_ops.deep import load_autoencoder

        return EncodedModel(algorithm, load_autoencoder(run.encoder(algorithm), "cuda" if _cuda() else "cpu"), inner)
    return inner


def run_assignments(run: RunDir) -> dict[str, np.ndarray]:
    """``assignments.parquet`` as {column: array} (``image_id`` a list, labels int64)."""
    import pyarrow.parquet as pq

    if not run.assignments.is_file():
        raise InputError(f"{run.path}: not a finished gpuclust run ({run.assignments.name} is missing)")
    table = pq.read_table(run.assignments)
    out: dict[str, Any] = {"image_id": [str(i) for i in table.column("image_id").to_pylist()]}
    for name in table.column_names[1:]:
        out[name] = table.column(name).to_numpy().astype(np.int64)
    return out


# ------------------------------------------------------------------------------ novelty


@dataclass(frozen=True)
class Threshold:
    """Per-cluster distance thresholds above which an image is novel, and what they mean."""

    per_cluster: list[float]
    overall: float
    quantile: float
    measure: str
    reconstruction: float | None = None  #: deep methods: the quantile of the run's reconstruction errors

    def meaning(self) -> str:
        text = (f"novel: {self.measure} above the {self.quantile:.0%} quantile of the run's own members of the "
                f"assigned cluster (clusters under {MIN_MEMBERS} members: of all rows)")
        if self.reconstruction is None:
            return text + f"; by construction about {1 - self.quantile:.0%} of the run's own images are novel"
        return (text + f", or an autoencoder reconstruction error above the {self.quantile:.0%} quantile of the "
                f"run's own images' errors ({self.reconstruction:.6g}); by construction {1 - self.quantile:.0%} "
                f"to {2 * (1 - self.quantile):.0%} of the run's own images are novel")

    def novel(self, prediction: Prediction) -> np.ndarray:
        """(m,) bool: no cluster, farther than the assigned cluster's threshold, or (deep methods)
        reconstructed worse than the run's threshold."""
        limits = np.asarray(self.per_cluster + [self.overall], dtype=np.float64)
        labels = prediction.labels
        lab = np.where((labels >= 0) & (labels < len(self.per_cluster)), labels, len(self.per_cluster))
        novel = (labels < 0) | ~(prediction.distance.astype(np.float64) <= limits[lab])
        if self.reconstruction is not None and prediction.reconstruction is not None:
            novel |= ~(prediction.reconstruction.astype(np.float64) <= self.reconstruction)
        return novel

    def as_dict(self) -> dict[str, Any]:
        return {"quantile": self.quantile, "measure": self.measure, "overall": self.overall,
                "per_cluster": self.per_cluster, "reconstruction": self.reconstruction, "meaning": self.meaning()}


def fit_threshold(prediction: Prediction, k: int, measure: str, quantile: float = NOVEL_QUANTILE) -> Threshold:
    """The thresholds from the run's own rows' prediction (their distances by assigned cluster)."""
    finite = np.isfinite(prediction.distance) & (prediction.labels >= 0)
    d, lab = prediction.distance[finite].astype(np.float64), prediction.labels[finite]
    overall = float(np.quantile(d, quantile)) if len(d) else float("inf")
    per = []
    for c in range(k):
        members = d[lab == c]
        per.append(float(np.quantile(members, quantile)) if len(members) >= MIN_MEMBERS else overall)
    reconstruction = None
    if prediction.reconstruction is not None and len(prediction.reconstruction):
        reconstruction = float(np.quantile(prediction.reconstruction.astype(np.float64), quantile))
    return Threshold(per, overall, quantile, measure, reconstruction)


def finish_model(run: RunDir, algorithm: str, X: np.ndarray, labels: np.ndarray, search_index: Any = None,
                 seed: int = 0) -> dict[str, Any]:
    """Set ``algorithm``'s novelty threshold from the run's own rows and write ``model-<algorithm>.json``.

    ``X``: what the model reads for the run's rows (embeddings, or images for deep methods),
    ``labels``: the run's labels (store order). Returns the JSON written.
    """
    model = load_model(run, algorithm, labels, search_index)
    k = int(labels.max()) + 1 if (labels >= 0).any() else 0
    rows = np.arange(len(labels))
    if len(rows) > THRESHOLD_SAMPLE_ROWS and model.kind in ("neighbours", "deep"):
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), THRESHOLD_SAMPLE_ROWS, replace=False))
    kind = model.kind
    errors = None
    if isinstance(model, EncodedModel):
        kind = model.inner.kind
        codes, errors = model.encode_with_error(X[rows])
        inner = model.inner
        prediction = inner.predict(codes, exclude=rows) if isinstance(inner, NeighbourModel) else inner.predict(codes)
    elif isinstance(model, NeighbourModel):
        prediction = model.predict(np.asarray(X[rows]), exclude=rows)
    else:
        prediction = model.predict(np.asarray(X[rows]))
    # Members are measured against their own cluster: the run's label, not a fresh prediction.
    prediction = Prediction(labels[rows], prediction.distance, prediction.confidence, errors)
    threshold = fit_threshold(prediction, k, MEANINGS[kind])
    doc = {"algorithm": algorithm, "kind": model.kind if model.kind != "deep" else f"deep+{kind}",
           "input": model.input, "k": k, "distance": MEANINGS[kind], "threshold": threshold.as_dict()}
    atomic_write_json(run.model_info(algorithm), doc, sort_keys=False)
    return doc


def load_threshold(run: RunDir, algorithm: str) -> Threshold:
    """The novelty threshold saved by :func:`finish_model`."""
    path = run.model_info(algorithm)
    if not path.is_file():
        raise InputError(f"{run.path}: {algorithm} has no saved model for assign ({path.name} is missing); "
                         "runs made before gpuclust kept one must be rerun")
    t = json.loads(path.read_text())["threshold"]
    reconstruction = t.get("reconstruction")  # absent in models saved before deep methods kept one
    return Threshold([float(v) for v in t["per_cluster"]], float(t["overall"]), float(t["quantile"]), t["measure"],
                     None if reconstruction is None else float(reconstruction))
