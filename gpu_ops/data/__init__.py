"""Dataset readers. A dataset spec string names the source:

``digits`` (scikit-learn's bundled 8x8 digits, the embedded default) · ``idx:DIR`` (MNIST-style
IDX files, .gz or raw) · ``folder:DIR`` (JPEG/PNG; labels from class-named subfolders when
present) · ``npz:FILE`` / ``npy:FILE`` (arrays, optional labels) · ``usps:FILE`` (USPS HDF5) ·
``parquet:DIR`` (embeddings already in the store format).

Every dataset has a stable ``image_id`` per item, an optional label, and loads one item at a time
so extraction can stream.
"""

from gpu_ops.data.base import BadImageError, Dataset, SPLITS
from gpu_ops.data.registry import DATASET_KINDS, SPLIT_KINDS, dataset_kind, load_dataset

__all__ = ["BadImageError", "Dataset", "SPLITS", "DATASET_KINDS", "SPLIT_KINDS", "dataset_kind", "load_dataset"]
