"""Clustering heads (SCAN, TEMI, TURTLE) on real data: each beats k-means on the same features, the
saved head assigns the same labels, a seed repeats, a store streamed from disk gives the same head,
TURTLE treats each backbone of a store as its own representation space, and bad settings are
one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from gpu_ops.config import make_config
from gpu_ops.errors import InputError
from gpu_ops.heads import fit_head, head_config, load_head
from gpu_ops.metrics import evaluate
from gpu_ops.registry import create_estimator
from gpu_ops.store import EmbeddingStore
from conftest import run_cli

#: Shorter training than the defaults (fewer epochs and heads), enough on MNIST's test pixels.
FAST = {"scan": {"epochs": 6, "n_heads": 4, "selflabel_epochs": 2},
        "temi": {"epochs": 8, "n_heads": 3},
        "turtle": {"epochs": 80, "n_heads": 4, "keep_heads": 1, "prune_epoch": 10, "batch_size": 2500}}
#: Settings for the checks that need no accuracy (repeats, streaming, files).
TINY = {"scan": {"epochs": 2, "n_heads": 2, "selflabel_epochs": 1}, "temi": {"epochs": 2, "n_heads": 2},
        "turtle": {"epochs": 3, "n_heads": 2, "keep_heads": 1, "prune_epoch": 1}}


@pytest.fixture(scope="module")
def mnist(mnist_test) -> tuple[np.ndarray, np.ndarray]:
    """The 10 000 MNIST test digits as raw pixels in [0, 1], and their labels."""
    X, y = mnist_test
    return X, y.astype(np.int64)


@pytest.fixture(scope="module")
def mnist_2k(mnist) -> tuple[np.ndarray, np.ndarray]:
    X, y = mnist
    return X[:2000], y[:2000]


@pytest.fixture(scope="module")
def kmeans_acc(mnist) -> float:
    """k-means (FAISS, 5 restarts) on the same pixels: ACC 0.55 (the best of 10 restarts is the same)."""
    X, y = mnist
    est, _ = create_estimator("kmeans", "cpu", n_clusters=10, n_init=5, max_iter=100, seed=0)
    est.fit(X)
    return evaluate(y, est.labels_)["acc"]


@pytest.fixture(scope="module")
def fitted(mnist) -> dict:
    X, y = mnist
    return {alg: fit_head(alg, X, 10, seed=0, device="cpu", labels=y, **FAST[alg]) for alg in ("scan", "temi", "turtle")}


@pytest.mark.parametrize("algorithm, margin", [("scan", 0.04), ("temi", 0.04), ("turtle", 0.04)])
def test_each_head_beats_kmeans_on_the_same_features(fitted, kmeans_acc, algorithm, margin) -> None:
    res = fitted[algorithm]
    assert res.metrics["acc"] >= kmeans_acc + margin, (res.metrics, kmeans_acc)
    # the history holds one record per epoch with the kept head's objective and the scores
    main = [h for h in res.history if h["phase"] == algorithm]
    assert [h["epoch"] for h in main] == list(range(1, FAST[algorithm]["epochs"] + 1))
    assert {"loss", "head", "objectives", "acc", "nmi", "ari"} <= set(main[-1])
    # the kept head is the one with the lowest objective among those trained to the end (TURTLE prunes)
    assert len(res.objectives) == FAST[algorithm]["n_heads"]
    survivors = main[-1].get("heads", range(len(res.objectives)))
    assert res.kept_head in survivors
    assert res.objectives[res.kept_head] == min(res.objectives[h] for h in survivors)


@pytest.mark.parametrize("algorithm", ["scan", "temi", "turtle"])
def test_the_saved_head_assigns_the_same_labels(fitted, mnist, tmp_path, algorithm) -> None:
    X, _ = mnist
    res = fitted[algorithm]
    head = load_head(res.save(tmp_path / f"model-{algorithm}.pt"))
    proba = head.predict_proba(X)
    assert proba.shape == (len(X), 10) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(proba.argmax(axis=1), res.labels)
    assert (head.k, head.dim, head.algorithm, head.kept_head) == (10, 784, algorithm, res.kept_head)
    with pytest.raises(InputError, match=r"model-.*\.pt: the head takes rows of 784 features; got shape \(3, 5\)"):
        head.predict_proba(np.zeros((3, 5), np.float32))


@pytest.mark.parametrize("algorithm", ["scan", "temi", "turtle"])
def test_a_seed_repeats(mnist_2k, algorithm) -> None:
    X, y = mnist_2k
    first, again, other = (fit_head(algorithm, X, 10, seed=seed, device="cpu", labels=y, **TINY[algorithm])
                           for seed in (5, 5, 6))
    assert np.array_equal(again.labels, first.labels)
    assert [h["loss"] for h in again.history] == [h["loss"] for h in first.history]
    assert [h["loss"] for h in other.history] != [h["loss"] for h in first.history]


def test_heads_that_are_relabellings_of_each_other_are_matched_back():
    """Three heads giving the same clusters under other names: their orders undo the renaming."""
    from gpu_ops.heads.scan import matched_orders

    rng = np.random.default_rng(0)
    base = rng.dirichlet(np.ones(4) * 0.3, size=200).astype(np.float32)  # (n, k) probabilities
    renamings = [np.arange(4), np.array([2, 0, 3, 1]), np.array([3, 2, 1, 0])]
    probs = np.stack([base[:, np.argsort(r)] for r in renamings])  # head h's cluster r[j] is cluster j
    orders = matched_orders(probs, reference=0)
    assert [list(o) for o in orders] == [list(r) for r in renamings]


def test_a_consensus_of_heads_is_saved_whole_and_assigns_its_own_labels(mnist_2k, tmp_path):
    X, y = mnist_2k
    res = fit_head("scan", X, 10, seed=1, device="cpu", labels=y, consensus=True, epochs=4, n_heads=3, hidden=32)
    assert res.history[-1]["phase"] == "consensus" and res.history[-1]["heads"] == 3
    assert res.history[-1]["acc"] == pytest.approx(res.metrics["acc"])
    head = load_head(res.save(tmp_path / "model-scan.pt"))
    assert head.mean_of_heads and head.model.n_heads == 3
    assert np.array_equal(head.predict(X), res.labels)
    # the consensus does about as well as the lowest-objective head alone, or better
    kept_alone = [h["acc"] for h in res.history if h["phase"] == "scan"][-1]
    assert res.metrics["acc"] >= kept_alone - 0.02, (res.metrics["acc"], kept_alone)
    with pytest.raises(InputError, match="^scan consensus keeps every head and self-labelling tunes one"):
        head_config("scan", consensus=True, selflabel_epochs=1)


def test_a_store_streamed_through_a_memory_map_trains_the_same_head(mnist_2k, tmp_path) -> None:
    """Rows that exceed the memory budget are memory-mapped; the head is the one trained in memory."""
    X, y = mnist_2k
    directory = tmp_path / "store"
    store = EmbeddingStore(directory, {"extractor": "raw-pixels", "store_key": "mnist-2k"}, len(X), 700)
    for shard in store.pending_shards():
        rows = store.shard_range(shard)
        store.write_shard(shard, [str(i) for i in rows], [""] * len(rows), y[rows].astype(np.int32), X[rows], [])
    store.finish()
    settings = TINY["scan"]
    scratch = tmp_path / "scratch"
    streamed = fit_head("scan", directory, 10, seed=3, device="cpu", memory_mb=1, scratch=scratch, **settings)
    assert (scratch / "head-rows.npy").is_file()  # 2 000 x 784 float32 rows need 6 MB: over half of 1 MB
    in_memory = fit_head("scan", X, 10, seed=3, device="cpu", **settings)
    assert np.array_equal(streamed.labels, in_memory.labels)


@pytest.mark.parametrize("algorithm, overrides, message", [
    ("scan", {"entropy_weight": -1}, "scan entropy_weight must be a number >= 0; got -1"),
    ("scan", {"confidence": 1.5}, "scan confidence must be a number between 0 and 1; got 1.5"),
    ("scan", {"n_heads": 0}, "scan n_heads must be a positive integer; got 0"),
    ("temi", {"beta": 0}, "temi beta must be a number in (0, 1]; got 0"),
    ("temi", {"teacher_temp": 0.0}, "temi teacher_temp must be a positive number; got 0.0"),
    ("temi", {"heads": 3}, "unknown temi option(s) 'heads'; expected some of: "),
    ("turtle", {"neighbors": 20}, "turtle neighbors must be 0 (TURTLE mines no neighbours); got 20"),
    ("turtle", {"gamma": -1.0}, "turtle gamma must be a number >= 0; got -1.0"),
    ("turtle", {"inner_steps": 0}, "turtle inner_steps must be a positive integer; got 0"),
])
def test_bad_settings_are_one_line_errors(algorithm, overrides, message) -> None:
    with pytest.raises(InputError) as err:
        head_config(algorithm, **overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def two_space_store(directory, X: np.ndarray, y: np.ndarray, shard_rows: int = 700) -> np.ndarray:
    """A store whose rows join two representations of the same digits, as a store of two backbones
    does: the 784 pixels and the 196 means of 2x2 pixel blocks; the rows written."""
    pooled = X.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(X), 196)
    rows_all = np.hstack([X, pooled]).astype(np.float32)
    backbones = [{"extractor": "pixels", "start": 0, "stop": 784}, {"extractor": "pooled", "start": 784, "stop": 980}]
    store = EmbeddingStore(directory, {"extractor": "pixels+pooled", "store_key": "two-spaces",
                                       "backbones": json.dumps(backbones)}, len(X), shard_rows)
    for shard in store.pending_shards():
        rows = store.shard_range(shard)
        store.write_shard(shard, [str(i) for i in rows], [""] * len(rows), y[rows].astype(np.int32), rows_all[rows], [])
    store.finish()
    return rows_all


def test_turtle_treats_each_backbone_of_a_store_as_a_space(mnist_2k, tmp_path) -> None:
    """Each backbone of the store gets its own centring, principal axes and L2 norm, and its own task
    encoder reading only its columns; the saved head gives the run's labels."""
    X, y = mnist_2k
    rows = two_space_store(tmp_path / "store", X, y)
    res = fit_head("turtle", tmp_path / "store", 10, seed=0, device="cpu", labels=y, **TINY["turtle"])
    assert res.transform.spaces == ((0, 256), (256, 452))  # 784 -> 256 principal axes, 196 kept whole
    Z = res.transform(rows[:50])
    gain = np.sqrt((256 + 196) / 2)
    np.testing.assert_allclose(np.linalg.norm(Z[:, :256], axis=1), gain, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(Z[:, 256:], axis=1), gain, rtol=1e-5)
    weights = res.model.weights[0].detach().numpy()  # (spaces, 452, k): one task encoder per space
    assert weights.shape == (2, 452, 10)
    assert not weights[0, 256:].any() and not weights[1, :256].any()
    head = load_head(res.save(tmp_path / "model-turtle.pt"))
    assert np.array_equal(head.predict(rows), res.labels) and head.transform.spaces == res.transform.spaces
    # an array has one space: all its columns
    assert fit_head("turtle", rows, 10, seed=0, device="cpu", **TINY["turtle"]).transform.spaces == ((0, 256),)


