"""What a small run pays besides its stages: the digits demo against a running Prefect server and
in ephemeral mode, for one or more checkouts of gpuclust, in one script.

The run is ``gpuclust run --extractor raw --algorithm kmeans --reducer none`` (the default dataset,
scikit-learn's digits) into a new directory each time, as a separate process, timed from outside.
Per run:

* ``wall``: the process from start to exit;
* ``stages``: the sum of the run's ``metrics.json`` ``timings_s``: extract, cluster, reduce, evaluate,
  explore and report, each timed inside its task (extract around its task, which is cached here);
* ``tasks``: the sum of the durations of every Prefect task run of the run's flow run (all the
  stages, evaluate, write-run, save-for-reuse and report included), read from the Prefect database
  in ``PREFECT_HOME`` after the run;
* the overheads ``wall - stages`` and ``wall - tasks``: imports, the Prefect server (ephemeral mode
  starts one per run), the flow and task engine, exit; ``wall - tasks`` split into the time before
  the flow run starts, between its task runs, and after it ends (the flow run's start and end in
  the database against this script's clock).

Each (checkout, mode) pair gets its own ``PREFECT_HOME`` and embedding cache and one warm-up run
(not counted: a fresh database is migrated, the extraction cached); then ``--repeats`` runs, of
which the medians are printed. The server mode uses one ``prefect server start`` on 127.0.0.1 that
this script starts and stops, shared by every checkout (``PREFECT_API_URL``).

A checkout is ``NAME=PATH``: the directory put first on ``PYTHONPATH`` for the ``gpuclust``
console script of this virtual environment. Before and after a change, on one machine::

    git worktree add /tmp/ov-old 36dc2f0
    .venv/bin/python bench/overhead.py --checkout before=/tmp/ov-old --checkout after=. --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GPUCLUST = Path(sys.executable).parent / "gpuclust"
RUN_ARGS = ["run", "--extractor", "raw", "--algorithm", "kmeans", "--reducer", "none"]
MODES = ("server", "ephemeral")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _base_env() -> dict[str, str]:
    # PYTHONDONTWRITEBYTECODE would make every run compile gpuclust's modules again; an installed
    # gpuclust has its bytecode written (the warm-up run writes it here).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", PREFECT_LOGGING_LEVEL="WARNING")
    return env


class Server:
    """``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME, stopped by process group."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.url = f"http://127.0.0.1:{_free_port()}/api"
        self.log = open(home / "server.log", "wb")
        env = {**_base_env(), "PREFECT_HOME": str(home)}
        self.proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                      "--port", self.url.split(":")[2].split("/")[0]],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("prefect server did not answer within 300 s")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.log.close()


def _seconds(start: str | None, end: str | None) -> float:
    if not start or not end:
        return 0.0  # a cached task run has no run time of its own
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _epoch(stamp: str) -> float:
    """A Prefect database time (UTC, no zone) as seconds since the epoch."""
    return datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc).timestamp()


