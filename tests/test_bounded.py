"""Bounded memory for every stage: a ``parquet:DIR`` run with ``memory_mb`` streams the store through
extraction, the 2-D map (fitted on a sample, the rest placed), evaluation, the run files and the
report, and scores exactly what the whole arrays in memory score; the explore stage searches
neighbours within k-means cells and finds the planted duplicates and far points the exact search finds.

The run test uses the real CLI (ephemeral Prefect); the memory test runs the stages in a fresh
process and reads its peak RSS (VmHWM) from /proc.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from gpu_ops.metrics import evaluate
from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]


def write_blob_parquet(directory: Path, n: int, dim: int, centres: int, files: int, seed: int = 0) -> None:
    """``n`` rows of well separated Gaussian blobs in ``files`` Parquet files (image_id, label, embedding)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    means = rng.uniform(-10, 10, size=(centres, dim)).astype(np.float32)
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        y = rng.integers(centres, size=hi - lo)
        X = means[y] + rng.standard_normal((hi - lo, dim), dtype=np.float32)
        pq.write_table(pa.table({
            "image_id": pa.array([f"row-{i:07d}" for i in range(lo, hi)], pa.string()),
            "label": pa.array(y.astype(np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), dim),
        }), directory / f"part-{f:03d}.parquet")


