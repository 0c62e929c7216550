"""The Prefect API of one ``gpuclust run`` when none is configured.

Without ``PREFECT_API_URL``, Prefect would start a temporary server itself on first use, in the
run's process group: Ctrl-C in a terminal kills it before gpuclust can stop, and SIGTERM,
SIGKILL or a crash leave it running. Here gpuclust starts that same server (Prefect's
``create_app`` under uvicorn, the database in ``PREFECT_HOME`` as before) itself:

- in its own session, so a terminal's Ctrl-C reaches only gpuclust, which then stops it;
- with Linux's ``PR_SET_PDEATHSIG`` set to SIGKILL, so it dies with gpuclust even when gpuclust
  is killed or aborts;
- stopped (SIGTERM to its process group, then SIGKILL) however the run ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import IO

from flows import stopping
from gpu_ops.errors import InputError

#: ``prctl`` option: the signal the kernel sends a process when its parent exits.
_PR_SET_PDEATHSIG = 1


#: An opener that never goes through an HTTP proxy from the environment (the server is local).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process exits (Linux only).

    The kernel sends it when the *thread* that started the child ends: start the server from
    the main thread, which lives as long as the process."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class ServerStartError(RuntimeError):
    """The run's Prefect server did not come up."""


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrefectServer:
    """One Prefect API server process on 127.0.0.1 for the lifetime of a run."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._log: IO[bytes] = tempfile.TemporaryFile(prefix="gpuclust-prefect-server-")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        """Start the server process (returns at once; see :meth:`wait_until_ready`)."""
        import prefect

        self.port = _free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=self._env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent())
        stopping.spare(self.process.pid)  # a signal must not kill it before it records the crash

    def wait_until_ready(self, timeout: float) -> None:
        """Block until the API answers its health check; restart on another port (a port taken
        between choosing and binding it) up to twice. :class:`ServerStartError` with the server's
        last line of output if it does not come up within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        restarts = 0
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                if restarts == 2:
                    break
                restarts += 1
                stopping.spare(self.process.pid, keep=False)
                self.start()
                continue
            try:
                with _DIRECT.open(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().decode(errors="replace").splitlines() if line.strip()]
        output = lines[-1][:500] if lines else ""  # the error line of a traceback: one line for the CLI
        code = self.process.poll() if self.process else None
        state = f"exited with code {code}" if code is not None else f"did not answer within {timeout:.0f} s"
        self.stop()
        raise ServerStartError(f"the Prefect server gpuclust started for this run {state}"
                               + (f": {output}" if output else ""))

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` s; safe to call twice
        and from any thread."""
        process, self.process = self.process, None
        if process is None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_group(process.pid, signal.SIGKILL)  # and anything it started
        process.wait()
        stopping.spare(process.pid, keep=False)
        self._log.close()

    def kill(self) -> None:
        """Stop quickly: what a stopping run does."""
        self.stop(grace=1.5)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _drain_prefect_queues() -> None:
    """Send the logs and events Prefect still holds: before an ephemeral server goes away (else
    its exit hooks retry against a closed port and print connection errors), and before the
    command's last line (else Prefect's exit hooks may print after it)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception:  # noqa: BLE001 - best effort: a worker that never started, a closed loop
            pass


@contextlib.contextmanager
def _drained_when_done() -> Iterator[None]:
    """Prefect's queues drained when the block ends, however it ends, unless the run is stopping."""
    try:
        yield
    finally:
        if stopping.requested() is None:
            _drain_prefect_queues()


@contextlib.contextmanager
def _api_url(url: str) -> Iterator[None]:
    """``PREFECT_API_URL`` set to ``url`` in this process (and the processes it starts) for the block."""
    from prefect.context import refresh_global_settings_context

    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        refresh_global_settings_context()


def announce(line: str) -> None:
    """The one line that says where this run's Prefect API is (stdout, before the run's output)."""
    print(line, flush=True)


@contextlib.contextmanager
def prefect_api() -> Iterator[PrefectServer | None]:
    """This run's Prefect API (see :mod:`flows.server` for the order): the configured one, or the
    one ``gpuclust server start`` started (yields None), or a server started here for this run
    (yields it, already started: call ``wait_until_ready`` before the first flow). Says which."""
    from prefect.settings import get_current_settings

    from flows import server as servers

    settings = get_current_settings()
    if settings.api.url:
        servers.check_configured(str(settings.api.url))
        announce(f"Prefect: server at {settings.api.url}")
        with _drained_when_done():
            yield None
        return
    record, note = servers.recorded_server()
    if note:
        print(f"gpuclust: {note}", file=sys.stderr)
    if record is not None:
        why = servers.health(record.url)
        if why is not None:
            raise InputError(f"the Prefect server recorded in {servers.state_file()} (pid {record.pid}) does not "
                             f"answer at {record.url} ({why}); see {record.log}, or `gpuclust server stop` it")
        announce(f"Prefect: server at {record.url} (started by `gpuclust server start`)")
        with _api_url(record.url), _drained_when_done():
            yield None
        return
    if not settings.server.ephemeral.enabled:
        yield None  # Prefect's own error: no server and no ephemeral mode
        return
    announce("Prefect: ephemeral mode (a temporary server for this run; `gpuclust server start` keeps one)")
    env = {**os.environ, **settings.to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    server = PrefectServer(env)
    stopping.add_cleanup(server.kill)
    try:
        server.start()
        with _api_url(server.api_url), _drained_when_done():  # Dask workers inherit the URL too
            yield server
    finally:
        server.stop(grace=5.0 if stopping.requested() is None else 1.5)
        stopping.remove_cleanup(server.kill)


def startup_timeout() -> float:
    """Seconds to wait for the server (Prefect's ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``)."""
    from prefect.settings import get_current_settings

    return float(get_current_settings().server.ephemeral.startup_timeout_seconds)


def foreground_run_settings() -> contextlib.AbstractContextManager[object]:
    """Prefect settings for a flow run in the user's terminal: no flow-run heartbeats unless the
    user set their frequency (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, or a profile). Prefect joins
    its heartbeat thread when a flow ends, and that thread sleeps in 1 s steps: 0.5 s of every
    run's exit on average. Heartbeats only matter to a server automation that marks silent runs
    as crashed; deployment runs (started by workers) keep Prefect's default."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
