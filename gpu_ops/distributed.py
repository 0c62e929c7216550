"""Scale-out on plain Dask (no Prefect here): start a cluster, extract a store shard by shard on
many workers, merge their manifest entries, and run k-means over a store that spans workers.

**Sharded extraction.** A store's shard is a fixed range of dataset indices
(:meth:`gpu_ops.store.EmbeddingStore.shard_range`), so shards can be written by different
processes without coordination. The driver (:func:`plan_shards`) fixes the layout (writes
``manifest.json`` with ``shard_rows``) and lists the pending shards; each worker
(:func:`extract_shards`) runs the single-process routine,
:func:`gpu_ops.features.extract.extract_to_store`, for its shards: it writes
``part-NNNNN.parquet`` atomically and then a per-shard manifest entry ``.shards/NNNNN.json``
(also atomically) — it never touches ``manifest.json``. In a daemonic worker process (Dask's
default) images are decoded without loader worker processes. The driver
alone merges the entries into ``manifest.json`` (:func:`merge_shards`), checking each part's row
count, and marks the store complete. A worker killed mid-shard leaves neither a part nor an entry
for it; finished shards keep their entries and are merged (not redone) by the next run. Stores of
fixed ranges are those of datasets keyed by their content (digits, IDX, arrays, ``parquet:DIR``).

**An image folder's refresh** (:func:`refresh_on_dask`). A folder's store is the one a local run
refreshes in place (:mod:`gpu_ops.incremental`): the driver holds its lock, compares the folder
with it, retires removed and changed images and lays out the new parts, exactly as the local run
does; the workers only embed (:func:`embed_group`, the local extraction's loop) and return each
new part's rows, which the driver writes as they arrive. Only new and changed images are
embedded, and a killed refresh's rerun embeds only what is still missing.

**Clustering a store that spans workers** (:func:`dask_kmeans`). CPU route: every worker loads
its part files (:class:`gpu_ops.cluster.sources.DaskSource`); the driver gathers a sample of at
most ``init_sample_rows`` rows (all rows when the store is smaller: then the initial fit is exactly
the single-process fit) and fits it with the registry's k-means backend (FAISS / scikit-learn,
``n_init`` restarts); then the package's Lloyd driver (:func:`gpu_ops.cluster.lloyd.lloyd`) runs
exact passes over every partition (workers return per-cluster sums and counts, the driver moves the
centres) until the inertia improves by less than ``tol``, and a last pass assigns every row. GPU
route (workers with CUDA and cuML): ``cuml.dask.cluster.KMeans`` over a CuPy-backed Dask array
whose blocks cuDF reads from the part files on each worker's GPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from gpu_ops.errors import InputError
from gpu_ops.registry import Resolution
from gpu_ops.rundir import RunDir
from gpu_ops.stages import ClusterResult, ResolutionRecord, k_for, write_cluster_result
from gpu_ops.store import (
    MANIFEST,
    EmbeddingStore,
    StoreSummary,
    atomic_write_json,
    load_manifest,
    part_files,
    part_problem,
    read_manifest,
    file_sha256,
    write_shard_part,
)

log = logging.getLogger(__name__)

#: Per-shard manifest entries written by workers, merged into manifest.json by the driver.
ENTRIES = ".shards"


# --------------------------------------------------------------------------------------------
# Devices and clusters


def device_label(device: str = "cpu") -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3) on host`` / ``cpu (2 threads) on host``: for logs."""
    host = socket.gethostname()
    if str(device).startswith("cuda"):
        try:
            import torch

            index = torch.cuda.current_device()
            name = torch.cuda.get_device_name(index)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            extra = f", CUDA_VISIBLE_DEVICES={visible}" if visible is not None else ""
            return f"cuda:{index} ({name}{extra}) on {host}"
        except Exception as exc:  # noqa: BLE001 - a label must never fail the run
            return f"{device} (unknown: {exc}) on {host}"
    torch = sys.modules.get("torch")  # its thread count when loaded; a label never imports it
    try:
        threads = torch.get_num_threads() if torch is not None else int(os.environ.get("OMP_NUM_THREADS", ""))
    except Exception:  # noqa: BLE001
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return f"cpu ({threads} threads) on {host}"


def batch_job() -> str | None:
    """``slurm job 123`` / ``pbs job 45.server`` when this process runs inside a batch job, else None."""
    for kind, name in (("slurm", "SLURM_JOB_ID"), ("pbs", "PBS_JOBID")):
        if os.environ.get(name):
            return f"{kind} job {os.environ[name]}"
    return None


def process_label() -> str:
    """``host:pid``, plus ``(slurm job 123)`` inside a batch job: who wrote a shard."""
    job = batch_job()
    label = f"{socket.gethostname()}:{os.getpid()}"
    return f"{label} ({job})" if job else label


