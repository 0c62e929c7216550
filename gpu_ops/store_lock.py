"""One writer per embedding store: an OS file lock (``filelock``) plus a sidecar naming its holder.

A run that extracts into a store holds ``<store>/.writer.lock`` for as long as it writes. A
second run on the same store does not extract the same images beside it: it logs one line
naming the holder (pid, host, run id, since when, read from ``<store>/.writer.json``) and waits
for the lock; then it finds the images embedded and extracts only what is still missing. Asked
not to wait (``wait=False``, ``gpuclust run --no-wait``), it fails at once with an
:class:`~gpu_ops.errors.InputError` naming the holder.

**Stale locks.** The lock is an OS lock (``flock``): the kernel releases it when its process dies,
SIGKILL included, so a killed run never blocks the next one. Its sidecar stays behind, though;
the next holder finds it, checks the pid it names (not running on this host, or another
process) and says in the log that the previous writer ended without releasing the store. A
sidecar whose pid is not running while the lock is held is reported as stale, not as the holder.
Locks on network filesystems are only as reliable as the filesystem's ``flock``. A store directory
this process cannot write (a read-only cache) is read without the lock.

**Readers.** A run reads the store from its clustering to its report, stage after stage, and all
of them must see the same rows. It holds a shared read lock on ``<store>/.readers.db``
(:class:`StoreReaders`, ``filelock``'s SQLite reader/writer lock) meanwhile; a refresh that would
change the store (retire, rewrite or add parts) takes that lock exclusively
(:func:`changing_store`), so it waits, with a log line, until the runs reading the store are
done, and a run that wants to read waits while a refresh is changing it. Like the OS lock, a
killed reader's hold ends with its process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, ReadWriteLock, Timeout

from gpu_ops.errors import InputError
from gpu_ops.fsutil import atomic_write_json

log = logging.getLogger(__name__)

LOCK_FILE = ".writer.lock"
HOLDER_FILE = ".writer.json"
READERS_FILE = ".readers.db"
#: Seconds between attempts while waiting for another writer.
POLL_S = 0.5
#: Seconds a writer that has just taken the lock gets to write its record before a waiter names it
#: (a loaded machine can stall a process that long; the waiter takes the lock meanwhile if it frees).
NAMING_GRACE_S = 10.0


def new_run_id() -> str:
    """A run id for the store's records: UTC time, then 8 random hex digits."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a store's lock."""

    pid: int
    host: str
    run: str
    since: str

    def describe(self) -> str:
        return f"run {self.run} (pid {self.pid} on {self.host}, since {self.since})"

    def running(self) -> bool | None:
        """Whether the process still runs: True / False on this host, None on another host."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            return True
        return True


