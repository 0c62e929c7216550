"""Test probe, loaded by Python at start-up when this folder is on PYTHONPATH: with
``GPUCLUST_IMPORT_PROBE=DIR`` set, each process writes ``DIR/<pid>.json`` at exit: its command line
and, for every top-level package it imported, the gpuclust frames (``flows/`` and ``gpu_ops/``
functions) on the stack when the package was first imported. Nothing happens without the variable."""

import atexit
import json
import os
import sys
import traceback

_DIR = os.environ.get("GPUCLUST_IMPORT_PROBE")


class _FirstImports:
    """A meta path finder that only watches: it notes the stack of each first top-level import."""

    def __init__(self) -> None:
        self.seen: dict[str, list[str]] = {}

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - the finder protocol
        top = name.partition(".")[0]
        if top not in self.seen and top not in sys.modules:
            frames = traceback.extract_stack()[:-1]
            self.seen[top] = [f"{os.path.basename(os.path.dirname(f.filename))}/{os.path.basename(f.filename)}:"
                              f"{f.name}" for f in frames
                              if f"{os.sep}flows{os.sep}" in f.filename or f"{os.sep}gpu_ops{os.sep}" in f.filename]
        return None


if _DIR:
    _probe = _FirstImports()
    sys.meta_path.insert(0, _probe)

    @atexit.register
    def _write() -> None:
        loaded = {name: _probe.seen.get(name, []) for name in sorted({m.partition(".")[0] for m in sys.modules})}
        with open(os.path.join(_DIR, f"{os.getpid()}.json"), "w") as fh:
            json.dump({"argv": sys.argv, "imports": loaded}, fh)
