"""Choosing k without labels (``--k auto``): elbow + silhouette curves, through the pipeline.

The acceptance case goes through the pipeline's own functions (extract_stage, cluster_stage), as
``gpuclust run --dataset npz:FILE --extractor raw --algorithm kmeans --k auto --reducer none``
does, without Prefect.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import silhouette_score

from gpu_ops.cluster.choose_k import KSelection, choose_k, elbow_point, save_k_selection
from gpu_ops.errors import InputError


@pytest.fixture(scope="module")
def blobs7() -> tuple[np.ndarray, np.ndarray]:
    X, y = make_blobs(n_samples=5000, n_features=32, centers=7, cluster_std=2.0, random_state=0)
    return X.astype(np.float32), y


def test_k_auto_picks_seven_on_the_blobs_through_the_pipeline(blobs7, tmp_path):
    from gpu_ops import pipeline
    from gpu_ops.config import make_config

    X, y = blobs7
    npz = tmp_path / "blobs.npz"
    np.savez(npz, X=X, y=y)
    cfg = make_config(dataset=f"npz:{npz}", extractor="raw", algorithms="kmeans", k="auto", reducer="none",
                      cache_dir=tmp_path / "cache")
    store = pipeline.extract_stage(pipeline.extract_params(cfg), progress=False)
    assert (store.rows, store.dim) == (5000, 32)
    staging = tmp_path / "staging"
    staging.mkdir()
    out = pipeline.cluster_stage(store.store, cfg, "kmeans", str(staging))
    assert out.k == 7
    saved = json.loads((staging / "k_selection.json").read_text())
    assert saved["chosen_k"] == 7 and saved["ks"] == list(range(2, 21))
    assert len(saved["inertia"]) == len(saved["silhouette"]) == 19
    metrics = pipeline.evaluate_stage(store.store, [out])["kmeans"]
    assert metrics.ari > 0.99 and metrics.k == 7


def test_silhouette_on_the_precomputed_sample_is_scikit_learns(blobs7):
    X, _ = blobs7
    sel = choose_k(X[:1200], 3, 5, sample_size=1200, seed=0)
    from gpu_ops.cluster.kmeans import FaissKMeans

    for k, s in zip(sel.ks, sel.silhouette):
        labels = FaissKMeans(n_clusters=k, max_iter=100, n_init=3, seed=0).fit(X[:1200]).labels_
        assert s == pytest.approx(silhouette_score(X[:1200], labels), abs=1e-4)
    assert sel.n_fit == 1200 and sel.n_silhouette == 1200 and len(sel.calinski_harabasz) == 3


def test_large_inputs_are_fitted_on_a_sample(blobs7):
    X, _ = blobs7
    sel = choose_k(X, 6, 8, sample_size=500, fit_sample_size=2000, seed=1)
    assert (sel.n_fit, sel.n_silhouette) == (2000, 500)
    assert sel.chosen_k == 7
    assert choose_k(X, 6, 8, fit_sample_size=2000, method="elbow").chosen_k == sel.elbow_k


def test_elbow_point_finds_the_knee():
    ks = list(range(1, 11))
    inertia = [100, 50, 20, 18, 16, 14, 12, 10, 8, 6]
    assert elbow_point(ks, inertia) == 3


def test_bad_ranges_and_methods_quote_the_values():
    X = np.random.default_rng(0).normal(size=(30, 2)).astype(np.float32)
    with pytest.raises(InputError, match=r"got \(1, 5\) with n=30"):
        choose_k(X, 1, 5)
    with pytest.raises(InputError, match="unknown k selection method 'gap'"):
        choose_k(X, 2, 5, method="gap")


def test_curves_are_saved_as_json(tmp_path):
    sel = KSelection(ks=[2, 3, 4], inertia=[9.0, 4.0, 3.5], silhouette=[0.4, 0.6, 0.5], elbow_k=3, chosen_k=3,
                     backend="faiss-cpu", calinski_harabasz=[1.0, 2.0, 1.5], n_fit=10, n_silhouette=10)
    path = save_k_selection(sel, tmp_path)
    assert path == tmp_path / "k_selection.json"
    assert json.loads(path.read_text()) == sel.as_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k_selection.json"]  # the report draws the curves
