"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (how Slurm and Kubernetes stop jobs).

On the first signal this process:

1. silences stderr, keeping the real one for the final line: the libraries unwinding (Prefect's
   engine and API client, Dask, loader workers) would otherwise print tracebacks;
2. kills the processes the run started (loader workers, Dask workers), except the ones it still
   needs to stop cleanly (the run's Prefect server, see :func:`spare`);
3. raises ``KeyboardInterrupt`` (SIGINT) or :class:`Terminated` (SIGTERM) in the main thread, so
   the run unwinds: Prefect records the crash, the flow removes its staging directory, the
   Parquet store keeps every finished part.

The CLI then calls :func:`exit_stopped`: it runs the clean-ups (stopping the Prefect server),
kills whatever is left of the process tree and exits at once with one line on stderr,
``gpuclust: interrupted`` (130) or ``gpuclust: terminated`` (143). A watchdog thread does the same
after :data:`GRACE_SECONDS` when the run does not unwind by itself (a library that swallows the
exception, or a long call in C that returns late). Later signals change nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, TextIO

import psutil

#: Seconds the main thread has to unwind after the first signal before the watchdog ends the run.
GRACE_SECONDS = 5.0

_MESSAGES = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (a BaseException, like
    KeyboardInterrupt, so that ``except Exception`` clauses do not swallow it)."""


class _LineTrackingStream:
    """``sys.stderr`` as it was, noting whether the last text written ended its line (a progress
    bar redraws one line without ending it: the final message must not be glued to it)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        if text:
            self.at_line_start = text.endswith("\n")
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _State:
    signal: int | None = None
    armed = False
    stderr_fd: int | None = None
    mid_line = False
    cleanups: list[Callable[[], None]] = []
    spared: set[int] = set()
    exit_lock = threading.Lock()


def install() -> None:
    """Handle SIGINT and SIGTERM as described in the module docstring (call in the main thread)."""
    _State.armed = True
    if sys.stderr is not None and not isinstance(sys.stderr, _LineTrackingStream):
        sys.stderr = _LineTrackingStream(sys.stderr)  # type: ignore[assignment]
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def reclaim_sigterm() -> None:
    """Put this module's SIGTERM handler back (no-op unless :func:`install` ran in this process).

    Prefect swaps in its own SIGTERM handler while a flow runs (it raises ``TerminationSignal``
    and logs a crash on stderr before anything else can happen). Flows call this first thing so
    that, under ``gpuclust run``, SIGTERM is handled like SIGINT; Prefect puts this handler back
    itself when the flow ends. Processes that Prefect's runner starts never call :func:`install`,
    so their cancellation through SIGTERM is unchanged.
    """
    if _State.armed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)


def ignore_from_now() -> None:
    """The command's work is done: let the interpreter's exit finish whatever signal comes now.

    SIG_IGN, unlike a Python handler, stays in place until the process is gone (Python restores
    the default action for its own handlers early in its shutdown, where a signal would end the
    process by the signal, with no line)."""
    if _State.armed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def requested() -> int | None:
    """The signal that asked the run to stop (``signal.SIGINT`` / ``signal.SIGTERM``), or None."""
    return _State.signal


def add_cleanup(fn: Callable[[], None]) -> None:
    """Run ``fn`` (which must not need the main thread) before a stopped run exits."""
    _State.cleanups.append(fn)


def remove_cleanup(fn: Callable[[], None]) -> None:
    """Forget a function given to :func:`add_cleanup`."""
    if fn in _State.cleanups:
        _State.cleanups.remove(fn)


def spare(pid: int, keep: bool = True) -> None:
    """Leave the process ``pid`` (and its children) alive when the signal arrives: a clean-up
    stops it later (the run's Prefect server, which records the crash). ``keep=False`` undoes it."""
    (_State.spared.add if keep else _State.spared.discard)(pid)


def _on_signal(signum: int, _frame: object) -> None:
    if _State.signal is not None:
        return  # already stopping: a second Ctrl-C must not interrupt the clean-up
    _State.signal = signum
    _silence_stderr()
    kill_descendants(os.getpid(), spared=_State.spared)
    threading.Thread(target=_watchdog, name="gpuclust-stop-watchdog", daemon=True).start()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated


def _silence_stderr() -> None:
    """Keep the real stderr for the final line; send everything else written to it to /dev/null."""
    logging.disable(logging.CRITICAL)
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    _State.mid_line = isinstance(sys.stderr, _LineTrackingStream) and not sys.stderr.at_line_start
    _State.stderr_fd = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _watchdog() -> None:
    time.sleep(GRACE_SECONDS)
    exit_stopped()


def exit_stopped() -> NoReturn:
    """Stop the run's child processes, print the one line, and exit with 130 or 143 at once.

    ``os._exit``: interpreter shutdown would run library exit hooks (Prefect drains its log and
    event queues to an API that is already gone) that can only print errors or wait.
    """
    _State.exit_lock.acquire()  # the main thread and the watchdog: whoever comes second waits here
    signum = _State.signal if _State.signal is not None else signal.SIGINT
    word, code = _MESSAGES.get(signum, _MESSAGES[signal.SIGINT])
    for fn in reversed(_State.cleanups):
        try:
            fn()
        except Exception:  # noqa: BLE001 - stopping goes on whatever one clean-up does
            pass
    kill_descendants(os.getpid())
    if threading.current_thread() is threading.main_thread():  # the watchdog must not wait on its lock
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
    fd = _State.stderr_fd if _State.stderr_fd is not None else 2
    newline = "\n" if _State.mid_line else ""  # end a progress bar's line first
    try:
        os.write(fd, f"{newline}gpuclust: {word}\n".encode())
    except OSError:
        pass
    os._exit(code)


# ------------------------------------------------------------------------------------------
# Child processes


def descendants(root: int, spared: set[int] | frozenset[int] = frozenset()) -> list[psutil.Process]:
    """Every live process below ``root`` (not ``root`` itself), leaving out the ``spared``
    processes and their own descendants."""
    try:
        below = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return []
    excluded = set(spared)
    for proc in below:
        if proc.pid in spared:
            try:
                excluded.update(child.pid for child in proc.children(recursive=True))
            except psutil.Error:
                pass
    return [proc for proc in below if proc.pid not in excluded]


def _running(proc: psutil.Process) -> bool:
    """Still running: not gone and not a zombie (no reaping here: the parent's own join does it)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_descendants(root: int, spared: set[int] | frozenset[int] = frozenset()) -> None:
    """SIGKILL every descendant of ``root`` but the ``spared`` ones, and wait (up to 1 s a round)
    until they are gone. Loader and Dask workers hold nothing that must be saved (store parts are
    written atomically), and SIGKILL is silent where a polite SIGTERM makes some of them log."""
    for _ in range(5):  # a parent that restarts its children is gone after the first round
        procs = descendants(root, spared)
        if not procs:
            return
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(_running(p) for p in procs):
            time.sleep(0.02)
