"""Clustering ops. Importing this package registers every backend of every op.

Ops: ``kmeans`` (cuML, FAISS GPU/CPU, scikit-learn), ``agglomerative`` (cuML single linkage,
scikit-learn with an automatic switch to micro-clusters above 10 000 points, ``microcluster``),
``hdbscan`` (cuML, scikit-learn), ``gmm`` (scikit-learn), ``knn`` (exact neighbours: FAISS GPU/CPU, cuML, scikit-learn). Out-of-core k-means over an embedding
store: :class:`gpu_ops.cluster.kmeans_ooc.StreamingKMeans` (not an op: it streams rows and uses
the ``kmeans`` backends for its in-memory sample fit). Our own k-means iterations exist once:
:func:`gpu_ops.cluster.lloyd.lloyd`, over the data interface of :mod:`gpu_ops.cluster.sources`
(in-memory, Parquet-streaming and Dask sources; the nearest-centre kernel and per-cluster sum).
"""

from gpu_ops.cluster import agglomerative, gmm, hdbscan, kmeans, microcluster, neighbors  # noqa: F401

CLUSTER_OPS = ("kmeans", "agglomerative", "hdbscan", "gmm")
