"""`gpuclust similar` and `gpuclust assign` on a real MNIST run: exact neighbours, an image file that
finds itself, new images into the run's clusters, the novelty flag, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import run_cli

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


def test_a_deep_method_is_assigned_through_its_saved_encoder_and_centres(tmp_path: Path) -> None:
    """Deep K-Means saves its fine-tuned encoder and centres; loaded back, they give its labels."""
    from gpu_ops.data import load_dataset
    from gpu_ops.deep import fit_deep
    from gpu_ops.explore.models import (
        finish_model,
        load_model,
        load_threshold,
        save_deep_model,
    )
    from gpu_ops.rundir import RunDir

    images = load_dataset("digits").items[:300]
    result = fit_deep("dkm", images, 10, seed=0, device="cpu", checkpoint_dir=tmp_path / "ae", progress=False,
                      pretrain_epochs=1, dkm_epochs=1, dkm_warmup_epochs=0, cluster_init="kmeans")
    run = RunDir(tmp_path)
    save_deep_model(run, "dkm", result)
    assert finish_model(run, "dkm", images, result.labels)["kind"] == "deep+centroids"
    model = load_model(run, "dkm", result.labels)
    assert model.input == "image"
    prediction = model.predict(images)
    assert (prediction.labels == result.labels).mean() >= 0.99
    assert load_threshold(run, "dkm").novel(prediction).mean() <= 0.05
    noise = np.random.default_rng(0).integers(0, 256, size=(20, 8, 8), dtype=np.uint8)  # not digits
    # a one-epoch autoencoder of 8x8 digits: most noise is novel (the 0.90 bar on a real run: BENCHMARKS.md)
    assert load_threshold(run, "dkm").novel(model.predict(noise)).mean() >= 0.75


def test_a_large_run_keeps_an_ivf_index_that_finds_the_exact_neighbours(tmp_path: Path) -> None:
    """Above the switch point the run keeps an IVF-Flat index: its answers match exact search."""
    from bench.similar import embeddings
    from gpu_ops.explore.search import SearchIndex, save_index
    from gpu_ops.rundir import RunDir

    X = embeddings(6000, 32)
    run = RunDir(tmp_path)
    info = save_index(run, X, approx_min_rows=5000)
    assert info.kind == "ivf-flat" and run.search_index.is_file() and not run.search_vectors.exists()
    index = SearchIndex(run, "cpu")
    rows = np.array([3, 1500, 5999])
    np.testing.assert_array_equal(index.vectors(rows), X[rows])
    dist, found = index.search(X[rows], 10)
    exact = np.argsort(((X[rows, None, :] - X[None]) ** 2).sum(axis=2), axis=1)[:, :10]
    assert found[:, 0].tolist() == rows.tolist() and np.allclose(dist[:, 0], 0, atol=1e-3)
    assert np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)]) >= 0.95


# ------------------------------------------------------------------------------ a deep run

DEEP_N = 600  # MNIST test images in the deep run


@pytest.fixture(scope="module")
def deep_run(prefect_server, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """IDEC (2 pretraining epochs, one N2D start, 150 iterations) beside k-means and agglomerative on
    600 raw MNIST test images."""
    out = tmp_path_factory.mktemp("similar-deep") / "run"
    res = run_cli(["run", "--dataset", f"idx:{data_dir / 'mnist'}", "--split", "test", "--limit", str(DEEP_N),
                   "--extractor", "raw", "--algorithm", "idec,kmeans,agglomerative", "--k", "10", "--reducer", "pca",
                   "--deep-epochs", "2", "--algorithm-option", "idec.n2d_starts=1", "--algorithm-option",
                   "idec.dec_max_iter=150", "--out", str(out)], api_url=prefect_server["url"])
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _idec_codes(run_dir: Path, images: np.ndarray) -> np.ndarray:
    """The images through the run's saved IDEC encoder, loaded here with the autoencoder loader."""
    from gpu_ops.deep import encode, load_autoencoder

    return encode(load_autoencoder(run_dir / "encoder-idec.pt", "cpu"), images, device="cpu")


