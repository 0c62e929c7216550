"""The ``knn`` op: every CPU backend returns the exact neighbours, without the query itself."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from gpu_ops.cluster.neighbors import drop_self
from gpu_ops.errors import InputError
from gpu_ops.registry import create_estimator


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_faiss_and_sklearn_agree_on_digits(metric: str) -> None:
    X = load_digits().data.astype(np.float32)
    found = {}
    for backend in ("faiss-cpu", "sklearn"):
        est, res = create_estimator("knn", backend, metric=metric)
        dist, idx = est.fit(X).kneighbors(n_neighbors=5)
        assert res.backend == backend
        assert dist.shape == idx.shape == (len(X), 5)
        assert not (idx == np.arange(len(X))[:, None]).any()  # never the query itself
        assert (np.diff(dist, axis=1) >= -1e-4).all()
        found[backend] = dist
    np.testing.assert_allclose(found["faiss-cpu"], found["sklearn"], rtol=1e-3, atol=1e-3)


def test_exact_duplicates_find_their_twin_at_distance_zero() -> None:
    X = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [9.0, 9.0]], np.float32)
    est, _ = create_estimator("knn", "faiss-cpu")
    dist, idx = est.fit(X).kneighbors(n_neighbors=1)
    assert idx[:2, 0].tolist() == [1, 0] and idx[3, 0] == 2
    assert dist[0, 0] == 0.0 and dist[1, 0] == 0.0


def test_drop_self_removes_exactly_one_column() -> None:
    idx = np.array([[3, 0, 1], [1, 2, 0]])
    dist = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    d, i = drop_self(dist, idx, np.array([0, 1]))
    assert i.tolist() == [[3, 1], [2, 0]] and d.tolist() == [[0.0, 1.0], [1.0, 2.0]]


def test_too_many_neighbours_is_one_clear_error() -> None:
    est, _ = create_estimator("knn", "faiss-cpu")
    est.fit(np.zeros((4, 2), np.float32))
    with pytest.raises(InputError, match=r"n_neighbors=4 must be between 1 and 3 \(the 4 indexed rows minus the query itself\)"):
        est.kneighbors(n_neighbors=4)
