"""Which Prefect API a ``gpuclust`` command talks to, and ``gpuclust server start|stop|status``.

In order:

1. ``PREFECT_API_URL`` (from the environment or the Prefect profile): that server. It must answer
   within :data:`REACH_TIMEOUT` seconds, else the command stops with one line (exit 2): a run
   the user pointed at a server never silently runs somewhere else.
2. A server started by ``gpuclust server start``: ``prefect server start`` on 127.0.0.1 in the
   background, recorded in ``$PREFECT_HOME/gpuclust-server.json`` (pid, URL, log file). Every
   later command of the same ``PREFECT_HOME`` uses it. A record whose process is gone (or whose
   pid now belongs to another process) is stale: it is removed, with a line saying so.
3. Otherwise ephemeral mode: a temporary server for the one run (:mod:`flows.api_server`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from gpu_ops.errors import InputError
from gpu_ops.fsutil import atomic_write_json

#: Seconds a configured server has to answer before a command gives up on it.
REACH_TIMEOUT = 3.0
#: The record of the server ``gpuclust server start`` started, in ``PREFECT_HOME``.
STATE_NAME = "gpuclust-server.json"
#: Its output (appended to across starts), in ``PREFECT_HOME``.
LOG_NAME = "gpuclust-server.log"
#: Prefect's usual port.
DEFAULT_PORT = 4200

#: An opener that never goes through an HTTP proxy from the environment (the server is local).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class ServerRecord:
    """What ``gpuclust server start`` wrote about the server it started."""

    pid: int
    url: str
    log: str
    started: float  #: the process's creation time (psutil): a reused pid does not match it

    def alive(self) -> bool:
        """Whether the recorded process still runs (the same process, not a reused pid)."""
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) < 1.0
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False


def prefect_home() -> Path:
    """``PREFECT_HOME`` as Prefect resolves it (``~/.prefect`` unless set)."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def state_file() -> Path:
    return prefect_home() / STATE_NAME


def read_record(path: Path | None = None) -> ServerRecord | None:
    """The recorded server, or None when there is no record (an unreadable one counts as none)."""
    path = path or state_file()
    try:
        return ServerRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def health(url: str, timeout: float = REACH_TIMEOUT) -> str | None:
    """None when the Prefect API at ``url`` answers ``GET /health``, else why not (one phrase)."""
    try:
        with _DIRECT.open(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason) or type(reason).__name__


def reachable(url: str, timeout: float = REACH_TIMEOUT) -> str | None:
    """None when something answers HTTP at ``url`` (any status: Prefect Cloud wants a key for
    ``/health``), else why not."""
    why = health(url, timeout)
    return None if why is None or why.startswith("HTTP ") else why


def check_configured(url: str) -> None:
    """InputError (one line) unless the configured API at ``url`` answers."""
    why = reachable(url)
    if why is not None:
        raise InputError(f"PREFECT_API_URL={url} does not answer ({why}); start that server "
                         f"(or `gpuclust server start`), or unset PREFECT_API_URL to run without one")


def recorded_server() -> tuple[ServerRecord | None, str | None]:
    """(the live server ``gpuclust server start`` recorded, None) or (None, a note when a stale
    record was found and removed)."""
    path = state_file()
    record = read_record(path)
    if record is None:
        if path.exists():
            path.unlink(missing_ok=True)
            return None, f"removed unreadable {path}"
        return None, None
    if not record.alive():
        path.unlink(missing_ok=True)
        return None, f"removed stale {path}: its server (pid {record.pid}) is not running"
    return record, None


# ------------------------------------------------------------------------------------------
# gpuclust server start | stop | status


def start(port: int = DEFAULT_PORT, timeout: float = 180.0) -> tuple[ServerRecord, bool]:
    """Start ``prefect server start`` on 127.0.0.1:``port`` in the background (its own session,
    output appended to ``$PREFECT_HOME/gpuclust-server.log``) and wait until ``/api/health``
    answers; return (its record, True). A live recorded server is returned as is (False).

    InputError when the port is taken; RuntimeError with the server's last output line when it
    exits or does not answer within ``timeout`` seconds (it is stopped then, nothing recorded).
    """
    record, _note = recorded_server()
    if record is not None:
        return record, False
    url = f"http://127.0.0.1:{port}/api"
    if reachable(url, timeout=1.0) is None:
        raise InputError(f"port {port} on 127.0.0.1 is taken (something answers at {url}); "
                         "choose another with --port, or point PREFECT_API_URL at that server")
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / LOG_NAME
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false")}
    env.pop("PREFECT_API_URL", None)  # the server itself must not point at another API
    with open(log_path, "ab") as log:
        log.write(f"--- gpuclust server start: {time.strftime('%Y-%m-%d %H:%M:%S')} port {port}\n".encode())
        log.flush()
        process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                    "--port", str(port)], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    record = ServerRecord(process.pid, url, str(log_path), psutil.Process(process.pid).create_time())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if health(url, timeout=2.0) is None:
            atomic_write_json(state_file(), asdict(record))
            return record, True
        time.sleep(0.2)
    code = process.poll()
    _stop_process(record)
    process.wait()
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    state = f"exited with code {code}" if code is not None else f"did not answer within {timeout:.0f} s"
    raise RuntimeError(f"the Prefect server {state} (log: {log_path})" + (f": {lines[-1][:300]}" if lines else ""))


def _stop_process(record: ServerRecord, grace: float = 30.0) -> None:
    """SIGTERM the server's process group (its own session), SIGKILL it after ``grace`` s; return
    once the process is gone (or a zombie its parent reaps)."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(record.pid, signum)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                if psutil.Process(record.pid).status() == psutil.STATUS_ZOMBIE:
                    return
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                return
            time.sleep(0.1)


def stop() -> str:
    """Stop the recorded server and remove its record; what happened, in one line."""
    path = state_file()
    record = read_record(path)
    if record is None:
        path.unlink(missing_ok=True)
        return f"no Prefect server started by gpuclust is recorded ({path})"
    if not record.alive():
        path.unlink(missing_ok=True)
        return f"removed stale {path}: its server (pid {record.pid}) was not running"
    _stop_process(record)
    path.unlink(missing_ok=True)
    return f"stopped the Prefect server at {record.url} (pid {record.pid})"


def status() -> tuple[bool, str]:
    """(running, one line): the recorded server, whether it answers, its log."""
    record, note = recorded_server()
    if record is None:
        return False, note or f"not running (no {state_file()})"
    why = health(record.url, timeout=REACH_TIMEOUT)
    answer = "answering" if why is None else f"not answering ({why})"
    return why is None, f"running at {record.url} (pid {record.pid}, {answer}); log: {record.log}"
