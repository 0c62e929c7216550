"""Clustering ops. Importing this package registers every backend of every op.

Ops: ``kmeans`` (cuML, FAISS GPU/CPU, scikit-learn), ``agglomerative`` (cuML single linkage,
scikit-learn with an automatic switch to micro-clusters above 10 000 points, ``microcluster``),
``hdbscan`` (cuML, scikit-learn), ``gmm`` (scikit-learn). Out-of-core k-means over an embedding
store: :class:`gpu_ops.cluster.kmeans_ooc.StreamingKMeans` (not an op: it streams rows and uses
the ``kmeans`` backends for its in-memory sample fit).
"""

from gpu_ops.cluster import agglomerative, gmm, hdbscan, kmeans, microcluster  # noqa: F401

CLUSTER_OPS = ("kmeans", "agglomerative", "hdbscan", "gmm")