N, FITTED = 6000, 600


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A CLI run over 6 000 x 384 blobs (12 centres, 9.2 MB) brought as parquet:DIR with memory_mb=16
    and the map fitted on 600 rows (t-SNE); returns (the Parquet folder, the run directory)."""
    tmp = tmp_path_factory.mktemp("bounded")
    data = tmp / "emb"
    write_blob_parquet(data, N, 384, 12, files=3)
    cfg = {"dataset": f"parquet:{data}", "extractor": "raw", "algorithms": ["kmeans"], "k": 12,
           "reducer": "tsne", "memory_mb": 16, "map_sample_rows": FITTED, "explore": False,
           "out": str(tmp / "run")}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = run_cli(["run", "--config", str(tmp / "cfg.yaml")], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return data, tmp / "run"


def test_sampled_map_run_scores_exactly_as_in_memory_and_says_how_the_map_was_made(sampled_run):
    data, run = sampled_run
    table = pq.read_table(data)  # the whole dataset in memory: the reference
    labels = table.column("label").to_numpy()
    ids = table.column("image_id").to_pylist()
    assignments = pd.read_parquet(run / "assignments.parquet")
    assert assignments["image_id"].tolist() == ids
    metrics = json.loads((run / "metrics.json").read_text())
    expected = evaluate(labels, assignments["kmeans"].to_numpy())
    got = metrics["algorithms"]["kmeans"]
    assert (got["acc"], got["nmi"], got["ari"]) == pytest.approx(
        (expected["acc"], expected["nmi"], expected["ari"]), abs=1e-12)
    assert got["acc"] > 0.9
    assert metrics["n"] == N and metrics["memory_mb"] == 16
    # the embeddings need more than a quarter of the budget: k-means keeps its model for assign (its novelty
    # threshold measured on a sample), the similar-image index (every embedding) is left out
    assert json.loads((run / "model-kmeans.json").read_text())["kind"] == "centroids"
    assert not (run / "search.json").exists()
    assert metrics["reducer"]["fitted_rows"] == FITTED
    assert "nearest fitted points" in metrics["reducer"]["placement"]
    html = (run / "report.html").read_text()
    assert f"the map was fitted on {FITTED} of {N:,} points" in html

    # the placed rows land among the fitted rows of their own class: a 1-NN vote in 2-D over the
    # fitted rows (the uniform sample of seed 0) recovers their labels
    from gpu_ops.cluster.sources import subset_rows

    xy = pd.read_parquet(run / "map2d.parquet")
    assert xy["image_id"].tolist() == ids
    pts = xy[["x", "y"]].to_numpy()
    fitted = subset_rows(N, FITTED, 0)
    placed = np.setdiff1d(np.arange(N), fitted)
    d2 = ((pts[placed][:, None, :] - pts[fitted][None, :, :]) ** 2).sum(-1)
    vote = labels[fitted][d2.argmin(axis=1)]
    assert (vote == labels[placed]).mean() > 0.95


def test_report_reads_a_sample_of_a_large_run(sampled_run):
    from gpu_ops.cluster.sources import subset_rows
    from gpu_ops.report.build import build_report
    from gpu_ops.report.data import load_run

    data, run = sampled_run
    inputs = load_run(run, max_rows=1000, seed=0)
    rows = subset_rows(N, 1000, 0)
    full = pd.read_parquet(run / "assignments.parquet")
    assert len(inputs.assignments) == 1000 and len(inputs.map2d) == 1000 and inputs.n_rows == N
    assert inputs.assignments["image_id"].tolist() == full["image_id"].iloc[rows].tolist()
    assert inputs.assignments["kmeans"].tolist() == full["kmeans"].iloc[rows].tolist()
    truth = pq.read_table(data).column("label").to_numpy()
    assert sorted(inputs.labels.index) == sorted(full["image_id"].iloc[rows])
    assert (inputs.labels.loc[full["image_id"].iloc[rows]].to_numpy() == truth[rows]).all()
    build_report(run, max_rows=1000)
    html = (run / "report.html").read_text()
    assert f"uniform sample of 1,000 of {N:,} points" in html


PEAK_SCRIPT = textwrap.dedent("""
    import json, re, sys, time
    from pathlib import Path
    from gpu_ops import pipeline
    from gpu_ops.config import make_config
    from gpu_ops.report.build import build_report
    from gpu_ops.rundir import start_run

    def rss_kb(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    data, tmp = sys.argv[1], Path(sys.argv[2])
    cfg = make_config(dataset=f"parquet:{data}", extractor="raw", algorithms=["kmeans"], k=10, reducer="pca",
                      memory_mb=64, explore=False, cache_dir=str(tmp / "cache"), max_iter=5, n_init=1)
    base = rss_kb("VmRSS")
    store = pipeline.extract_stage(pipeline.extract_params(cfg), progress=False)
    staging = start_run(tmp / "run")
    cluster = pipeline.cluster_stage(store.store, cfg, "kmeans", str(staging))
    reduced = pipeline.reduce_stage(store.store, cfg, str(staging))
    metrics = pipeline.evaluate_stage(store.store, [cluster])
    pipeline.finalize_run(cfg, store, [cluster], reduced, metrics, str(staging), {})
    build_report(staging)
    print(json.dumps({"base_kb": base, "peak_kb": rss_kb("VmHWM"), "rows": store.rows,
                      "acc": metrics["kmeans"].acc}))
""")


def test_stages_of_a_300k_row_parquet_run_stay_within_the_memory_budget(tmp_path):
    """300 000 x 64 float32 (77 MB of embeddings, 3 files) with memory_mb=64 in a fresh process:
    every stage together (extract, streaming k-means, map, evaluation, run files, report) grows
    the peak RSS by less than 450 MB over the process's RSS after its imports (measured: ~280 MB,
    most of it Arrow's buffer pool and the report's matplotlib). Loading the store whole at the
    stages (the embeddings, their ids as Python strings, the report's tables) took 630 MB."""
    data = tmp_path / "emb"
    write_blob_parquet(data, 300_000, 64, 10, files=3)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(data), str(tmp_path)], capture_output=True,
                         text=True, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["rows"] == 300_000 and result["acc"] > 0.9
    assert result["peak_kb"] - result["base_kb"] < 450 * 1024, result