def flow_run_times(database: Path) -> tuple[float, float, dict[str, float]]:
    """(start, end) of the newest flow run in a Prefect SQLite database (seconds since the epoch)
    and the seconds of each of its task runs."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as db:
        flow_run, start, end = db.execute(
            "SELECT id, start_time, end_time FROM flow_run ORDER BY created DESC LIMIT 1").fetchone()
        rows = db.execute("SELECT name, start_time, end_time FROM task_run WHERE flow_run_id = ?", (flow_run,))
        tasks = {name.rsplit("-", 1)[0]: round(_seconds(s, e), 3) for name, s, e in rows}
    return _epoch(start), _epoch(end), tasks


def one_run(checkout: Path, env: dict[str, str], out: Path, database: Path) -> dict[str, Any]:
    """Run the demo once; its wall, stage and task seconds."""
    load = os.getloadavg()[0]
    launched = time.time()
    t0 = time.perf_counter()
    done = subprocess.run([str(GPUCLUST), *RUN_ARGS, "--out", str(out)], env={**env, "PYTHONPATH": str(checkout)},
                          capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    exited = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"gpuclust run failed ({done.returncode}): {done.stderr[-2000:]}")
    timings = json.loads((out / "metrics.json").read_text())["timings_s"]
    time.sleep(0.5)  # the server commits the last task run states
    flow_start, flow_end, tasks = flow_run_times(database)
    stages, task_sum = sum(timings.values()), sum(tasks.values())
    first = done.stdout.splitlines()[0] if done.stdout else ""
    return {"wall": round(wall, 2), "stages": round(stages, 2), "tasks": round(task_sum, 2),
            "overhead_stages": round(wall - stages, 2), "overhead_tasks": round(wall - task_sum, 2),
            "before_flow": round(flow_start - launched, 2), "between_tasks": round(flow_end - flow_start - task_sum, 2),
            "after_flow": round(exited - flow_end, 2),
            "load1": round(load, 2), "timings_s": timings, "task_s": tasks,
            "mode_line": first if first.startswith("Prefect:") else ""}


def measure(name: str, checkout: Path, mode: str, server: Server | None, scratch: Path, repeats: int) -> dict[str, Any]:
    """A warm-up run, then ``repeats`` runs of one checkout in one mode."""
    home = scratch / f"{name}-{mode}"
    home.mkdir()
    env = {**_base_env(), "PREFECT_HOME": str(home / "prefect-home"), "GPUCLUST_CACHE": str(home / "cache")}
    if server is not None:
        env["PREFECT_API_URL"] = server.url
        database = server.home / "prefect.db"
    else:
        database = home / "prefect-home" / "prefect.db"
    runs = []
    for i in range(repeats + 1):
        result = one_run(checkout, env, home / f"run-{i}", database)
        print(f"  {name:<8} {mode:<9} {'warm-up' if i == 0 else f'run {i}':<7} wall {result['wall']:6.2f} s  "
              f"stages {result['stages']:5.2f}  tasks {result['tasks']:5.2f}  (before the flow "
              f"{result['before_flow']:.2f}, between tasks {result['between_tasks']:.2f}, after the flow "
              f"{result['after_flow']:.2f})  load {result['load1']:.2f}  "
              f"{result['mode_line']}", flush=True)
        if i:
            runs.append(result)
    median = {key: round(statistics.median(r[key] for r in runs), 2)
              for key in ("wall", "stages", "tasks", "overhead_stages", "overhead_tasks", "before_flow",
                          "between_tasks", "after_flow", "load1")}
    return {"checkout": name, "mode": mode, "median": median, "runs": runs}


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"cpu": f"{cpu}, {os.cpu_count()} logical CPUs", "python": platform.python_version(),
            "os": platform.platform()}
    for package in ("prefect", "torch", "scikit-learn", "faiss-cpu", "numpy", "pyarrow"):
        try:
            info[package] = version(package)
        except Exception:  # noqa: BLE001 - not installed
            info[package] = "-"
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", metavar="NAME=PATH",
                        help="a gpuclust source tree to measure (repeatable; default: this one, as 'this')")
    parser.add_argument("--modes", default=",".join(MODES), help="server,ephemeral (default both)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per checkout and mode (default 3)")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args(argv)
    checkouts = [(c.split("=", 1)[0], Path(c.split("=", 1)[1]).resolve()) for c in (args.checkout or [f"this={ROOT}"])]
    modes = [m for m in args.modes.split(",") if m]
    info = machine()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    for name, path in checkouts:
        commit = subprocess.run(["git", "-C", str(path), "log", "-1", "--format=%h %s"], capture_output=True,
                                text=True).stdout.strip()
        print(f"checkout {name}: {path} ({commit})")
    print(f"command: gpuclust {' '.join(RUN_ARGS)} --out NEW_DIR")
    scratch = Path(tempfile.mkdtemp(prefix="gpuclust-overhead-"))
    results = []
    server = None
    try:
        if "server" in modes:
            (scratch / "server").mkdir()
            t0 = time.perf_counter()
            server = Server(scratch / "server")
            print(f"prefect server at {server.url}: answered after {time.perf_counter() - t0:.1f} s")
        for mode in modes:
            for name, path in checkouts:
                results.append(measure(name, path, mode, server if mode == "server" else None, scratch, args.repeats))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nmedians of {args.repeats} runs (seconds); stages = metrics.json timings_s (the six stages), tasks = every Prefect task run")
    header = ("| checkout | mode | wall | stages | wall - stages | tasks | wall - tasks | before the flow | "
              "between tasks | after the flow | load (1 min) |")
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    for r in results:
        m = r["median"]
        print(f"| {r['checkout']} | {r['mode']} | {m['wall']:.1f} | {m['stages']:.1f} | {m['overhead_stages']:.1f} | "
              f"{m['tasks']:.1f} | {m['overhead_tasks']:.1f} | {m['before_flow']:.1f} | {m['between_tasks']:.1f} | "
              f"{m['after_flow']:.1f} | {m['load1']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
