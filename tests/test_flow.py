"""The Prefect flow, in-process under the test harness."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from gpu_ops.config import make_config
from gpu_ops.rundir import RUN_FILES


def _task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def test_flow_writes_the_run_directory_and_rerun_skips_extraction(prefect_harness, tmp_path):
    from flows.pipeline import cluster_images

    cfg = make_config(dataset="digits", algorithms=["kmeans", "agglomerative"], reducer="pca",
                      out=tmp_path / "run", cache_dir=tmp_path / "cache")
    state = cluster_images(cfg, return_state=True)
    doc = state.result()
    assert {p.name for p in (tmp_path / "run").iterdir()} >= set(RUN_FILES)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n"] == 1797 and set(metrics["algorithms"]) == {"kmeans", "agglomerative"}
    assert metrics["algorithms"]["agglomerative"]["acc"] > 0.8  # ward on raw digits: 0.84
    assignments = pq.read_table(tmp_path / "run" / "assignments.parquet")
    assert assignments.column_names == ["image_id", "kmeans", "agglomerative"]
    assert assignments.num_rows == 1797 and len(np.unique(assignments.column("kmeans"))) == 10
    assert pq.read_table(tmp_path / "run" / "map2d.parquet").column_names == ["image_id", "x", "y"]
    assert _task_states(state.state_details.flow_run_id)["extract"] == "Completed"
    assert doc["run_dir"] == str(tmp_path / "run")

    again = cluster_images(cfg, return_state=True)
    assert _task_states(again.state_details.flow_run_id)["extract"] == "Cached"
    assert again.result()["algorithms"]["kmeans"]["acc"] == pytest.approx(metrics["algorithms"]["kmeans"]["acc"])


def test_jpeg_folder_with_resnet18(prefect_harness, cifar_folder, tmp_path):
    from flows.pipeline import cluster_images

    cfg = make_config(dataset=f"folder:{cifar_folder}", extractor="resnet18", weights="none", image_size=64,
                      algorithms=["kmeans"], reducer="tsne", out=tmp_path / "run", cache_dir=tmp_path / "cache")
    doc = cluster_images(cfg)
    assert {p.name for p in (tmp_path / "run").iterdir()} >= set(RUN_FILES)
    assert doc["n"] == 200 and doc["extract"]["dim"] == 512
    assert doc["algorithms"]["kmeans"]["acc"] > 0.15  # random-init ResNet features: above chance (0.10)
    ids = pq.read_table(tmp_path / "run" / "assignments.parquet").column("image_id").to_pylist()
    assert ids[0] == "airplane/0000.jpg" and len(set(ids)) == 200


def test_failed_run_leaves_nothing_that_looks_complete(prefect_harness, tmp_path):
    from flows.pipeline import cluster_images
    from gpu_ops.errors import InputError

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_text("not an image")
    cfg = make_config(dataset=f"folder:{tmp_path / 'imgs'}", k=2, out=tmp_path / "run", cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match="no readable image"):
        cluster_images(cfg)
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]
