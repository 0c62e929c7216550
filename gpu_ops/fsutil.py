"""Atomic files: every file gpuclust writes appears whole or not at all.

:func:`atomic_path` is the one mechanism: the writer fills a temporary name in the same folder,
which is flushed to disk and renamed onto the target only when the writer finished; on any
failure (an exception, Ctrl-C) the temporary file is removed. A killed process can leave a
hidden ``.NAME.*.tmp`` file behind, never a half-written ``NAME``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: Path | str, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced (when ``durable``) and renamed
    onto ``path``.

    The parent folder is created when missing. The temporary name keeps ``path``'s suffix, so
    writers that pick a format by suffix (``np.savez``, ``torch.save``) behave as for ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (``durable``: fsynced first, to survive a power cut)."""
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data)


def json_bytes(obj: Any, sort_keys: bool = True) -> bytes:
    """The exact bytes :func:`atomic_write_json` writes for ``obj``."""
    return (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode()


def atomic_write_json(path: Path, obj: Any, sort_keys: bool = True, durable: bool = True) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (``durable``: as :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, json_bytes(obj, sort_keys), durable)


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
