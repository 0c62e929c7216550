"""`--task-runner slurm` against a real Slurm: a single-node cluster (Debian's slurm-wlm 22.05 with
munge) started on this machine for the module, jobs recorded by ``jobcomp/filetxt`` and listed by
``sacct --completion``. Skips, saying why, where Slurm cannot start (not installed, not root,
daemons that do not come up); every daemon it started is stopped afterwards, and that is checked."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import free_port, run_cli

#: What the cluster runs on (``slurmscriptd`` is slurmctld's helper, ``slurmstepd`` runs each job).
DAEMONS = ("slurmctld", "slurmd", "slurmstepd", "slurmscriptd", "munged")
#: Commands the cluster and dask-jobqueue need.
COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "sacct")


def daemon_pids() -> dict[int, dict]:
    """Running Slurm and munge daemons (zombies excluded): pid -> name, cmdline, pgid, create_time."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline", "status", "create_time"]):
        text = " ".join([proc.info["name"] or "", *(proc.info["cmdline"] or [])])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(d in text for d in DAEMONS):
            with _no_such_process():
                found[proc.info["pid"]] = {"text": text, "pgid": os.getpgid(proc.info["pid"]),
                                           "created": proc.info["create_time"]}
    return found


def started_here(root: Path, groups: set[int], since: float) -> dict[int, str]:
    """The daemons of the cluster under ``root``: those in the process groups of the daemons
    started there (slurmctld's slurmscriptd), those naming ``root``, and the job step daemons
    (``slurmstepd``, which detach from slurmd) started since ``since``."""
    return {pid: d["text"] for pid, d in daemon_pids().items()
            if d["pgid"] in groups or str(root) in d["text"]
            or (d["text"].startswith("slurmstepd") and d["created"] >= since)}


