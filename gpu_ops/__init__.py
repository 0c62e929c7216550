"""gpuclust's computing core: datasets, feature extractors, the Parquet embedding store,
clustering / reduction backends (GPU and CPU behind one interface), metrics and reports.

This package never imports Prefect; orchestration lives in :mod:`flows`.

Importing it lets idle OpenMP threads sleep (see :func:`prefer_passive_openmp`), so it should be
imported before torch, scikit-learn or FAISS load their OpenMP runtimes.
"""

import os
import sys

__version__ = "0.1.0"

#: ``GPUCLUST_OMP_WAIT=spin`` keeps the OpenMP runtimes' default wait policy (threads spin at
#: barriers); anything else, or unset, lets them sleep.
OMP_WAIT_SWITCH = "GPUCLUST_OMP_WAIT"


def prefer_passive_openmp() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for this process and its children; return whether it was set.

    torch, scikit-learn and FAISS each bundle a libgomp whose threads spin at every barrier while
    they wait for the slowest thread. On cores shared with another busy process the thread that
    has work is descheduled while its partners spin: a conv autoencoder epoch on MNIST-test at
    2 torch threads went from about 6 s to 100-133 s beside one busy process (BENCHMARKS.md,
    "Training under load"). Sleeping threads give the core back. libgomp reads the policy once,
    when it loads, so this only affects runtimes loaded afterwards (a warning says so when torch
    is already loaded). A policy the user set, or ``GPUCLUST_OMP_WAIT=spin``, is left alone.
    """
    if os.environ.get(OMP_WAIT_SWITCH, "").strip().lower() == "spin" or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in sys.modules:
        import logging

        logging.getLogger(__name__).warning(
            "torch was imported before gpu_ops: its OpenMP threads keep spinning at barriers "
            "(import gpu_ops first, or set OMP_WAIT_POLICY=PASSIVE)")
    return True


prefer_passive_openmp()
