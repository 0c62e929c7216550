"""Benchmark clustering and 2-D maps: every available backend side by side, time and objective.

Sub-commands (each prints a Markdown table; ``--jsonl FILE`` also appends one JSON line per row):

    kmeans      grid n x d x k, every usable ``kmeans`` backend (cuML, FAISS-GPU, FAISS-CPU,
                scikit-learn) in the same run; combos estimated to take longer than --max-est-s
                on a backend are skipped with a note
    accept-a    100k x 128 blobs, k=100, 20 iterations: default backend vs scikit-learn Lloyd
    ooc         out-of-core k-means over an N x d Parquet store in a fresh process: time, peak RSS
    dendrogram  agglomerative (micro-clusters above 10 000 points) tree of N embeddings
    gpu-scale   cuML and FAISS-GPU k-means on 1M x 256, k=20 000, 25 iterations (needs a GPU)
    maps        t-SNE and UMAP on MNIST (10k test split, 70k all): first call and warm call
    numba-cache umap-learn fit of 2 000 points in two fresh processes sharing a new numba cache
    choose-k    what --k auto picks on blobs, digits and MNIST test pixels

Examples (the figures in BENCHMARKS.md came from these):

    .venv/bin/python bench/cluster.py accept-a
    .venv/bin/python bench/cluster.py kmeans --n 10000,100000 --d 64,512 --k 10,100,1000
    .venv/bin/python bench/cluster.py kmeans --n 1000000 --d 64 --k 10,100 --backends faiss-cpu
    .venv/bin/python bench/cluster.py ooc --n 2000000 --d 64 --k 100 --memory-mb 256
    .venv/bin/python bench/cluster.py dendrogram --n 100000 --d 64
    .venv/bin/python bench/cluster.py maps --sizes 10000 --methods tsne,umap
    .venv/bin/python bench/cluster.py gpu-scale            # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

#: Crude sustained rates (2 x multiply-adds per second) used only to skip hopeless combos, from
#: acceptance (a) on 2 shared cores: FAISS-CPU ~4e10 (5.1e10 in 1.3 s), scikit-learn Lloyd with its
#: k-means++ init ~1e9 under load (9e9 on an idle machine); GPUs ~1e12 and more.
RATES = {"faiss-cpu": 2e10, "sklearn": 2e9, "cuml": 1e12, "faiss-gpu": 1e12}


def env_info() -> dict[str, Any]:
    import numpy as np
    import sklearn

    info: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                            "machine": platform.machine(), "numpy": np.__version__, "scikit-learn": sklearn.__version__}
    try:
        from gpu_ops.cluster.kmeans import import_faiss

        info["faiss"] = import_faiss().__version__
    except ImportError:
        info["faiss"] = None
    for mod in ("openTSNE", "umap", "numba", "cuml"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    try:
        with open("/proc/loadavg") as fh:
            info["loadavg_at_start"] = fh.read().split()[0]
    except OSError:
        pass
    return info


def blobs(n: int, d: int, centers: int = 100, seed: int = 0, std: float = 1.0):
    """(n, d) float32 Gaussian blobs around ``centers`` centres uniform in [-10, 10]^d."""
    import numpy as np

    from gpu_ops.cluster.synthetic import blob_centers

    rng = np.random.default_rng(seed)
    C = blob_centers(centers, d, seed)
    X = np.empty((n, d), dtype=np.float32)
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        X[s:s + m] = C[rng.integers(centers, size=m)] + rng.normal(scale=std, size=(m, d)).astype(np.float32)
    return X


def emit(rows: list[dict[str, Any]], columns: list[str], jsonl: str | None, env: dict[str, Any]) -> None:
    print()
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    if jsonl:
        Path(jsonl).parent.mkdir(parents=True, exist_ok=True)
        with open(jsonl, "a") as fh:
            for r in rows:
                fh.write(json.dumps({**r, "env": env}, default=str) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.6g}"
    return str(v)


def usable_kmeans_backends(wanted: str) -> list[str]:
    from gpu_ops.registry import list_backends

    names = []
    for spec in list_backends("kmeans"):
        ok, why = spec.usable()
        if ok and (wanted == "all" or spec.name in wanted.split(",")):
            names.append(spec.name)
        elif wanted == "all" or spec.name in wanted.split(","):
            print(f"# skip backend {spec.name}: {why}", flush=True)
    return names


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------- sub-commands


def cmd_kmeans(args: argparse.Namespace, env: dict[str, Any]) -> None:
    from gpu_ops.registry import create_estimator

    ns = [int(v) for v in args.n.split(",")]
    ds = [int(v) for v in args.d.split(",")]
    ks = [int(v) for v in args.k.split(",")]
    backends = usable_kmeans_backends(args.backends)
    rows = []
    for n in ns:
        for d in ds:
            X = blobs(n, d, centers=100, seed=0)
            for k in ks:
                best = None
                for b in backends:
                    est_s = 2.0 * n * k * d * args.iters / RATES.get(b, 3e10)
                    row = {"n": n, "d": d, "k": k, "backend": b, "iters": args.iters}
                    if est_s > args.max_est_s:
                        row["note"] = f"skipped: ~{est_s:.0f} s estimated > --max-est-s {args.max_est_s:.0f}"
                        rows.append(row)
                        print(f"# {row}", flush=True)
                        continue
                    est, res = create_estimator("kmeans", b, n_clusters=k, max_iter=args.iters, n_init=1, seed=0)
                    _, secs = timed(lambda est=est, data=X: est.fit(data))
                    row.update(seconds=round(secs, 3), objective=float(est.inertia_),
                               init=getattr(est, "init_", "k-means++" if b == "sklearn" else "k-means||"))
                    best = row["objective"] if best is None else min(best, row["objective"])
                    rows.append(row)
                    print(f"# {row}", flush=True)
                for r in rows:
                    if (r["n"], r["d"], r["k"]) == (n, d, k) and "objective" in r and best:
                        r["obj_vs_best"] = round(r["objective"] / best, 4)
    emit(rows, ["n", "d", "k", "backend", "init", "seconds", "objective", "obj_vs_best", "note"], args.jsonl, env)


def cmd_accept_a(args: argparse.Namespace, env: dict[str, Any]) -> None:
    """faiss-cpu (the default CPU backend, k-means++ seeding, all points) vs scikit-learn Lloyd."""
    from sklearn.cluster import KMeans

    from gpu_ops.registry import create_estimator

    X = blobs(100_000, 128, centers=100, seed=0)
    rows = []
    for rep in range(args.repeats):
        est, res = create_estimator("kmeans", "cpu", n_clusters=100, max_iter=20, n_init=1, seed=rep)
        _, fs = timed(lambda: est.fit(X))
        sk, ss = timed(lambda: KMeans(n_clusters=100, algorithm="lloyd", n_init=1, max_iter=20, random_state=rep).fit(X))
        rows.append({"repeat": rep, "default_backend": res.backend, "default_s": round(fs, 2),
                     "default_objective": est.inertia_, "sklearn_s": round(ss, 2), "sklearn_objective": float(sk.inertia_),
                     "speedup": round(ss / fs, 1), "objective_ratio": round(est.inertia_ / sk.inertia_, 4)})
        print(f"# {rows[-1]}", flush=True)
    emit(rows, ["repeat", "default_backend", "default_s", "sklearn_s", "speedup", "default_objective",
                "sklearn_objective", "objective_ratio"], args.jsonl, env)


OOC_SCRIPT = textwrap.dedent("""
    import json, re, sys, time
    t0 = time.perf_counter()
    from gpu_ops.cluster.kmeans_ooc import StreamingKMeans
    est = StreamingKMeans(n_clusters=int(sys.argv[2]), memory_mb=int(sys.argv[3]), max_iter=int(sys.argv[4]),
                          backend=sys.argv[5], seed=0)
    est.fit(sys.argv[1], labels_path=sys.argv[6])
    status = open("/proc/self/status").read()
    print(json.dumps({"vmhwm_mb": round(int(re.search(r"VmHWM:\\s+(\\d+)", status).group(1)) / 1024, 1),
                      "rows_assigned": int(est.counts_.sum()), "objective": est.inertia_,
                      "sample_objective": est.sample_inertia_, "seconds": round(time.perf_counter() - t0, 2),
                      "timings": est.timings_, "plan": est.plan_.as_dict(), "backend": est.resolution_["backend"]}))
