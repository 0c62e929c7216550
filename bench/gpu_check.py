"""`make gpu-check`: the GPU tests and GPU benchmarks, in an order that suits a bare GPU machine.

A bare GPU machine has PyTorch and CuPy but none of cuML, cuDF, FAISS or Prefect; those arrive
as wheels later (BENCHMARKS.md, "GPU check"). So the parts run in this order, each needing no more
than the wheels installed before it:

1. ``torch``  (PyTorch only): ``pytest -m gpu`` of the extraction tests; ResNet-50 at 224 px in
   bf16 and channels_last, images/s for the model alone and end to end from JPEG files (nvJPEG
   decoding, the product's extraction); GPU JPEG decoding alone; the MNIST-70k deep run (IDEC).
2. ``faiss``  (+ a FAISS GPU build): its GPU tests; FAISS-GPU k-means 1M x 256, k = 20 000, 25 iterations.
3. ``cuml``   (+ cuML): the remaining GPU tests; cuML k-means on the same data; cuML t-SNE and
   UMAP of MNIST-70k.

Every part writes its figures into one JSON file (``--out``) as soon as it finishes, with the
device's name and the library versions. A part whose packages are missing, a test that fails OR
SKIPS, or a benchmark that raises, fails the part: the command exits 1 and says which and why.
Without CUDA it exits 2 at once. ``--dry-run`` walks the plan without running anything (it works
on any machine) and records what each part would need.

    python -m bench.gpu_check --out gpu-check/figures.json               # every part
    python -m bench.gpu_check --parts torch --out gpu-check/figures.json # after each transfer of wheels
    python -m bench.gpu_check --dry-run --out /tmp/plan.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: The parts, in the order they run (and need wheels).
PARTS = ("torch", "faiss", "cuml")
#: The distributions whose versions every figure is recorded with.
VERSIONED = ("torch", "torchvision", "numpy", "cupy-cuda13x", "cupy-cuda12x", "cuml-cu13", "cuml-cu12", "cuml",
             "cudf-cu13", "cudf-cu12", "faiss-gpu-cu12", "faiss-gpu-cu13-cuvs", "faiss-gpu", "faiss-gpu-cuvs",
             "faiss-cpu", "scikit-learn", "umap-learn", "opentsne")
#: pytest selections of tests/gpu per part: together every GPU test but the one comparing cuML
#: with FAISS-GPU at scale, which needs both in one process (the ``cuml`` part compares the two
#: k-means figures of this file instead).
_FAISS_TESTS = "faiss_gpu or faiss-gpu or nearest_centre"
PYTEST_SELECTION = {
    "torch": ["tests/gpu/test_gpu_extract.py"],
    "faiss": ["tests/gpu", "--ignore=tests/gpu/test_gpu_extract.py", "-k", f"({_FAISS_TESTS}) and not agree"],
    "cuml": ["tests/gpu", "--ignore=tests/gpu/test_gpu_extract.py", "-k", f"not ({_FAISS_TESTS} or agree)"],
}
KMEANS_N, KMEANS_D, KMEANS_K, KMEANS_ITERS = 1_000_000, 256, 20_000, 25


class CheckFailed(RuntimeError):
    """A part cannot run or did not pass; the message says why."""


@dataclass
class Step:
    name: str
    run: Callable[["Context"], dict[str, Any]]


@dataclass
class Part:
    name: str
    needs: str  #: what the part needs beyond PyTorch, in words
    missing: Callable[[], str | None]  #: why the part cannot run here, or None
    steps: list[Step] = field(default_factory=list)


@dataclass
class Context:
    out: Path
    data: Path | None
    scratch: Path
    quick: bool = False


# ------------------------------------------------------------------------------------------
# The JSON of figures


def read_figures(path: Path) -> dict[str, Any]:
    """The figures file as written so far (an empty skeleton when there is none)."""
    if path.is_file():
        return json.loads(path.read_text())
    return {"device": None, "versions": {}, "parts": {}}


def write_part(path: Path, part: str, result: dict[str, Any], device: dict[str, Any] | None = None) -> None:
    """Merge one part's result into the figures file at ``path`` (atomic replace), so each
    part's figures survive whatever happens to the parts after it."""
    figures = read_figures(path)
    if device is not None:
        figures["device"] = device
    figures["versions"] = versions()
    figures["parts"][part] = result
    figures["order"] = [p for p in PARTS if p in figures["parts"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    """Installed versions of the libraries the figures depend on (absent ones left out)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    try:
        import torch

        out["torch.cuda"] = str(torch.version.cuda)
        out["cudnn"] = str(torch.backends.cudnn.version())
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    return out


def device_info() -> dict[str, Any]:
    """Name, memory, compute capability and driver of CUDA device 0."""
    import torch

    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                            "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    return info


# ------------------------------------------------------------------------------------------
# What each part needs


def _why_not_importable(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - GPU packages fail at import for many reasons
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"{module} not importable ({type(exc).__name__}: {first})"
    return None


def missing_for_faiss() -> str | None:
    why = _why_not_importable("faiss")
    if why:
        return why
    from gpu_ops.device import faiss_has_gpu

    return None if faiss_has_gpu() else "faiss is not a GPU build, or it sees no GPU"


def missing_for_cuml() -> str | None:
    return _why_not_importable("cuml") or _why_not_importable("cupy")


def mnist_dir(ctx: Context) -> Path:
    if ctx.data is None or not (ctx.data / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        raise CheckFailed(f"MNIST not found under {ctx.data}/mnist (pass --data DIR or set GPUCLUST_DATA)")
    return ctx.data / "mnist"


# ------------------------------------------------------------------------------------------
# Benchmarks


def _sync() -> None:
    import torch

    torch.cuda.synchronize()


def run_pytest(part: str, data: Path | None = None) -> dict[str, Any]:
    """``pytest -m gpu`` on the part's selection (``data`` as the tests' data directory); a
    failure or a skip fails the part."""
    report = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={report}", *PYTEST_SELECTION[part]]
    t0 = time.perf_counter()
    env = {**os.environ, **({"GPUCLUST_DATA": str(Path(data).resolve())} if data else {})}
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, env=env)
    seconds = round(time.perf_counter() - t0, 1)
    sys.stdout.write(proc.stdout[-4000:])
    counts = junit_counts(report) if report.is_file() else {}
    check_pytest(part, proc.returncode, counts, proc.stdout[-2000:] + proc.stderr[-2000:])
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "seconds": seconds, **counts}


def check_pytest(part: str, returncode: int, counts: dict[str, Any], output: str = "") -> None:
    """Raise :class:`CheckFailed` unless the part's GPU tests ran and all passed: on a GPU
    machine a skip means a GPU path did not run, so it fails the part like a failure."""
    if returncode not in (0, 5) or counts.get("failures") or counts.get("errors"):  # 5: nothing collected
        shown = {k: v for k, v in counts.items() if k != "skip_reasons"}
        raise CheckFailed(f"pytest {part}: {shown} (exit {returncode})\n{output}")
    if counts.get("skipped"):
        raise CheckFailed(f"pytest {part}: {counts['skipped']} test(s) skipped on a GPU machine: "
                          f"{'; '.join(counts['skip_reasons'])}")
    if not counts.get("tests"):
        raise CheckFailed(f"pytest {part}: no GPU test ran")


def junit_counts(path: Path) -> dict[str, Any]:
    """tests / failures / errors / skipped and the skip reasons of a pytest JUnit XML report."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    reasons = [f"{case.get('name')}: {skip.get('message', '')}" for s in suites for case in s.iter("testcase")
               for skip in case.findall("skipped")]
    return {**counts, "skip_reasons": reasons}


