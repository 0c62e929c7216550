"""Autoencoder features: a convolutional autoencoder trained on the dataset itself, used as the encoder.

The network and its training are :mod:`gpu_ops.deep` (one autoencoder module for extraction and
deep clustering). The checkpoint lives beside the dataset's stores
(``<dataset dir>/autoencoder/ae-<arch>-z<latent>-<key>.pt``) and is reused by every later run
with the same data and settings; its sha256 is the weights identity in the store's metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from gpu_ops.data.base import BadImageError, Dataset
from gpu_ops.errors import InputError
from gpu_ops.features.base import Extractor, describe
from gpu_ops.fsutil import atomic_path, file_sha256

log = logging.getLogger(__name__)

RECONSTRUCTIONS = "reconstructions.npz"


class AutoencoderFeatures(Extractor):
    """Latent vectors of a trained autoencoder, (b, latent_dim).

    Parameters
    ----------
    model : torch.nn.Module
        A trained :mod:`gpu_ops.deep` autoencoder (carries its ``image_size`` / ``max_side``).
    checkpoint : Path
        The checkpoint file it was loaded from or saved to.
    """

    name = "autoencoder"

    def __init__(self, model: torch.nn.Module, checkpoint: Path, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.checkpoint = Path(checkpoint)
        self.device = device
        self.image_size = getattr(model, "image_size", None)
        self.max_side = getattr(model, "max_side", 64)
        self._sha = file_sha256(self.checkpoint)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["model"] = None  # loader workers only preprocess
        return state

    def preprocess(self, item: np.ndarray) -> torch.Tensor:
        """(h, w[, c]) uint8 -> (c, s, s) float32 in [0, 1], as at training time."""
        from gpu_ops.deep._common import images_to_tensor

        return images_to_tensor(item[None], self.image_size, self.max_side)[0]

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        return self.model.encode(batch.to(self.device)).float().cpu().numpy()

    def metadata(self) -> dict[str, str]:
        return {
            "extractor": self.name,
            "weights": f"autoencoder:{self.checkpoint.name}",
            "weights_sha256": self._sha,
            "preprocessing": describe(size=self.image_size, scale="x/255", arch=getattr(self.model, "arch", "conv"),
                                      latent_dim=int(getattr(self.model, "latent_dim", 0) or 0)),
        }


def training_images(dataset: Dataset, limit: int, seed: int, size: int) -> np.ndarray:
    """Up to ``limit`` images of ``dataset`` (a seeded sample) as one uint8 array (n, h, w[, c]).

    In-memory datasets are used as they are; image folders are decoded and resized to ``size``.
    """
    n = len(dataset)
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(n, size=limit, replace=False)) if n > limit else np.arange(n)
    items = getattr(dataset, "items", None)
    if items is not None and items.ndim >= 3:
        return np.asarray(items[index])
    if dataset.item_kind != "image":
        raise InputError(f"the autoencoder extractor needs images; {dataset.name} holds vectors")
    from PIL import Image

    out = []
    for i in index:
        try:
            img = dataset.load(int(i))
        except BadImageError:
            continue
        out.append(np.asarray(Image.fromarray(img).convert("RGB").resize((size, size), Image.BILINEAR)))
    if not out:
        raise InputError(f"{dataset.name}: no readable image to train the autoencoder on")
    return np.stack(out)


def trained_autoencoder(dataset: Dataset, checkpoint_dir: Path, *, latent_dim: int = 10, epochs: int = 20,
                        image_size: int | None = None, seed: int = 0, device: str = "cpu",
                        max_train: int = 60_000, progress: bool = True) -> AutoencoderFeatures:
    """Train the conv autoencoder on ``dataset`` (or load its checkpoint) and return the extractor.

    Also writes ``reconstructions.npz`` (20 inputs and their reconstructions, the report's
    contract) beside the checkpoint.
    """
    from gpu_ops.deep import encode, train_autoencoder  # noqa: F401  (encode documents the pairing)

    if not 2 <= latent_dim <= 256:
        raise InputError(f"latent_dim must be between 2 and 256; got {latent_dim}")
    images = training_images(dataset, max_train, seed, image_size or 32)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    model, history = train_autoencoder(images, arch="conv", latent_dim=latent_dim, epochs=epochs, seed=seed,
                                       device=device, checkpoint_path=checkpoint_dir, progress=progress,
                                       image_size=image_size)
    model.latent_dim = latent_dim  # type: ignore[assignment]
    checkpoint = history.checkpoint
    if checkpoint is None:
        raise RuntimeError("autoencoder training returned no checkpoint path")
    log.info("autoencoder %s: %s", "loaded" if history.from_checkpoint else "trained", checkpoint)
    extractor = AutoencoderFeatures(model, checkpoint, device)
    save_reconstructions(extractor, images[:20], checkpoint_dir / RECONSTRUCTIONS)
    return extractor


@torch.inference_mode()
def save_reconstructions(extractor: AutoencoderFeatures, images: np.ndarray, path: Path) -> None:
    """``inputs`` and ``outputs`` (m, c, s, s -> m, s, s[, c]) in [0, 1] for the report."""
    x = torch.stack([extractor.preprocess(im) for im in images]).to(extractor.device)
    y = extractor.model.decode(extractor.model.encode(x)).float().clamp(0, 1).cpu().numpy()
    x = x.cpu().numpy()

    def hwc(a: np.ndarray) -> np.ndarray:
        return a[:, 0] if a.shape[1] == 1 else a.transpose(0, 2, 3, 1)

    with atomic_path(path) as tmp:
        np.savez(tmp, inputs=hwc(x), outputs=hwc(y))