def read_holder(directory: Path) -> Holder | None:
    """The holder a store's sidecar names (None when there is none or it is unreadable)."""
    try:
        doc: Any = json.loads((Path(directory) / HOLDER_FILE).read_text())
        return Holder(int(doc["pid"]), str(doc["host"]), str(doc["run"]), str(doc["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _holder_text(holder: Holder | None) -> str:
    """The holder for a log line, saying when its record cannot be trusted."""
    if holder is None:
        return "another process (it has not named itself yet)"
    if holder.running() is False:
        return (f"another process (the record names {holder.describe()}, which is no longer running: "
                "a stale record)")
    return holder.describe()


class StoreLock:
    """Exclusive writer lock of the store at ``directory`` (a context manager).

    ``wait``: when another process holds it, log one line naming that process and wait (True), or
    raise InputError naming it (False). ``run`` is recorded in the sidecar for the others to see.
    """

    def __init__(self, directory: Path, run: str, wait: bool = True) -> None:
        self.directory = Path(directory)
        self.run = run
        self.wait = wait
        self.waited_s = 0.0
        self.waited_for: str | None = None
        self._lock: FileLock | None = FileLock(str(self.directory / LOCK_FILE), thread_local=False)

    def __enter__(self) -> "StoreLock":
        if self.directory.is_dir() and not _writable(self.directory):
            # made read-only (or not ours to write): this run cannot write into it, and reusing it must
            # not write either (the store refuses in one line if it would have to)
            log.info("store %s is read-only: reading it without taking its lock", self.directory)
            self._lock = None
            return self
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create store directory {self.directory} ({exc.strerror})") from None
        try:
            self._lock.acquire(timeout=0)  # type: ignore[union-attr]
        except Timeout:
            self._wait_for_holder()
        self._take_over()
        return self

    def _acquired_while_the_holder_names_itself(self) -> tuple[bool, Holder | None]:
        """(whether the lock was taken meanwhile, the holder's record).

        A writer records itself just after it takes the lock: a waiter that arrives in between
        finds no record, or the one a killed writer left. It gives the holder a moment to name itself."""
        deadline = time.monotonic() + NAMING_GRACE_S
        while True:
            holder = read_holder(self.directory)
            if (holder is not None and holder.running() is not False) or time.monotonic() >= deadline:
                return False, holder
            try:
                self._lock.acquire(timeout=0.05)  # type: ignore[union-attr]
                return True, None
            except Timeout:
                continue

    def _wait_for_holder(self) -> None:
        acquired, holder = self._acquired_while_the_holder_names_itself()
        if acquired:
            return
        who = _holder_text(holder)
        if not self.wait:
            raise InputError(f"store {self.directory} is being written by {who}; run without --no-wait to wait "
                             "for it") from None
        log.warning("store %s is being written by %s: waiting for it to finish", self.directory, who)
        t0 = time.monotonic()
        self._lock.acquire(poll_interval=POLL_S)  # type: ignore[union-attr]
        self.waited_s, self.waited_for = time.monotonic() - t0, who
        log.warning("store %s: waited %.1f s for %s", self.directory, self.waited_s, who)

    def _take_over(self) -> None:
        """Record this process as the holder; report a record left by a writer that was killed
        (a writer removes its record when it releases the store)."""
        previous = read_holder(self.directory)
        if previous is not None:
            state = {False: "is no longer running", None: "ran on another host"}.get(previous.running(),
                                                                                    "no longer holds the lock")
            log.warning("store %s: stale lock record: %s %s and ended without releasing the store (killed?); "
                        "the OS lock is free: taking the store over", self.directory, previous.describe(), state)
        me = Holder(os.getpid(), socket.gethostname(), self.run, datetime.now(timezone.utc).isoformat(timespec="seconds"))
        # not fsynced: the record only names the holder to waiters while this process lives, and a
        # flush can take seconds on a busy disk while they wait for it
        atomic_write_json(self.directory / HOLDER_FILE, asdict(me), durable=False)

    def __exit__(self, *exc: object) -> None:
        if self._lock is None:
            return
        try:
            (self.directory / HOLDER_FILE).unlink(missing_ok=True)
        finally:
            self._lock.release()


def _writable(directory: Path) -> bool:
    """A store directory this process may write (a read-only cache is read without locks)."""
    return directory.is_dir() and os.access(directory, os.W_OK | os.X_OK) and bool(directory.stat().st_mode & 0o222)


def _readers_lock(directory: Path) -> ReadWriteLock | None:
    """The store's reader/writer lock; None for a store this process cannot write (nobody changes
    a read-only cache through it)."""
    if not _writable(directory):
        return None
    return ReadWriteLock(str(directory / READERS_FILE), is_singleton=False)


class StoreReaders:
    """A shared hold of the store at ``directory`` while a run reads it (a context manager): a
    refresh that would change the store waits until it is released."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = _readers_lock(self.directory)

    def __enter__(self) -> "StoreReaders":
        if self._lock is None:
            return self
        try:
            self._lock.acquire_read(timeout=0)
        except Timeout:
            log.warning("store %s is being refreshed by another run: waiting to read it", self.directory)
            t0 = time.monotonic()
            self._lock.acquire_read()
            log.warning("store %s: waited %.1f s for the refresh", self.directory, time.monotonic() - t0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock.close()


@contextmanager
def changing_store(directory: Path) -> Iterator[None]:
    """Hold the store at ``directory`` exclusively while a refresh changes it: wait (one log line)
    for the runs reading it to finish first."""
    lock = _readers_lock(Path(directory))
    if lock is None:
        yield
        return
    try:
        lock.acquire_write(timeout=0)
    except Timeout:
        log.warning("store %s is being read by another run: waiting for it to finish before changing the store",
                    directory)
        t0 = time.monotonic()
        lock.acquire_write()
        log.warning("store %s: waited %.1f s for its readers", directory, time.monotonic() - t0)
    try:
        yield
    finally:
        lock.release()
        lock.close()