def bench_resnet50_model(ctx: Context) -> dict[str, Any]:
    """ResNet-50, 224 px, bf16 autocast, channels_last, inference on device-resident batches."""
    import torch

    from gpu_ops.features import create_extractor

    torch.backends.cudnn.benchmark = True
    ex = create_extractor("resnet50", weights="none", image_size=224, device="cuda")
    batch, iters = (64, 3) if ctx.quick else (256, 30)
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[ex.precision()]
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        for _ in range(5):
            ex.model(x)
        _sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            ex.model(x)
        _sync()
        seconds = time.perf_counter() - t0
    return {"images_per_s": round(batch * iters / seconds, 1), "batch": batch, "iterations": iters,
            "precision": ex.precision(), "memory_format": "channels_last", "image_size": 224}


def make_jpegs(directory: Path, n: int, size: tuple[int, int] = (320, 240)) -> Path:
    """``n`` photo-like JPEGs (smooth colour fields with noise, quality 90) in ``directory/a``."""
    import numpy as np
    from PIL import Image

    folder = directory / "a"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        base = rng.uniform(0, 255, size=(h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(h, w, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    return directory


def bench_jpeg_decode(ctx: Context) -> dict[str, Any]:
    """nvJPEG batched decoding of 320 x 240 JPEGs (bytes already in host memory)."""
    import torch

    from gpu_ops.features.jpeg import DecodeCounts, decode_batch

    n = 256 if ctx.quick else 2048
    folder = make_jpegs(ctx.scratch / "jpegs-decode", n)
    raw = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in sorted(folder.rglob("*.jpg"))]
    batch = 256
    counts = DecodeCounts()
    decode_batch(["jpeg"] * batch, raw[:batch], "cuda", counts)  # warm-up (nvJPEG handles)
    _sync()
    counts = DecodeCounts()
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        chunk = raw[start:start + batch]
        decode_batch(["jpeg"] * len(chunk), chunk, "cuda", counts)
    _sync()
    seconds = time.perf_counter() - t0
    if counts.batched != n:
        raise CheckFailed(f"JPEG decoding fell back to the CPU: {counts}")
    return {"images_per_s": round(n / seconds, 1), "images": n, "size": "320x240", "batch": batch,
            "decoded_on_device": counts.batched}


def bench_resnet50_end_to_end(ctx: Context) -> dict[str, Any]:
    """The product's extraction (``extract_to_store`` with nvJPEG decoding) of a JPEG folder into
    a Parquet store: file reads, decoding, resize, ResNet-50 in bf16, Parquet writes."""
    from gpu_ops.data import load_dataset
    from gpu_ops.features import create_extractor
    from gpu_ops.features.extract import extract_to_store

    n = 512 if ctx.quick else 8192
    folder = make_jpegs(ctx.scratch / "jpegs-e2e", n)
    ds = load_dataset(f"folder:{folder}")
    ex = create_extractor("resnet50", weights="none", image_size=224, device="cuda")
    warm = extract_to_store(load_dataset(f"folder:{folder}", limit=256), ex, ctx.scratch / "store-warm",
                            progress=False, decode_on_device=True, batch_size=256)
    del warm
    t0 = time.perf_counter()
    summary = extract_to_store(ds, ex, ctx.scratch / "store-e2e", progress=False, decode_on_device=True,
                               batch_size=256)
    seconds = time.perf_counter() - t0
    if summary.rows != n:
        raise CheckFailed(f"end-to-end extraction stored {summary.rows} of {n} images")
    return {"images_per_s": round(n / seconds, 1), "images": n, "seconds": round(seconds, 2), "jpeg": "320x240",
            "precision": ex.precision(), "decode_on_device": True}


def bench_deep_mnist(ctx: Context) -> dict[str, Any]:
    """IDEC on MNIST-70k (autoencoder pretraining included), one seed, on the GPU."""
    from bench import deep

    jsonl = ctx.scratch / "deep.jsonl"
    jsonl.unlink(missing_ok=True)
    args = ["--datasets", "mnist-full", "--methods", "idec", "--seeds", "0", "--device", "cuda",
            "--data-root", str(mnist_dir(ctx).parent), "--jsonl", str(jsonl), "--log-level", "WARNING"]
    if ctx.quick:
        args = [*args[:1], "mnist-test", *args[2:], "--set", "pretrain_epochs=1", "--set", "dec_max_iter=50"]
    if deep.main(args) != 0 or not jsonl.is_file():
        raise CheckFailed("bench/deep.py did not finish")
    row = json.loads(jsonl.read_text().splitlines()[-1])
    return {k: row.get(k) for k in ("dataset", "n", "method", "seed", "acc", "nmi", "ari", "wall_s", "pretrain_s",
                                    "cluster_s", "device")}


def scale_data():
    import numpy as np

    return np.random.default_rng(0).standard_normal((KMEANS_N, KMEANS_D), dtype=np.float32)


def _kmeans(backend: str, ctx: Context) -> dict[str, Any]:
    from gpu_ops.registry import create_estimator

    n, k = (100_000, 1000) if ctx.quick else (KMEANS_N, KMEANS_K)
    X = scale_data()[:n]
    est, res = create_estimator("kmeans", backend, n_clusters=k, max_iter=KMEANS_ITERS, n_init=1, seed=0)
    if res.kind != "gpu":
        raise CheckFailed(f"k-means backend {backend} resolved to {res.backend} ({res.reason})")
    t0 = time.perf_counter()
    est.fit(X)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "n": n, "d": KMEANS_D, "k": k, "iterations": KMEANS_ITERS,
            "objective": float(est.inertia_), "init": getattr(est, "init_", None), "backend": res.backend}


def bench_faiss_kmeans(ctx: Context) -> dict[str, Any]:
    return _kmeans("faiss-gpu", ctx)


def bench_cuml_kmeans(ctx: Context) -> dict[str, Any]:
    """cuML k-means on the FAISS part's data; its objective within 2 % of FAISS-GPU's when the
    FAISS part's figures are in the file (standard-normal data: no basin much better than another)."""
    result = _kmeans("cuml", ctx)
    faiss = read_figures(ctx.out)["parts"].get("faiss", {}).get("steps", {}).get("kmeans_1m_256_k20000", {})
    if faiss.get("status") == "passed" and faiss.get("n") == result["n"]:
        ratio = result["objective"] / faiss["objective"]
        result["objective_vs_faiss_gpu"] = round(ratio, 4)
        if not 1 / 1.02 <= ratio <= 1.02:
            raise CheckFailed(f"cuML and FAISS-GPU k-means objectives differ by more than 2 %: {result} vs {faiss}")
    return result


def _mnist70k(ctx: Context):
    import numpy as np

    from gpu_ops.data import load_dataset

    ds = load_dataset(f"idx:{mnist_dir(ctx)}", "test" if ctx.quick else "all")
    return ds.items.reshape(len(ds), -1).astype(np.float32) / 255.0, np.asarray(ds.labels)


def _map_quality(embedding, y) -> float:
    from sklearn.cluster import KMeans

    from gpu_ops.metrics import evaluate

    labels = KMeans(n_clusters=10, n_init=3, random_state=0).fit_predict(embedding)
    return round(float(evaluate(y, labels)["acc"]), 4)


def bench_cuml_tsne(ctx: Context) -> dict[str, Any]:
    from gpu_ops.reduce.tsne import CumlTSNE

    X, y = _mnist70k(ctx)
    t0 = time.perf_counter()
    est = CumlTSNE(n_components=2, perplexity=30.0, seed=0).fit(X)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "n": len(X), "d": X.shape[1], "map_kmeans_acc": _map_quality(est.embedding_, y)}