def test_rows_copied_from_a_store_of_several_backbones_keep_their_spaces(mnist_2k, tmp_path) -> None:
    """``parquet:DIR`` of such a store is copied into the run's cache store with its backbones'
    column ranges, so a head trained on the copy still sees one space per backbone."""
    from gpu_ops.data import load_dataset
    from gpu_ops.features import create_extractor
    from gpu_ops.features.extract import extract_to_store
    from gpu_ops.heads.api import feature_spaces

    X, y = mnist_2k
    two_space_store(tmp_path / "store", X[:300], y[:300])
    copy = extract_to_store(load_dataset(f"parquet:{tmp_path / 'store'}", "all"), create_extractor("raw"),
                            tmp_path / "cache", progress=False)
    assert copy.directory != str(tmp_path / "store") and copy.rows == 300
    assert feature_spaces(copy.directory, copy.dim) == [(0, 784), (784, 980)]
    # rows from a plain Parquet folder (no backbones) are one space
    assert feature_spaces(tmp_path / "store" / "nowhere", 980) == [(0, 980)]


def test_bad_inputs_are_one_line_errors(mnist_2k, tmp_path) -> None:
    X, _ = mnist_2k
    with pytest.raises(InputError, match=r"^scan: k must be an integer from 2 to the number of rows \(2000\); got 1$"):
        fit_head("scan", X, 1)
    with pytest.raises(InputError, match=r"^neighbors=20 needs at least 21 rows; the store has 5$"):
        fit_head("scan", X[:5], 2)
    with pytest.raises(InputError, match=r"^unknown clustering head 'dec'; expected one of: scan, temi, turtle$"):
        fit_head("dec", X, 10)
    missing = tmp_path / "model-scan.pt"
    with pytest.raises(InputError, match=r"model-scan\.pt: no saved head there"):
        load_head(missing)
    missing.write_text("not a model")
    with pytest.raises(InputError, match=r"model-scan\.pt: not a saved clustering head"):
        load_head(missing)


