"""`gpuclust` commands forked from a process that has already imported what they import.

A `gpuclust run` on a small dataset spends most of its CPU time importing scikit-learn, Prefect,
torch, pandas and matplotlib; the suite runs dozens of them. A :class:`CommandForker` is a Python
process that imports those once and then, for each command, forks a child that runs
``flows.cli.main`` the way the installed ``gpuclust`` script does (``sys.exit(main())``), with its
own working directory and its standard output and error in files. Each command is still its own
process, against the same Prefect server, with its own exit status; only the interpreter's start
and the imports are shared. A command whose environment differs from the forker's in a variable that
could matter before it starts runs as a plain subprocess instead (:meth:`CommandForker.serves`,
``run_cli`` in conftest.py).

Run as a script, this file is the forker: it reads one JSON request per line on standard input,
``{"argv": [...], "cwd": DIR, "stdout": FILE, "stderr": FILE, "env": {NAME: VALUE or null}}`` (variables
to set or unset in the child: only those in :data:`RUN_TIME_VARIABLES`).
The forker's first line, once its imports are done, is ``{"environ": {...}}``: its environment as
those imports left it (they set defaults, as they do in any process). It answers each request with
``{"pid": PID}`` when the child starts and ``{"returncode": CODE}`` when it ends (negative: killed
by that signal, as :mod:`subprocess` reports it), or with one line ``{"error": WHY}`` when it cannot
fork safely (then :meth:`CommandForker.run` returns None and the caller starts a subprocess).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

#: Imported once by the forker: the modules a `gpuclust run` or `assign` imports on its way (torch's
#: compiler front end too: the first optimizer a run creates imports it, about 2 CPU-seconds).
PRELOAD = ("flows.cli", "flows.pipeline", "flows.assign", "gpu_ops.report.build", "gpu_ops.report.figures",
           "gpu_ops.deep", "gpu_ops.heads", "matplotlib.figure", "matplotlib.offsetbox", "sklearn.decomposition",
           "sklearn.metrics", "pandas", "pyarrow.parquet", "torch", "torch._dynamo", "torchvision", "faiss",
           "scipy.cluster.hierarchy")


#: Variables a command may have other values of than the forker: no module the forker imports reads
#: them when it is imported (numba, which reads NUMBA_CACHE_DIR, is not among them), and the child
#: sets them before the command starts. HOME: gpuclust reads it where it expands a path; of the
#: imported libraries only matplotlib read it (for the folder of its font cache), and PREFECT_HOME
#: is set for the whole session.
RUN_TIME_VARIABLES = frozenset({"PYTEST_CURRENT_TEST", "GPUCLUST_CACHE", "GPUCLUST_TEST_PREFECT_SERVER",
                                "NUMBA_CACHE_DIR", "HOME"})

#: Threads that may run beside the forker's main thread: the library that starts them makes a fork
#: safe itself (jemalloc, which pyarrow loads, stops its background thread in the child).
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})


def unsafe_threads() -> list[str]:
    """The names of this process's threads, other than the main one, that a fork could copy in the
    middle of holding a lock (Linux: threads as the kernel sees them, also those Python did not start)."""
    names = [Path(f"/proc/self/task/{tid}/comm").read_text().strip()
             for tid in sorted(os.listdir("/proc/self/task"), key=int) if int(tid) != os.getpid()]
    return [name for name in names if name not in FORK_SAFE_THREADS]


class CommandForker:
    """A forker process started with ``env``; :meth:`run` runs one command in a forked child."""

    def __init__(self, env: dict[str, str], log: Path, preexec_fn: Any = None) -> None:
        self.env = dict(env)
        self.refused: str | None = None
        self._prepared: dict[str, str] | None = None
        self._log = open(log, "w")
        self._proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], env=self.env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      start_new_session=True, preexec_fn=preexec_fn)

    def usable(self) -> bool:
        return self.refused is None and self._proc.poll() is None

    def prepared_environ(self) -> dict[str, str]:
        """The forker's environment once its imports are done (waits for them)."""
        if self._prepared is None:
            reply = self._read_reply(None)
            assert reply is not None
            self._prepared = reply["environ"]
        return self._prepared

    def serves(self, env: dict[str, str]) -> bool:
        """Whether a command started with environment ``env`` may fork from this forker: every
        variable has the forker's value, or is one the child sets (:data:`RUN_TIME_VARIABLES`), or is
        one the forker's imports set and ``env`` leaves unset (the command's own imports would set it)."""
        prepared = self.prepared_environ()
        for name in env.keys() | prepared.keys():
            if env.get(name) == prepared.get(name) or name in RUN_TIME_VARIABLES:
                continue
            if name not in env and name not in self.env:
                continue
            return False
        return True

    def _read_reply(self, deadline: float | None) -> dict | None:
        """The forker's next reply line, or None when ``deadline`` (monotonic) passes first."""
        stream = self._proc.stdout
        assert stream is not None
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([stream], [], [], timeout)
        if not ready:
            return None
        line = stream.readline()
        if not line:
            raise RuntimeError(f"the command forker exited (code {self._proc.wait()}); see {self._log.name}")
        return json.loads(line)

    def run(self, argv: list[str], env: dict[str, str], cwd: Path, scratch: Path,
            timeout: float) -> subprocess.CompletedProcess | None:
        """Run ``gpuclust argv`` in ``cwd`` with the environment ``env`` (one this forker
        :meth:`serves`); its output goes through files in ``scratch``. Raises
        :class:`subprocess.TimeoutExpired` (the child killed) after ``timeout`` seconds, as
        :func:`subprocess.run` does. None, with a warning, where the forker cannot fork."""
        out, err = scratch / "stdout", scratch / "stderr"
        request = {"argv": argv, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                   "env": {name: env.get(name) for name in RUN_TIME_VARIABLES}}
        assert self._proc.stdin is not None
        self.prepared_environ()
        self._proc.stdin.write((json.dumps(request) + "\n").encode())
        self._proc.stdin.flush()
        started = self._read_reply(None)
        assert started is not None
        if "error" in started:
            self.refused = started["error"]
            warnings.warn(f"{self.refused}; commands run as subprocesses", stacklevel=2)
            return None
        pid = started["pid"]
        reply = self._read_reply(time.monotonic() + timeout)
        if reply is None:
            os.kill(pid, 9)
            self._read_reply(None)
            raise subprocess.TimeoutExpired(["gpuclust", *argv], timeout)
        return subprocess.CompletedProcess(["gpuclust", *argv], reply["returncode"], out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()


def _reply(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def _read_request(stdin: Any) -> dict | None:
    line = stdin.readline()
    return json.loads(line) if line else None


def serve() -> dict | None:
    """The forker's loop. Returns None in the forker when its input ends, and the request in each
    forked child (which then becomes the command)."""
    stdin = os.fdopen(0, "rb", buffering=0, closefd=False)
    _reply({"environ": dict(os.environ)})
    while (request := _read_request(stdin)) is not None:
        if unsafe := unsafe_threads():
            _reply({"error": f"the forker runs other threads ({', '.join(unsafe)}): it does not fork"})
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return request
        _reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _reply({"returncode": os.waitstatus_to_exitcode(status)})
    return None


def become_command(request: dict) -> list[str]:
    """In the forked child: the request's working directory, output files, variables and argv."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.close(null)
    os.chdir(request["cwd"])
    for name, value in request["env"].items():
        if name not in RUN_TIME_VARIABLES:
            raise ValueError(f"{name} cannot change in a forked command")
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    sys.argv = [str(Path(sys.executable).parent / "gpuclust"), *request["argv"]]
    return list(request["argv"])


if __name__ == "__main__":
    sys.path[0] = str(Path(sys.executable).parent)  # as the installed script has it, not this folder
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    request = serve()
    if request is None:
        sys.exit(0)
    argv = become_command(request)
    from flows.cli import main

    sys.exit(main(argv))
