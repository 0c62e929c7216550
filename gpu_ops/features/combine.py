"""Extractors built from others: horizontal-flip averaging, and several backbones in one store.

:class:`FlipAveraged` embeds each image and its mirror image and keeps the mean.
:class:`Concatenated` runs several backbones over one decode of each image (each with its own
preprocessing) and writes rows that concatenate each backbone's L2-normalised features; the store
metadata's ``backbones`` entry gives each backbone's slice of the row, so a consumer can use the
spaces side by side or together.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from gpu_ops.errors import InputError
from gpu_ops.features.base import Extractor, PretrainedImageExtractor


class FlipAveraged(Extractor):
    """The mean of ``inner``'s features of each image and of its horizontal mirror image."""

    def __init__(self, inner: PretrainedImageExtractor) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = inner.device
        self.device_decoding = inner.device_decoding

    @property
    def image_size(self) -> int:
        return self.inner.image_size

    def preprocess(self, item: np.ndarray) -> torch.Tensor:
        return self.inner.preprocess(item)

    def preprocess_decoded(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self.inner.preprocess_decoded(images)

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """(b, 3, s, s) -> (b, d): (f(x) + f(mirror(x))) / 2."""
        return (self.inner.embed(batch) + self.inner.embed(batch.flip(-1))) / np.float32(2.0)

    def output_dim(self) -> int:
        return self.inner.output_dim()

    def metadata(self) -> dict[str, str]:
        return {**self.inner.metadata(), "flip_average": "true"}

    def precision(self, device: str | None = None) -> str:
        return self.inner.precision(device)


def l2_normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, np.float32(1e-12))).astype(np.float32, copy=False)


class Concatenated(Extractor):
    """Several image backbones in one pass over the images: rows are ``[l2(f_1(x)), l2(f_2(x)), ...]``.

    Each item is decoded once; :meth:`preprocess` prepares it for every backbone and packs the
    results into one flat tensor per item, which :meth:`embed` unpacks.

    Parameters
    ----------
    parts : list of extractors
        Image extractors (pretrained networks, optionally :class:`FlipAveraged`), at least two.
    name : str, optional
        The combination's name (the spec it was built from, e.g. with ``@SIZE`` parts); default: the
        parts' names joined by ``+``.
    """

    def __init__(self, parts: list[Extractor], name: str | None = None) -> None:
        if len(parts) < 2:
            raise InputError("combining backbones needs at least two extractors")
        self.parts = parts
        self.name = name or "+".join(p.name for p in parts)
        self.device = parts[0].device
        self.device_decoding = all(p.device_decoding for p in parts)
        self.shapes = [(3, p.image_size, p.image_size) for p in parts]  # type: ignore[attr-defined]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.dims = [p.output_dim() for p in parts]  # type: ignore[attr-defined]

    def preprocess(self, item: np.ndarray) -> torch.Tensor:
        """One item -> every backbone's preprocessed tensor, flattened and concatenated."""
        return torch.cat([p.preprocess(item).reshape(-1) for p in self.parts])

    def preprocess_decoded(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.preprocess_decoded(images).flatten(1) for p in self.parts], dim=1)

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """(b, sum of input sizes) -> (b, sum of dims), each backbone's slice L2-normalised."""
        out, start = [], 0
        for part, shape, size in zip(self.parts, self.shapes, self.sizes):
            x = batch[:, start:start + size].reshape(len(batch), *shape)
            out.append(l2_normalised(part.embed(x)))
            start += size
        return np.concatenate(out, axis=1)

    def output_dim(self) -> int:
        return sum(self.dims)

    def precision(self, device: str | None = None) -> str:
        return "+".join(sorted({p.precision(device) for p in self.parts}))

    def slices(self) -> list[tuple[int, int]]:
        """Each backbone's [start, stop) columns of a row."""
        stops = np.cumsum(self.dims).tolist()
        return [(int(stop - dim), int(stop)) for dim, stop in zip(self.dims, stops)]

    def metadata(self) -> dict[str, str]:
        metas = [p.metadata() for p in self.parts]
        preprocessing = [json.loads(m["preprocessing"]) for m in metas]
        backbones = [{**m, "preprocessing": prep, "dim": dim, "start": start, "stop": stop, "normalise": "l2"}
                     for m, prep, dim, (start, stop) in zip(metas, preprocessing, self.dims, self.slices())]
        flipped = {"flip_average": "true"} if all(m.get("flip_average") == "true" for m in metas) else {}
        return {
            **flipped,
            "extractor": self.name,
            "weights": "+".join(m["weights"] for m in metas),
            "weights_sha256": "+".join(m["weights_sha256"] for m in metas),
            "preprocessing": json.dumps(preprocessing, sort_keys=True),
            "backbones": json.dumps(backbones, sort_keys=True),
        }