@pytest.mark.parametrize("algorithm", ["agglomerative", "hdbscan"])
def test_an_algorithm_that_needs_every_embedding_in_memory_is_refused_beyond_the_budget(tmp_path, algorithm):
    """20 000 x 256 float32 (20 MB) is more than half of memory_mb=16: the in-memory algorithms
    are refused before anything is loaded, in one line; k-means streams the same store."""
    from gpu_ops import pipeline
    from gpu_ops.config import make_config
    from gpu_ops.errors import InputError
    from gpu_ops.rundir import start_run

    write_blob_parquet(tmp_path / "emb", 20_000, 256, 5, files=2)
    cfg = make_config(dataset=f"parquet:{tmp_path / 'emb'}", extractor="raw", algorithms=[algorithm, "kmeans"], k=5,
                      reducer="none", memory_mb=16, explore=False, cache_dir=str(tmp_path / "cache"))
    store = pipeline.extract_stage(pipeline.extract_params(cfg), progress=False)
    staging = start_run(tmp_path / "run")
    with pytest.raises(InputError) as refused:
        pipeline.cluster_stage(store.store, cfg, algorithm, str(staging))
    assert str(refused.value) == (f"{algorithm} holds all 20,000 x 256 embeddings in memory (20 MB), more than half of "
                                  "memory_mb=16; kmeans streams within it, or raise memory_mb")
    assert not (staging / f"labels-{algorithm}.npy").exists()
    streamed = pipeline.cluster_stage(store.store, cfg, "kmeans", str(staging))
    assert streamed.streaming is not None and streamed.k == 5


# --------------------------------------------------------------------------------------------
# The explore stage beyond the budget: neighbours within k-means cells

#: Planted in :func:`write_planted_parquet`: exact copies (copy -> original), a near copy, far points.
EXACT_COPIES = {100: 7, 200: 7, 300: 9}
NEAR_COPY = (11, 400)
FAR_POINTS = (500, 600)


