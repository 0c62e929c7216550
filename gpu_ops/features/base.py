"""The extractor interface: per-item preprocessing (runs in loader workers) + batched embedding.

torch is imported where it is used, not here: raw-pixel runs never load it."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

from gpu_ops.device import autocast_dtype, precision_for_device
from gpu_ops.errors import InputError

if TYPE_CHECKING:
    import torch


class Extractor(ABC):
    """Turns images (or vectors) into fixed-length float32 embeddings.

    Subclasses set ``name`` and implement :meth:`preprocess` (one item -> tensor, picklable so
    DataLoader workers can run it) and :meth:`embed` (a batch tensor -> (b, d) float32).
    """

    name: str = ""
    device: str = "cpu"
    #: Whether :meth:`preprocess_decoded` can prepare batches decoded on the device.
    device_decoding: bool = False
    #: Whether :meth:`preprocess` returns numpy arrays and :meth:`embed` takes them: its batches
    #: are then made in this process, files decoded by threads, and torch is never imported.
    numpy_batches: bool = False

    @abstractmethod
    def preprocess(self, item: np.ndarray) -> torch.Tensor | np.ndarray:
        """One item, uint8 image (h, w[, c]) or float vector (d,), to a tensor (or array) ready to batch."""

    @abstractmethod
    def embed(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """(b, ...) batch from :meth:`preprocess` -> (b, d) float32 numpy."""

    def preprocess_decoded(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(3, h, w) uint8 images already on the device -> the batch :meth:`embed` takes."""
        raise InputError(f"{self.name} cannot prepare images decoded on the device")

    @abstractmethod
    def metadata(self) -> dict[str, str]:
        """Identity written into the store's schema: ``extractor``, ``weights``, ``weights_sha256``
        and ``preprocessing`` (JSON)."""

    def precision(self, device: str | None = None) -> str:
        """The arithmetic the embeddings are computed in on ``device`` (this extractor's when
        None): ``fp32``, or ``bf16`` / ``fp16`` under autocast on a GPU. Embeddings of different
        precisions never share a store."""
        return "fp32"

    def identity(self, device: str | None = None) -> dict[str, str]:
        """What decides an embedding: :meth:`metadata` (extractor, weights, preprocessing) plus
        :meth:`precision` (on ``device``). A store is keyed by it and carries it in its metadata."""
        return {**self.metadata(), "precision": self.precision(device)}

    def store_key(self, device: str | None = None) -> str:
        """Short hash of :meth:`identity`: stores of different extractors, weights, preprocessing
        or precision never mix."""
        blob = json.dumps(self.identity(device), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(h, w) or (h, w, 1|3|4) uint8 -> (h, w, 3) uint8."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[:, :, :3]


def describe(**fields: Any) -> str:
    """Stable JSON for the ``preprocessing`` metadata entry."""
    return json.dumps(fields, sort_keys=True)


def image_tensor(item: np.ndarray, size: int, extractor: str) -> torch.Tensor:
    """(h, w[, c]) uint8 image -> (3, size, size) float32 in [0, 1], resized with antialiasing."""
    import torch
    import torch.nn.functional as F

    if item.dtype != np.uint8 or item.ndim not in (2, 3):
        raise InputError(f"{extractor} needs images; got an item of shape {item.shape} and dtype {item.dtype}")
    x = torch.from_numpy(np.array(to_rgb(item), dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    if x.shape[1:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return x


#: Images per forward pass of a pretrained network on the CPU (a loader batch is split into chunks).
CPU_CHUNK_ROWS = 8


class PretrainedImageExtractor(Extractor):
    """A CNN over normalised RGB images: shared preprocessing, device placement and inference.

    Subclasses build ``self.model`` (a module mapping (b, 3, s, s) to (b, d)) and call
    :meth:`_place`; ``mean`` / ``std`` are per-channel on the [0, 1] scale. On CUDA the model runs
    in channels_last under autocast in :meth:`precision` with non-blocking copies.
    """

    image_size: int
    device_decoding = True
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model: torch.nn.Module | None

    def _place(self, model: torch.nn.Module) -> None:
        import torch

        model.eval().to(self.device)
        if self.device == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    def __getstate__(self) -> dict:
        # Loader workers need preprocess() only; never pickle the model into them.
        state = self.__dict__.copy()
        state["model"] = None
        return state

    def preprocess(self, item: np.ndarray) -> torch.Tensor:
        """(h, w[, c]) uint8 -> (3, size, size) float32, normalised."""
        return (image_tensor(item, self.image_size, self.name) - self._mean) / self._std

    def preprocess_decoded(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(3, h, w) uint8 images on the device -> (b, 3, size, size) normalised, as :meth:`preprocess`."""
        from gpu_ops.features.jpeg import resize_normalise

        return resize_normalise(images, self.image_size, self._mean, self._std)

    def precision(self, device: str | None = None) -> str:
        """``bf16`` / ``fp16`` / ``fp32``: the precision the model runs in on ``device`` (this
        extractor's when None; :func:`gpu_ops.device.precision_for_device`: bf16 from compute
        capability 8.0)."""
        return precision_for_device(device or self.device)

    def output_dim(self) -> int:
        """Length of this extractor's embeddings (one forward pass of a blank image)."""
        blank = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        return int(self.embed(self.preprocess(blank)[None]).shape[1])

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """(b, 3, s, s) -> (b, d) float32."""
        import torch

        assert self.model is not None
        with torch.inference_mode():
            if self.device == "cuda":
                batch = batch.to("cuda", non_blocking=True).contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=autocast_dtype(self.precision())):
                    out = self.model(batch)
                return out.float().cpu().numpy()
            # Small chunks on the CPU: a whole batch's activations (tens of MB per layer) exceed glibc's
            # mmap threshold, so every layer maps fresh pages and faults them in (half the CPU time
            # went to the kernel); chunks of CPU_CHUNK_ROWS images reuse the heap (bench/cpu_chunks.py).
            out = [self.model(chunk) for chunk in batch.split(CPU_CHUNK_ROWS)]
            return torch.cat(out).numpy().astype(np.float32, copy=False)
