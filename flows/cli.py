"""``gpuclust`` command line: ``run``, ``similar``, ``assign``, ``export``, ``report``, ``serve``, ``backends``,
``server``.

Exit codes: 0 done; 2 bad input or configuration (one line on stderr naming what and where);
1 anything else.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

import gpu_ops  # noqa: F401  (lets OpenMP threads sleep; before any OpenMP runtime loads)
import flows  # noqa: F401  (sets Prefect environment defaults before Prefect is imported)
from flows import stopping
from flows.api_server import ServerStartError
from gpu_ops.errors import InputError

log = logging.getLogger("gpuclust")


#: RunConfig fields that `run` options set, and the option that sets each (messages name it).
RUN_OPTIONS = {
    "dataset": "--dataset", "split": "--split", "limit": "--limit", "extractor": "--extractor",
    "weights": "--weights", "image_size": "--image-size", "batch_size": "--batch-size",
    "num_workers": "--num-workers", "decode_on_device": "--gpu-decode", "flip_average": "--flip-average",
    "latent_dim": "--latent-dim",
    "ae_epochs": "--ae-epochs", "deep_epochs": "--deep-epochs", "algorithms": "--algorithm",
    "linkage": "--linkage", "reducer": "--reducer", "seed": "--seed", "out": "--out", "explore": "--no-explore",
    "wait_for_store": "--no-wait",
}
#: The task_runner fields the Dask options set.
RUNNER_OPTIONS = {"kind": "--task-runner", "address": "--dask-address", "n_workers": "--dask-workers"}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``gpuclust: error: <message>`` and exit 2, not a usage block
    (``--help`` still prints the usage)."""

    def error(self, message: str) -> NoReturn:
        print(f"gpuclust: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _backend_arg(raw: str) -> dict[str, Any]:
    """``auto|gpu|cpu`` for every op, and/or ``op=name`` overrides: ``cpu,kmeans=sklearn``."""
    out: dict[str, Any] = {}
    overrides = {}
    for part in (p.strip() for p in raw.split(",") if p.strip()):
        if "=" in part:
            op, name = part.split("=", 1)
            if op.strip() in overrides:
                raise argparse.ArgumentTypeError(f"op {op.strip()!r} is given twice in {raw!r}")
            overrides[op.strip()] = name.strip()
        elif "backend" in out:
            raise argparse.ArgumentTypeError(f"two backends for every op ({out['backend']!r}, {part!r}) in {raw!r}")
        else:
            out["backend"] = part
    if overrides:
        out["backends"] = overrides
    return out


def _algorithm_option(raw: str) -> tuple[str, str, Any]:
    """``scan.n_heads=20`` as ``("scan", "n_heads", 20)``; the value is read as YAML (numbers,
    true/false, null, [lists])."""
    import yaml

    target, sep, text = raw.partition("=")
    algorithm, dot, name = target.strip().partition(".")
    if not (sep and dot and algorithm and name.strip()):
        raise argparse.ArgumentTypeError(f"expected ALGORITHM.NAME=VALUE (e.g. scan.n_heads=20); got {raw!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return algorithm, name.strip(), value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gpuclust", description="Cluster image collections without labels.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Prefect's and gpuclust's info logs")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="extract, cluster, map and evaluate a dataset (a Prefect flow)")
    run.add_argument("--config", type=Path, help="YAML file of settings (flags override it)")
    run.add_argument("--dataset", help="digits | idx:DIR | folder:DIR | npz:FILE | usps:FILE | parquet:DIR")
    run.add_argument("--split", choices=["train", "test", "all"])
    run.add_argument("--limit", type=int)
    run.add_argument("--extractor", help="raw | resnet18 | resnet34 | resnet50 | efficientnet_lite0 | efficientnet_lite1 | "
                     "efficientnet_lite2 | autoencoder | timm:NAME | torchvision:NAME; join backbones with + "
                     "to concatenate their L2-normalised features")
    run.add_argument("--weights", help="none | imagenet | PATH (timm:/torchvision: models: unset or imagenet = the "
                     "library's default pretrained weights, downloaded once)")
    run.add_argument("--flip-average", action="store_true", default=None, dest="flip_average",
                     help="average each image's features with its mirror image's (pretrained extractors)")
    run.add_argument("--image-size", type=int, dest="image_size")
    run.add_argument("--batch-size", type=int, dest="batch_size")
    run.add_argument("--num-workers", type=int, dest="num_workers", help="loader worker processes")
    run.add_argument("--latent-dim", type=int, dest="latent_dim", help="autoencoder latent size (10-64 typical)")
    run.add_argument("--ae-epochs", type=int, dest="ae_epochs", help="autoencoder pretraining epochs")
    run.add_argument("--deep-epochs", type=int, dest="deep_epochs",
                     help="pretraining epochs for dkm/dec/idec/n2d (default: by data size)")
    run.add_argument("--gpu-decode", action="store_true", default=None, dest="decode_on_device",
                     help="decode JPEGs in batches on the GPU (nvJPEG)")
    run.add_argument("--algorithm", dest="algorithms",
                     help="comma-separated: umap-graph, umap-kmeans, kmeans, agglomerative, hdbscan, gmm, n2d, dkm, dec, idec, "
                          "scan, temi, turtle")
    run.add_argument("--algorithm-option", dest="algorithm_option", action="append", type=_algorithm_option,
                     metavar="ALGORITHM.NAME=VALUE", help="a setting of a deep method or clustering head, e.g. "
                     "scan.n_heads=20 or idec.dec_max_iter=2000 (repeatable; YAML: algorithm_options)")
    run.add_argument("--k", help="number of clusters, or auto")
    run.add_argument("--k-range", dest="k_range", help="k=auto: the smallest and largest k tried, LOW,HIGH (default 2,20)")
    run.add_argument("--linkage", help="ward | average | complete | single (agglomerative)")
    run.add_argument("--reducer", help="umap | tsne | pca | none")
    run.add_argument("--backend", type=_backend_arg, help="auto | gpu | cpu, and/or op=name overrides")
    run.add_argument("--seed", type=int)
    run.add_argument("--no-wait", action="store_false", default=None, dest="wait_for_store",
                     help="fail at once when another run is writing the same embedding store (default: wait for it)")
    run.add_argument("--no-explore", action="store_false", default=None, dest="explore",
                     help="skip duplicates, outliers and quality flags (one more pass over the images)")
    run.add_argument("--out", help="run directory: a new path, an empty directory or an earlier run "
                                   "(default runs/<time>-<dataset>)")  # a str: "" must not become "."
    run.add_argument("--task-runner", dest="task_runner_kind", choices=["local", "dask", "dask-cuda", "slurm", "pbs"],
                     help="where extraction and k-means run: this process (local), a Dask LocalCluster, "
                          "a LocalCUDACluster (one worker per GPU), or Slurm/PBS jobs (dask-jobqueue)")
    run.add_argument("--dask-address", help="scheduler of a running Dask cluster, e.g. tcp://10.0.0.5:8786")
    run.add_argument("--dask-workers", type=int, help="Dask workers (local clusters) or batch jobs (slurm/pbs)")

    serve = sub.add_parser("serve", add_help=False, help="serve the flow with a cron schedule on this machine (needs a Prefect "
                                         "server: PREFECT_API_URL); the run options set its parameters")
    serve._add_container_actions(run)  # every `run` option (and -h), as `argparse` parents=[...] would
    serve.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: 02:00 every night)")
    serve.add_argument("--timezone", default="UTC", help="time zone of the cron schedule (default UTC)")
    serve.add_argument("--name", default="nightly", help="deployment name (default nightly)")
    serve.add_argument("--extract-only", action="store_true", help="serve the extract-images flow instead")

    sub.add_parser("backends", help="list every op's backends, which are usable here, and what auto picks")

    server = sub.add_parser(
        "server", help="a Prefect server in the background that later commands use (start | stop | status)",
        description="start: `prefect server start` on 127.0.0.1 in the background (its own session; pid and URL "
                    "in $PREFECT_HOME/gpuclust-server.json, output in $PREFECT_HOME/gpuclust-server.log), waiting "
                    "until /api/health answers. Later commands with the same PREFECT_HOME and no PREFECT_API_URL "
                    "run against it instead of starting a temporary server each. stop: stop it. status: exit 0 "
                    "when it runs, 1 when not.")
    server.add_argument("action", choices=["start", "stop", "status"])
    server.add_argument("--port", type=int, default=4200, help="start: the port on 127.0.0.1 (default 4200)")
    server.add_argument("--timeout", type=float, default=180.0,
                        help="start: seconds to wait for the server to answer (default 180)")

    report = sub.add_parser("report", help="(re)build report.html and its figures for a finished run directory")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--embed-images", action="store_true", help="one self-contained HTML file (data URIs)")

    similar = sub.add_parser("similar", help="the nearest images of a finished run to one of its images or a new file")
    similar.add_argument("run_dir", type=Path)
    query = similar.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", type=Path, help="an image file (embedded with the run's extractor)")
    query.add_argument("--id", dest="image_id", help="an image id of the run (assignments.parquet)")
    similar.add_argument("-k", type=int, default=10, help="how many neighbours (default 10)")
    similar.add_argument("--json", action="store_true", help="print JSON instead of a table")

    assign = sub.add_parser("assign", help="assign new images to a finished run's clusters (a Prefect flow)")
    assign.add_argument("run_dir", type=Path)
    assign.add_argument("--dataset", required=True, help="the new images: digits | idx:DIR | folder:DIR | npz:FILE | "
                        "usps:FILE | parquet:DIR (embeddings made with the run's extractor)")
    assign.add_argument("--split", choices=["train", "test", "all"], default="all")
    assign.add_argument("--limit", type=int)
    assign.add_argument("--out", help="a .parquet or .csv file (default runs/<time>-assign-<dataset>.parquet)")

    export = sub.add_parser(
        "export", help="one folder per cluster (cluster-03_n412/) plus clusters.csv; a rerun changes nothing",
        description="Export a finished run's clusters: one folder per cluster, named by cluster number and size, "
                    "holding symbolic links to the images (copies with --copy), plus DIR/clusters.csv (image_id, "
                    "path, cluster, source). Only image folders (folder:DIR) have files to link or copy; the images "
                    "of array datasets (digits, idx, npz, usps) are written as PNG files. DIR must be a new path, "
                    "an empty folder or an earlier export of the same run (marked by DIR/.gpuclust-export).")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--to", required=True, help="the export folder")
    export.add_argument("--copy", action="store_true", help="copy the image files instead of linking them")
    export.add_argument("--algorithm", help="whose clusters (default: the run's first algorithm)")
    return parser


def _int_pair(text: str) -> object:
    """``"5,15"`` as ``[5, 15]``; anything else as given, for RunConfig to name in its error."""
    parts = [p.strip() for p in text.split(",")]
    try:
        return [int(p) for p in parts]
    except ValueError:
        return text


def run_config_from_args(args: argparse.Namespace) -> "Any":
    """The run's RunConfig: the config file's settings, overridden by the options given.

    RunConfig checks every value; its messages name the option, or the file a value came from.
    """
    from gpu_ops.config import load_config_file, validate_config

    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    flags: dict[str, str] = {}
    for key, option in RUN_OPTIONS.items():
        value = getattr(args, key)
        if value is not None:
            values[key] = value
            flags[key] = option
    if args.k is not None:
        try:
            values["k"] = int(args.k)
        except ValueError:
            values["k"] = args.k  # auto, or a mistake RunConfig names
        flags["k"] = "--k"
    if args.k_range is not None:
        values["k_range"] = _int_pair(args.k_range)
        flags["k_range"] = "--k-range"
    if args.algorithm_option:
        merged_options = {alg: dict(opts) if isinstance(opts, dict) else opts
                          for alg, opts in (values.get("algorithm_options") or {}).items()}
        for algorithm, name, value in args.algorithm_option:
            if not isinstance(merged_options.setdefault(algorithm, {}), dict):
                merged_options[algorithm] = {}
            merged_options[algorithm][name] = value
        values["algorithm_options"] = merged_options
        flags["algorithm_options"] = "--algorithm-option"
    if args.backend:
        values.update(args.backend)
        flags.update({key: "--backend" for key in args.backend})
    runner = {"kind": args.task_runner_kind, "address": args.dask_address, "n_workers": args.dask_workers}
    if any(v is not None for v in runner.values()):
        merged = dict(values.get("task_runner") or {})
        merged.update({k: v for k, v in runner.items() if v is not None})
        values["task_runner"] = merged
        flags.update({f"task_runner.{k}": RUNNER_OPTIONS[k] for k, v in runner.items() if v is not None})
    return validate_config(values, flags=flags, file=args.config)


def minimum_sizes(cfg: Any) -> list[tuple[str, int]]:
    """(what, the fewest images it runs on) for the stages with a floor, measured with umap-learn
    and openTSNE: UMAP's spectral start needs n > n_components + 1, t-SNE n > 3 * perplexity (the
    map's perplexity shrinks with n down to 2, so the map needs 7)."""
    floors = []
    floors += [(f"{a} (UMAP to umap_dims={cfg.umap_dims} dimensions)", cfg.umap_dims + 2)
               for a in cfg.algorithms if a in ("umap-graph", "umap-kmeans")]
    if cfg.reducer == "umap":
        floors.append(("the umap map (reducer umap)", 4))  # 2 dimensions
    if cfg.reducer == "tsne":
        floors.append(("the tsne map (reducer tsne)", 7))
        floors += [(f"the t-SNE sweep at perplexity {p:g}", int(3 * p) + 1) for p in cfg.tsne_perplexities]
    return floors


def preflight(cfg: Any) -> None:
    """Fail fast, before any work, on what the settings alone do not tell (RunConfig checked them):
    that the dataset opens, k and the size floors of the stages against its size, and that the
    backends named in ``backends`` are usable on this machine."""
    from gpu_ops.data import load_dataset
    from gpu_ops.device import BACKEND_CHOICES
    from gpu_ops.registry import resolve_backend
    from gpu_ops.rundir import check_out_dir
    from gpu_ops.store import check_cache_root

    for op, name in cfg.backends.items():
        if op != "extract" and name not in BACKEND_CHOICES:
            resolve_backend(op, name)
    if cfg.out is not None:
        check_out_dir(cfg.out, cfg.dataset, cfg.cache_root())
    check_cache_root(cfg.cache_root())
    dataset = load_dataset(cfg.dataset, cfg.split, cfg.limit)
    n = len(dataset)
    if cfg.k != "auto" and cfg.k > n:
        raise InputError(f"k={cfg.k} is larger than the number of images ({n}) in {cfg.dataset}")
    if cfg.k == "auto" and n <= cfg.k_range[0]:
        raise InputError(f"k=auto tries k from {cfg.k_range[0]}: it needs more than {cfg.k_range[0]} images; "
                         f"{cfg.dataset} has {n}")
    for what, fewest in minimum_sizes(cfg):
        if n < fewest:
            raise InputError(f"{what} needs at least {fewest} images; {cfg.dataset} has {n}"
                             + (f" (limit {cfg.limit})" if cfg.limit is not None else ""))


def print_metrics(doc: dict[str, Any]) -> None:
    """The table printed at the end of a run."""
    print(f"\n{doc['dataset']}: n={doc['n']}  run directory: {doc['run_dir']}")
    if doc.get("report"):
        print(f"report: {doc['report']}")
    if doc.get("quarantined"):
        print(f"skipped {doc['quarantined']} unreadable item(s): see {Path(doc['store']) / 'quarantine.csv'}")
    header = f"{'algorithm':<16}{'k':>5}{'ACC':>8}{'NMI':>8}{'ARI':>8}  backend"
    print(header)
    print("-" * len(header))
    for name, m in doc["algorithms"].items():
        cells = "".join(f"{m[key]:>8.4f}" if key in m else f"{'-':>8}" for key in ("acc", "nmi", "ari"))
        print(f"{name:<16}{m['k']:>5}{cells}  {m['backend']}")
    for name, m in doc["algorithms"].items():
        for reason in m.get("degenerate") or []:
            print(f"degenerate {name}: {reason}")
    for fallback in doc.get("fallbacks", []):
        print(f"fallback: {fallback}")
    print("timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in doc["timings_s"].items()))


def collect_from_here() -> None:
    """End of a run's start-up: the objects its imports made (modules, classes, Prefect's and
    pydantic's schemas; about 200,000) live until the exit, so the collector, off while they were
    made (a sixth of the import time went into collections among them), leaves them alone from
    now on and runs as usual for what the run creates."""
    gc.freeze()
    gc.enable()


def cmd_run(args: argparse.Namespace) -> int:
    cfg = run_config_from_args(args)
    preflight(cfg)
    from flows.api_server import foreground_run_settings, prefect_api, startup_timeout

    with prefect_api() as server:
        from flows.pipeline import cluster_images  # imported while the server starts

        if server is not None:
            server.wait_until_ready(startup_timeout())
        collect_from_here()
        with foreground_run_settings():
            doc = cluster_images(cfg)
    print_metrics(doc)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deploy import serve

    cfg = run_config_from_args(args)
    preflight(cfg)
    serve(cfg, cron=args.cron, timezone=args.timezone, name=args.name, extract_only=args.extract_only)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from gpu_ops.report import build_report

    result = build_report(args.run_dir, embed_images=args.embed_images)
    for missing in result.missing:
        print(f"gpuclust: warning: {missing}", file=sys.stderr)
    print(result.html)
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    import json

    from gpu_ops.explore.assign import similar

    what, neighbours, space = similar(args.run_dir, image=args.image, image_id=args.image_id, k=args.k)
    if args.json:
        print(json.dumps({"query": what, "index": space, "neighbours": [vars(n) for n in neighbours]}, indent=2))
        return 0
    algorithms = list(neighbours[0].clusters) if neighbours else []
    width = max([len("image_id")] + [len(n.image_id) for n in neighbours])
    print(f"nearest images to {what} in {args.run_dir} ({space}):")
    print(f"{'rank':>4}  {'image_id':<{width}}  {'distance':>10}" + "".join(f"  {a:>10}" for a in algorithms))
    for n in neighbours:
        print(f"{n.rank:>4}  {n.image_id:<{width}}  {n.distance:>10.4f}" + "".join(f"  {n.clusters[a]:>10}" for a in algorithms))
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    from flows.api_server import prefect_api, startup_timeout
    from gpu_ops.data import load_dataset
    from gpu_ops.explore.assign import check_out_file, default_out, open_run

    open_run(args.run_dir)  # bad input fails before the flow starts
    out = check_out_file(args.out or default_out(args.dataset))
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be a positive integer; got {args.limit}")
    load_dataset(args.dataset, args.split, args.limit)
    with prefect_api() as server:
        from flows.assign import assign_images

        if server is not None:
            server.wait_until_ready(startup_timeout())
        summary = assign_images(str(args.run_dir), args.dataset, args.split, args.limit, str(out))
    print(f"assigned {summary['rows']} image(s) to the clusters of {args.run_dir}: {summary['out']}")
    for algorithm, novel in summary["novel"].items():
        print(f"{algorithm}: {novel} novel (far from every cluster)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gpu_ops.explore.export import export_run

    result = export_run(args.run_dir, args.to, copy=args.copy, algorithm=args.algorithm)
    what = {"link": "links", "copy": "copies", "png": "PNG files"}[result.mode]
    print(f"{result.images} images of {result.algorithm} in {result.clusters} cluster folders ({what}) in "
          f"{result.directory}: {result.written} written, {result.unchanged} unchanged, {result.removed} removed; "
          f"list: {result.csv}")
    return 0


def cmd_backends(_args: argparse.Namespace) -> int:
    from gpu_ops.device import cuda_available, installed_faiss_distributions
    from gpu_ops.placement import place, stages
    from gpu_ops.registry import list_backends, list_ops

    print(f"CUDA available: {cuda_available()}")
    faiss = installed_faiss_distributions()
    if len(faiss) > 1:
        print(f"WARNING: several faiss distributions installed ({', '.join(faiss)}): keep only one")
    ops = list_ops()
    for stage in stages():
        print(f"\n{place(stage, 'auto').summary()}")
        for s in list_backends(stage) if stage in ops else []:
            ok, why = s.usable()
            print(f"  {'+' if ok else '-'} {s.name:<11} {s.kind:<4} {'usable' if ok else 'unusable'}: {why}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from flows import server

    if args.action == "start":
        if not 0 < args.port < 65536:
            raise InputError(f"--port must be between 1 and 65535; got {args.port}")
        try:
            record, started = server.start(port=args.port, timeout=args.timeout)
        except RuntimeError as exc:
            print(f"gpuclust: error: {exc}", file=sys.stderr)
            return 1
        print(f"{'started' if started else 'already running:'} Prefect server at {record.url} (pid {record.pid}); "
              f"log: {record.log}")
        if os.environ.get("PREFECT_API_URL"):
            print(f"gpuclust: note: PREFECT_API_URL={os.environ['PREFECT_API_URL']} is set: runs use that server "
                  "until it is unset", file=sys.stderr)
        return 0
    if args.action == "stop":
        print(server.stop())
        return 0
    running, line = server.status()
    print(line)
    return 0 if running else 1


class _HideInputErrorTracebacks(logging.Filter):
    """Bad input is reported by the CLI in one line; drop the engine's tracebacks for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, InputError):
            return False
        return "InputError" not in record.getMessage()


def _configure_logging(verbose: bool) -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_HideInputErrorTracebacks())
    root = logging.getLogger("gpu_ops")
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    root.addHandler(handler)
    root.propagate = False


def _filter_prefect_loggers() -> None:
    # Filters on the loggers themselves (not their handlers) survive Prefect re-configuring
    # its handlers when a flow starts.
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.engine", "prefect"):
        logging.getLogger(name).addFilter(_HideInputErrorTracebacks())


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; bad input, an interrupt or a stage's time limit become one line."""
    try:
        if args.command == "run":
            _filter_prefect_loggers()
            return cmd_run(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "serve":
            _filter_prefect_loggers()
            return cmd_serve(args)
        if args.command == "similar":
            return cmd_similar(args)
        if args.command == "assign":
            _filter_prefect_loggers()
            return cmd_assign(args)
        if args.command == "server":
            return cmd_server(args)
        return cmd_backends(args)
    except InputError as exc:
        print(f"gpuclust: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpuclust: interrupted", file=sys.stderr)
        return 130
    except TimeoutError as exc:  # a stage ran past its limit (config `timeouts:`)
        print(f"gpuclust: error: a stage ran too long: {exc} (see `timeouts:` in the config)", file=sys.stderr)
        return 1
    except ServerStartError as exc:
        print(f"gpuclust: error: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        gc.disable()  # until the imports are done (collect_from_here)
    _configure_logging(args.verbose)
    if args.command in ("run", "report", "assign"):
        stopping.install()  # SIGINT/SIGTERM: one line, exit 130/143, no process left behind
    try:
        code = run_command(args)
    except BaseException:
        if stopping.requested() is not None:  # whatever the signal became on its way up
            stopping.exit_stopped()
        raise
    finally:
        gc.enable()  # also when the run stopped before its start-up was done
    if stopping.requested() is not None:  # caught on the way, or swallowed by a library
        stopping.exit_stopped()
    stopping.ignore_from_now()  # the work is done: a late signal must not turn exit 0 into a kill
    # The interpreter's last garbage collection walks every object Prefect, pydantic and the
    # rest created: seconds of a small run's wall time. Frozen objects are left to the exit;
    # atexit hooks (Prefect sending its last logs and events) still run.
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