def slurm_conf(root: Path, node: str, socket_path: Path) -> str:
    """A single-node slurm.conf: this machine's CPUs and memory (``slurmd -C``), one partition,
    no cgroups, every file under ``root``, job completions in a text file for ``sacct -c``."""
    name = node.split()[0].removeprefix("NodeName=")
    return "\n".join([
        "ClusterName=gpuclust-test",
        f"SlurmctldHost={name}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={socket_path}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root / 'log' / 'jobcomp.txt'}",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "ReturnToService=2",
        "MpiDefault=none",
        f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
        f"PartitionName=debug Nodes={name} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def stop(proc: subprocess.Popen, wait_s: float = 15) -> None:
    """SIGTERM ``proc``'s process group (it was started in its own session), SIGKILL after ``wait_s``."""
    if proc.poll() is not None:
        return
    with _no_such_process():
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        with _no_such_process():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=wait_s)


class _no_such_process:
    """Ignore a process that is already gone."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, ProcessLookupError)


def _tail(path: Path, n: int = 1500) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path.name} not written)"


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """A single-node Slurm on this machine: munged (own key and socket), slurmctld and slurmd in a
    temporary directory. Yields the environment (``SLURM_CONF``) its commands need."""
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}; .ci/run installs slurm-wlm and munge)")
    if os.geteuid() != 0:
        pytest.skip("a test Slurm needs root: slurmd runs its jobs as SlurmUser=root here")
    since = time.time() - 1
    root = Path(tempfile.mkdtemp(prefix="gpuclust-slurm-"))
    root.chmod(0o755)  # munged wants its socket's directory open to every user
    for sub, mode in (("key", 0o700), ("run", 0o755), ("state", 0o755), ("spool", 0o755), ("log", 0o755)):
        (root / sub).mkdir(mode=mode)
    socket_path = root / "run" / "munge.socket"
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(root / "log" / f"{name}.out", "w")
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        out.close()
        return procs[-1]

    def give_up(why: str, log: str) -> None:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"the test Slurm did not come up: {why}\n{log}")

    subprocess.run(["mungekey", "--create", "--keyfile", str(root / "key" / "munge.key")], check=True,
                   capture_output=True)
    munged = start("munged", ["munged", "--foreground", f"--socket={socket_path}",
                              f"--key-file={root / 'key' / 'munge.key'}", f"--pid-file={root / 'run' / 'munged.pid'}",
                              f"--seed-file={root / 'key' / 'munged.seed'}",
                              f"--log-file={root / 'log' / 'munged.log'}"])
    deadline = time.monotonic() + 20
    while not socket_path.exists() and munged.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not socket_path.exists():
        give_up("munged", _tail(root / "log" / "munged.out"))

    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout.splitlines()
    if not node or not node[0].startswith("NodeName="):
        give_up("`slurmd -C` printed no node line", "\n".join(node))
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, node[0], socket_path))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    ctld = start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])
    slurmd = start("slurmd", ["slurmd", "-D", "-f", str(conf)])
    state = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and ctld.poll() is None and slurmd.poll() is None:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout.strip()
        if state == "idle":
            break
        time.sleep(0.5)
    if state != "idle":
        give_up(f"node state {state!r}", _tail(root / "log" / "slurmctld.log") + _tail(root / "log" / "slurmd.log"))

    yield {"SLURM_CONF": str(conf)}

    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env).stdout.split()
    if jobs:
        subprocess.run(["scancel", *jobs], env=env, capture_output=True)
        deadline = time.monotonic() + 20
        while jobs and time.monotonic() < deadline:
            time.sleep(0.5)
            jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env).stdout.split()
    for proc in (slurmd, ctld, munged):
        stop(proc)
    groups = {proc.pid for proc in procs}  # each was started in a session (and group) of its own
    deadline = time.monotonic() + 10
    left = started_here(root, groups, since)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = started_here(root, groups, since)
    shutil.rmtree(root, ignore_errors=True)
    assert not left, f"daemons still running after the test Slurm was stopped: {left}"


def sacct_jobs(env: dict[str, str]) -> dict[str, dict[str, str]]:
    """Job id -> its ``sacct --completion`` record (name, state, node, exit code)."""
    out = subprocess.run(["sacct", "--completion", "-P", "-n", "-o", "JobID,JobName,State,NodeList,ExitCode"],
                         capture_output=True, text=True, env={**os.environ, **env}, check=True).stdout
    print(out)
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return {r[0]: {"name": r[1], "state": r[2], "node": r[3], "exit": r[4]} for r in rows}


def test_slurm_batch_jobs_extract_and_cluster_an_image_folder_as_the_local_run_does(slurm, cifar_folder, tmp_path):
    """`gpuclust run --task-runner slurm`: batch jobs (Dask workers, daemonic processes that
    decode the JPEG folder themselves) write the store's shards and run k-means's Lloyd passes;
    both submitted jobs are in ``sacct`` and ended COMPLETED; the store and the labels are the
    local run's."""
    from gpu_ops import pipeline
    from gpu_ops.config import make_config
    from gpu_ops.metrics import evaluate
    from gpu_ops.store import read_embeddings

    settings = {"task_runner": {"kind": "slurm", "n_workers": 2,
                                "cluster_kwargs": {"memory": "2GB", "walltime": "00:10:00"}},
                "shard_rows": 100, "num_workers": 2, "explore": False, "cache_dir": str(tmp_path / "cache")}
    cfg_file = tmp_path / "slurm.yaml"
    cfg_file.write_text(json.dumps(settings))  # JSON is YAML
    args = ["run", "--config", str(cfg_file), "--task-runner", "slurm", "--dataset", f"folder:{cifar_folder}",
            "--extractor", "raw", "--algorithm", "kmeans", "--k", "10", "--reducer", "none", "--seed", "0",
            "--out", str(tmp_path / "run")]
    t0 = time.perf_counter()
    proc = run_cli(args, env=slurm, timeout=420)
    print(f"gpuclust run --task-runner slurm: {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    store = Path(metrics["store"])

    # the shards were written inside batch jobs (which of the two jobs takes which shard is the
    # scheduler's choice: on a quiet node the first job can write both), the Lloyd passes ran in
    # them, and both submitted jobs are in sacct, COMPLETED
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 2
    writers = {re.search(r"\(slurm job (\d+)\)", s["writer"]).group(1) for s in manifest["shards"].values()}
    kmeans = next(b for b in metrics["backends"] if b["stage"] == "kmeans")
    assert kmeans["backend"].startswith("dask-lloyd+")
    assert re.search(r"on \d worker\(s\) in slurm job \d+(, slurm job \d+)?$", kmeans["reason"]), kmeans["reason"]
    lloyd = set(re.findall(r"slurm job (\d+)", kmeans["reason"]))
    records = sacct_jobs(slurm)
    assert len(records) == 2 and writers | lloyd <= set(records), (writers, lloyd, records)
    for job, record in records.items():
        assert record["name"] == "dask-worker", records
        assert record["state"] == "COMPLETED" and record["exit"] == "0:0", records  # not cancelled
    logs = sorted(p.name for p in (tmp_path / "cache" / "jobs").iterdir())
    assert {f"dask-worker-{j}.err" for j in records} <= set(logs)  # job output under the cache, not in the cwd

    # the same store and clustering as the stages a local run calls, in this process
    local_cfg = make_config(dataset=f"folder:{cifar_folder}", extractor="raw", algorithms=["kmeans"], k=10, seed=0,
                            shard_rows=100, num_workers=0, cache_dir=tmp_path / "local-cache")
    local_store = pipeline.extract_stage(pipeline.extract_params(local_cfg), progress=False)
    (tmp_path / "staging").mkdir()
    local = pipeline.cluster_stage(local_store.store, local_cfg, "kmeans", str(tmp_path / "staging"))
    a, b = read_embeddings(Path(local_store.store)), read_embeddings(store)
    assert a.image_ids == b.image_ids and len(a.image_ids) == 200
    assert np.array_equal(a.embeddings, b.embeddings)
    assignments = pq.read_table(tmp_path / "run" / "assignments.parquet").to_pydict()
    assert assignments["image_id"] == a.image_ids
    on_slurm, here = np.asarray(assignments["kmeans"]), np.load(local.labels)
    assert evaluate(here, on_slurm)["ari"] > 0.99  # the same partition (cluster numbers may differ)
    expected = evaluate(a.labels, here)
    got = metrics["algorithms"]["kmeans"]
    print(f"k-means on 200 CIFAR-10 JPEGs: ACC {got['acc']:.4f} on Slurm vs {expected['acc']:.4f} locally")
    assert got["acc"] == pytest.approx(expected["acc"], abs=0.01)
    assert got["nmi"] == pytest.approx(expected["nmi"], abs=0.01)