""")


def cmd_ooc(args: argparse.Namespace, env: dict[str, Any]) -> None:
    from gpu_ops.cluster.synthetic import write_blob_store

    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store = Path(tmp) / "store"
        _, ws = timed(lambda: write_blob_store(store, args.n, args.d, n_centers=100, seed=0, shard_rows=100_000))
        for k in [int(v) for v in args.k.split(",")]:
            out = subprocess.run([sys.executable, "-c", OOC_SCRIPT, str(store), str(k), str(args.memory_mb),
                                  str(args.iters), args.backend, str(Path(tmp) / "labels.npy")],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(1)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"n": args.n, "d": args.d, "k": k, "memory_mb": args.memory_mb, "store_write_s": round(ws, 1),
                         **{key: r[key] for key in ("seconds", "vmhwm_mb", "rows_assigned", "objective", "backend")},
                         "timings": r["timings"], "sample_rows": r["plan"]["sample_rows"]})
            print(f"# {rows[-1]}", flush=True)
    emit(rows, ["n", "d", "k", "memory_mb", "backend", "sample_rows", "seconds", "vmhwm_mb", "rows_assigned",
                "objective", "timings", "store_write_s"], args.jsonl, env)


def cmd_dendrogram(args: argparse.Namespace, env: dict[str, Any]) -> None:
    import numpy as np
    from sklearn.datasets import make_blobs
    from sklearn.metrics import adjusted_rand_score

    from gpu_ops.registry import create_estimator

    X, y = make_blobs(n_samples=args.n, n_features=args.d, centers=12, cluster_std=2.0, random_state=0)
    X = X.astype(np.float32)
    rows = []
    for linkage in args.linkages.split(","):
        est, res = create_estimator("agglomerative", args.backend, n_clusters=12, linkage=linkage)
        _, secs = timed(lambda: est.fit(X))
        rows.append({"n": args.n, "d": args.d, "linkage": linkage, "backend": res.backend,
                     "method": getattr(est, "method_", "exact"), "leaves": est.linkage_matrix_.shape[0] + 1,
                     "seconds": round(secs, 1), "ari_vs_blobs": round(adjusted_rand_score(y, est.labels_), 4),
                     "kmeans_backend": getattr(est, "kmeans_resolution_", {}).get("backend")})
        print(f"# {rows[-1]}", flush=True)
        if args.figure:
            from gpu_ops.report.data import dendrogram_cut
            from gpu_ops.report.figures import dendrogram_figure

            path = Path(args.figure).with_name(f"{Path(args.figure).stem}-{linkage}.png")
            dendrogram_figure(est.linkage_matrix_, 12, dendrogram_cut(est.linkage_matrix_, 12), path,
                              f"{linkage} tree of {args.n} embeddings ({rows[-1]['leaves']} micro-clusters)")
    emit(rows, ["n", "d", "linkage", "backend", "method", "kmeans_backend", "leaves", "seconds", "ari_vs_blobs"],
         args.jsonl, env)


def cmd_gpu_scale(args: argparse.Namespace, env: dict[str, Any]) -> None:
    """Acceptance (e): cuML and FAISS-GPU k-means, 1M x 256, k=20 000, 25 iterations."""
    import numpy as np

    from gpu_ops.registry import create_estimator

    backends = [b for b in usable_kmeans_backends(args.backends) if b in ("cuml", "faiss-gpu")]
    if not backends:
        print("# no GPU k-means backend is usable here (needs CUDA and cuML or a GPU build of faiss)")
        return
    X = np.random.default_rng(0).standard_normal((args.n, args.d), dtype=np.float32)
    rows = []
    for b in backends:
        est, res = create_estimator("kmeans", b, n_clusters=args.k, max_iter=args.iters, n_init=1, seed=0)
        _, secs = timed(lambda: est.fit(X))
        rows.append({"n": args.n, "d": args.d, "k": args.k, "iters": args.iters, "backend": b,
                     "seconds": round(secs, 2), "objective": float(est.inertia_),
                     "init": getattr(est, "init_", "k-means||")})
        print(f"# {rows[-1]}", flush=True)
    emit(rows, ["n", "d", "k", "iters", "backend", "init", "seconds", "objective"], args.jsonl, env)


def _mnist(size: int):
    import numpy as np

    from gpu_ops.data import load_dataset

    ds = load_dataset(f"idx:{DATA / 'mnist'}", "test" if size <= 10_000 else "all")
    X = ds.items.reshape(len(ds.items), -1).astype(np.float32)[:size] / 255.0
    return X, np.asarray(ds.labels)[:size]


def cmd_maps(args: argparse.Namespace, env: dict[str, Any]) -> None:
    """First call (numba compile / thread start-up included) and a warm second call, same process."""
    from gpu_ops.reduce.umap import enable_numba_cache

    enable_numba_cache()
    from gpu_ops.registry import create_estimator

    rows = []
    for size in [int(v) for v in args.sizes.split(",")]:
        X, _ = _mnist(size)
        if args.pca:
            from sklearn.decomposition import PCA

            X = PCA(n_components=args.pca, random_state=0).fit_transform(X).astype("float32")
        for method in args.methods.split(","):
            params = {"n_components": 2, "seed": 0}
            if method == "tsne":
                params["perplexity"] = 30.0
            for call in ("first", "warm"):
                est, res = create_estimator(method, args.backend, **params)
                _, secs = timed(lambda: est.fit(X))
                rows.append({"dataset": f"MNIST {len(X)}", "dims": X.shape[1], "method": method,
                             "backend": res.backend, "call": call, "seconds": round(secs, 1)})
                print(f"# {rows[-1]}", flush=True)
    emit(rows, ["dataset", "dims", "method", "backend", "call", "seconds"], args.jsonl, env)


NUMBA_SCRIPT = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    import numpy as np
    from sklearn.datasets import make_blobs
    from gpu_ops.reduce.umap import UmapLearn
    X, _ = make_blobs(2000, 32, centers=5, random_state=0)
    t1 = time.perf_counter()
    UmapLearn(seed=0).fit(X)
    t2 = time.perf_counter()
    UmapLearn(seed=1).fit(X)
    t3 = time.perf_counter()
    print(json.dumps({"first_fit_s": round(t2 - t1, 1), "warm_fit_s": round(t3 - t2, 1), "process_s": round(t3 - t0, 1)}))
""")


