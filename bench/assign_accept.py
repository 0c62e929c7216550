"""Assigning new images and similar images on a real MNIST run (BENCHMARKS.md, "Assigning new images
and similar images").

1. Cluster the first ``--train`` MNIST-test images with ``configs/handwriting.yaml`` (IDEC, the
   default deep method) through ``gpuclust run``.
2. ``gpuclust assign`` the held-back rest: their ACC under the run's own cluster -> class mapping
   (Hungarian on the clustered images) against the run's ACC.
3. ``gpuclust assign`` ``--cifar`` CIFAR-10 test JPEGs (the same count per class) to that run: the
   share flagged novel.
4. The run's similar-image index: the share of each image's top-10 neighbours (itself left out)
   with its label, and whether every image's nearest neighbour is itself; for comparison the same
   over the store's embeddings (raw pixels).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/assign_accept.py --work /tmp/assign-accept

``--run-dir`` reuses a finished run (steps 2-4 only); with ``--refit-novelty`` its deep model's
novelty thresholds are first set again by :func:`gpu_ops.explore.models.finish_model`, the function
the run's last step calls, from the run's own images (for runs made before a change to the rule).
Prints the figures as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("GPUCLUST_DATA", ROOT.parent / "shared" / "data"))


def gpuclust(*args: str) -> float:
    """Run the ``gpuclust`` console script beside this Python; returns its wall seconds."""
    exe = Path(sys.executable).parent / "gpuclust"
    t0 = time.perf_counter()
    res = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=ROOT, check=False)
    if res.returncode != 0:
        sys.exit(f"gpuclust {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return time.perf_counter() - t0


def write_splits(work: Path, n_train: int) -> tuple[Path, Path]:
    """The MNIST test set as two .npz files: the first ``n_train`` images and the rest."""
    from gpu_ops.data import load_dataset

    test = load_dataset(f"idx:{DATA / 'mnist'}", "test")
    X, y = np.asarray(test.items), np.asarray(test.labels)
    first, rest = work / "mnist_first.npz", work / "mnist_rest.npz"
    np.savez(first, X=X[:n_train], y=y[:n_train])
    np.savez(rest, X=X[n_train:], y=y[n_train:])
    return first, rest


def cifar_folder(work: Path, total: int) -> Path:
    """``total`` CIFAR-10 test JPEGs, the same count per class, in class-named subfolders."""
    import tarfile

    out = work / "cifar"
    if out.is_dir():
        shutil.rmtree(out)
    per = total // 10
    counts: dict[str, int] = {}
    with tarfile.open(DATA / "cifar10_jpg" / "cifar10_test_jpg.tar.gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or counts.get(parts[1], 0) >= per:
                continue
            counts[parts[1]] = counts.get(parts[1], 0) + 1
            target = out / parts[1] / parts[2]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    return out


def labels_by_id(spec: str, image_ids: list[str]) -> np.ndarray:
    """The true labels of ``image_ids`` in the dataset ``spec``."""
    from gpu_ops.data import load_dataset

    dataset = load_dataset(spec)
    position = {i: r for r, i in enumerate(dataset.image_ids)}
    return np.asarray(dataset.labels)[[position[i] for i in image_ids]]


def column(path: Path, name: str) -> np.ndarray:
    import pyarrow.parquet as pq

    return pq.read_table(path).column(name).to_numpy()


def label_agreement(X: np.ndarray, y: np.ndarray, k: int = 10) -> dict[str, float]:
    """Top-``k`` neighbours (itself left out) sharing the query's label, and the share of rows
    whose nearest neighbour is the row itself (exact search, the ``knn`` op)."""
    from gpu_ops.registry import create_estimator

    knn, _ = create_estimator("knn", "cpu", metric="euclidean")
    X = np.asarray(X, np.float32)
    dist, rows = knn.fit(X).kneighbors(X, n_neighbors=k + 1)
    own = np.arange(len(X))
    self_first = rows[:, 0] == own
    # Exact duplicates can tie at distance 0: the row itself may then come second.
    self_first |= (dist[:, 0] == 0) & (rows[:, :2] == own[:, None]).any(axis=1)
    others = np.array([[r for r in row if r != i][:k] for i, row in enumerate(rows)])
    return {"top10_same_label": round(float((y[others] == y[:, None]).mean()), 4),
            "nearest_is_itself": round(float(self_first.mean()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/assign-accept"))
    ap.add_argument("--train", type=int, default=9000, help="MNIST-test images clustered (the rest are assigned)")
    ap.add_argument("--cifar", type=int, default=1000, help="CIFAR-10 test JPEGs assigned")
    ap.add_argument("--config", default=str(ROOT / "configs" / "handwriting.yaml"))
    ap.add_argument("--run-dir", type=Path, help="reuse this finished run")
    ap.add_argument("--refit-novelty", action="store_true", help="set the reused run's IDEC novelty thresholds again")
    args = ap.parse_args()

    from gpu_ops.explore.search import IndexInfo, SearchIndex
    from gpu_ops.metrics import hungarian_accuracy
    from gpu_ops.rundir import RunDir
    from gpu_ops.store import read_embeddings

    args.work.mkdir(parents=True, exist_ok=True)
    first, rest = write_splits(args.work, args.train)
    run_dir = args.run_dir or args.work / "run"
    if args.run_dir is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        seconds = gpuclust("run", "--config", args.config, "--dataset", f"npz:{first}", "--out", str(run_dir))
        print(json.dumps({"step": "run", "images": args.train, "seconds": round(seconds, 1)}), flush=True)
    algorithm = "idec"
    run_labels = column(run_dir / "assignments.parquet", algorithm)
    y_first = labels_by_id(f"npz:{first}", [str(i) for i in column(run_dir / "assignments.parquet", "image_id")])
    run_acc = hungarian_accuracy(y_first, run_labels)
    if args.run_dir is not None and args.refit_novelty:
        from gpu_ops.data import load_dataset
        from gpu_ops.explore.models import finish_model

        dataset = load_dataset(f"npz:{first}")
        position = {i: r for r, i in enumerate(dataset.image_ids)}
        ids = [str(i) for i in column(run_dir / "assignments.parquet", "image_id")]
        images = np.asarray(dataset.items)[[position[i] for i in ids]]
        doc = finish_model(RunDir(run_dir), algorithm, images, run_labels)
        print(json.dumps({"step": "refit novelty", "threshold": doc["threshold"]["meaning"]}), flush=True)

    held = args.work / "held.parquet"
    seconds = gpuclust("assign", str(run_dir), "--dataset", f"npz:{rest}", "--out", str(held))
    pred = column(held, algorithm)
    y_rest = labels_by_id(f"npz:{rest}", [str(i) for i in column(held, "image_id")])
    mapped = np.array([run_acc.mapping.get(int(c), -1) for c in pred])
    held_acc = float((mapped == y_rest).mean())
    print(json.dumps({"step": "assign held-back", "images": len(y_rest), "run_acc": round(run_acc.accuracy, 4),
                      "held_back_acc": round(held_acc, 4), "gap": round(abs(held_acc - run_acc.accuracy), 4),
                      "held_back_novel": round(float(column(held, f"{algorithm}_novel").mean()), 4),
                      "seconds": round(seconds, 1)}), flush=True)

    cifar = cifar_folder(args.work, args.cifar)
    out = args.work / "cifar.parquet"
    seconds = gpuclust("assign", str(run_dir), "--dataset", f"folder:{cifar}", "--out", str(out))
    print(json.dumps({"step": "assign CIFAR-10", "images": len(column(out, "image_id")),
                      "novel": round(float(column(out, f"{algorithm}_novel").mean()), 4),
                      "seconds": round(seconds, 1)}), flush=True)

    run = RunDir(run_dir)
    info = IndexInfo.read(run)
    codes = SearchIndex(run, "cpu").vectors(np.arange(info.rows))
    print(json.dumps({"step": "similar", "index": info.describe(), **label_agreement(codes, y_first)}), flush=True)
    store = json.loads(run.embedder.read_text())["store"]
    print(json.dumps({"step": "similar (comparison)", "index": "the store's embeddings (raw pixels)",
                      **label_agreement(read_embeddings(Path(store)).embeddings, y_first)}), flush=True)


if __name__ == "__main__":
    main()
