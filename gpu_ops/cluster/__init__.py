"""Clustering ops. Importing this package registers every backend of every op."""

from gpu_ops.cluster import agglomerative, kmeans  # noqa: F401

CLUSTER_OPS = ("kmeans", "agglomerative")
