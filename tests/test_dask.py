"""Scale-out on Dask: sharded extraction into one store (per-shard manifest entries merged by the
driver), k-means over partitions held by workers, cluster set-up for every task-runner kind, and
the flow on a 2-worker LocalCluster against the single-process run (MNIST test split)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("distributed")
pytest.importorskip("prefect_dask")

from gpu_ops import distributed as gd  # noqa: E402
from gpu_ops import pipeline  # noqa: E402
from gpu_ops.config import make_config  # noqa: E402
from gpu_ops.errors import InputError  # noqa: E402
from gpu_ops.metrics import evaluate  # noqa: E402
from gpu_ops.store import read_embeddings  # noqa: E402


def _params(cache: Path, **kw: object) -> dict:
    return pipeline.extract_params(make_config(cache_dir=cache, **kw))


def _ids_per_part(store: Path) -> list[list[str]]:
    manifest = json.loads((store / "manifest.json").read_text())
    files = [s["file"] for _, s in sorted(manifest["shards"].items()) if s["file"]]
    assert sorted(files) == sorted(p.name for p in store.glob("part-*.parquet")), "a part file the manifest lacks"
    return [pq.read_table(store / f, columns=["image_id"]).column("image_id").to_pylist() for f in files]


def test_two_writers_fill_disjoint_shards_and_the_driver_merges_them(tmp_path):
    params = _params(tmp_path / "cache", shard_rows=300)
    plan = gd.plan_shards(params, n_workers=2)  # digits: 1797 rows -> 6 shards
    store = Path(plan["store"])
    assert plan["pending"] == [0, 1, 2, 3, 4, 5] and plan["shard_rows"] == 300
    with ThreadPoolExecutor(2) as pool:  # two writers at the same time, as two Dask workers would
        done = [pool.submit(gd.extract_shards, params, plan["store"], shards, 300) for shards in ([0, 2, 4], [1, 3, 5])]
        results = [f.result() for f in done]
    assert [r["shards"] for r in results] == [[0, 2, 4], [1, 3, 5]]
    assert json.loads((store / "manifest.json").read_text())["shards"] == {}  # workers never write it
    assert len(list((store / gd.ENTRIES).glob("*.json"))) == 6

    summary = gd.merge_shards(store)
    assert summary.complete and summary.rows == 1797 and summary.shards == 6 and summary.dim == 64
    assert not list((store / gd.ENTRIES).glob("*.json"))
    parts = _ids_per_part(store)
    flat = [i for ids in parts for i in ids]
    assert len(flat) == len(set(flat)) == 1797  # every image in exactly one part

    # the same rows, in the same order, with the same values as the single-process extraction
    single = pipeline.extract_stage(_params(tmp_path / "single", shard_rows=300), progress=False)
    a, b = read_embeddings(store), read_embeddings(Path(single.store))
    assert a.image_ids == b.image_ids and np.array_equal(a.embeddings, b.embeddings)
    assert np.array_equal(a.labels, b.labels)


def test_an_interrupted_sharded_run_resumes_without_redoing_finished_shards(tmp_path):
    params = _params(tmp_path / "cache", shard_rows=600)
    plan = gd.plan_shards(params, n_workers=2)  # 3 shards
    gd.extract_shards(params, plan["store"], [1], 600)  # then the run died
    again = gd.plan_shards({**params, "shard_rows": 100}, n_workers=8)  # a rerun keeps the store's layout
    assert again["shard_rows"] == 600 and again["pending"] == [0, 2]
    assert json.loads((Path(plan["store"]) / "manifest.json").read_text())["shards"]["00001"]["rows"] == 600
    assert gd.extract_shards(params, plan["store"], [1, 2], 600)["shards"] == [2]  # shard 1 is not redone
    gd.extract_shards(params, plan["store"], [0], 600)
    assert gd.merge_shards(plan["store"]).rows == 1797

    entry = Path(plan["store"]) / gd.ENTRIES / "00000.json"  # an entry that disagrees with its part
    entry.parent.mkdir(exist_ok=True)
    entry.write_text(json.dumps({"file": "part-00000.parquet", "rows": 5, "dim": 64, "quarantined": []}))
    with pytest.raises(RuntimeError, match="600 rows, its manifest entry says 5"):
        gd.merge_shards(plan["store"])


def test_dask_kmeans_matches_the_single_process_fit(tmp_path):
    from distributed import LocalCluster

    from gpu_ops.registry import create_estimator

    params = _params(tmp_path / "cache", shard_rows=400)
    plan = gd.plan_shards(params, n_workers=2)
    gd.extract_shards(params, plan["store"], plan["pending"], 400)
    gd.merge_shards(plan["store"])
    table = read_embeddings(Path(plan["store"]))
    single, _ = create_estimator("kmeans", "cpu", n_clusters=10, n_init=3, max_iter=100, seed=0)
    single.fit(table.embeddings)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        whole = gd.dask_kmeans(cluster.scheduler_address, plan["store"], 10, n_init=3, seed=0, backend="cpu")
        sampled = gd.dask_kmeans(cluster.scheduler_address, plan["store"], 10, n_init=3, seed=0, backend="cpu",
                                 init_sample_rows=600)
    # store smaller than the sample: the initial fit is the single-process fit, Lloyd only refines it
    assert whole["backend"].startswith("dask-lloyd+") and whole["labels"].shape == (1797,)
    assert evaluate(table.labels, whole["labels"])["acc"] == pytest.approx(
        evaluate(table.labels, single.labels_)["acc"], abs=0.01)
    assert whole["inertia"] <= single.inertia_ * 1.001
    # fit on a third of the rows, then exact passes over all partitions: objective within 2 %
    assert sampled["inertia"] <= single.inertia_ * 1.02
    assert evaluate(table.labels, sampled["labels"])["acc"] > 0.75


def test_cluster_settings_for_every_kind(monkeypatch):
    env = {"PREFECT_API_URL": "http://10.0.0.2:4200/api"}
    local = gd.cluster_kwargs("dask", n_workers=3, processes=True, env=env)
    assert local == {"n_workers": 3, "threads_per_worker": 1, "processes": True, "env": env}
    assert "env" not in gd.cluster_kwargs("dask", processes=False, env=env)  # threads share this process's env
    assert "n_workers" not in gd.cluster_kwargs("dask-cuda", env=env)  # one worker per visible GPU

    from dask_jobqueue import PBSCluster, SLURMCluster

    slurm = gd.cluster_kwargs("slurm", env=env, extra={"queue": "gpu", "account": "vision", "cores": 8,
                                                       "memory": "64GB", "walltime": "02:00:00",
                                                       "job_extra_directives": ["--gres=gpu:1"]})
    with SLURMCluster(**slurm, scheduler_options={"dashboard_address": None}) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH -p gpu", "#SBATCH -A vision", "#SBATCH --gres=gpu:1", "#SBATCH -t 02:00:00",
                 "export PREFECT_API_URL=http://10.0.0.2:4200/api"):
        assert line in script
    # values are quoted for the job script; job output goes where the run says, not the submitting directory
    quoted = gd.cluster_kwargs("slurm", env={"PYTHONPATH": "/src/my code"}, extra={"memory": "1GB"},
                               log_directory="/cache/jobs")
    assert quoted["job_script_prologue"] == ["export PYTHONPATH='/src/my code'"]
    assert quoted["log_directory"] == "/cache/jobs"
    with pytest.raises(InputError, match=r"task runner 'slurm' needs task_runner.cluster_kwargs.memory \(per batch "
                                         r"job, e.g. 16GB\)"):
        gd.cluster_kwargs("slurm", env=env, extra={"cores": 8})
    pbs = gd.cluster_kwargs("pbs", env=env, extra={"queue": "gpuq", "cores": 4, "memory": "32GB",
                                                   "resource_spec": "select=1:ncpus=4:ngpus=1:mem=32GB"})
    with PBSCluster(**pbs, scheduler_options={"dashboard_address": None}) as cluster:
        script = cluster.job_script()
    assert "#PBS -q gpuq" in script and "#PBS -l select=1:ncpus=4:ngpus=1:mem=32GB" in script

    import importlib.util

    if importlib.util.find_spec("dask_cuda") is None:
        with pytest.raises(InputError, match=r"gpuclust\[gpu\]"):
            gd._import_cluster_class("dask-cuda")


def test_cli_task_runner_flags_merge_with_the_config_file(tmp_path):
    from flows.cli import build_parser, run_config_from_args

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("task_runner: {kind: slurm, n_workers: 4, cluster_kwargs: {queue: gpu}}\n")
    args = build_parser().parse_args(["run", "--config", str(cfg_file), "--dask-workers", "2"])
    tr = run_config_from_args(args).task_runner
    assert (tr.kind, tr.n_workers, tr.cluster_kwargs) == ("slurm", 2, {"queue": "gpu"})
    args = build_parser().parse_args(["run", "--dask-address", "tcp://10.0.0.5:8786"])
    tr = run_config_from_args(args).task_runner
    assert (tr.kind, tr.address) == ("dask", "tcp://10.0.0.5:8786")
    assert run_config_from_args(build_parser().parse_args(["run"])).task_runner.kind == "local"


def test_mnist_on_a_two_worker_local_cluster_matches_the_single_process_run(prefect_harness, data_dir, tmp_path):
    """The acceptance run: Dask LocalCluster (2 worker processes) vs one process, MNIST test split."""
    from flows.pipeline import cluster_images

    common = dict(dataset=f"idx:{data_dir / 'mnist'}", split="test", extractor="raw", algorithms=["kmeans"], k=10,
                  n_init=1, reducer="none", backend="cpu", explore=False)  # explore: tests/test_explore.py
    nanny_variables = ("PYTHONHASHSEED", "MALLOC_TRIM_THRESHOLD_")  # set by each Nanny in the process that starts it
    before = {name: os.environ.get(name) for name in nanny_variables}
    on_dask = cluster_images(make_config(**common, out=tmp_path / "dask", cache_dir=tmp_path / "c-dask",
                                         task_runner={"kind": "dask", "n_workers": 2}))
    assert {name: os.environ.get(name) for name in nanny_variables} == before  # back once the cluster closed
    single = cluster_images(make_config(**common, out=tmp_path / "single", cache_dir=tmp_path / "c-single"))
    acc_dask, acc_single = on_dask["algorithms"]["kmeans"]["acc"], single["algorithms"]["kmeans"]["acc"]
    print(f"MNIST test split, raw, k-means k=10: ACC 2-worker Dask {acc_dask:.4f} vs single process {acc_single:.4f}")
    assert abs(acc_dask - acc_single) <= 0.01
    assert on_dask["algorithms"]["kmeans"]["backend"].startswith("dask-lloyd+")

    store = Path(on_dask["store"])
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["shard_rows"] == 4096  # the single-process layout: 3 shards
    assert len({s["writer"] for s in manifest["shards"].values()}) == 2  # both worker processes wrote parts
    flat = [i for ids in _ids_per_part(store) for i in ids]
    assert len(flat) == len(set(flat)) == 10_000  # every image in exactly one Parquet part
    assert flat == read_embeddings(Path(single["store"])).image_ids


def _extract_on_cluster(address: str, params: dict) -> Path:
    """The Dask path for an image folder without Prefect: the driver refreshes the folder's store
    in place, one task per new part embeds its images on a worker."""
    from gpu_ops.features.extract import open_dataset

    assert gd.refreshes_in_place(params)
    done = gd.refresh_on_dask(params, address, backend="cpu")
    assert done["items"] == len(open_dataset(params))  # a new store: every image was embedded here
    return Path(done["store"])


def test_raw_pixels_of_a_limited_folder_of_mixed_sizes_on_dask_match_the_local_run(cifar_folder, tmp_path):
    """--limit wraps the folder dataset; raw pixels still resize its differing images to 32 px."""
    from distributed import LocalCluster
    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    sizes = [None, (40, 28), (24, 36), (64, 64)]
    for i, src in enumerate(sorted(cifar_folder.rglob("*.jpg"))[::7][:30]):
        with Image.open(src) as im:
            size = sizes[i % len(sizes)]
            (im.resize(size, Image.BILINEAR) if size else im).save(folder / f"{i:03d}.jpg", quality=90)
    (folder / "002b.jpg").write_bytes(b"")  # an unreadable item inside the limit: quarantined on both paths
    common = dict(dataset=f"folder:{folder}", limit=25, extractor="raw", shard_rows=10, num_workers=0)
    local = pipeline.extract_stage(_params(tmp_path / "local", **common), progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        store = _extract_on_cluster(cluster.scheduler_address, _params(tmp_path / "dask", **common))
    a, b = read_embeddings(Path(local.store)), read_embeddings(store)
    assert (local.rows, local.dim, local.quarantined) == (24, 32 * 32 * 3, 1)
    assert a.image_ids == b.image_ids and len(b.image_ids) == 24
    assert np.array_equal(a.embeddings, b.embeddings)
    assert (store / "quarantine.csv").read_text() == (Path(local.store) / "quarantine.csv").read_text()
    assert "002b.jpg,empty file (0 bytes)" in (store / "quarantine.csv").read_text()


def test_an_image_folder_is_extracted_on_daemonic_worker_processes(cifar_folder, tmp_path):
    """Dask worker processes are daemonic: the loader must not start processes of its own there."""
    from distributed import LocalCluster

    # batches of 10 in parts of 25: by default a loader would start worker processes for each part
    common = dict(dataset=f"folder:{cifar_folder}", limit=100, extractor="resnet18", weights="none", image_size=32,
                  shard_rows=25, batch_size=10)
    local = pipeline.extract_stage(_params(tmp_path / "local", **common), progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        store = _extract_on_cluster(cluster.scheduler_address, _params(tmp_path / "dask", **common))
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 4
    assert store.relative_to(tmp_path / "dask") == Path(local.store).relative_to(tmp_path / "local")  # its layout
    # both worker processes embedded parts (the driver, this process, wrote them)
    writers = {s["writer"] for s in manifest["shards"].values()}
    assert len(writers) == 2 and gd.process_label() not in writers
    flat = [i for ids in _ids_per_part(store) for i in ids]
    assert len(flat) == len(set(flat)) == 100  # exactly one row per image
    a, b = read_embeddings(Path(local.store)), read_embeddings(store)
    assert a.image_ids == b.image_ids == flat
    np.testing.assert_allclose(b.embeddings, a.embeddings, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# An image folder's store refreshed in place over Dask


def _small_folder(cifar_folder: Path, dest: Path, per_class: int) -> tuple[Path, list[Path]]:
    """The first ``per_class`` JPEGs of each class of ``cifar_folder`` copied to ``dest``; the rest
    of the JPEGs (spare images for changes), in order."""
    import shutil

    spare = []
    for klass in sorted(p for p in cifar_folder.iterdir() if p.is_dir()):
        files = sorted(klass.glob("*.jpg"))
        (dest / klass.name).mkdir(parents=True)
        for f in files[:per_class]:
            shutil.copy(f, dest / klass.name / f.name)
        spare += files[per_class:]
    return dest, spare


def _rows_by_id(store: Path) -> dict[str, dict]:
    """Every row of ``store`` (every column: embedding, label, source, file record, run_id) by image_id."""
    rows: dict[str, dict] = {}
    _ids_per_part(store)  # the manifest lists exactly the part files there are
    manifest = json.loads((store / "manifest.json").read_text())
    for _, entry in sorted(manifest["shards"].items()):
        if entry["file"]:
            for row in pq.read_table(store / entry["file"]).to_pylist():
                assert row["image_id"] not in rows, f"{row['image_id']} stored twice"
                rows[row["image_id"]] = row
    return rows


def _change_folder(folder: Path, spare: list[Path]) -> tuple[set[str], set[str], set[str]]:
    """Add 5 images, remove 3 and rewrite 2 with new content; returns (added, removed, rewritten) ids."""
    import os
    import shutil

    current = sorted(folder.rglob("*.jpg"))
    added = set()
    for src in spare[:5]:
        target = folder / src.parent.name / f"new-{src.name}"
        shutil.copy(src, target)
        added.add(target.relative_to(folder).as_posix())
    removed = {p.relative_to(folder).as_posix() for p in current[1:30:10]}
    for image_id in removed:
        (folder / image_id).unlink()
    rewritten = {p.relative_to(folder).as_posix() for p in (current[5], current[40])}
    for image_id, src in zip(sorted(rewritten), spare[-2:]):
        (folder / image_id).write_bytes(src.read_bytes())
        os.utime(folder / image_id, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    return added, removed, rewritten


def test_a_folder_refreshed_over_dask_embeds_only_new_and_changed_images(cifar_folder, tmp_path):
    """Two refreshes of one folder on the same 2-process LocalCluster: the second embeds exactly
    the 5 new and 2 rewritten images, retires 3, leaves every other row byte for byte as it was,
    and gives the embeddings a local extraction of the folder gives."""
    from distributed import LocalCluster

    from gpu_ops.features.extract import open_dataset

    folder, spare = _small_folder(cifar_folder, tmp_path / "photos", per_class=6)  # 60 images
    params = _params(tmp_path / "cache", dataset=f"folder:{folder}", extractor="raw", shard_rows=8, num_workers=0)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        first = gd.refresh_on_dask(params, cluster.scheduler_address, backend="cpu")
        store = Path(first["store"])
        before = _rows_by_id(store)
        parts_before = {p.name: p.read_bytes() for p in store.glob("part-*.parquet")}
        assert first["items"] == 60 and len(before) == 60
        assert json.loads((store / "manifest.json").read_text())["runs"][-1]["embedded"] == 60

        added, removed, rewritten = _change_folder(folder, spare)
        second = gd.refresh_on_dask(params, cluster.scheduler_address, backend="cpu")
    assert second["store"] == first["store"]  # refreshed in place, not a new store per content
    manifest = json.loads((store / "manifest.json").read_text())
    run = manifest["runs"][-1]
    assert (run["new"], run["changed"], run["removed"], run["embedded"]) == (5, 2, 3, 7)
    assert second["items"] == 7 and run["run_id"] == manifest["revision"] != manifest["runs"][0]["run_id"]
    after = _rows_by_id(store)
    current = set(open_dataset(params).image_ids)
    assert set(after) == current and len(after) == 62 and not removed & set(after)  # each current image once
    assert {i for i, row in after.items() if row["run_id"] == run["run_id"]} == added | rewritten
    for image_id in current - added - rewritten:
        assert after[image_id] == before[image_id], image_id  # unchanged rows untouched
    for image_id in rewritten:
        assert after[image_id]["blake2b"] != before[image_id]["blake2b"]
    # parts that held no removed or rewritten image are the same files, byte for byte
    kept = [e["file"] for e in manifest["shards"].values() if e["file"] in parts_before]
    assert kept and all((store / f).read_bytes() == parts_before[f] for f in kept)
    new_parts = [e for e in manifest["shards"].values() if e["run"] == run["run_id"] and "rewritten_by" not in e]
    assert new_parts and all(e["writer"] and e["writer"] != gd.process_label() for e in new_parts)  # the workers

    local = pipeline.extract_stage(_params(tmp_path / "local", dataset=f"folder:{folder}", extractor="raw",
                                           num_workers=0), progress=False)
    single = read_embeddings(Path(local.store))
    by_id = dict(zip(single.image_ids, single.embeddings))
    on_dask = read_embeddings(store)
    assert sorted(on_dask.image_ids) == sorted(single.image_ids)
    np.testing.assert_allclose(on_dask.embeddings, np.stack([by_id[i] for i in on_dask.image_ids]),
                               rtol=1e-5, atol=1e-6)


def test_a_dask_run_after_a_local_run_finds_the_folder_embedded(cifar_folder, tmp_path):
    """A local run and a Dask run over one folder share its store: the Dask run embeds nothing."""
    from distributed import LocalCluster

    folder, _ = _small_folder(cifar_folder, tmp_path / "photos", per_class=3)
    params = _params(tmp_path / "cache", dataset=f"folder:{folder}", extractor="raw", shard_rows=8, num_workers=0)
    local = pipeline.extract_stage(params, progress=False)
    store = Path(local.store)
    files = {p.name: p.read_bytes() for p in store.iterdir() if p.is_file() and not p.name.startswith(".writer")}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        done = gd.refresh_on_dask(params, cluster.scheduler_address, backend="cpu")
    assert done["store"] == local.store and done["items"] == 0 and done["writers"] == []
    assert (done["rows"], done["revision"]) == (30, local.revision)
    assert {p.name: p.read_bytes() for p in store.iterdir() if p.name in files} == files  # nothing rewritten


def test_a_worker_that_sees_other_files_than_the_driver_refuses_its_images(cifar_folder, tmp_path):
    """A worker embeds the images the driver names, or says which one it sees differently."""
    from gpu_ops.features.extract import store_directory

    folder, _ = _small_folder(cifar_folder, tmp_path / "photos", per_class=2)
    params = _params(tmp_path / "cache", dataset=f"folder:{folder}", extractor="raw", num_workers=0)
    dataset, extractor = gd.dataset_and_extractor(params, "cpu", listing="t")
    ids = list(dataset.image_ids[3:6])
    store = str(store_directory(Path(params["cache_root"]) / "stores", dataset, extractor, incremental=True))
    done = gd.embed_group(params, store, "t", [3, 4, 5], ids, "cpu")
    assert done["rows"].image_ids == ids and done["rows"].embeddings.shape == (3, 32 * 32 * 3)
    assert done["rows"].embeddings.dtype == np.float32
    with pytest.raises(InputError, match=rf"image 4 is '{ids[2]}' for the driver but '{ids[1]}' on the Dask worker"):
        gd.embed_group(params, store, "t", [3, 4, 5], [ids[0], ids[2], ids[1]], "cpu")
    with pytest.raises(InputError, match=r"image 20 is 'x/9.jpg' for the driver but missing \(20 images\)"):
        gd.embed_group(params, store, "t", [20], ["x/9.jpg"], "cpu")
    with pytest.raises(InputError, match="this worker's data/extractor belong in"):
        gd.embed_group(params, str(tmp_path / "other"), "t", [3], ids[:1], "cpu")


_KILLABLE_REFRESH = """
import json, sys, time
from distributed import LocalCluster
from gpu_ops import distributed as gd

