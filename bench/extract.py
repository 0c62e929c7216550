"""Extraction throughput: images/s by extractor, input size, batch size and device.

For each setting it times, in one run and on the same images:
  loading  - the DataLoader alone (decode + resize + normalise, worker processes)
  model    - the network alone on ready batches (CUDA: events around the region, after warm-up)
  pipeline - gpuclust's whole extract stage into a fresh Parquet store
  per-image loop (--loop) - a plain loop: open, preprocess, model(x[None]), one image at a time

    python -m bench.extract --extractors resnet18 --sizes 64 --batch-sizes 128 --n 1024 --loop
    python -m bench.extract --device cuda --extractors resnet50 --sizes 224 --batch-sizes 256 --n 20000 --gpu-decode
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from gpu_ops.data import load_dataset
from gpu_ops.features import create_extractor
from gpu_ops.features.extract import batch_loader, extract_to_store

CIFAR_TAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10_jpg" / "cifar10_test_jpg.tar.gz"


def jpeg_folder(n: int, root: Path, tar_path: Path = CIFAR_TAR) -> Path:
    """The first ``n`` CIFAR-10 test JPEGs (class subfolders) under ``root``."""
    out = root / "jpegs"
    count = 0
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                target = out / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
                count += 1
                if count == n:
                    break
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_loading(ds, extractor, batch_size: int, workers: int) -> float:
    """images/s of the DataLoader alone."""
    loader = batch_loader(ds, extractor, list(range(len(ds))), batch_size=batch_size, num_workers=workers)
    t0 = time.perf_counter()
    n = sum(len(good) for good, _, _ in loader)
    return n / (time.perf_counter() - t0)


def time_model(extractor, batch: torch.Tensor, repeats: int) -> float:
    """images/s of the network alone (median over ``repeats`` timed calls after warm-up)."""
    device = extractor.device
    x = batch.to(device)
    for _ in range(3):
        extractor.embed(x)
    _sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            extractor.embed(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            extractor.embed(x)
            times.append(time.perf_counter() - t0)
    return len(batch) / statistics.median(times)


def time_pipeline(ds, extractor, batch_size: int, workers: int, gpu_decode: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = extract_to_store(ds, extractor, Path(tmp), batch_size=batch_size, num_workers=workers,
                                   progress=False, decode_on_device=gpu_decode)
        return summary.rows / (time.perf_counter() - t0)


def time_per_image_loop(ds, extractor) -> float:
    """A plain loop: read, preprocess, model on a batch of one."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(len(ds)):
            extractor.embed(extractor.preprocess(ds.load(i))[None])
    return len(ds) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extractors", default="resnet18")
    ap.add_argument("--sizes", default="64")
    ap.add_argument("--batch-sizes", default="128")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=1024, help="images (CIFAR-10 test JPEGs)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--weights", default="none", help="none is enough for timing (imagenet for EfficientNet)")
    ap.add_argument("--loop", action="store_true", help="also time a plain per-image loop")
    ap.add_argument("--gpu-decode", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ds = load_dataset(f"folder:{jpeg_folder(args.n, Path(tmp))}")
        workers = args.workers if args.workers is not None else max(1, min(8, (torch.get_num_threads())))
        print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, device {args.device}"
              + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "") + f", n={len(ds)}, workers={workers}")
        header = "| extractor | size | batch | loading img/s | model img/s | pipeline img/s | per-image loop img/s | pipeline / loop |"
        print(header)
        print("|" + "---|" * 8)
        for name in args.extractors.split(","):
            for size in map(int, args.sizes.split(",")):
                weights = "imagenet" if name == "efficientnet_lite0" else args.weights
                ex = create_extractor(name, weights=weights, image_size=size, device=args.device)
                for bs in map(int, args.batch_sizes.split(",")):
                    loading = time_loading(ds, ex, bs, workers)
                    batch = torch.stack([ex.preprocess(ds.load(i % len(ds))) for i in range(bs)])
                    model = time_model(ex, batch, args.repeats)
                    pipe = time_pipeline(ds, ex, bs, workers, args.gpu_decode)
                    loop = time_per_image_loop(ds.subset(min(len(ds), 256)), ex) if args.loop else float("nan")
                    ratio = pipe / loop if args.loop else float("nan")
                    print(f"| {name} | {size} | {bs} | {loading:,.0f} | {model:,.0f} | {pipe:,.0f} | "
                          f"{loop:,.0f} | {ratio:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
