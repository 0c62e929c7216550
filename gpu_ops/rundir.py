"""Run directories: staged in a hidden sibling, swapped into place only when complete.

A run that fails leaves its staging directory (``.NAME.partial-*``) and never a directory that
looks complete; a previous good run at the same path is replaced only by a finished one.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

RUN_FILES = ("config.yaml", "assignments.parquet", "map2d.parquet", "metrics.json", "map.png")


def default_run_dir(dataset: str) -> Path:
    """``runs/<timestamp>-<dataset kind>``."""
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{dataset.split(':', 1)[0]}"


def start_run(out: Path) -> Path:
    """Create and return a fresh staging directory beside ``out``."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def commit_run(staging: Path, out: Path) -> Path:
    """Move a finished staging directory to ``out``, replacing an older run there."""
    out = Path(out).absolute()
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