def test_a_deep_runs_index_holds_its_encoders_codes(deep_run: Path, mnist_pixels) -> None:
    """The index is over what IDEC clustered in (its 10-d codes), says so, and `similar --id` gives
    the exact code-space neighbours with the image itself first."""
    info = json.loads((deep_run / "search.json").read_text())
    assert (info["space"], info["kind"], info["rows"], info["dim"]) == ("latent:idec", "exact", DEEP_N, 10)
    codes = _idec_codes(deep_run, mnist_pixels[0][:DEEP_N])
    np.testing.assert_allclose(np.load(deep_run / "search-vectors.npy"), codes, rtol=1e-4, atol=1e-4)
    res = run_cli(["similar", str(deep_run), "--id", "test/0000007", "-k", "5"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == (f"nearest images to image test/0000007 in {deep_run} "
                                          "(exact index over the idec encoder's 10-d latent codes):")
    got = json.loads(run_cli(["similar", str(deep_run), "--id", "test/0000007", "-k", "5", "--json"]).stdout)
    dist = np.sqrt(((codes.astype(np.float64) - codes[7]) ** 2).sum(axis=1))
    order = np.argsort(dist, kind="stable")[:5]
    assert [n["image_id"] for n in got["neighbours"]] == [f"test/{i:07d}" for i in order]
    assert order[0] == 7


def test_similar_image_file_on_a_deep_run_is_embedded_through_the_encoder(deep_run: Path, mnist_pixels,
                                                                          tmp_path: Path) -> None:
    """A new file goes through the run's extractor and then IDEC's encoder: its distances are the
    code-space distances, and the file of a run image finds that image at distance 0."""
    png = tmp_path / "twelve.png"
    Image.fromarray(mnist_pixels[0][12]).save(png)
    res = run_cli(["similar", str(deep_run), "--image", str(png), "-k", "3", "--json"])
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["index"] == "exact index over the idec encoder's 10-d latent codes"
    codes = _idec_codes(deep_run, mnist_pixels[0][:DEEP_N])
    dist = np.sqrt(((codes.astype(np.float64) - codes[12]) ** 2).sum(axis=1))
    order = np.argsort(dist, kind="stable")[:3]
    assert [n["image_id"] for n in doc["neighbours"]] == [f"test/{i:07d}" for i in order]
    np.testing.assert_allclose([n["distance"] for n in doc["neighbours"]], dist[order], atol=1e-4)


def test_assign_on_a_deep_run_keeps_every_algorithms_labels(deep_run: Path, prefect_server, data_dir: Path,
                                                           tmp_path: Path) -> None:
    """With the index over IDEC's codes, the algorithms that predict from the nearest labelled
    embedding keep their own embeddings: the run's own images get their labels back."""
    out = tmp_path / "own.parquet"
    res = _assign(deep_run, prefect_server, f"idx:{data_dir / 'mnist'}", out, "--split", "test",
                  "--limit", str(DEEP_N))
    assert res.returncode == 0, res.stderr[-3000:]
    run = pq.read_table(deep_run / "assignments.parquet")
    for algorithm in ("idec", "kmeans", "agglomerative"):
        agreement = (_labels(out, algorithm) == run.column(algorithm).to_numpy()).mean()
        assert agreement >= 0.99, (algorithm, agreement)
    assert json.loads((deep_run / "model-agglomerative.json").read_text())["kind"] == "neighbours"


def test_cifar_images_assigned_to_a_deep_run_are_novel(deep_run: Path, prefect_server, cifar_folder: Path,
                                                       tmp_path: Path) -> None:
    """Photos land near some centre of IDEC's code space, but its autoencoder, trained on digits,
    rebuilds them worse than the run's own images: they are flagged novel."""
    out = tmp_path / "cifar.parquet"
    res = _assign(deep_run, prefect_server, f"folder:{cifar_folder}", out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(_labels(out, "idec")) == 200
    assert _labels(out, "idec_novel").mean() >= 0.9
    meta = json.loads(pq.read_schema(out).metadata[b"gpuclust_assign"])
    threshold = meta["algorithms"]["idec"]["novel_threshold"]
    assert threshold["reconstruction"] > 0 and "reconstruction error above the 99% quantile" in threshold["meaning"]