def write_planted_parquet(directory: Path, n: int, dim: int, seed: int = 0) -> None:
    """``n`` rows of 12 overlapping Gaussian blobs (noise 3 around centres in [-10, 10]^dim: distinct
    rows are far from a centred cosine of 0.97) in two Parquet files, with :data:`EXACT_COPIES`, a
    near copy (:data:`NEAR_COPY`: 1 % noise) and two far points (:data:`FAR_POINTS`)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    means = rng.uniform(-10, 10, size=(12, dim)).astype(np.float32)
    y = rng.integers(12, size=n)
    X = means[y] + 3 * rng.standard_normal((n, dim), dtype=np.float32)
    for copy, original in EXACT_COPIES.items():
        X[copy] = X[original]
    X[NEAR_COPY[1]] = X[NEAR_COPY[0]] + 0.01 * rng.standard_normal(dim, dtype=np.float32)
    for sign, row in zip((1, -1), FAR_POINTS):
        X[row] = sign * 20 * rng.standard_normal(dim, dtype=np.float32)
    for f, (lo, hi) in enumerate(((0, n // 2), (n // 2, n))):
        pq.write_table(pa.table({
            "image_id": pa.array([f"row-{i:07d}" for i in range(lo, hi)], pa.string()),
            "label": pa.array(y[lo:hi].astype(np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X[lo:hi].reshape(-1)), dim),
        }), directory / f"part-{f:03d}.parquet")


def _row(i: int) -> str:
    return f"row-{i:07d}"


PLANTED_PAIRS = {(_row(7), _row(100), "exact"), (_row(7), _row(200), "exact"), (_row(100), _row(200), "exact"),
                 (_row(9), _row(300), "exact"), (_row(NEAR_COPY[0]), _row(NEAR_COPY[1]), "embedding")}


@pytest.fixture(scope="module")
def explored_beyond_budget(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A CLI run with the explore stage over 6 000 x 256 planted rows (6.1 MB: more than a quarter of
    memory_mb=16) brought as parquet:DIR; returns (the Parquet folder, the run directory)."""
    tmp = tmp_path_factory.mktemp("explore-bounded")
    data = tmp / "emb"
    write_planted_parquet(data, 6000, 256)
    cfg = {"dataset": f"parquet:{data}", "extractor": "raw", "algorithms": ["kmeans"], "k": 12, "reducer": "pca",
           "memory_mb": 16, "explore": True, "out": str(tmp / "run")}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = run_cli(["run", "--config", str(tmp / "cfg.yaml")], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return data, tmp / "run"


def _exact_explore(run: Path, tmp: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The explore stage over the run's store with every row in memory (no memory_mb), with the run's
    k-means labels: (duplicates, outliers, the metrics entry)."""
    from gpu_ops.config import make_config
    from gpu_ops.explore.stage import explore_stage
    from gpu_ops.stages import ClusterResult

    metrics = json.loads((run / "metrics.json").read_text())
    cfg = make_config(**{**yaml.safe_load((run / "config.yaml").read_text()), "memory_mb": None})
    labels = tmp / "labels.npy"
    np.save(labels, pd.read_parquet(run / "assignments.parquet")["kmeans"].to_numpy().astype(np.int64))
    clusters = [ClusterResult(algorithm="kmeans", labels=str(labels), k=12, backend="-", resolutions=[], seconds=0)]
    (tmp / "exact").mkdir()
    result = explore_stage(metrics["store"], cfg, str(tmp / "exact"), clusters)
    return (pd.read_parquet(tmp / "exact" / "duplicates.parquet"), pd.read_parquet(tmp / "exact" / "outliers.parquet"),
            result.as_json())


def test_explore_beyond_the_budget_finds_what_the_exact_search_finds_and_says_how(explored_beyond_budget, tmp_path):
    """Streamed within k-means cells, the run finds exactly the planted
    duplicate pairs the all-rows search finds, ranks the planted far points first as it does, its
    k-nearest distances are never below the exact ones, and metrics.json and the report say the
    neighbours were searched within cells."""
    data, run = explored_beyond_budget
    metrics = json.loads((run / "metrics.json").read_text())
    entry = metrics["explore"]
    cells = entry["cells"]
    assert entry["neighbours"] == f"within {cells['count']} cells" and cells["count"] > 1
    assert not (run / ".explore-scratch").exists() and not list(run.glob(".*scratch*"))

    dups = pd.read_parquet(run / "duplicates.parquet")
    exact_dups, exact_scores, exact_entry = _exact_explore(run, tmp_path)
    assert exact_entry["neighbours"] == "exact" and "cells" not in exact_entry
    found = set(zip(dups["image_id_a"], dups["image_id_b"], dups["kind"]))
    assert found == PLANTED_PAIRS == set(zip(exact_dups["image_id_a"], exact_dups["image_id_b"], exact_dups["kind"]))
    assert dups[["group", "representative", "image_id_a", "image_id_b", "kind"]].equals(
        exact_dups[["group", "representative", "image_id_a", "image_id_b", "kind"]])
    assert np.allclose(dups["cosine"], exact_dups["cosine"], atol=1e-5)
    assert {k: entry[k] for k in ("pairs", "groups", "redundant", "flagged")} == {
        k: exact_entry[k] for k in ("pairs", "groups", "redundant", "flagged")}

    scores = pd.read_parquet(run / "outliers.parquet")
    assert scores["image_id"].tolist() == exact_scores["image_id"].tolist() == pq.read_table(data).column(
        "image_id").to_pylist()
    far = {_row(i) for i in FAR_POINTS}
    assert set(scores.nsmallest(2, "rank")["image_id"]) == far == set(exact_scores.nsmallest(2, "rank")["image_id"])
    # within a cell a row's k nearest can only be farther (up to float32 rounding: the distance of exact
    # twins comes out ~0.2 rather than 0 from |x|^2 + |y|^2 - 2 x.y at |x|^2 ~ 10^4)
    exact_knn = exact_scores["knn_distance"].to_numpy()
    assert (scores["knn_distance"].to_numpy() >= exact_knn - 1e-3 * np.median(exact_knn)).all()
    assert (scores["knn_distance"].to_numpy() > exact_knn * 1.001).sum() > 0  # and some are farther indeed
    assert np.allclose(scores["cluster_ratio"], exact_scores["cluster_ratio"], rtol=1e-4, equal_nan=True)

    html = (run / "report.html").read_text()
    assert html.count(f"were searched within {cells['count']} cells (k-means cells), not among all images") == 2


def test_a_cell_larger_than_the_budget_is_searched_exactly_in_blocks():
    """:func:`blocked_knn` over blocks of 70 rows gives the knn op's neighbours of all 500 rows at
    once, exact twins included (each row's own entry dropped, not its twin's)."""
    from gpu_ops.explore.cells import blocked_knn
    from gpu_ops.explore.duplicates import knn

    rng = np.random.default_rng(1)
    X = rng.standard_normal((500, 16)).astype(np.float32)
    X[[50, 450]] = X[3]
    for metric in ("euclidean", "cosine"):
        want_d, want_i, _ = knn(X, 10, metric, "cpu")
        got_d, got_i, _ = blocked_knn(lambda lo, hi: X[lo:hi], 500, 10, metric, 70, "cpu")
        assert np.allclose(got_d, want_d, atol=1e-5)
        assert (got_i == want_i).mean() > 0.99  # equal distances may come in another order
        assert not (got_i == np.arange(500)[:, None]).any()
        assert {int(got_i[3, 0]), int(got_i[3, 1])} == {50, 450}


PEAK_EXPLORE_SCRIPT = textwrap.dedent("""
    import json, re, sys
    from pathlib import Path
    import scipy.sparse.csgraph, scipy.stats, sklearn.cluster  # imported before the baseline, as in a run
    from gpu_ops.cluster.kmeans import import_faiss
    from gpu_ops.config import make_config
    from gpu_ops.explore.stage import explore_stage
    from gpu_ops.stages import ClusterResult

    def rss_kb(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    data, store, staging, cluster = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    import_faiss()
    cfg = make_config(dataset=f"parquet:{data}", extractor="raw", algorithms=["kmeans"], k=10, memory_mb=64)
    base = rss_kb("VmRSS")
    result = explore_stage(store, cfg, str(staging), [ClusterResult.model_validate_json(cluster)])
    print(json.dumps({"base_kb": base, "peak_kb": rss_kb("VmHWM"), "neighbours": result.neighbours,
                      "pairs": result.pairs}))
""")


def test_explore_of_a_300k_row_store_stays_within_the_memory_budget(tmp_path):
    """300 000 x 64 float32 (77 MB of embeddings) with memory_mb=64: the explore stage alone, in a fresh
    process, grows the peak RSS by less than 300 MB over the RSS after its imports (measured: 180-200 MB,
    ~140 MB of it the Parquet dataset reader's first pass in a fresh process) and finds the planted
    copies. All rows at once took 584 MB (and 18 minutes of exact search on two busy cores, 71 s in cells)."""
    from gpu_ops import pipeline
    from gpu_ops.config import make_config
    from gpu_ops.rundir import start_run

    data = tmp_path / "emb"
    write_planted_parquet(data, 300_000, 64)
    cfg = make_config(dataset=f"parquet:{data}", extractor="raw", algorithms=["kmeans"], k=10, memory_mb=64,
                      cache_dir=str(tmp_path / "cache"), max_iter=5, n_init=1)
    store = pipeline.extract_stage(pipeline.extract_params(cfg), progress=False)
    staging = start_run(tmp_path / "run")
    cluster = pipeline.cluster_stage(store.store, cfg, "kmeans", str(staging))
    out = subprocess.run([sys.executable, "-c", PEAK_EXPLORE_SCRIPT, str(data), store.store, str(staging),
                          cluster.model_dump_json()], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["neighbours"].startswith("within ") and result["pairs"] == {"exact": 4, "phash": 0, "embedding": 1}
    assert result["peak_kb"] - result["base_kb"] < 300 * 1024, result
    scores = pd.read_parquet(staging / "outliers.parquet", columns=["image_id", "rank"])
    assert len(scores) == 300_000
    assert set(scores.nsmallest(2, "rank")["image_id"]) == {_row(i) for i in FAR_POINTS}


def test_images_explored_in_cells_get_the_exact_paths_pairs_flags_and_measurements(tmp_path):
    """digits (1 797 images, raw pixels) explored within cells gives the all-rows search's duplicate
    pairs (exact, perceptual-hash and embedding kinds, groups, representatives), the same quality
    flags and image measurements, in files of the same schema; only distances and scores may move."""
    from gpu_ops import pipeline
    from gpu_ops.cluster.sources import StoreSource
    from gpu_ops.config import make_config
    from gpu_ops.explore.stage import explore_in_cells, explore_stage

    cfg = make_config(dataset="digits", extractor="raw", memory_mb=16, cache_dir=str(tmp_path / "cache"))
    store = pipeline.extract_stage(pipeline.extract_params(cfg), progress=False).store
    for name in ("exact", "cells"):
        (tmp_path / name).mkdir()
    exact = explore_stage(store, cfg, str(tmp_path / "exact"), [])  # 0.4 MB of embeddings: all rows at once
    cells = explore_in_cells(StoreSource(store), cfg, str(tmp_path / "cells"), [])
    assert (exact.neighbours, cells.neighbours) == ("exact", f"within {cells.cells['count']} cells")
    assert exact.pairs == cells.pairs and exact.pairs["phash"] > 0 and exact.pairs["embedding"] > 0
    assert (exact.flagged, exact.groups, exact.redundant) == (cells.flagged, cells.groups, cells.redundant)
    moving = {"duplicates": {"similarity", "cosine"}, "outliers": {"score", "rank", "knn_distance", "lof"}}
    for table in moving:
        a, b = (pq.read_table(tmp_path / name / f"{table}.parquet") for name in ("exact", "cells"))
        assert a.schema == b.schema
        for column in set(a.column_names) - moving[table]:
            assert a.column(column).equals(b.column(column)), column


def test_near_copies_across_cell_borders_are_found_as_by_the_exact_search(tmp_path):
    """500 near copies (noise 0.5 a dimension: centred cosine ~0.98) planted among 20 000 x 128 rows of
    12 overlapping blobs: within the cells of a 16 MB budget (23) the search finds the same 500 pairs as all
    rows at once, the copies split from their originals by a cell border found through the next cell
    (searching each row's own cell only missed 11)."""
    from gpu_ops.config import make_config
    from gpu_ops.explore.stage import explore_stage

    n, dim = 20_000, 128
    rng = np.random.default_rng(3)
    means = rng.uniform(-10, 10, size=(12, dim)).astype(np.float32)
    X = means[rng.integers(12, size=n)] + 3 * rng.standard_normal((n, dim), dtype=np.float32)
    originals = rng.choice(n // 2, 500, replace=False)
    X[n // 2 + np.arange(500)] = X[originals] + 0.5 * rng.standard_normal((500, dim), dtype=np.float32)
    (tmp_path / "emb").mkdir()
    pq.write_table(pa.table({"image_id": pa.array([_row(i) for i in range(n)]),
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), dim)}),
                   tmp_path / "emb" / "part-0.parquet")
    planted = {(_row(int(a)), _row(n // 2 + i)) for i, a in enumerate(originals)}
    found = {}
    for memory_mb in (None, 16):
        out = tmp_path / f"run-{memory_mb}"
        out.mkdir()
        cfg = make_config(dataset=f"parquet:{tmp_path / 'emb'}", extractor="raw", memory_mb=memory_mb)
        result = explore_stage(str(tmp_path / "emb"), cfg, str(out), [])
        pairs = pd.read_parquet(out / "duplicates.parquet")
        found[result.neighbours] = set(zip(pairs["image_id_a"], pairs["image_id_b"]))
    within = [how for how in found if how.startswith("within ")]
    assert len(found) == 2 and "exact" in found and len(within) == 1
    assert found["exact"] == planted == found[within[0]]
