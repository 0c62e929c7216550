"""torchvision ResNets as feature extractors: penultimate-layer (global-pooled) features."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpu_ops.errors import InputError
from gpu_ops.features.base import Extractor, describe, file_sha256, to_rgb

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


def image_tensor(item: np.ndarray, size: int, extractor: str) -> torch.Tensor:
    """(h, w[, c]) uint8 image -> (3, size, size) float32 in [0, 1], resized with antialiasing."""
    if item.dtype != np.uint8 or item.ndim not in (2, 3):
        raise InputError(f"{extractor} needs images; got an item of shape {item.shape} and dtype {item.dtype}")
    x = torch.from_numpy(np.array(to_rgb(item), dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    if x.shape[1:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return x


def autocast_embed(forward, batch: torch.Tensor, device: str) -> np.ndarray:
    """Run ``forward`` on a (b, 3, h, w) batch: on CUDA in channels_last under autocast (bf16 when
    supported, else fp16) with a non-blocking copy; on CPU in float32. Returns (b, d) float32."""
    if device == "cuda":
        batch = batch.to("cuda", non_blocking=True).contiguous(memory_format=torch.channels_last)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            out = forward(batch)
        return out.float().cpu().numpy()
    return forward(batch).numpy().astype(np.float32, copy=False)


class ResNetFeatures(Extractor):
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
        model, self.weights_id, self.weights_sha = load_resnet(arch, weights, seed)
        model.fc = torch.nn.Identity()
        model.eval().to(device)
        if device == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __getstate__(self) -> dict:
        # Loader workers need preprocess() only; never pickle the model into them.
        state = self.__dict__.copy()
        state["model"] = None
        return state

    def preprocess(self, item: np.ndarray) -> torch.Tensor:
        """(h, w[, c]) uint8 -> (3, size, size) float32, ImageNet-normalised."""
        return (image_tensor(item, self.image_size, self.arch) - self._mean) / self._std

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        return autocast_embed(self.model, batch, self.device)

    def metadata(self) -> dict[str, str]:
        return {
            "extractor": self.arch,
            "weights": self.weights_id,
            "weights_sha256": self.weights_sha,
            "preprocessing": describe(size=self.image_size, resize="bilinear-antialias", rgb=True,
                                      mean=IMAGENET_MEAN, std=IMAGENET_STD),
        }
