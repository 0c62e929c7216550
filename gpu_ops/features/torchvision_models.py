"""torchvision ResNets as feature extractors: penultimate-layer (global-pooled) features."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gpu_ops.errors import InputError
from gpu_ops.features.base import PretrainedImageExtractor, describe
from gpu_ops.fsutil import file_sha256

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESNETS = {
    "resnet18": ("resnet18", "ResNet18_Weights"),
    "resnet34": ("resnet34", "ResNet34_Weights"),
    "resnet50": ("resnet50", "ResNet50_Weights"),
}


def load_resnet(arch: str, weights: str, seed: int) -> tuple[torch.nn.Module, str, str]:
    """Build ``arch`` with ``weights`` = none | imagenet | PATH; return (model, weights id, sha256).

    ``imagenet`` goes through torchvision's weight enums and cache (downloads once for users).
    ``none`` is a seeded random initialisation; PATH is a state_dict file (a plain state_dict or
    a checkpoint dict with ``state_dict``).
    """
    import torchvision.models as tvm

    builder = getattr(tvm, RESNETS[arch][0])
    if weights == "none":
        torch.manual_seed(seed)
        return builder(weights=None), f"none(seed={seed})", "none"
    if weights == "imagenet":
        enum = getattr(tvm, RESNETS[arch][1]).IMAGENET1K_V1
        try:
            return builder(weights=enum), f"torchvision:{enum}", "torchvision"
        except (OSError, RuntimeError) as exc:  # no network and nothing in torchvision's cache
            raise InputError(f"cannot load ImageNet weights for {arch} ({type(exc).__name__}: {exc}); "
                             "use --weights none or --weights PATH") from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise InputError(f"weights {weights!r}: expected none, imagenet or a path to a state_dict file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - one line naming the file
        raise InputError(f"{path}: cannot load a torch state_dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model = builder(weights=None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("fc.")] or unexpected:
        raise InputError(f"{path}: state_dict does not match {arch} (missing {len(missing)}, unexpected {len(unexpected)} keys)")
    return model, f"file:{path.name}", file_sha256(path)


class ResNetFeatures(PretrainedImageExtractor):
    """ResNet penultimate features (512-d for 18/34, 2048-d for 50).

    Parameters
    ----------
    arch : {"resnet18", "resnet34", "resnet50"}
    weights : str
        ``none`` | ``imagenet`` | path to a state_dict.
    image_size : int
        Images are resized (up or down) to this square size.
    device : str
        ``cpu`` or ``cuda``; on CUDA the model runs in channels_last with autocast (bf16 when
        supported, else fp16).
    """

    def __init__(self, arch: str = "resnet18", weights: str = "none", image_size: int = 224,
                 device: str = "cpu", seed: int = 0) -> None:
        self.name = arch
        self.arch = arch
        self.weights = weights
        self.image_size = image_size
        self.device = device
        self.seed = seed
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        model, self.weights_id, self.weights_sha = load_resnet(arch, weights, seed)
        model.fc = torch.nn.Identity()
        self._place(model)

    def metadata(self) -> dict[str, str]:
        return {
            "extractor": self.arch,
            "weights": self.weights_id,
            "weights_sha256": self.weights_sha,
            "preprocessing": describe(size=self.image_size, resize="bilinear-antialias", rgb=True,
                                      mean=IMAGENET_MEAN, std=IMAGENET_STD),
        }
