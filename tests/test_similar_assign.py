"""`gpuclust similar` and `gpuclust assign` on a real MNIST run: exact neighbours, an image file that
finds itself, new images into the run's clusters, the novelty flag, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import run_cli

N = 1000  # MNIST test images in the run


@pytest.fixture(scope="module")
def mnist_pixels(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test and train images as uint8 (n, 28, 28), read independently of the run."""
    from gpu_ops.data import load_dataset

    return (load_dataset(f"idx:{data_dir / 'mnist'}", "test").items,
            load_dataset(f"idx:{data_dir / 'mnist'}", "train", 300).items)


@pytest.fixture(scope="module")
def run_dir(prefect_server, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("similar") / "run"
    res = run_cli(["run", "--dataset", f"idx:{data_dir / 'mnist'}", "--split", "test", "--limit", str(N),
                   "--extractor", "raw", "--algorithm", "kmeans,gmm,agglomerative", "--k", "10", "--reducer", "pca",
                   "--out", str(out)], api_url=prefect_server["url"])
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _assign(run_dir: Path, prefect_server: dict, dataset: str, out: Path, *extra: str):
    return run_cli(["assign", str(run_dir), "--dataset", dataset, "--out", str(out), *extra],
                   api_url=prefect_server["url"])


def _labels(path: Path, column: str) -> np.ndarray:
    return pq.read_table(path).column(column).to_numpy()


def test_similar_by_id_gives_the_exact_nearest_neighbours(run_dir: Path, mnist_pixels) -> None:
    X = mnist_pixels[0][:N].reshape(N, -1).astype(np.float64) / 255.0
    query = 7
    res = run_cli(["similar", str(run_dir), "--id", "test/0000007", "-k", "10", "--json"])
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)["neighbours"]
    dist = np.sqrt(((X - X[query]) ** 2).sum(axis=1))
    order = np.argsort(dist, kind="stable")[:10]
    assert [n["image_id"] for n in got] == [f"test/{i:07d}" for i in order]
    np.testing.assert_allclose([n["distance"] for n in got], dist[order], rtol=1e-4, atol=1e-4)
    assert got[0]["image_id"] == "test/0000007" and got[0]["distance"] == pytest.approx(0.0, abs=1e-5)
    table = run_cli(["similar", str(run_dir), "--id", "test/0000007", "-k", "3"])
    assert table.returncode == 0 and len(table.stdout.strip().splitlines()) == 2 + 3


def test_similar_image_file_finds_itself(run_dir: Path, mnist_pixels, tmp_path: Path) -> None:
    png = tmp_path / "twelve.png"
    Image.fromarray(mnist_pixels[0][12]).save(png)  # 28 x 28 grey, like the run's items
    res = run_cli(["similar", str(run_dir), "--image", str(png), "-k", "2", "--json"])
    assert res.returncode == 0, res.stderr
    first = json.loads(res.stdout)["neighbours"][0]
    assert first["image_id"] == "test/0000012" and first["distance"] < 1e-5


def test_assign_of_the_runs_own_images_reproduces_its_labels(run_dir: Path, prefect_server, data_dir: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "own.parquet"
    res = _assign(run_dir, prefect_server, f"idx:{data_dir / 'mnist'}", out, "--split", "test", "--limit", str(N))
    assert res.returncode == 0, res.stderr[-3000:]
    run = pq.read_table(run_dir / "assignments.parquet")
    assert _labels(out, "image_id").tolist() == run.column("image_id").to_pylist()
    for algorithm in ("kmeans", "gmm", "agglomerative"):
        agreement = (_labels(out, algorithm) == run.column(algorithm).to_numpy()).mean()
        assert agreement >= 0.99, (algorithm, agreement)
    assert _labels(out, "kmeans_novel").mean() <= 0.02  # the 99 % quantile of the members' own distances


def test_assign_of_new_images_matches_a_fresh_nearest_centre_predict(run_dir: Path, prefect_server, data_dir: Path,
                                                                     mnist_pixels, tmp_path: Path) -> None:
    test_images, train_images = mnist_pixels
    X = test_images[:N].reshape(N, -1).astype(np.float64) / 255.0
    run_labels = pq.read_table(run_dir / "assignments.parquet").column("kmeans").to_numpy()
    centres = np.stack([X[run_labels == c].mean(axis=0) for c in range(10)])
    new = train_images.reshape(len(train_images), -1).astype(np.float64) / 255.0
    expected = ((new[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
    out = tmp_path / "new.csv"
    res = _assign(run_dir, prefect_server, f"idx:{data_dir / 'mnist'}", out, "--split", "train", "--limit", "300")
    assert res.returncode == 0, res.stderr[-3000:]
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(out)
    assert table.num_rows == 300
    assert (table.column("kmeans").to_numpy() == expected).mean() >= 0.99
    assert table.column("kmeans_novel").to_numpy().mean() <= 0.05  # in-distribution: few novel
    meta = json.loads((tmp_path / "new.csv.json").read_text())["gpuclust_assign"]
    threshold = meta["algorithms"]["kmeans"]["novel_threshold"]
    assert threshold["quantile"] == 0.99 and len(threshold["per_cluster"]) == 10
    assert "99% quantile" in threshold["meaning"]


def test_novel_flag_fires_on_cifar_images(run_dir: Path, prefect_server, cifar_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "cifar.parquet"
    res = _assign(run_dir, prefect_server, f"folder:{cifar_folder}", out)  # 32 x 32 RGB JPEGs -> 28 x 28 grey
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(_labels(out, "kmeans")) == 200
    assert _labels(out, "kmeans_novel").mean() >= 0.8
    assert _labels(out, "gmm_novel").mean() >= 0.9


def test_embeddings_of_another_extractor_are_refused(run_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from gpu_ops.data import load_dataset
    from gpu_ops.features.extract import extract_to_store
    from gpu_ops.features.raw import RawPixels

    summary = extract_to_store(load_dataset(f"idx:{data_dir / 'mnist'}", "test", 20), RawPixels(image_size=14),
                               tmp_path / "stores", progress=False)
    res = run_cli(["assign", str(run_dir), "--dataset", f"parquet:{summary.directory}", "--out",
                   str(tmp_path / "x.parquet")])
    theirs = '{"grayscale": false, "scale": "x/255", "size": 14}'
    ours = '{"grayscale": false, "scale": "x/255", "size": null}'
    assert res.returncode == 2
    assert res.stderr == (f"gpuclust: error: parquet:{summary.directory}: embeddings made with raw (weights none, "
                          f"preprocessing {theirs}), but run {run_dir} used raw (weights none, preprocessing "
                          f"{ours}); new images must be embedded with the run's extractor and weights\n")
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize("command", [["similar", "--id", "test/0000000"], ["assign", "--dataset", "digits"]])
def test_a_directory_that_is_not_a_run_is_refused(command: list[str], tmp_path: Path) -> None:
    res = run_cli([command[0], str(tmp_path), *command[1:]])
    assert res.returncode == 2
    assert res.stderr == f"gpuclust: error: {tmp_path}: not a gpuclust run directory (no .gpuclust-run file)\n"
