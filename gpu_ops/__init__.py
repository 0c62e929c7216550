"""gpuclust's computing core: datasets, feature extractors, the Parquet embedding store,
clustering / reduction backends (GPU and CPU behind one interface), metrics and reports.

This package never imports Prefect; orchestration lives in :mod:`flows`.
"""

__version__ = "0.1.0"
