"""Backend resolution on a machine where cuML may be missing: fallbacks, their reasons, and errors.

These run everywhere (no GPU needed); the expected reasons are read from the specs themselves,
so they hold on a GPU machine too, where "unsupported parameters" replaces "not usable here".
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from gpu_ops.cluster.agglomerative import CumlAgglomerative, _cuml_linkage_unsupported
from gpu_ops.cluster.kmeans import CumlKMeans
from gpu_ops.device import cuda_available
from gpu_ops.errors import InputError
from gpu_ops.reduce.pca import CumlPCA
from gpu_ops.reduce.tsne import CumlTSNE, _cuml_tsne_unsupported
from gpu_ops.reduce.umap import CumlUMAP
from gpu_ops.registry import list_backends, resolve_backend

LOGGER = "gpu_ops.registry"


def _spec(op: str, name: str):
    return next(s for s in list_backends(op) if s.name == name)


def _why_skipped(op: str, name: str, params: dict) -> str:
    """The reason the registry must give for not running GPU backend ``name`` with ``params``."""
    ok, why = _spec(op, name).usable()
    if not ok:
        return why
    problem = _spec(op, name).unsupported(params)
    assert problem is not None, f"{op}/{name} would run with {params}; nothing to fall back from"
    return problem


def test_every_op_has_a_cuml_gpu_backend_listed_first():
    for op in ("kmeans", "agglomerative", "tsne", "umap", "pca"):
        specs = list_backends(op)
        assert specs[0].name == "cuml" and specs[0].kind == "gpu", (op, [s.name for s in specs])
        assert any(s.kind == "cpu" for s in specs), op


def test_gpu_request_with_ward_falls_back_to_sklearn_and_says_why():
    params = {"linkage": "ward"}
    spec, res = resolve_backend("agglomerative", "gpu", params)
    assert spec.name == "sklearn" and spec.kind == "cpu"
    assert (res.backend, res.kind, res.requested) == ("sklearn", "cpu", "gpu")
    expected = f"cuml: {_why_skipped('agglomerative', 'cuml', params)}"
    assert expected in res.fallbacks
    assert expected in res.reason
    assert res.as_dict()["fallbacks"] == res.fallbacks


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA: covered by tests/gpu")
def test_gpu_request_without_cuda_names_the_missing_device():
    _, res = resolve_backend("agglomerative", "gpu", {"linkage": "ward"})
    assert "cuml: no CUDA device visible" in res.fallbacks


def test_cuml_by_name_is_an_input_error_when_not_usable_here():
    ok, why = _spec("agglomerative", "cuml").usable()
    if ok:
        pytest.skip("cuML is usable on this machine")
    with pytest.raises(InputError) as info:
        resolve_backend("agglomerative", "cuml", {"linkage": "ward"})
    assert str(info.value) == f"agglomerative backend 'cuml' is not usable here: {why}"
    assert "agglomerative backend 'cuml' is not usable here: " in str(info.value)


def test_cuml_by_name_with_an_unsupported_linkage_falls_back_when_usable():
    ok, _ = _spec("agglomerative", "cuml").usable()
    if not ok:
        pytest.skip("cuML is not usable here (covered by the InputError test)")
    spec, res = resolve_backend("agglomerative", "cuml", {"linkage": "ward"})
    assert spec.name == "sklearn"
    assert res.fallbacks == [f"cuml: {_cuml_linkage_unsupported({'linkage': 'ward'})}"]


def test_tsne_with_three_components_runs_on_opentsne():
    params = {"n_components": 3}
    spec, res = resolve_backend("tsne", "gpu", params)
    assert spec.name == "opentsne" and res.kind == "cpu"
    assert f"cuml: {_why_skipped('tsne', 'cuml', params)}" in res.fallbacks


def test_tsne_unsupported_reason_quotes_the_value():
    assert _cuml_tsne_unsupported({"n_components": 3}) == (
        "cuML TSNE supports 2 components only; n_components=3 was requested"
    )
    assert _cuml_tsne_unsupported({"n_components": 2}) is None


def test_unknown_backend_name_lists_the_valid_choices():
    with pytest.raises(InputError) as info:
        resolve_backend("kmeans", "cumlx")
    names = sorted(["auto", "gpu", "cpu", *(s.name for s in list_backends("kmeans"))])
    assert str(info.value) == f"unknown kmeans backend 'cumlx'; expected one of: {', '.join(names)}"
    for name in ("auto", "cpu", "gpu", "cuml", "faiss-cpu", "faiss-gpu", "sklearn"):
        assert name in str(info.value)


def test_gpu_fallback_logs_a_warning_with_the_reason(caplog):
    params = {"linkage": "ward"}
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        resolve_backend("agglomerative", "gpu", params)
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    message = warnings[0].getMessage()
    assert "agglomerative: falling back to CPU backend 'sklearn'" in message
    assert f"cuml: {_why_skipped('agglomerative', 'cuml', params)}" in message


@pytest.mark.skipif(cuda_available(), reason="with CUDA, auto falling back is a real fallback")
def test_auto_without_cuda_is_the_plan_not_a_warning(caplog):
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        spec, _ = resolve_backend("agglomerative", "auto", {"linkage": "ward"})
    assert spec.name == "sklearn"
    assert not [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# The GPU estimators validate before importing cuML, so bad input is an InputError quoting the
# value on every machine, with or without a GPU.
X = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)


@pytest.mark.parametrize(
    ("estimator", "message"),
    [
        (CumlKMeans(n_clusters=0), "n_clusters must be a positive integer; got 0"),
        (CumlKMeans(n_clusters=51), "k=51 is larger than the number of images (50)"),
        (CumlKMeans(n_clusters=3, n_init=0), "n_init must be a positive integer; got 0"),
        (CumlAgglomerative(n_clusters=3, linkage="ward"), "supports single linkage only; 'ward' was requested"),
        (CumlAgglomerative(n_clusters=3, connectivity="dense"), "unknown connectivity 'dense'"),
        (CumlTSNE(n_components=3), "n_components=3 was requested"),
        (CumlTSNE(perplexity=30.0), "t-SNE with perplexity=30.0 needs more than 90 samples; got 50"),
        (CumlUMAP(n_neighbors=60), "UMAP with n_neighbors=60 needs more than 60 samples; got 50"),
        (CumlPCA(n_components=5), "n_components=5 must be between 1 and min(n_samples, n_features)=4"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else "",
)
def test_gpu_estimators_validate_before_touching_cuml(estimator, message):
    with pytest.raises(InputError) as info:
        estimator.fit(X)
    assert message in str(info.value)


def test_gpu_estimators_reject_bad_shapes_before_touching_cuml():
    with pytest.raises(InputError, match=r"must be a 2-D array .* got shape \(50,\)"):
        CumlKMeans(n_clusters=2).fit(X[:, 0])