def _import_cluster_class(kind: str) -> Any:
    try:
        if kind == "dask":
            from distributed import LocalCluster

            return LocalCluster
        if kind == "dask-cuda":
            from dask_cuda import LocalCUDACluster

            return LocalCUDACluster
        if kind == "slurm":
            from dask_jobqueue import SLURMCluster

            return SLURMCluster
        if kind == "pbs":
            from dask_jobqueue import PBSCluster

            return PBSCluster
    except ImportError as exc:
        extra = "gpu" if kind == "dask-cuda" else "dask"
        raise InputError(f"task runner {kind!r} needs {exc.name or 'its package'} "
                         f"(pip install 'gpuclust[{extra}]')") from None
    raise InputError(f"unknown task runner kind {kind!r}; expected one of: dask, dask-cuda, slurm, pbs")


def cluster_kwargs(kind: str, *, n_workers: int | None = None, threads_per_worker: int = 1, processes: bool = True,
                   env: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                   log_directory: str | Path | None = None) -> dict[str, Any]:
    """Keyword arguments for the cluster class of ``kind`` (``extra`` wins over the defaults).

    ``env`` reaches worker processes: a LocalCluster gets it as ``env``, a jobqueue cluster as
    ``export`` lines in the job script (``job_script_prologue``). A LocalCUDACluster replaces
    each worker's ``env`` with its own ``CUDA_VISIBLE_DEVICES``, so it gets none here: its
    workers get ``env`` through the Nanny's ``distributed.nanny.environ`` setting
    (:func:`worker_env_config`), which the Nanny merges under its ``env``.
    ``log_directory``: where a jobqueue cluster's batch jobs write their output.
    """
    extra = dict(extra or {})
    kw: dict[str, Any] = {}
    if kind == "dask":
        kw = {"n_workers": n_workers or 2, "threads_per_worker": threads_per_worker, "processes": processes}
        if processes and env:
            kw["env"] = dict(env)
    elif kind == "dask-cuda":
        kw = {"threads_per_worker": threads_per_worker}  # one worker process per visible GPU
        if n_workers:
            kw["n_workers"] = n_workers
    elif kind in ("slurm", "pbs"):
        kw = {"processes": 1, "cores": extra.pop("cores", threads_per_worker)}
        prologue = [f"export {k}={shlex.quote(str(v))}" for k, v in (env or {}).items()]
        kw["job_script_prologue"] = prologue + list(extra.pop("job_script_prologue", []))
        if log_directory is not None:
            kw["log_directory"] = str(log_directory)  # else each job's output lands in the submitting directory
    kw.update(extra)
    if kind in ("slurm", "pbs"):
        _check_job_resources(kind, kw)
    return kw


def _check_job_resources(kind: str, kw: dict[str, Any]) -> None:
    """dask-jobqueue needs cores and memory per job (from the settings or Dask's jobqueue config)."""
    import dask

    for name, example in (("memory", "16GB"), ("cores", "8")):
        if kw.get(name) is None and dask.config.get(f"jobqueue.{kind}.{name}", None) is None:
            raise InputError(f"task runner {kind!r} needs task_runner.cluster_kwargs.{name} (per batch job, "
                             f"e.g. {example}) in the config file, or jobqueue.{kind}.{name} in Dask's config")


def worker_env_config(kind: str, env: dict[str, str] | None) -> dict[str, Any]:
    """Dask settings that carry ``env`` into the worker processes of a ``kind`` cluster.

    dask-cuda's ``LocalCUDACluster.new_worker_spec`` sets each worker's Nanny option ``env`` to
    ``{"CUDA_VISIBLE_DEVICES": ...}``, dropping any ``env`` given to the cluster. The Nanny
    builds its worker's environment from ``distributed.nanny.environ`` (read when the Nanny is
    created) merged under that ``env``, so values set there survive (a variable also set in this
    process's environment keeps that value: Dask lets the OS environment win). Other kinds take
    ``env`` through :func:`cluster_kwargs` and need nothing here.
    """
    if kind == "dask-cuda" and env:
        return {"distributed.nanny.environ": {k: str(v) for k, v in env.items()}}
    return {}


@contextlib.contextmanager
def dask_cluster(kind: str, *, address: str | None = None, n_workers: int | None = None, threads_per_worker: int = 1,
                 processes: bool = True, env: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                 log_directory: str | Path | None = None) -> Iterator[str]:
    """Yield the scheduler address of a running Dask cluster; one created here is closed on exit.

    ``address`` connects to an existing cluster (nothing is started or stopped). Otherwise
    ``kind`` picks LocalCluster (``dask``), LocalCUDACluster (``dask-cuda``) or a dask-jobqueue
    SLURMCluster / PBSCluster (``slurm`` / ``pbs``; ``n_workers`` batch jobs are submitted, their
    output in ``log_directory``). When the body finishes, the batch jobs' workers are retired
    first, so the jobs end by themselves (COMPLETED in ``sacct``); on an exception they are
    cancelled at once.
    """
    if address:
        log.info("using the Dask cluster at %s", address)
        yield address
        return
    cls = _import_cluster_class(kind)
    import dask

    kwargs = cluster_kwargs(kind, n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes,
                            env=env, extra=extra, log_directory=log_directory)
    t0 = time.perf_counter()
    # the settings stay while the cluster lives: a worker restarted later gets them too
    with _nanny_environ_restored(), dask.config.set(worker_env_config(kind, env)), \
            _jobs_outlive_their_workers(kind), cls(**kwargs) as cluster:
        if kind not in ("slurm", "pbs"):
            log.info("started %s with %d worker(s) in %.1f s: %s", cls.__name__, len(cluster.workers),
                     time.perf_counter() - t0, cluster.scheduler_address)
            yield cluster.scheduler_address
            return
        cluster.scale(jobs=n_workers or 1)
        log.info("submitting %d %s job(s) (output in %s); job script:\n%s", n_workers or 1, kind,
                 kwargs.get("log_directory") or "the submitting directory", cluster.job_script())
        yield cluster.scheduler_address
        end_batch_jobs(cluster, kind)  # a run that fails or is stopped cancels its jobs at once