def test_a_run_trains_the_heads_and_saves_them(tmp_path, prefect_server) -> None:
    """``gpuclust run --algorithm scan,temi,turtle`` on digits: labels, metrics, the kept heads and their histories;
    ``gpuclust assign`` of the run's own images gives them the run's labels through the saved heads."""
    out = tmp_path / "run"
    # the heads' own settings (FAST: fewer epochs and heads) reach them through --algorithm-option
    options = [arg for alg in ("scan", "temi", "turtle") for name, value in FAST[alg].items()
               for arg in ("--algorithm-option", f"{alg}.{name}={value}")]
    proc = run_cli(["run", "--dataset", "digits", "--algorithm", "scan,temi,turtle,kmeans", "--k", "10", "--reducer", "none",
                    "--backend", "cpu", "--no-explore", *options, "--out", str(out)], api_url=prefect_server["url"])
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["algorithms"]) == {"scan", "temi", "turtle", "kmeans"}
    for algorithm in ("scan", "temi", "turtle"):
        assert metrics["algorithms"][algorithm]["acc"] > 0.5  # k-means 0.79: the heads want more rows than digits has
        history = json.loads((out / f"history-{algorithm}.json").read_text())
        trained = [h for h in history if h["phase"] == algorithm]
        assert history[0]["phase"] == algorithm and "acc" in trained[-1]
        assert len(trained) == FAST[algorithm]["epochs"] and len(trained[0]["objectives"]) == FAST[algorithm]["n_heads"]
        head = load_head(out / f"model-{algorithm}.pt")
        assert (head.k, head.dim) == (10, 64)
    ops = {(r["stage"], r["op"]) for r in metrics["backends"]}
    assert {("scan", "knn"), ("temi", "knn"), ("scan", "scan"), ("temi", "temi"), ("turtle", "turtle")} <= ops
    assert ("turtle", "knn") not in ops  # TURTLE mines no neighbours

    assigned = tmp_path / "assigned.parquet"
    proc = run_cli(["assign", str(out), "--dataset", "digits", "--out", str(assigned)], api_url=prefect_server["url"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, run = pd.read_parquet(assigned), pd.read_parquet(out / "assignments.parquet")
    for algorithm in ("scan", "temi", "turtle"):
        assert (got[algorithm].to_numpy() == run[algorithm].to_numpy()).all()
        assert got[f"{algorithm}_confidence"].between(0, 1).all()


def test_the_memory_budget_applies_to_the_heads_and_to_the_whole_run() -> None:
    assert make_config(algorithms=["scan", "temi"], memory_mb=64).memory_mb == 64
    # the budget bounds every stage (map, evaluation, run files, report), whatever clusters
    assert make_config(algorithms=["gmm"], memory_mb=64).memory_mb == 64
