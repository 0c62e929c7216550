"""The similar-image index saved with a run: exact below :data:`APPROX_MIN_ROWS` rows, IVF-Flat above.

Exact search is the ``knn`` op (FAISS flat search on the GPU or CPU, cuML, scikit-learn) over the
run's embeddings, which the run keeps as ``search-vectors.npy``. Above :data:`APPROX_MIN_ROWS`
rows the run keeps a FAISS ``IndexIVFFlat`` (``search.faiss``) instead, searched with
:data:`DEFAULT_NPROBE` probed lists, on the GPU when a FAISS GPU build sees one
(``index_cpu_to_gpu``). Both answer Euclidean distances between store rows (row ``i`` is the run's
``i``-th image, the order of ``assignments.parquet``). ``search.json`` says which kind was built,
how, and in which space (:class:`IndexInfo`): the store's embeddings, or, when the run's clustering
learned its own embedding (a deep method's trained encoder), that encoder's latent codes of the
images, which is the space the clustering grouped them in.

The switch point and the probe count come from ``bench/similar.py`` (BENCHMARKS.md, "Similar
images"): below 200k rows exact search costs at most a few ms per query in a batch and IVF-Flat is
not faster at d=1280; at 200k it is 2.7x (d=1280) to 48x (d=64) faster, and with
``nlist = 4 sqrt(n)`` and 32 probes it found every exact neighbour at every size measured.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gpu_ops.errors import InputError
from gpu_ops.fsutil import atomic_path, atomic_write_json
from gpu_ops.rundir import RunDir

log = logging.getLogger(__name__)

#: From this many rows up the run keeps an approximate (IVF-Flat) index; below it, exact search.
APPROX_MIN_ROWS = 200_000
#: Inverted lists probed per query (recall@10 1.0 in bench/similar.py at every size measured; 16: 0.991).
DEFAULT_NPROBE = 32
#: IVF training rows per list (FAISS wants 39-256; more rows cost training time, not recall).
TRAIN_ROWS_PER_LIST = 40
#: Lloyd iterations of the IVF coarse quantizer's k-means.
TRAIN_ITERATIONS = 10
METRIC = "euclidean"
#: ``IndexInfo.space`` of an index over the store's embeddings; ``latent:<algorithm>`` is one over a
#: deep method's encoder codes.
EMBEDDINGS = "embeddings"
LATENT_PREFIX = "latent:"


def latent_space(algorithm: str) -> str:
    """The ``space`` of an index over ``algorithm``'s encoder codes."""
    return f"{LATENT_PREFIX}{algorithm}"


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` rows: ``4 sqrt(n)``, at least 1 and at most n / 39 (FAISS's floor
    of training points per list)."""
    return int(max(1, min(4 * math.sqrt(n), n // 39)))


@dataclass(frozen=True)
class IndexInfo:
    """``search.json``: what the run's index is (``exact`` or ``ivf-flat``), how it was built and
    which vectors it holds (``space``: :data:`EMBEDDINGS` or ``latent:<algorithm>``)."""

    kind: str
    metric: str
    rows: int
    dim: int
    nlist: int | None
    nprobe: int | None
    build_seconds: float
    built_on: str  #: ``gpu`` or ``cpu``
    approx_min_rows: int
    space: str = EMBEDDINGS  #: indexes written before the field existed are over the embeddings

    @property
    def encoder(self) -> str | None:
        """The deep algorithm whose encoder codes the index holds, or None (the store's embeddings)."""
        return self.space[len(LATENT_PREFIX):] if self.space.startswith(LATENT_PREFIX) else None

    def describe(self) -> str:
        """``exact index over the idec encoder's 10-d latent codes`` (for ``gpuclust similar``)."""
        what = (f"the {self.encoder} encoder's {self.dim}-d latent codes" if self.encoder
                else f"the run's {self.dim}-d embeddings")
        return f"{self.kind} index over {what}"

    @classmethod
    def read(cls, run: RunDir) -> IndexInfo:
        import json

        path = run.search_info
        if not path.is_file():
            raise InputError(f"{run.path}: the run has no similar-image index ({path.name} is missing); "
                             "runs made before gpuclust kept one must be rerun")
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise InputError(f"{path}: not a similar-image index description ({exc})") from None


def _faiss() -> Any:
    from gpu_ops.cluster.kmeans import import_faiss

    return import_faiss()


def _gpu() -> bool:
    from gpu_ops.cluster.sources import faiss_gpu_usable

    return faiss_gpu_usable()


def build_ivf(X: np.ndarray, nlist: int, seed: int = 0, gpu: bool | None = None) -> Any:
    """A trained and filled FAISS ``IndexIVFFlat`` (L2) over ``X`` (n, d) float32, as a CPU index
    (trained and filled on the GPU when ``gpu``, default: when usable)."""
    faiss = _faiss()
    X = np.ascontiguousarray(X, dtype=np.float32)
    quantizer = faiss.IndexFlatL2(X.shape[1])
    index = faiss.IndexIVFFlat(quantizer, X.shape[1], int(nlist), faiss.METRIC_L2)
    index.cp.seed = int(seed)
    index.cp.niter = TRAIN_ITERATIONS
    train = X
    if len(X) > TRAIN_ROWS_PER_LIST * nlist:
        rows = np.random.default_rng(seed).choice(len(X), TRAIN_ROWS_PER_LIST * nlist, replace=False)
        train = X[np.sort(rows)]
    if gpu if gpu is not None else _gpu():
        resources = faiss.StandardGpuResources()
        on_gpu = faiss.index_cpu_to_gpu(resources, 0, index)
        on_gpu.train(train)
        on_gpu.add(X)
        return faiss.index_gpu_to_cpu(on_gpu)
    index.train(train)
    index.add(X)
    return index


def save_index(run: RunDir, X: np.ndarray, *, seed: int = 0, approx_min_rows: int = APPROX_MIN_ROWS,
               space: str = EMBEDDINGS) -> IndexInfo:
    """Build the run's similar-image index over ``X`` (n, d), store order, and write it into
    ``run`` (``search-vectors.npy`` or ``search.faiss``, then ``search.json``); ``space`` says what
    ``X`` is (:data:`EMBEDDINGS` or :func:`latent_space`)."""
    t0 = time.perf_counter()
    X = np.ascontiguousarray(X, dtype=np.float32)
    n, d = X.shape
    gpu = _gpu()
    if n >= approx_min_rows:
        nlist = nlist_for(n)
        index = build_ivf(X, nlist, seed, gpu)
        with atomic_path(run.search_index) as tmp:
            _faiss().write_index(index, str(tmp))
        info = IndexInfo("ivf-flat", METRIC, n, d, nlist, min(DEFAULT_NPROBE, nlist), 0.0, "gpu" if gpu else "cpu",
                         approx_min_rows, space)
    else:
        with atomic_path(run.search_vectors) as tmp:
            np.save(tmp, X)
        info = IndexInfo("exact", METRIC, n, d, None, None, 0.0, "gpu" if gpu else "cpu", approx_min_rows, space)
    info = IndexInfo(**{**asdict(info), "build_seconds": round(time.perf_counter() - t0, 3)})
    atomic_write_json(run.search_info, asdict(info))
    log.info("similar-image index: %s over %d x %d (%s) in %.1f s", info.kind, n, d, space, info.build_seconds)
    return info


class SearchIndex:
    """A run's similar-image index, opened for queries.

    ``search(Q, k)`` returns ``(distances (m, k) float32, rows (m, k) int64)``, nearest first;
    ``vectors(rows)`` the indexed embeddings of those rows.
    """

    def __init__(self, run: RunDir, backend: str = "auto") -> None:
        self.run = run
        self.info = IndexInfo.read(run)
        self.backend = backend
        self._knn: Any = None
        self._ivf: Any = None
        self._X: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return self.info.rows

    def _vectors(self) -> np.ndarray:
        if self._X is None:
            path = self.run.search_vectors
            if not path.is_file():
                raise InputError(f"{path}: the run's similar-image vectors are missing")
            self._X = np.load(path, mmap_mode="r")
            if self._X.shape != (self.info.rows, self.info.dim):
                raise InputError(f"{path}: holds {self._X.shape}, {self.run.search_info.name} says "
                                 f"({self.info.rows}, {self.info.dim})")
        return self._X

    def _ivf_index(self) -> Any:
        if self._ivf is None:
            faiss = _faiss()
            path = self.run.search_index
            if not path.is_file():
                raise InputError(f"{path}: the run's similar-image index is missing")
            index = faiss.read_index(str(path))
            faiss.extract_index_ivf(index).make_direct_map()  # vectors(rows) for --id queries
            self._cpu_ivf = index
            if self.backend != "cpu" and _gpu():
                self._resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._resources, 0, index)
                faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(self.info.nprobe or 1))
            else:
                faiss.extract_index_ivf(index).nprobe = int(self.info.nprobe or 1)
            self._ivf = index
        return self._ivf

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), d) float32: the indexed embeddings of store rows ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.info.kind == "exact":
            return np.asarray(self._vectors()[rows], dtype=np.float32)
        self._ivf_index()
        return np.stack([self._cpu_ivf.reconstruct(int(r)) for r in rows]).astype(np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest indexed rows of each query (m, d): (distances, rows), nearest first."""
        Q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if Q.shape[1] != self.info.dim:
            raise InputError(f"queries have {Q.shape[1]} dimensions; the run's index holds {self.info.dim}-d embeddings")
        k = min(int(k), self.info.rows)
        if self.info.kind == "exact":
            if self._knn is None:
                from gpu_ops.registry import create_estimator

                self._knn, self.resolution = create_estimator("knn", self.backend, metric=METRIC)
                self._knn.fit(np.asarray(self._vectors()))
            return self._knn.kneighbors(Q, n_neighbors=k)
        dist, idx = self._ivf_index().search(Q, k)
        dist = np.sqrt(np.maximum(dist, 0.0)).astype(np.float32)
        dist[idx < 0] = np.inf  # fewer than k rows in the probed lists
        return dist, idx.astype(np.int64)