def hold_after_the_first_part(done, total):
    print("part written", flush=True)
    time.sleep(600)  # killed here

with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
    gd.refresh_on_dask(json.loads(sys.argv[1]), cluster.scheduler_address, backend="cpu",
                       on_shard=hold_after_the_first_part)
"""


def test_a_killed_dask_refresh_and_its_rerun_give_the_store_of_an_uninterrupted_refresh(cifar_folder, tmp_path):
    """SIGKILL of the driver once it has written the first new part; the rerun embeds only the
    rest, and the store holds what a run that was never interrupted gives."""
    import os
    import signal
    import subprocess
    import sys

    from distributed import LocalCluster

    folder, spare = _small_folder(cifar_folder, tmp_path / "photos", per_class=5)  # 50 images
    params = _params(tmp_path / "cache", dataset=f"folder:{folder}", extractor="raw", shard_rows=2, num_workers=0)
    store = Path(pipeline.extract_stage(params, progress=False).store)
    before = _rows_by_id(store)
    added, removed, rewritten = _change_folder(folder, spare)  # 7 images to embed: 4 new parts of 2, 2, 2, 1

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-c", _KILLABLE_REFRESH, json.dumps(params, default=str)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert driver.stdout.readline().strip() == "part written", "the refresh ended before writing a part"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    killed = json.loads((store / "manifest.json").read_text())
    assert not killed["complete"] and killed["runs"][-1]["finished"] is None
    assert killed["runs"][-1]["embedded"] == 2  # one part of the 4 was written

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        rerun = gd.refresh_on_dask(params, cluster.scheduler_address, backend="cpu")
    manifest = json.loads((store / "manifest.json").read_text())
    assert rerun["items"] == 5 and manifest["runs"][-1]["embedded"] == 5 and manifest["complete"]
    after = _rows_by_id(store)
    for image_id in set(before) - removed - rewritten:
        assert after[image_id] == before[image_id], image_id

    uninterrupted = pipeline.extract_stage(_params(tmp_path / "fresh", dataset=f"folder:{folder}", extractor="raw",
                                                   num_workers=0), progress=False)
    expected = _rows_by_id(Path(uninterrupted.store))
    assert set(after) == set(expected) == set(before) - removed | added
    for image_id, row in expected.items():
        assert {**after[image_id], "run_id": None} == {**row, "run_id": None}, image_id


def test_a_refresh_whose_parts_all_arrived_in_time_is_not_failed_by_its_timeout(cifar_folder, tmp_path):
    """The stage timeout bounds the wait for the workers' parts, not the driver's writing after
    the last one came (Dask's as_completed raises past its deadline even with nothing left)."""
    import time

    from distributed import LocalCluster

    folder, _ = _small_folder(cifar_folder, tmp_path / "photos", per_class=1)
    params = _params(tmp_path / "cache", dataset=f"folder:{folder}", extractor="raw", shard_rows=5, num_workers=0)

    def slow_after_the_last(done: int, total: int) -> None:
        if done == total:
            time.sleep(6)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        done = gd.refresh_on_dask(params, cluster.scheduler_address, backend="cpu", timeout=5,
                                  on_shard=slow_after_the_last)
    assert (done["items"], done["rows"]) == (10, 10)
