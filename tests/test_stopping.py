"""Stopping `gpuclust run`: SIGINT to the process or to its whole process group (a terminal's
Ctrl-C) and SIGTERM (how Slurm and Kubernetes stop jobs), during extraction, clustering and the
report, in ephemeral Prefect mode: each stage and each way of stopping at least once.

Every stop must: exit 130 / 143 within 10 s; print exactly one line on stderr (besides the
progress bars drawn before the signal), also when a second Ctrl-C comes while it stops; leave no
process the run started alive (the process tree, recorded just before the signal, not names); and
leave a store that the next run completes to exactly one row per image.

The cases share one feature store, in order: each run is the rerun of the case before it
(two runs interrupted during extraction, the next resumes it before it is interrupted during
clustering), and :func:`test_rerun_after_stops_completes_the_store` is the rerun of the last one.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import psutil
import pytest

from conftest import REPO, seed_prefect_home
from gpu_ops.rundir import is_run_dir

GPUCLUST = Path(sys.executable).parent / "gpuclust"
N_IMAGES = 200  # the cifar_folder fixture
STOP_LIMIT_S = 10.0
EXPECTED = {signal.SIGINT: ("gpuclust: interrupted", 130), signal.SIGTERM: ("gpuclust: terminated", 143)}
HOW = {"sigint-group": (signal.SIGINT, True), "sigint-pid": (signal.SIGINT, False),
       "sigterm-pid": (signal.SIGTERM, False)}
#: A tqdm progress bar as drawn on stderr before the signal ("extract resnet18:  8%|▊  | 16/200 [...]").
PROGRESS_BAR = re.compile(r"^.+: +\d{1,3}%\|.*\| *\d+/\d+ \[[^\]]*\]$")


# ------------------------------------------------------------------------------------------
# The process tree, from /proc


def descendants(root: int) -> dict[int, float]:
    """Every live process below ``root``: pid -> creation time (so a reused pid is not mistaken
    for the same process)."""
    found: dict[int, float] = {}
    try:
        below = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return found
    for proc in below:
        try:
            found[proc.pid] = proc.create_time()
        except psutil.Error:
            pass
    return found


def still_alive(processes: dict[int, float], wait_s: float = 1.0) -> dict[int, str]:
    """Those of ``processes`` still running (zombies count as gone) after up to ``wait_s`` s:
    pid -> command line."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = {}
        for pid, start in processes.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == start and proc.status() != psutil.STATUS_ZOMBIE:
                    alive[pid] = " ".join(proc.cmdline())[:200]
            except psutil.Error:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def kill_leftovers(processes: dict[int, float]) -> None:
    """SIGKILL whatever of ``processes`` is still running (after a failed check: no leaks)."""
    for pid in still_alive(processes, wait_s=0):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------
# One store shared by the cases


