"""k-means backends: cuML, FAISS (GPU and CPU), scikit-learn, all behind the estimator protocol.

Every backend takes ``n_clusters, max_iter, n_init, seed`` and after ``fit(X)`` exposes
``labels_`` (n,), ``cluster_centers_`` (k, d), ``inertia_`` (sum of squared distances to the
nearest centre, float) and ``n_iter_``. Results are always host (numpy) arrays, whichever
device computed them. GPU packages are imported inside ``fit``, so a CPU install imports cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator

import numpy as np

from gpu_ops._validation import as_float32_matrix, check_int, check_n_clusters
from gpu_ops.cluster.sources import NearestCentre, faiss_gpu_usable
from gpu_ops.device import to_host
from gpu_ops.errors import InputError
from gpu_ops.backend_table import register_backend, requires

log = logging.getLogger(__name__)

INITS = ("k-means++", "random")
#: Default rows drawn for k-means++ seeding: ``max(SEED_MIN_ROWS, SEED_ROWS_PER_CENTROID * k)``,
#: capped by the training rows, :data:`SEED_MAX_BYTES` and the cost bounds below.
SEED_MIN_ROWS = 10_000
SEED_ROWS_PER_CENTROID = 40
#: Seeding costs about ``n_seedings * k * rows * (d + 6 * trials)`` element operations (one thin
#: matrix product plus a few passes over a rows x trials array per centre); Lloyd costs
#: ``n_train * k * d * max_iter`` multiply-adds in a large, efficient matrix product (~10x faster
#: per element). The seeding sample shrinks to keep its cost under ``SEED_LLOYD_FRACTION`` of
#: Lloyd's and under :data:`SEED_MAX_WORK`; when even ``2 * k`` rows and one seeding would not
#: fit (k in the thousands on few rows), FAISS's random initialisation is used instead (logged).
SEED_LLOYD_FRACTION = 1 / 40
#: Seeding may always spend this much (~0.5 s on two cores), however cheap Lloyd is, and never more
#: than :data:`SEED_MAX_WORK`.
SEED_MIN_WORK = 1e9
SEED_MAX_WORK = 1e10
#: Bytes the seeding sample may occupy.
SEED_MAX_BYTES = 256 * 2**20


#: Whether FAISS's OpenMP runtime lets idle threads sleep: True when :func:`import_faiss` loaded it
#: with ``OMP_WAIT_POLICY=PASSIVE`` (or the user chose passive), False when another library had
#: already loaded the same runtime (scikit-learn bundles the very same libgomp build, and whichever
#: loads first is shared) or the user chose active, None before faiss is imported.
OMP_PASSIVE: bool | None = None


def _libgomp_loaded() -> bool:
    """Is some libgomp already mapped into this process? (Linux; elsewhere assume it is.)"""
    try:
        with open("/proc/self/maps") as fh:
            return "libgomp" in fh.read()
    except OSError:
        return True


def machine_busy() -> bool:
    """1-minute load average above 1.5 x the CPU count: other processes compete for the cores."""
    try:
        return os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return False


def import_faiss() -> Any:
    """Import faiss with its OpenMP runtime told to let idle threads sleep (``OMP_WAIT_POLICY=PASSIVE``).

    FAISS uses OpenMP and an OpenMP build of OpenBLAS, whose waiting threads spin by default. On a
    machine whose cores are also busy with other work (CI, a shared box) spinning threads and
    working ones take turns: measured on 2 shared cores (load average ~7), 100k x 128, k=100,
    20 iterations took 3.3-5.1 s with spinning threads and 1.3-1.5 s with sleeping ones (MNIST test
    pixels, k=10, 100 iterations: 3.4 s vs 1.1 s). libgomp reads the policy once, when it is
    loaded, so it is set only for the duration of the first ``import faiss`` and removed again, and
    only takes effect if no libgomp was loaded before (see :data:`OMP_PASSIVE`). A policy the user
    set is left alone. Raises ImportError when faiss is not installed.
    """
    global OMP_PASSIVE
    user = os.environ.get("OMP_WAIT_POLICY")
    if "faiss" in sys.modules:
        if OMP_PASSIVE is None:
            OMP_PASSIVE = bool(user and user.strip().lower() == "passive")
        return sys.modules["faiss"]
    preloaded = _libgomp_loaded()
    if user is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import faiss
    finally:
        if user is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
    OMP_PASSIVE = user.strip().lower() == "passive" if user is not None else not preloaded
    return faiss


#: Below this many multiply-adds per Lloyd iteration (n * k * d), FAISS runs on one thread: the
#: per-iteration cost of waking threads outweighs the work (5 000 x 32, k <= 20: ~5 ms/iteration
#: on 2 threads against well under 1 ms on one).
SINGLE_THREAD_WORK = 1e8


@contextlib.contextmanager
def _faiss_threads(faiss: Any, single: bool) -> Iterator[None]:
    """Run FAISS (OpenMP) and BLAS on one thread inside the block when ``single``."""
    if not single:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with _blas_threads(1):
            yield
    finally:
        faiss.omp_set_num_threads(before)


@contextlib.contextmanager
def _blas_threads(limit: int | None) -> Iterator[None]:
    """Limit BLAS threads (thin matrix products are faster on one thread than on a busy pool)."""
    if limit is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        yield
        return
    with threadpool_limits(limits=limit, user_api="blas"):
        yield


def default_trials(k: int) -> int:
    """Local trials per k-means++ centre: ``2 + 2 int(ln k)`` (see :func:`kmeans_plusplus`)."""
    return 2 + 2 * int(np.log(max(int(k), 1)))


def kmeans_plusplus(X: np.ndarray, n_clusters: int, *, seed: int = 0, n_local_trials: int | None = None,
                    sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with scikit-learn's local trials).

    Each new centre is the best of ``n_local_trials`` candidates drawn with probability proportional
    to the squared distance to the nearest centre so far (times ``sample_weight``); "best" means the
    lowest resulting potential. The default, ``2 + 2 int(ln k)``, is twice scikit-learn's
    ``2 + int(ln k)``: on 100-centre Gaussian blobs (100k x 64, 10k x 512; 16 seeds each, FAISS Lloyd
    after) scikit-learn's count left a centre doubled up in 1 run of 16 (objective 18-25% above the
    best), twice as many trials in none, at about the same cost. Distances use the
    ``|x|^2 - 2 x.c + |c|^2`` expansion, one thin matrix product per centre.

    Parameters
    ----------
    X : np.ndarray of shape (n, d), float32
    n_clusters : int
    seed : int
    n_local_trials : int or None
    sample_weight : np.ndarray of shape (n,) or None

    Returns
    -------
    centers : np.ndarray of shape (n_clusters, d), float32
    potential : float
        Weighted sum of squared distances from the rows of ``X`` to their nearest centre.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    n, d = X.shape
    k = int(n_clusters)
    check_n_clusters(k, n)
    rng = np.random.default_rng(seed)
    trials = int(n_local_trials) if n_local_trials else default_trials(k)
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    xsq = np.einsum("ij,ij->i", X, X)
    centers = np.empty((k, d), dtype=np.float32)
    first = int(rng.integers(n)) if w is None else int(rng.choice(n, p=w / w.sum()))
    centers[0] = X[first]
    with _blas_threads(1 if n * d < (1 << 22) else None):
        closest = np.maximum(xsq - 2.0 * (X @ X[first]) + xsq[first], 0.0).astype(np.float64)
        for c in range(1, k):
            mass = closest if w is None else closest * w
            cum = np.cumsum(mass)
            if cum[-1] <= 0:  # every row sits on a centre already: draw uniformly
                cand = rng.integers(n, size=trials)
            else:
                cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1]), n - 1)
            dist = xsq[:, None] - 2.0 * (X @ X[cand].T) + xsq[cand][None, :]
            np.maximum(dist, 0.0, out=dist)
            cand_closest = np.minimum(closest[:, None], dist)
            pots = cand_closest.sum(axis=0) if w is None else w @ cand_closest
            best = int(np.argmin(pots))
            closest = cand_closest[:, best].astype(np.float64)
            centers[c] = X[cand[best]]
    potential = float(closest.sum() if w is None else w @ closest)
    return centers, potential


def best_kmeans_plusplus(sample: np.ndarray, n_clusters: int, n_seedings: int,
                         rng: np.random.Generator) -> np.ndarray:
    """The lowest-potential of ``n_seedings`` :func:`kmeans_plusplus` seedings of ``sample``.

    Every k-means++ start of this package goes through here (FAISS estimator, Lloyd driver).
    """
    best, best_pot = None, np.inf
    for _ in range(max(1, int(n_seedings))):
        centers, pot = kmeans_plusplus(sample, int(n_clusters), seed=int(rng.integers(2**31)))
        if pot < best_pot:
            best, best_pot = centers, pot
    return best


def seeding_rows(n: int, k: int, d: int, n_seedings: int, init_sample: int | None = None,
                 max_iter: int = 25) -> tuple[int, int]:
    """Rows to draw for k-means++ seeding and how many seedings to try: ``(rows, n_seedings)``.

    ``n`` is the number of training rows. ``rows`` is 0 when even ``min(n, 2 k)`` rows and one
    seeding would exceed the cost bounds (see :data:`SEED_LLOYD_FRACTION`): the caller then uses
    random initialisation.
    """
    per_row = d + 6 * default_trials(k)
    rows = min(n, init_sample if init_sample else max(SEED_MIN_ROWS, SEED_ROWS_PER_CENTROID * k))
    rows = min(rows, max(1, SEED_MAX_BYTES // (4 * d)))
    work = min(SEED_MAX_WORK, max(SEED_MIN_WORK, SEED_LLOYD_FRACTION * n * k * d * max(1, max_iter)))
    for tries in range(max(1, n_seedings), 0, -1):
        r = min(rows, int(work // (tries * k * per_row)))
        if r >= min(n, 2 * k):
            return r, tries
    return 0, 0


class CumlKMeans:
    """cuML ``KMeans`` on the GPU (scalable k-means++ / k-means|| init, Lloyd iterations).

    Parameters
    ----------
    n_clusters : int
    max_iter : int
        Lloyd iterations per restart.
    n_init : int
        Restarts with different seeds; the run with the lowest inertia is kept. One is
        usually enough with k-means|| initialisation (cuML's own ``"auto"`` picks 1).
    seed : int
        cuML ``random_state``.

    Attributes
    ----------
    labels_ : np.ndarray of shape (n,), int64
    cluster_centers_ : np.ndarray of shape (k, d), float32
    inertia_ : float
        Sum of squared distances to the nearest centre (cuML accumulates it in float32).
    n_iter_ : int
    """

    def __init__(self, n_clusters: int = 8, max_iter: int = 300, n_init: int = 1, seed: int = 0) -> None:
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.n_init = n_init
        self.seed = seed

    def fit(self, X: np.ndarray) -> "CumlKMeans":
        """Fit on ``X`` of shape (n, d); the data is copied to the GPU once."""
        X = as_float32_matrix(X)
        check_n_clusters(self.n_clusters, X.shape[0])
        check_int("max_iter", self.max_iter)
        check_int("n_init", self.n_init)
        from cuml.cluster import KMeans

        self._km = KMeans(
            n_clusters=int(self.n_clusters),
            max_iter=int(self.max_iter),
            n_init=int(self.n_init),
            random_state=int(self.seed),
            init="scalable-k-means++",
            output_type="numpy",
        ).fit(X)
        self.labels_ = to_host(self._km.labels_).astype(np.int64)
        self.cluster_centers_ = to_host(self._km.cluster_centers_).astype(np.float32)
        self.inertia_ = float(self._km.inertia_)
        self.n_iter_ = int(self._km.n_iter_)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Nearest centre for each row of ``X`` (n, d) -> (n,)."""
        return to_host(self._km.predict(as_float32_matrix(X))).astype(np.int64)


class FaissKMeans:
    """FAISS k-means as a scikit-learn style estimator.

    Parameters
    ----------
    n_clusters : int
    max_iter : int
        Lloyd iterations per restart (FAISS ``niter``).
    n_init : int
        Restarts; the run with the lowest objective is kept (FAISS ``nredo`` for random init).
    seed : int
    max_points_per_centroid : int or None
        FAISS trains on at most ``k * max_points_per_centroid`` sampled points. None trains on
        every point (FAISS's own default, 256, would silently subsample).
    gpu : bool
        Train on the GPU (needs a GPU build of faiss).
    init : {"k-means++", "random"}
        "k-means++" (default): each restart starts from greedy k-means++ centres (see
        :func:`kmeans_plusplus`) computed on a random sample of ``init_sample`` rows, the best
        (lowest potential) of ``n_seedings`` seedings. "random": FAISS's own initialisation,
        ``k`` distinct random rows. FAISS's random init on well-separated data often leaves two
        centres in one cluster and none in another (100k x 128 blobs, 100 centres, 20 iterations:
        objective 78-87 M against 12.8 M for k-means++ and 12.8-15.5 M for scikit-learn);
        k-means++ does not trade objective for speed. When
        k-means++ would cost too much next to the Lloyd iterations (k in the thousands on few rows,
        see :func:`seeding_rows`), ``init`` falls back to "random" and logs why; ``init_`` says
        which ran.
    init_sample : int or None
        Most rows for seeding; None: ``max(10 000, 40 k)``; capped by n and the cost bounds.
    n_seedings : int
        Seedings per restart (cheap next to Lloyd: one thin matrix product per centre).

    Attributes
    ----------
    labels_ : np.ndarray of shape (n,), int64
    cluster_centers_ : np.ndarray of shape (k, d), float32
    inertia_ : float
        Sum of squared distances of all rows to their nearest centre (float64 sum).
    n_iter_ : int
    init_ : str
        The initialisation actually used.
    objective_history_ : list of float
        FAISS's per-iteration objective of the kept restart.
    """

    def __init__(
        self,
        n_clusters: int = 8,
        max_iter: int = 25,
        n_init: int = 1,
        seed: int = 0,
        max_points_per_centroid: int | None = None,
        gpu: bool = False,
        init: str = "k-means++",
        init_sample: int | None = None,
        n_seedings: int = 3,
    ) -> None:
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.n_init = n_init
        self.seed = seed
        self.max_points_per_centroid = max_points_per_centroid
        self.gpu = gpu
        self.init = init
        self.init_sample = init_sample
        self.n_seedings = n_seedings

    def _seed_centers(self, X: np.ndarray, rows: int, n_seedings: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        n = X.shape[0]
        sample = X if rows >= n else X[np.sort(rng.choice(n, size=rows, replace=False))]
        return best_kmeans_plusplus(sample, int(self.n_clusters), n_seedings, rng)

    def _assign(self, X: np.ndarray, centroids: np.ndarray,
                weights: np.ndarray | None) -> tuple[float, np.ndarray]:
        """(objective, labels) of ``X`` against ``centroids``, by the package's nearest-centre kernel."""
        labels, dist = NearestCentre(centroids, gpu=bool(self.gpu))(X)
        d = dist.astype(np.float64)
        return float(d.sum() if weights is None else d @ weights.astype(np.float64)), labels

    def fit(self, X: np.ndarray, sample_weight: np.ndarray | None = None) -> "FaissKMeans":
        """Fit on ``X`` of shape (n, d); ``sample_weight`` (n,) weights the Lloyd updates."""
        faiss = import_faiss()

        X = as_float32_matrix(X)
        n, d = X.shape
        k = self.n_clusters
        check_n_clusters(k, n)
        check_int("max_iter", self.max_iter)
        check_int("n_init", self.n_init)
        check_int("n_seedings", self.n_seedings)
        if self.init not in INITS:
            raise InputError(f"unknown init {self.init!r}; expected one of: {', '.join(INITS)}")
        if self.max_points_per_centroid is not None:
            check_int("max_points_per_centroid", self.max_points_per_centroid)
        weights = None
        if sample_weight is not None:
            weights = np.ascontiguousarray(sample_weight, dtype=np.float32)
            if weights.shape != (n,) or (weights < 0).any():
                raise InputError(f"sample_weight must be {n} non-negative values; got shape {weights.shape}")
        mppc = self.max_points_per_centroid or int(np.ceil(n / k)) + 1
        n_train = min(n, int(k) * int(mppc))
        init = self.init
        rows, n_seedings = 0, 0
        if init == "k-means++" and int(k) > 1:
            rows, n_seedings = seeding_rows(n_train, int(k), d, int(self.n_seedings), self.init_sample,
                                            int(self.max_iter))
            if rows == 0:
                log.info("kmeans: k-means++ seeding of k=%d in %d-d on %d rows would cost more than Lloyd's "
                         "iterations allow (see SEED_LLOYD_FRACTION); using FAISS random initialisation", k, d, n_train)
                init = "random"

        def clustering(nredo: int, seed: int) -> Any:
            return faiss.Kmeans(d, int(k), niter=int(self.max_iter), nredo=nredo, seed=seed,
                                max_points_per_centroid=int(mppc), min_points_per_centroid=1,
                                gpu=bool(self.gpu), verbose=False)

        single = not self.gpu and float(n_train) * float(k) * d < SINGLE_THREAD_WORK
        # With spinning OpenMP threads on a busy machine, FAISS's BLAS calls fare best on one
        # thread (100k x 128, k=100: 2.0 s vs 5.0 s); FAISS's own OpenMP loops keep their threads.
        spin_guard = not self.gpu and not single and OMP_PASSIVE is False and machine_busy()
        with _faiss_threads(faiss, single), _blas_threads(1 if spin_guard else None):
            if init == "random" or int(k) == 1:
                km = clustering(int(self.n_init), int(self.seed))
                km.train(X, weights=weights)
                best = (*self._assign(X, km.centroids, weights), km)
            else:
                best = None
                for r in range(int(self.n_init)):
                    seed_r = int(self.seed) + 1000003 * r
                    init_centers = self._seed_centers(X, rows, n_seedings, seed_r)
                    km = clustering(1, seed_r)
                    km.train(X, weights=weights, init_centroids=init_centers)
                    inertia, labels = self._assign(X, km.centroids, weights)
                    if best is None or inertia < best[0]:
                        best = (inertia, labels, km)
        inertia, labels, km = best
        self.init_ = init
        self.cluster_centers_ = np.asarray(km.centroids, dtype=np.float32)
        self.labels_ = labels
        self.inertia_ = inertia
        self.n_iter_ = int(self.max_iter)
        self.objective_history_ = [float(v) for v in km.obj]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Nearest centre for each row of ``X`` (n, d) -> (n,)."""
        return NearestCentre(self.cluster_centers_, gpu=bool(self.gpu))(as_float32_matrix(X))[0]


class SklearnKMeans:
    """scikit-learn ``KMeans`` (Lloyd, k-means++ init) with the common parameter names."""

    def __init__(self, n_clusters: int = 8, max_iter: int = 300, n_init: int = 10, seed: int = 0) -> None:
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.n_init = n_init
        self.seed = seed

    def fit(self, X: np.ndarray) -> "SklearnKMeans":
        """Fit on ``X`` of shape (n, d)."""
        from sklearn.cluster import KMeans

        X = as_float32_matrix(X)
        check_n_clusters(self.n_clusters, X.shape[0])
        self._km = KMeans(
            n_clusters=int(self.n_clusters),
            max_iter=int(self.max_iter),
            n_init=int(self.n_init),
            random_state=int(self.seed),
            algorithm="lloyd",
        ).fit(X)
        self.labels_ = self._km.labels_.astype(np.int64)
        self.cluster_centers_ = self._km.cluster_centers_.astype(np.float32)
        self.inertia_ = float(self._km.inertia_)
        self.n_iter_ = int(self._km.n_iter_)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self._km.predict(as_float32_matrix(X)).astype(np.int64)


@register_backend(
    "kmeans", "cuml", kind="gpu", priority=0, availability=requires("cuml", gpu=True),
    description="cuML KMeans on the GPU (k-means|| init)",
)
def _cuml(**params: object) -> CumlKMeans:
    return CumlKMeans(**params)


@register_backend(
    "kmeans", "faiss-gpu", kind="gpu", priority=1,
    availability=lambda: (True, "faiss GPU build sees a GPU") if faiss_gpu_usable() else (False, "faiss GPU build or GPU not available"),
    description="FAISS k-means on the GPU",
)
def _faiss_gpu(**params: object) -> FaissKMeans:
    return FaissKMeans(**params, gpu=True)


@register_backend(
    "kmeans", "faiss-cpu", kind="cpu", priority=0, availability=requires("faiss"),
    description="FAISS k-means on the CPU (BLAS distance kernels, multi-threaded)",
)
def _faiss_cpu(**params: object) -> FaissKMeans:
    return FaissKMeans(**params, gpu=False)


@register_backend(
    "kmeans", "sklearn", kind="cpu", priority=1, availability=requires("sklearn"),
    description="scikit-learn KMeans (Lloyd, k-means++)",
)
def _sklearn(**params: object) -> SklearnKMeans:
    return SklearnKMeans(**params)