def cmd_numba_cache(args: argparse.Namespace, env: dict[str, Any]) -> None:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as cache:
        for proc in range(1, args.processes + 1):
            env_vars = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONWARNINGS": "ignore"}
            out = subprocess.run([sys.executable, "-c", NUMBA_SCRIPT], capture_output=True, text=True, cwd=ROOT,
                                 env=env_vars)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(1)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"process": proc, "cache": "fresh" if proc == 1 else "filled by process 1", **r})
            print(f"# {rows[-1]}", flush=True)
    emit(rows, ["process", "cache", "first_fit_s", "warm_fit_s", "process_s"], args.jsonl, env)


def cmd_choose_k(args: argparse.Namespace, env: dict[str, Any]) -> None:
    import numpy as np
    from sklearn.datasets import load_digits, make_blobs

    from gpu_ops.cluster.choose_k import choose_k, save_k_selection
    from gpu_ops.report.figures import k_selection_figure

    rows = []
    for name in args.datasets.split(","):
        if name == "blobs":
            X, _ = make_blobs(n_samples=5000, n_features=32, centers=7, cluster_std=2.0, random_state=0)
        elif name == "digits":
            X, _ = load_digits(return_X_y=True)
        elif name == "mnist-test":
            X, _ = _mnist(10_000)
        else:
            raise SystemExit(f"unknown dataset {name!r}; expected blobs, digits, mnist-test")
        sel, secs = timed(lambda: choose_k(np.asarray(X, dtype=np.float32), 2, 20, seed=0))
        top = np.argsort(sel.silhouette)[::-1][:3]
        rows.append({"dataset": name, "n": len(X), "chosen_k": sel.chosen_k, "elbow_k": sel.elbow_k,
                     "best_silhouettes": ", ".join(f"k={sel.ks[i]}: {sel.silhouette[i]:.3f}" for i in top),
                     "backend": sel.backend, "seconds": round(secs, 1)})
        print(f"# {rows[-1]}", flush=True)
        if args.out:
            out = Path(args.out) / name
            out.mkdir(parents=True, exist_ok=True)
            save_k_selection(sel, out)
            k_selection_figure(sel.as_dict(), out / "k_selection.png")
    emit(rows, ["dataset", "n", "chosen_k", "elbow_k", "best_silhouettes", "backend", "seconds"], args.jsonl, env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jsonl", default=None, help="append one JSON line per result row to this file")
    ap.add_argument("--tmp", default=None, help="scratch directory for stores and caches")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("kmeans", help="n x d x k grid, all backends side by side")
    p.add_argument("--n", default="10000,100000,1000000")
    p.add_argument("--d", default="64,512")
    p.add_argument("--k", default="10,100,1000")
    p.add_argument("--backends", default="all", help="all, or a comma list of backend names")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--max-est-s", type=float, default=300.0, help="skip a backend on a combo estimated longer")
    p.set_defaults(fn=cmd_kmeans)

    p = sub.add_parser("accept-a", help="100k x 128, k=100, 20 iterations: default vs scikit-learn")
    p.add_argument("--repeats", type=int, default=1)
    p.set_defaults(fn=cmd_accept_a)

    p = sub.add_parser("ooc", help="out-of-core k-means over a Parquet store, peak RSS in a fresh process")
    p.add_argument("--n", type=int, default=2_000_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--k", default="100")
    p.add_argument("--memory-mb", type=int, default=256)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--backend", default="auto")
    p.set_defaults(fn=cmd_ooc)

    p = sub.add_parser("dendrogram", help="agglomerative tree of N embeddings (micro-clusters above 10 000)")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--linkages", default="ward")
    p.add_argument("--backend", default="auto")
    p.add_argument("--figure", default=None, help="also draw the dendrogram to this PNG path")
    p.set_defaults(fn=cmd_dendrogram)

    p = sub.add_parser("gpu-scale", help="cuML / FAISS-GPU k-means, 1M x 256, k=20 000, 25 iterations")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=20_000)
    p.add_argument("--iters", type=int, default=25)
    p.add_argument("--backends", default="all")
    p.set_defaults(fn=cmd_gpu_scale)

    p = sub.add_parser("maps", help="t-SNE / UMAP on MNIST: first and warm call")
    p.add_argument("--sizes", default="10000,70000")
    p.add_argument("--methods", default="tsne,umap")
    p.add_argument("--backend", default="auto")
    p.add_argument("--pca", type=int, default=0, help="project to this many PCA components first (0: raw pixels)")
    p.set_defaults(fn=cmd_maps)

    p = sub.add_parser("numba-cache", help="umap-learn in fresh processes sharing one new numba cache")
    p.add_argument("--processes", type=int, default=2)
    p.set_defaults(fn=cmd_numba_cache)

    p = sub.add_parser("choose-k", help="what --k auto picks")
    p.add_argument("--datasets", default="blobs,digits,mnist-test")
    p.add_argument("--out", default=None, help="write k_selection.json/.png per dataset under this folder")
    p.set_defaults(fn=cmd_choose_k)

    args = ap.parse_args(argv)
    env = env_info()
    print(f"# env {json.dumps(env)}", flush=True)
    print(f"# command: {' '.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}", flush=True)
    args.fn(args, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