def bench_cuml_umap(ctx: Context) -> dict[str, Any]:
    from gpu_ops.reduce.umap import CumlUMAP

    X, y = _mnist70k(ctx)
    t0 = time.perf_counter()
    est = CumlUMAP(n_components=2, n_neighbors=15, min_dist=0.1, seed=0).fit(X)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "n": len(X), "d": X.shape[1], "map_kmeans_acc": _map_quality(est.embedding_, y)}


def plan() -> list[Part]:
    """The parts in run order, each with its steps."""
    return [
        Part("torch", "PyTorch with CUDA", lambda: None, [
            Step("pytest", lambda ctx: run_pytest("torch", ctx.data)),
            Step("resnet50_model", bench_resnet50_model),
            Step("jpeg_decode", bench_jpeg_decode),
            Step("resnet50_end_to_end", bench_resnet50_end_to_end),
            Step("deep_mnist70k", bench_deep_mnist),
        ]),
        Part("faiss", "a FAISS GPU build (faiss-gpu-cu12, or conda's faiss-gpu-cuvs)", missing_for_faiss, [
            Step("pytest", lambda ctx: run_pytest("faiss", ctx.data)),
            Step("kmeans_1m_256_k20000", bench_faiss_kmeans),
        ]),
        Part("cuml", "cuML (cuml-cu13 / cuml-cu12 and their wheels)", missing_for_cuml, [
            Step("pytest", lambda ctx: run_pytest("cuml", ctx.data)),
            Step("kmeans_1m_256_k20000", bench_cuml_kmeans),
            Step("tsne_mnist70k", bench_cuml_tsne),
            Step("umap_mnist70k", bench_cuml_umap),
        ]),
    ]


