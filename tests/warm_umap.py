"""Compile umap-learn's numba kernels once, at the start of a test session, into the on-disk cache
that every later process loads them from (:func:`gpu_ops.reduce.umap.import_umap`).

numba keys that cache by the source files' paths, which are new in every fresh checkout's virtual
environment. There, each test process whose first UMAP came before another process had written the
cache compiled the same kernels again: about 25 CPU-seconds each, in four processes of a `make test`
(the tests' own first UMAP, the ephemeral-mode demo run, a forked run, a flow in the test harness).
Under xdist the controller runs this file in the background (tests/conftest.py): one compilation,
and the UMAPs that come later load the kernels. Where it is still compiling when a test's UMAP
starts, that test compiles them too, as before.

    python tests/warm_umap.py
"""

from __future__ import annotations

import numpy as np


def warm_umap() -> None:
    """Fit UMAP (the CPU backend every run uses) on a small float32 sample: kernels are compiled per
    argument types, and every UMAP of a run takes float32 rows and an exact kNN graph."""
    from gpu_ops.reduce.umap import UmapLearn

    rows = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)  # (n, d)
    embedding = UmapLearn(n_components=2, n_neighbors=10).fit_transform(rows)
    assert embedding.shape == (300, 2)


if __name__ == "__main__":
    warm_umap()
