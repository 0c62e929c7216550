"""A Prefect home whose database is already migrated, copied into the fresh homes the tests use.

A `prefect server` (or an ephemeral one) that finds no database in its ``PREFECT_HOME`` creates it
and runs every migration: about 6 CPU-seconds more than a start on a migrated database. The suite
starts about ten servers on fresh homes (each test process's shared server and its ephemeral
runs' home, and the tests that need a home of their own). So the session builds one template once,
in the background (a real `prefect server start`, stopped once healthy), and :func:`seed` copies
its database into each fresh home: the servers still start, and still check their migrations,
on a database of their own.

Run as a script: ``python tests/prefect_home.py build DIR`` builds the template in ``DIR`` and
writes ``DIR/ready`` (or ``DIR/failed`` with the reason); ``python tests/prefect_home.py seed DIR
HOME COMMAND...`` seeds ``HOME`` and then becomes ``COMMAND`` (same process: a server launched
this way does not wait in its launcher for the template).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

#: The files of a Prefect home that a server start writes: its database and the record of the
#: block types it registered in it (read at the next start to skip that registration).
HOME_FILES = ("prefect.db", "memo_store.toml")
READY, FAILED = "ready", "failed"


def die_with_parent():  # noqa: ANN201 - a preexec_fn or None
    """A ``preexec_fn``: the child gets SIGKILL when the process that starts it dies (Linux), so a
    killed test run leaves no server behind. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it

    def preexec() -> None:
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(api_url: str, alive: Callable[[], bool], log: Path, timeout: float = 180) -> None:
    """Return once the Prefect API at ``api_url`` answers ``/health``; RuntimeError with the end of
    the server's ``log`` when ``alive()`` turns false first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if not alive():
            raise RuntimeError(f"prefect server exited: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"prefect server did not become healthy in {timeout:.0f} s: {log.read_text()[-2000:]}")
        time.sleep(0.25)


def build(directory: Path, timeout: float = 300) -> None:
    """Start a `prefect server` on ``directory/home``, wait until it answers, stop it; then mark the
    template ready (or failed, with the reason)."""
    home = directory / "home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).parent / "prefect"
    with open(directory / "server.log", "w") as log:
        proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent())  # an interrupted session leaves no server
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/api", lambda: proc.poll() is None, directory / "server.log", timeout)
    except BaseException as exc:
        (directory / FAILED).write_text(str(exc))
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    (directory / READY).touch()


def seed(home: Path, template: Path | None, timeout: float = 180) -> bool:
    """Copy the template's database into ``home`` when ``home`` has none; waits for the template
    to be built. False (``home`` left as it is) without a template or when it failed."""
    if template is None or (home / HOME_FILES[0]).exists():
        return False
    deadline = time.monotonic() + timeout
    while not (template / READY).exists():
        if (template / FAILED).exists() or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    home.mkdir(parents=True, exist_ok=True)
    source = template / "home"
    # the SQLite backup API gives a consistent copy whatever journal files the server left
    with closing(sqlite3.connect(source / HOME_FILES[0])) as src, closing(sqlite3.connect(home / HOME_FILES[0])) as dst:
        src.backup(dst)
    for name in HOME_FILES[1:]:
        if (source / name).exists():
            shutil.copyfile(source / name, home / name)
    return True


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]))
    else:
        seed(Path(sys.argv[3]), Path(sys.argv[2]))
        os.execv(sys.argv[4], sys.argv[4:])
