"""Feature extractors, created by name (``create_extractor``), and batched extraction."""

from __future__ import annotations

from gpu_ops.errors import InputError, choice_error
from gpu_ops.features.base import Extractor

EXTRACTORS = ("raw", "resnet18", "resnet34", "resnet50", "efficientnet_lite0", "autoencoder")


def create_extractor(name: str, *, weights: str | None = None, image_size: int | None = None,
                     device: str = "cpu", seed: int = 0) -> Extractor:
    """Build extractor ``name``; an unknown name raises InputError listing the valid ones.

    ``weights`` None means the extractor's default: ImageNet for the pretrained networks.
    """
    if name == "raw":
        from gpu_ops.features.raw import RawPixels

        return RawPixels(image_size=image_size)
    if name in ("resnet18", "resnet34", "resnet50"):
        from gpu_ops.features.torchvision_models import ResNetFeatures

        return ResNetFeatures(name, weights=weights or "imagenet", image_size=image_size or 224, device=device, seed=seed)
    if name == "efficientnet_lite0":
        from gpu_ops.features.efficientnet import EfficientNetLite0Features

        return EfficientNetLite0Features(weights=weights or "imagenet", image_size=image_size or 224, device=device,
                                         seed=seed)
    if name == "autoencoder":
        raise InputError("the autoencoder extractor is trained on the dataset first: "
                         "use gpu_ops.features.autoencoder.trained_autoencoder")
    raise choice_error("extractor", name, EXTRACTORS)


__all__ = ["EXTRACTORS", "Extractor", "create_extractor"]