# ------------------------------------------------------------------------------------------
# The driver


def parse_parts(text: str) -> list[str]:
    """``torch,cuml`` -> the named parts in run order; an unknown name is an error."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PARTS]
    if unknown or not names:
        raise CheckFailed(f"unknown part(s) {unknown or [text]}; expected some of: {', '.join(PARTS)}")
    return [p for p in PARTS if p in names]


def run_part(part: Part, ctx: Context, dry_run: bool) -> dict[str, Any]:
    """Run one part's steps (or, in a dry run, record them); its result, failed or not."""
    result: dict[str, Any] = {"needs": part.needs, "steps": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    missing = part.missing()
    if dry_run:
        result.update(status="dry-run", missing=missing, steps={s.name: {"status": "dry-run"} for s in part.steps})
        return result
    if missing:
        result.update(status="failed", error=f"part {part.name} needs {part.needs}: {missing}")
        return result
    t0 = time.perf_counter()
    for step in part.steps:
        s0 = time.perf_counter()
        try:
            figures = step.run(ctx)
            result["steps"][step.name] = {"status": "passed", **figures, "wall_s": round(time.perf_counter() - s0, 1)}
        except Exception as exc:  # noqa: BLE001 - recorded, and the part fails
            detail = str(exc) if isinstance(exc, CheckFailed) else traceback.format_exc(limit=6)
            result["steps"][step.name] = {"status": "failed", "error": detail}
        print(f"gpu-check {part.name}/{step.name}: {json.dumps(result['steps'][step.name], default=str)[:600]}",
              flush=True)
    failed = [name for name, s in result["steps"].items() if s["status"] != "passed"]
    result["status"] = "failed" if failed else "passed"
    if failed:
        result["error"] = f"step(s) failed: {', '.join(failed)}"
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-check/figures.json", help="the JSON of figures (parts are merged in)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (run in that order)")
    ap.add_argument("--data", default=os.environ.get("GPUCLUST_DATA") or str(ROOT.parent / "shared" / "data"),
                    help="the data directory holding mnist/ (default: $GPUCLUST_DATA or ../shared/data)")
    ap.add_argument("--dry-run", action="store_true", help="walk the plan and write it; run nothing")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the check itself)")
    args = ap.parse_args(argv)
    try:
        names = parse_parts(args.parts)
    except CheckFailed as exc:
        print(f"gpu-check: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if not args.dry_run:
        from gpu_ops.device import cuda_available

        if not cuda_available():
            print("gpu-check: error: no CUDA device visible (torch.cuda.is_available() is False): "
                  "this check runs on a GPU machine", file=sys.stderr)
            return 2
    device = {"name": "none (dry run)"} if args.dry_run else device_info()
    parts = {p.name: p for p in plan()}
    data = Path(args.data) if args.data else None
    failed = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        ctx = Context(out=out, data=data, scratch=Path(scratch), quick=args.quick)
        for name in names:
            print(f"gpu-check: part {name} ({parts[name].needs})", flush=True)
            result = run_part(parts[name], ctx, args.dry_run)
            write_part(out, name, result, device)
            if result["status"] == "failed":
                failed.append(f"{name}: {result['error']}")
    if failed:
        print("gpu-check: FAILED\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    print(f"gpu-check: {'planned' if args.dry_run else 'passed'}: {', '.join(names)} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