@dataclass
class Chain:
    """The shared settings: a CIFAR image folder, its resnet18 store (16 rows per part, so an
    interrupted extraction has written some parts and not others), and a run directory."""

    root: Path
    dataset: Path

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def out(self) -> Path:
        return self.root / "run"

    def args(self, *extra: str) -> list[str]:
        return [str(GPUCLUST), "run", "--config", str(self.root / "config.yaml"), "--dataset", f"folder:{self.dataset}",
                "--extractor", "resnet18", "--weights", "none", "--image-size", "64", "--batch-size", "16",
                "--num-workers", "1", "--seed", "0", "--out", str(self.out), *extra]

    def env(self) -> dict[str, str]:
        env = {**os.environ, "GPUCLUST_CACHE": str(self.cache)}
        env.pop("PREFECT_API_URL", None)  # ephemeral mode
        return env

    def parts(self) -> list[Path]:
        return sorted(Path(p) for p in glob.glob(str(self.cache / "stores" / "*" / "*" / "part-*.parquet")))

    def store_complete(self) -> bool:
        for manifest in glob.glob(str(self.cache / "stores" / "*" / "*" / "manifest.json")):
            try:
                if json.loads(Path(manifest).read_text()).get("complete"):
                    return True
            except (OSError, ValueError):
                pass
        return False

    def store_ids(self) -> list[str]:
        """Every image_id in the store's Parquet parts (duplicates kept)."""
        parts = self.parts()
        if not parts:
            return []
        return pa.concat_tables([pq.read_table(p, columns=["image_id"]) for p in parts]).column("image_id").to_pylist()

    def staging(self) -> list[Path]:
        return sorted(self.root.glob(".run.partial-*"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, cifar_folder: Path) -> Chain:
    root = tmp_path_factory.mktemp("stopping")
    (root / "config.yaml").write_text("shard_rows: 16\n")
    seed_prefect_home(Path(os.environ["PREFECT_HOME"]))  # the home of the runs' ephemeral servers
    return Chain(root, cifar_folder)


# ------------------------------------------------------------------------------------------
# The stages, seen from outside: what the run has written so far


def _in_extraction(chain: Chain, parts_before: int) -> Callable[[], str | None]:
    def check() -> str | None:
        parts = len(chain.parts())
        if parts > parts_before and not chain.store_complete():
            return f"store has {parts} part(s), not complete"
        return None
    return check


def _in_clustering(chain: Chain) -> Callable[[], str | None]:
    def check() -> str | None:  # k=auto is chosen first; umap-kmeans then runs for seconds
        for staging in chain.staging():
            if (staging / "k_selection.json").exists() and not list(staging.glob("labels-*.npy")):
                return "k chosen, no labels yet"
        return None
    return check


def _in_report(chain: Chain) -> Callable[[], str | None]:
    def check() -> str | None:
        for staging in chain.staging():
            if (staging / "metrics.json").exists() and list(staging.glob(".figures.tmp-*")) \
                    and not (staging / "report.html").exists():
                return "metrics written, report figures being drawn"
        return None
    return check


STAGES: dict[str, tuple[tuple[str, ...], Callable[..., Callable[[], str | None]]]] = {
    "extract": ((), _in_extraction),
    "cluster": (("--algorithm", "umap-kmeans", "--k", "auto", "--reducer", "pca"), _in_clustering),
    "report": (("--algorithm", "kmeans", "--k", "10", "--reducer", "pca"), _in_report),
}


def _only_the_line(stderr: str, expected: str) -> None:
    """stderr's last line is ``expected``; every other non-empty line is a progress bar."""
    lines = [line for line in stderr.split("\n") if line.strip()]
    assert lines and lines[-1] == expected, stderr[-3000:]
    for line in lines[:-1]:
        frames = [f.strip() for f in line.split("\r") if f.strip()]
        assert frames and all(PROGRESS_BAR.match(f) for f in frames), f"unexpected stderr line {line!r}\n{stderr[-3000:]}"


#: Each stage and each way of stopping at least once; extraction, where the loader's worker
#: processes run, both as a terminal's Ctrl-C (the whole group) and as a scheduler's SIGTERM.
CASES = [("extract", "sigint-group"), ("extract", "sigterm-pid"), ("cluster", "sigint-pid"), ("report", "sigterm-pid")]


@pytest.mark.parametrize("stage, how", CASES, ids=lambda v: v)
def test_signal_stops_the_run_cleanly(chain: Chain, stage: str, how: str) -> None:
    signum, to_group = HOW[how]
    line, code = EXPECTED[signum]
    extra, stage_check = STAGES[stage]
    check = stage_check(chain, len(chain.parts())) if stage == "extract" else stage_check(chain)
    stderr_path = chain.root / f"stderr-{stage}-{how}.txt"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(chain.args(*extra), env=chain.env(), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=True)
    started: dict[int, float] = {}
    try:
        deadline = time.monotonic() + 600
        where = None
        while proc.poll() is None and time.monotonic() < deadline and where is None:
            where = check()
            time.sleep(0.05)
        assert where is not None, (f"the run never reached {stage} (exit {proc.poll()}): "
                                   + stderr_path.read_text()[-3000:])
        started = descendants(proc.pid)
        sent = time.monotonic()
        (os.killpg if to_group else os.kill)(proc.pid, signum)
        if to_group:  # a second Ctrl-C while it stops changes nothing
            try:
                proc.wait(timeout=0.3)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signum)
        proc.wait(timeout=60)
        took = time.monotonic() - sent
        left = still_alive(started)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_leftovers(started)
    print(f"{stage} {how}: stopped {took:.2f} s after the signal ({where}); {len(started)} child process(es)")
    stderr_text = stderr_path.read_text()
    assert proc.returncode == code, stderr_text[-3000:]
    _only_the_line(stderr_text, line)
    assert took <= STOP_LIMIT_S, f"took {took:.1f} s to stop"
    assert started, "the run had started no process (no Prefect server?)"
    assert not left, f"left running: {left}"
    if chain.out.exists():
        # the signal landed after the run was committed (the report stage is short): what is
        # there must then be a whole run, never a partial one
        assert is_run_dir(chain.out) and (chain.out / "report.html").is_file(), "a partial run directory"
        shutil.rmtree(chain.out)  # the next case starts without it
    ids = chain.store_ids()
    assert len(ids) == len(set(ids)), "duplicate image_id rows in the store"
    if stage != "extract":  # this run resumed the store to the end before it was stopped
        assert chain.store_complete() and len(ids) == N_IMAGES


def test_rerun_after_stops_completes_the_store(chain: Chain) -> None:
    """The rerun of the last stopped run: exit 0, one row per image, and (sampled through the
    run) no process it started is left once it has exited."""
    seen: dict[int, float] = {}
    with open(chain.root / "stderr-final.txt", "w") as stderr:
        proc = subprocess.Popen(chain.args("--algorithm", "kmeans", "--k", "10", "--reducer", "pca"), env=chain.env(),
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            while proc.poll() is None:
                seen.update(descendants(proc.pid))
                time.sleep(0.2)
            proc.wait(timeout=600)
            left = still_alive(seen, wait_s=5.0)
        finally:
            kill_leftovers(seen)
    assert proc.returncode == 0, (chain.root / "stderr-final.txt").read_text()[-3000:]
    ids = chain.store_ids()
    assert chain.store_complete() and len(ids) == len(set(ids)) == N_IMAGES
    assert pq.read_table(chain.out / "assignments.parquet").num_rows == N_IMAGES
    assert seen and not left, f"left running: {left}"


def test_sigkill_leaves_no_prefect_server(tmp_path: Path) -> None:
    """SIGKILL (or a crash in C++) gives gpuclust no chance to clean up: the Prefect server it
    started must die with it all the same."""
    out = tmp_path / "run"
    env = {**os.environ, "GPUCLUST_CACHE": str(tmp_path / "cache")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([str(GPUCLUST), "run", "--dataset", "digits", "--extractor", "raw", "--algorithm", "kmeans",
                             "--reducer", "none", "--out", str(out)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started: dict[int, float] = {}
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline and not list(tmp_path.glob(".run.partial-*")):
            time.sleep(0.05)  # the staging directory: the flow runs, so its server is up
        assert proc.poll() is None, "the run ended before it could be killed"
        started = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        left = still_alive(started, wait_s=5.0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_leftovers(started)
    assert started, "the run had started no process (no Prefect server?)"
    assert not left, f"left running after SIGKILL: {left}"