@contextlib.contextmanager
def _nanny_environ_restored() -> Iterator[None]:
    """This process's values of the variables a Dask Nanny sets before it starts its worker, back
    when the cluster closes. A local cluster's Nannies run in this process and set them here for
    good (``distributed.nanny.pre-spawn-environ``: MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS, ...,
    and PYTHONHASHSEED): every process started after the run would inherit them."""
    import dask

    names = set(dask.config.get("distributed.nanny.pre-spawn-environ", None) or {}) | {"PYTHONHASHSEED"}
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


#: Seconds the batch jobs get to end by themselves once their workers are retired.
JOB_END_WAIT_S = 60.0


@contextlib.contextmanager
def _jobs_outlive_their_workers(kind: str) -> Iterator[None]:
    """A jobqueue cluster cancels a job once its worker has left the scheduler for
    ``distributed.deploy.lost-worker-timeout`` (15 s); a retired worker's job (its interpreter
    exiting, the nanny after it) may need longer to end by itself."""
    if kind not in ("slurm", "pbs"):
        yield
        return
    import dask

    with dask.config.set({"distributed.deploy.lost-worker-timeout": f"{JOB_END_WAIT_S + 10:.0f}s"}):
        yield


def _jobs_in_queue(kind: str, job_ids: list[str]) -> list[str]:
    """Those of ``job_ids`` the batch system still lists (pending, running or completing)."""
    if kind == "slurm":
        cmd = ["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return []
        return sorted(set(out.stdout.split()) & set(job_ids)) if out.returncode == 0 else []
    left = []
    for job in job_ids:  # PBS: qstat fails for a job that has finished
        try:
            if subprocess.run(["qstat", job], capture_output=True, timeout=30).returncode == 0:
                left.append(job)
        except (OSError, subprocess.SubprocessError):
            return []
    return left


def end_batch_jobs(cluster: Any, kind: str, timeout: float = JOB_END_WAIT_S) -> None:
    """Retire a jobqueue cluster's workers and wait (up to ``timeout`` s) for their batch jobs to
    leave the queue: jobs whose worker exits by itself end COMPLETED. Whatever is left is
    cancelled when the cluster closes."""
    from distributed import Client

    job_ids = sorted({str(job.job_id) for job in cluster.workers.values() if getattr(job, "job_id", None)})
    if not job_ids:
        return
    t0 = time.monotonic()
    try:
        with Client(cluster.scheduler_address, set_as_default=False, timeout=10) as client:
            client.retire_workers(close_workers=True)
    except Exception as exc:  # noqa: BLE001 - closing the cluster cancels the jobs anyway
        log.warning("could not retire the workers of %s job(s) %s: %s", kind, ", ".join(job_ids), exc)
        return
    left = _jobs_in_queue(kind, job_ids)
    while left and time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        left = _jobs_in_queue(kind, left)
    if left:
        log.warning("%s job(s) %s still queued %.0f s after their workers were retired: cancelling them", kind,
                    ", ".join(left), time.monotonic() - t0)
    else:
        log.info("%s job(s) %s ended %.1f s after their workers were retired", kind, ", ".join(job_ids),
                 time.monotonic() - t0)


def worker_count(address: str) -> int:
    """Workers currently connected to the scheduler at ``address``."""
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        return len(client.scheduler_info()["workers"])


# --------------------------------------------------------------------------------------------
# Sharded extraction


@functools.lru_cache(maxsize=4)
def _opened(params_json: str, device: str, listing: str | None) -> tuple[Any, Any]:
    from gpu_ops.features.extract import build_extractor, open_dataset

    params = json.loads(params_json)
    dataset = open_dataset(params)
    return dataset, build_extractor(params, dataset, device=device, progress=False)


def dataset_and_extractor(params: dict[str, Any], device: str, listing: str | None = None) -> tuple[Any, Any]:
    """The dataset and extractor an extract run with ``params`` uses, the extractor on ``device``
    (:func:`gpu_ops.features.extract.build_extractor`), opened once per process: a worker that
    embeds many shards loads its model once. ``listing`` names one look at the data (a folder
    refresh's run id): a new one opens the dataset anew, since a folder's files change between
    runs on a long-lived cluster."""
    return _opened(json.dumps(params, sort_keys=True, default=str), device, listing)


class ShardedStore(EmbeddingStore):
    """A store written by many processes: parts plus per-shard entries, never ``manifest.json``.

    ``shards`` restricts :meth:`pending_shards` to the shards this writer was given. The driver
    verifies the finished parts (:func:`plan_shards`); a worker given its shards does not again.
    """

    def __init__(self, directory: Path, metadata: dict[str, str], n_items: int, shard_rows: int,
                 shards: list[int] | None = None, verify: bool | None = None) -> None:
        self.assigned = None if shards is None else sorted(set(shards))
        super().__init__(directory, metadata, n_items, shard_rows, verify=shards is None if verify is None else verify)

    def entry_path(self, shard: int) -> Path:
        return self.directory / ENTRIES / f"{shard:05d}.json"

    def pending_shards(self) -> list[int]:
        done = self.manifest["shards"]
        todo = range(self.n_shards) if self.assigned is None else self.assigned
        return [s for s in todo if f"{s:05d}" not in done and not self.entry_path(s).is_file()]

    def write_shard(self, shard: int, image_ids: list[str], sources: list[str], labels: np.ndarray | None,
                    embeddings: np.ndarray, quarantined: list[tuple[str, str]]) -> None:
        """Part file first, then its entry: an entry always stands for a whole part."""
        entry = write_shard_part(self.directory, shard, image_ids, sources, labels, embeddings, quarantined,
                                 self.metadata)
        entry["writer"] = process_label()
        self.entry_path(shard).parent.mkdir(exist_ok=True)
        atomic_write_json(self.entry_path(shard), entry)
        self.manifest["shards"][f"{shard:05d}"] = entry  # in memory only: pending_shards() skips it


def sharded_store_directory(params: dict[str, Any]) -> Path:
    """The store a sharded extraction with ``params`` writes: fixed index ranges, keyed by the
    data's content and by the precision of the device the run's extraction is placed on (an image
    folder's store is refreshed in place instead: :func:`refresh_on_dask`)."""
    from gpu_ops.features.extract import store_directory

    dataset, extractor = dataset_and_extractor(params, "cpu")
    return store_directory(Path(params["cache_root"]) / "stores", dataset, extractor, incremental=False,
                           device=params["device"])


def plan_shards(params: dict[str, Any], *, n_workers: int = 1) -> dict[str, Any]:
    """Fix the store's layout and list its pending shards (driver side; builds the extractor on
    the CPU only to learn its identity). A new store gets ``params["shard_rows"]`` rows per
    shard (the same layout as a single-process extraction); one that exists keeps its own."""
    from gpu_ops.features.extract import DEFAULT_SHARD_ROWS, store_metadata

    dataset, extractor = dataset_and_extractor(params, "cpu")
    directory = sharded_store_directory(params)
    n = len(dataset)
    manifest, _ = read_manifest(directory)  # a damaged one is restarted (with a warning) just below
    rows = int(manifest["shard_rows"]) if manifest else int(params.get("shard_rows") or DEFAULT_SHARD_ROWS)
    store = ShardedStore(directory, store_metadata(dataset, extractor, incremental=False, device=params["device"]), n,
                         rows)
    if not (directory / MANIFEST).is_file():
        atomic_write_json(directory / MANIFEST, store.manifest)  # every writer now agrees on the layout
    merge_shards(directory, finish=False)  # fold in entries an interrupted run left behind
    store = ShardedStore(directory, store.metadata, n, rows, verify=False)  # verified just above
    pending = store.pending_shards()
    log.info("store %s: %d rows in %d shard(s) of %d rows; %d pending", directory, n, store.n_shards, rows,
             len(pending))
    if 0 < len(pending) < n_workers:
        log.warning("%d pending shard(s) for %d workers: some workers stay idle (a smaller shard_rows spreads a "
                    "new store wider)", len(pending), n_workers)
    return {"store": str(directory), "n_items": n, "shard_rows": rows, "n_shards": store.n_shards,
            "pending": pending}


def extract_shards(params: dict[str, Any], store: str, shards: list[int], shard_rows: int, device: str = "cpu",
                   on_shard: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Worker side: embed those of ``shards`` still pending in the store at ``store`` with the
    extractor on ``device``, through the same routine as a single-process extraction
    (:func:`gpu_ops.features.extract.extract_to_store` with ``shards``): every option of the
    run's ``params`` applies. ``on_shard(done, total)`` follows the given shards."""
    from gpu_ops.features.extract import extract_options, extract_to_store, store_directory

    t0 = time.perf_counter()
    dataset, extractor = dataset_and_extractor(params, device)
    store_root = Path(params["cache_root"]) / "stores"
    expected = store_directory(store_root, dataset, extractor, incremental=False)
    if expected.resolve() != Path(store).resolve():
        raise InputError(f"{store}: this worker's data/extractor belong in {expected} (different dataset "
                         "files, library versions or precision on the workers?)")
    options = {**extract_options(params, extractor.device), "shard_rows": shard_rows}
    done = extract_to_store(dataset, extractor, store_root, shards=shards, progress=False, on_shard=on_shard,
                            **options)
    label = device_label(extractor.device)
    log.info("shards %s: %d items with %s on %s", list(done.written), done.items, extractor.name, label)
    return {"shards": list(done.written), "skipped": sorted(set(shards) - set(done.written)), "items": done.items,
            "rows": done.rows, "quarantined": done.quarantined, "device": extractor.device, "device_label": label,
            "writer": process_label(), "seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------------------------
# An image folder's store refreshed in place over the cluster


def refreshes_in_place(params: dict[str, Any]) -> bool:
    """Whether an extract run with ``params`` refreshes its store in place (an image folder,
    limited or not: :func:`refresh_on_dask`) rather than writing a store of fixed ranges."""
    from gpu_ops.features.extract import open_dataset, refreshed_in_place

    return refreshed_in_place(open_dataset(params))


def refresh_on_dask(params: dict[str, Any], address: str, *, backend: str = "auto", wait: bool = True,
                    timeout: float | None = None, run_id: str | None = None,
                    on_shard: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Driver side: refresh an image folder's store in place, its images embedded on the Dask
    cluster at ``address``: the store a local run refreshes (one per folder and extractor
    identity, :mod:`gpu_ops.incremental`), and the same refresh.

    Under the store's lock (``wait``: wait for another writer, else an InputError) the driver
    compares the folder with the store, retires removed and changed images and lays out the new
    parts (:func:`gpu_ops.incremental.start_refresh`); one Dask task per new part embeds its
    images on a worker (:func:`embed_group`, the extract placement of ``backend`` resolved there)
    and returns the rows; the driver writes each part as its rows arrive (one part's rows held
    here at a time), recording the worker process that embedded it, then finishes the store. A
    run killed at any point leaves the parts written so far; the next run embeds what is still
    missing. ``timeout``: seconds for all the tasks (TimeoutError after). ``on_shard(done,
    total)`` follows the parts written.

    Returns the store's ``store``, ``rows``, ``dim``, ``quarantined``, ``revision``,
    ``shard_rows``, the images this run embedded or quarantined (``items``) and who embedded
    them (``writers``, ``devices``, ``device_labels``).
    """
    from distributed import Client, as_completed

    from gpu_ops.features.extract import checked_summary, extract_options, store_directory, store_metadata
    from gpu_ops.incremental import start_refresh, store_revision
    from gpu_ops.store_lock import StoreLock, new_run_id

    run_id = run_id or new_run_id()
    dataset, extractor = dataset_and_extractor(params, "cpu", listing=run_id)
    directory = store_directory(Path(params["cache_root"]) / "stores", dataset, extractor, incremental=True,
                                device=params["device"])
    metadata = store_metadata(dataset, extractor, incremental=True, device=params["device"])
    shard_rows = int(extract_options(params, "cpu")["shard_rows"])
    done: list[dict[str, Any]] = []
    with StoreLock(directory, run_id, wait=wait), \
            start_refresh(directory, metadata, dataset, shard_rows, run_id) as store:
        pending = store.pending_shards()
        if pending:
            log.info("store %s: embedding %d image(s) in %d part(s) on the Dask cluster %s", directory,
                     sum(len(store.shard_range(s)) for s in pending), len(pending), address)
            with Client(address, set_as_default=False) as client:
                futures = {client.submit(embed_group, params, str(directory), run_id, list(store.shard_range(s)),
                                         [dataset.image_ids[i] for i in store.shard_range(s)], backend,
                                         key=f"embed-group-{run_id}-{s:05d}", pure=False): s for s in pending}
                try:
                    for future in as_completed(list(futures), loop=client.loop, timeout=timeout):
                        result = future.result()
                        future.release()  # the worker drops the rows once they are here
                        rows = result.pop("rows")
                        store.write_shard(futures[future], rows.image_ids, rows.sources, rows.labels,
                                          rows.embeddings, rows.quarantined, writer=result["writer"])
                        del rows
                        done.append(result)
                        if on_shard:
                            on_shard(len(done), len(pending))
                        if len(done) == len(pending):
                            break  # as_completed past its timeout raises even once nothing is left
                except TimeoutError:
                    raise TimeoutError(f"{len(pending) - len(done)} of {len(pending)} part(s) unfinished after the "
                                       f"extract stage's {timeout} s") from None
                finally:
                    client.cancel([f for f in futures if not f.done()])
        else:
            log.info("store %s: nothing to extract", directory)
        summary = checked_summary(store.finish(), dataset.name, len(dataset))
    if done:
        log.info("%d part(s) embedded by %d worker process(es) on %s", len(done), len({r["writer"] for r in done}),
                 ", ".join(sorted({r["device_label"] for r in done})))
    return {"store": str(directory), "rows": summary.rows, "dim": summary.dim, "quarantined": summary.quarantined,
            "revision": store_revision(directory), "shard_rows": store.shard_rows,
            "items": sum(r["items"] for r in done), "writers": sorted({r["writer"] for r in done}),
            "devices": sorted({r["device"] for r in done}), "device_labels": sorted({r["device_label"] for r in done})}


def _check_same_items(dataset: Any, indices: list[int], expected_ids: list[str]) -> None:
    """Refuse (one line, naming the first differing item) a worker whose view of the folder is not
    the driver's at ``indices``."""
    for index, want in zip(indices, expected_ids, strict=True):
        got = dataset.image_ids[index] if 0 <= index < len(dataset) else None
        if got != want:
            seen = f"{got!r}" if got is not None else f"missing ({len(dataset)} images)"
            raise InputError(f"{dataset.name}: image {index} is {want!r} for the driver but {seen} on the Dask "
                             f"worker {process_label()} (the folder changed during the run, or the workers see "
                             "other files)")


def embed_group(params: dict[str, Any], store: str, listing: str, indices: list[int], expected_ids: list[str],
                backend: str = "auto") -> dict[str, Any]:
    """Worker side of :func:`refresh_on_dask`: embed the images at ``indices`` of the run's folder
    with the extractor placed by ``backend`` on this worker, through the local extraction's loop
    (:func:`gpu_ops.features.extract.embed_items`), and return them (``rows``:
    :class:`~gpu_ops.features.extract.EmbeddedRows`) with ``items``, ``writer`` (this process),
    ``device``, ``device_label`` and ``seconds``; nothing is written here. Refuses a worker whose
    images at ``indices`` are not ``expected_ids`` (the driver's), or whose extractor or precision
    would belong in another store than ``store``."""
    from gpu_ops.features.extract import embed_items, extract_options, store_directory
    from gpu_ops.placement import place

    t0 = time.perf_counter()
    device = place("extract", backend).torch_device
    dataset, extractor = dataset_and_extractor(params, device, listing=listing)
    expected = store_directory(Path(params["cache_root"]) / "stores", dataset, extractor, incremental=True)
    if expected.resolve() != Path(store).resolve():
        raise InputError(f"{store}: this worker's data/extractor belong in {expected} (different dataset "
                         "files, library versions or precision on the workers?)")
    _check_same_items(dataset, indices, expected_ids)
    options = extract_options(params, extractor.device)
    rows = embed_items(dataset, extractor, indices, batch_size=options["batch_size"],
                       num_workers=options["num_workers"], decode_on_device=options["decode_on_device"])
    label = device_label(extractor.device)
    log.info("%d image(s) embedded with %s on %s", len(indices), extractor.name, label)
    return {"rows": rows, "items": len(indices), "writer": process_label(), "device": extractor.device,
            "device_label": label, "seconds": round(time.perf_counter() - t0, 3)}


def merge_shards(directory: str | Path, finish: bool = True) -> StoreSummary | None:
    """Driver side: fold the workers' per-shard entries into ``manifest.json`` (one writer, one
    atomic replace), then delete the entries; with ``finish`` and every shard done, mark the
    store complete (``quarantine.csv``) and return its summary."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    manifest = load_manifest(directory)
    entries = sorted((directory / ENTRIES).glob("*.json")) if (directory / ENTRIES).is_dir() else []
    for path in entries:
        entry = json.loads(path.read_text())
        if entry["file"]:
            part = directory / entry["file"]
            if "sha256" in entry:  # what the worker wrote, byte for byte
                problem = part_problem(directory, entry)
                if problem:
                    raise RuntimeError(f"store {directory}: {problem} since its worker wrote it")
                record = {k: entry[k] for k in ("bytes", "mtime_ns", "sha256")}
            else:  # an entry without its part's record: take it from the part as it is
                st = part.stat()
                record = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(part)}
            rows = pq.ParquetFile(part).metadata.num_rows
            if rows != entry["rows"]:
                raise RuntimeError(f"{part}: {rows} rows, its manifest entry says {entry['rows']}")
            entry = {**entry, **record}
            manifest["dim"] = int(entry["dim"])
        manifest["shards"][path.stem] = {k: entry[k] for k in ("file", "rows", "quarantined", "bytes", "mtime_ns",
                                                               "sha256") if k in entry}
        manifest["shards"][path.stem]["writer"] = entry.get("writer")
    if entries:
        atomic_write_json(directory / MANIFEST, manifest)
        for path in entries:
            path.unlink()
    n_shards = max(1, -(-int(manifest["n_items"]) // int(manifest["shard_rows"])))
    missing = [s for s in range(n_shards) if f"{s:05d}" not in manifest["shards"]]
    if not finish:
        return None
    if missing:
        raise RuntimeError(f"{directory}: shard(s) {missing[:10]} were not written")
    from gpu_ops.features.extract import checked_summary

    store = EmbeddingStore(directory, manifest["metadata"], int(manifest["n_items"]), int(manifest["shard_rows"]),
                           verify=False)  # every part was checked as it was merged
    return checked_summary(store.finish(), manifest["metadata"].get("dataset", str(directory)),
                           int(manifest["n_items"]))


# --------------------------------------------------------------------------------------------
# k-means over a store whose parts live on the workers


#: The packages the cuML-on-Dask route imports on every worker, in the order they are checked.
#: ``raft_dask`` (NCCL comms) comes with conda's ``raft-dask`` or pip's ``cuml-cu1X[dask]`` only.
CUML_DASK_MODULES = ("cupy", "cudf", "raft_dask", "cuml.dask.cluster")


def cuml_dask_worker_status() -> dict[str, Any]:
    """What this Dask worker offers the cuML-on-Dask route (run on each worker by ``client.run``).

    Returns ``usable`` (bool), ``reason`` (why not, naming the module and its import error, or
    what it has), ``host`` and ``device`` (``host/PCI bus id`` of the worker's current CUDA device,
    None without one). Every import is checked one by one so the reason names what is missing.
    """
    import importlib

    host = socket.gethostname()
    status: dict[str, Any] = {"usable": False, "host": host, "device": None,
                              "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
    for module in CUML_DASK_MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - GPU packages fail at import for many reasons; each is reported
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            hint = " (pip install 'cuml-cu13[dask]' or conda install raft-dask)" if module == "raft_dask" else ""
            status["reason"] = f"{module} not importable on {host} ({type(exc).__name__}: {first}){hint}"
            return status
        if module == "cupy":
            import cupy

            try:
                count = cupy.cuda.runtime.getDeviceCount()
                current = cupy.cuda.runtime.getDevice() if count else None
                bus = cupy.cuda.runtime.deviceGetPCIBusId(current) if count else None
            except Exception as exc:  # noqa: BLE001 - no driver / no device
                status["reason"] = f"no CUDA device on {host} ({type(exc).__name__}: {exc})"
                return status
            if not count:
                status["reason"] = f"no CUDA device on {host}"
                return status
            status["device"] = f"{host}/{bus}"
    status.update(usable=True, reason=f"cuML, cuDF and raft-dask on {status['device']}")
    return status


def cuml_dask_route(statuses: dict[str, dict[str, Any]]) -> tuple[bool, str]:
    """Whether k-means may run as ``cuml.dask.cluster.KMeans`` on workers with these
    :func:`cuml_dask_worker_status` answers (worker address -> status), and why.

    Every worker must have cuML, cuDF, raft-dask and a CUDA device, and no two workers may share a
    device: NCCL refuses two ranks on one GPU, so a plain LocalCluster whose workers all see GPU 0
    must not take this route (LocalCUDACluster gives each worker its own device).
    """
    if not statuses:
        return False, "no workers answered"
    missing = {addr: s for addr, s in statuses.items() if not s.get("usable")}
    if missing:
        addr, first = next(iter(sorted(missing.items())))
        more = f" (and {len(missing) - 1} more worker(s))" if len(missing) > 1 else ""
        return False, f"worker {addr}: {first.get('reason', 'not usable')}{more}"
    by_device: dict[str, list[str]] = {}
    for addr, s in statuses.items():
        by_device.setdefault(str(s["device"]), []).append(addr)
    shared = {dev: sorted(addrs) for dev, addrs in by_device.items() if len(addrs) > 1}
    if shared:
        dev, addrs = next(iter(sorted(shared.items())))
        return False, (f"{len(addrs)} workers share the GPU {dev} ({', '.join(addrs)}): cuML's NCCL communicator "
                       "needs one device per worker (start the cluster with dask-cuda's LocalCUDACluster)")
    return True, f"{len(statuses)} worker(s), each with its own GPU"


def dask_kmeans(address: str, store: str | Path, n_clusters: int, *, n_init: int = 10, max_iter: int = 100,
                seed: int = 0, backend: str = "auto", tol: float = 1e-4,
                init_sample_rows: int = 100_000) -> dict[str, Any]:
    """k-means of every row of ``store`` on the Dask cluster at ``address``.

    Returns ``labels`` (n,) int64 in store order, ``centers`` (k, d), ``inertia``, ``n_iter``,
    ``backend`` (``cuml-dask`` or ``dask-lloyd+<init backend>``), ``kind``, ``reason`` and
    ``fallback`` (why the cuML route was not taken when a GPU backend was allowed, else None).
    The cuML route needs every worker to pass :func:`cuml_dask_worker_status` with a device of
    its own (:func:`cuml_dask_route`); otherwise the CPU route runs and the reason is logged.
    """
    from distributed import Client

    from gpu_ops.cluster.lloyd import lloyd
    from gpu_ops.cluster.sources import DaskSource
    from gpu_ops.registry import create_estimator

    parts = [str(p) for p in part_files(Path(store))]
    with Client(address, set_as_default=False) as client:
        client.wait_for_workers(1)
        if backend in ("auto", "gpu", "cuml"):
            usable, why = cuml_dask_route(client.run(cuml_dask_worker_status))
            if usable:
                return _cuml_dask_kmeans(client, store, parts, n_clusters, max_iter=max_iter, seed=seed, tol=tol)
            log.log(logging.WARNING if backend != "auto" else logging.INFO,
                    "k-means on Dask: not on cuML (%s): CPU Lloyd passes on the workers", why)
            fallback: str | None = why
            why = f"cuml-dask not used: {why}"
        else:
            fallback, why = None, f"backend {backend!r}"
        init_backend = "cpu" if backend in ("auto", "gpu", "cuml") else backend
        source = DaskSource.from_parts(client, parts)
        n = source.count()
        if n_clusters > n:
            raise InputError(f"k={n_clusters} is larger than the number of rows ({n})")
        # 1. initial fit on a sample gathered to the driver (all rows when the store is small)
        sample = source.subset(init_sample_rows, seed)
        est, res = create_estimator("kmeans", init_backend, n_clusters=n_clusters, n_init=n_init, max_iter=max_iter,
                                    seed=seed)
        centers = est.fit(sample).cluster_centers_
        # 2. exact Lloyd passes over every partition, then the assignment, on the workers
        result = lloyd(source, n_clusters, init_centroids=centers, max_iter=max_iter, tol=tol)
        workers = len(client.scheduler_info()["workers"])
        jobs = sorted({job for job in client.run(batch_job).values() if job})
    where = f"{workers} worker(s)" + (f" in {', '.join(jobs)}" if jobs else "")
    log.info("dask k-means: %d rows over %d partition(s) on %s: init %s on %d rows, %d Lloyd pass(es), "
             "inertia %.6g", n, len(parts), where, res.backend, len(sample), result.n_iter, result.inertia)
    return {"labels": result.labels, "centers": result.centroids, "inertia": result.inertia,
            "n_iter": result.n_iter, "backend": f"dask-lloyd+{res.backend}", "kind": "cpu",
            "reason": f"{why}: initial fit with {res.backend} on {len(sample)} of {n} rows, then exact Lloyd passes "
                      f"over {len(parts)} partition(s) on {where}",
            "init_resolution": res.as_dict(), "fallback": fallback}


def _cuml_dask_kmeans(client: Any, store: str | Path, parts: list[str], n_clusters: int, *, max_iter: int,
                      seed: int, tol: float) -> dict[str, Any]:
    """cuML's multi-GPU KMeans over a CuPy-backed Dask array read by cuDF on each worker."""
    import cupy
    import dask
    import dask.array as da
    from cuml.dask.cluster import KMeans
    from distributed import wait

    manifest = load_manifest(Path(store))
    dim = int(manifest["dim"])
    rows = [s["rows"] for _, s in sorted(manifest["shards"].items()) if s["file"]]

    def load(path: str) -> Any:
        import cudf

        table = cudf.read_parquet(path, columns=["embedding"])
        return table["embedding"].list.leaves.values.reshape(len(table), dim).astype(cupy.float32)

    blocks = [da.from_delayed(dask.delayed(load)(p), shape=(r, dim), dtype=np.float32,
                              meta=cupy.empty((0, dim), dtype=cupy.float32)) for p, r in zip(parts, rows)]
    X = client.persist(da.concatenate(blocks, axis=0))
    with client.as_current():
        wait(X)
    model = KMeans(client=client, n_clusters=n_clusters, max_iter=max_iter, tol=tol, random_state=seed,
                   init="scalable-k-means++")
    model.fit(X)
    labels = client.compute(model.predict(X)).result()
    centers = model.cluster_centers_
    labels = cupy.asnumpy(labels) if hasattr(labels, "__cuda_array_interface__") else np.asarray(labels)
    centers = cupy.asnumpy(centers) if hasattr(centers, "__cuda_array_interface__") else np.asarray(centers)
    workers = len(client.scheduler_info()["workers"])
    return {"labels": labels.astype(np.int64), "centers": centers.astype(np.float32), "inertia": None,
            "n_iter": None, "backend": "cuml-dask", "kind": "gpu",
            "reason": f"cuml.dask.cluster.KMeans over {len(parts)} partition(s) on {workers} GPU worker(s)",
            "init_resolution": None, "fallback": None}


def cluster_stage_dask(store: str, cfg: Any, algorithm: str, staging: str, address: str) -> ClusterResult:
    """:func:`gpu_ops.pipeline.cluster_stage` for a store spread over a Dask cluster: plain
    k-means runs on the cluster (:func:`dask_kmeans`, ``k=auto`` chosen as every path chooses it);
    every other algorithm gathers the store to the driver and runs the single-process stage (logged)."""
    if algorithm != "kmeans":
        from gpu_ops import pipeline

        log.info("%s has no distributed route: gathering the store to the driver", algorithm)
        return pipeline.cluster_stage(store, cfg, algorithm, staging)
    t0 = time.perf_counter()
    run = RunDir(staging)
    k = k_for(cfg, store, run)
    requested = cfg.backend_for("kmeans")
    result = dask_kmeans(address, store, k, n_init=cfg.n_init, max_iter=cfg.max_iter, seed=cfg.seed,
                         backend=requested, init_sample_rows=cfg.task_runner.init_sample_rows)
    fallbacks = [f"cuml-dask: {result['fallback']}"] if requested == "gpu" and result.get("fallback") else []
    ran = Resolution("kmeans", requested, result["backend"], result["kind"], result["reason"], fallbacks)
    return write_cluster_result(run, algorithm, k=k, resolutions=[ResolutionRecord.of(ran, algorithm)], started=t0,
                                labels=result["labels"], inertia=result["inertia"], n_iter=result["n_iter"])
