"""Raw pixels: uint8 images flattened and scaled to [0, 1] by the pixel rule; float vectors pass through.

Plain numpy, no torch: a raw-pixel run never loads it."""

from __future__ import annotations

import numpy as np
from PIL import Image

from gpu_ops.data.base import to_unit_scale
from gpu_ops.features.base import Extractor, describe


class RawPixels(Extractor):
    """Raw pixel features.

    Parameters
    ----------
    image_size : int or None
        Resize images to (image_size, image_size) first; needed when a folder's images differ
        in size. None keeps the dataset's own size (array datasets are uniform).
    grayscale : bool
        Convert RGB images to one channel before flattening.
    """

    name = "raw"
    numpy_batches = True

    def __init__(self, image_size: int | None = None, grayscale: bool = False) -> None:
        self.image_size = image_size
        self.grayscale = grayscale

    def preprocess(self, item: np.ndarray) -> np.ndarray:
        if item.dtype != np.uint8:  # already a feature vector
            return np.asarray(item, dtype=np.float32).reshape(-1)
        if self.image_size is not None and item.shape[:2] != (self.image_size, self.image_size):
            item = np.asarray(Image.fromarray(item).resize((self.image_size, self.image_size), Image.BILINEAR))
        if self.grayscale and item.ndim == 3:
            item = np.asarray(Image.fromarray(item[:, :, :3]).convert("L"))
        return to_unit_scale(item, "image").reshape(-1)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(batch, dtype=np.float32)

    def metadata(self) -> dict[str, str]:
        return {
            "extractor": self.name,
            "weights": "none",
            "weights_sha256": "none",
            "preprocessing": describe(size=self.image_size, scale="x/255", grayscale=self.grayscale),
        }
