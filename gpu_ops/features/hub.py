"""Any timm or torchvision classification model as a feature extractor: ``timm:NAME``, ``torchvision:NAME``.

Pretrained weights come through each library's own download and cache (timm: the Hugging Face
hub or the model's URL; torchvision: its weight enums and ``$TORCH_HOME``), so a user with a
network gets them once and offline afterwards. ``weights="none"`` is a seeded random
initialisation and a PATH a local state_dict: both load nothing from the network.

Each model is preprocessed as its library evaluates it: resize the shorter side, centre crop,
normalise with the mean/std of its weights (timm: ``resolve_model_data_config``; torchvision: the
default weights' ``transforms()``). A given ``image_size`` sets the crop size and scales the
resize by the same ratio.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpu_ops.errors import InputError
from gpu_ops.features.base import PretrainedImageExtractor, describe, to_rgb
from gpu_ops.fsutil import file_sha256

LIBRARIES = ("timm", "torchvision")
#: ``weights`` values that ask for the library's default pretrained weights.
PRETRAINED = (None, "pretrained", "imagenet")


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize`` (``interpolation``, antialiased), centre crop ``size``,
    normalise with ``mean`` / ``std`` (the [0, 1] scale). ``source`` names the config it came from."""

    size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    def describe(self) -> str:
        return describe(**asdict(self), crop="center", rgb=True)


def _resize_crop(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """(b, 3, h, w) float in [0, 1] -> (b, 3, size, size): shorter side to ``resize``, centre crop."""
    h, w = x.shape[-2:]
    scale = prep.resize / min(h, w)
    new_h, new_w = max(prep.size, round(h * scale)), max(prep.size, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode=prep.interpolation, align_corners=False, antialias=True)
        if prep.interpolation == "bicubic":  # bicubic overshoots; images stay in [0, 1]
            x = x.clamp_(0.0, 1.0)
    top, left = round((new_h - prep.size) / 2.0), round((new_w - prep.size) / 2.0)
    return x[..., top:top + prep.size, left:left + prep.size]


def _close(name: str, names: list[str]) -> str:
    match = difflib.get_close_matches(name, names, n=3, cutoff=0.75)
    return f" (close: {', '.join(match)})" if match else ""


def unknown_model_error(library: str, name: str) -> InputError:
    """The one-line error for a model name ``library`` does not know, saying how to list valid ones."""
    if library == "timm":
        import timm

        how = "python -c \"import timm; print(timm.list_models('*pattern*', pretrained=True))\""
        close = _close(name, timm.list_models())
    else:
        import torchvision

        how = "python -c \"import torchvision; print(torchvision.models.list_models(module=torchvision.models))\""
        close = _close(name, torchvision.models.list_models(module=torchvision.models))
    return InputError(f"unknown {library} model {name!r}{close}; list the valid names with: {how}")


def check_model_name(library: str, name: str) -> None:
    """InputError unless ``library`` (timm | torchvision) has a classification model ``name``."""
    if library == "timm":
        import timm

        if not timm.is_model(name):
            raise unknown_model_error(library, name)
    else:
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models):
            raise unknown_model_error(library, name)


def state_sha256(model: torch.nn.Module) -> str:
    """Content hash of a model's state_dict (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to unpickle: one line naming the file
        raise InputError(f"{path}: cannot load a torch state_dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a state_dict (a mapping of parameter names to tensors)")
    return state


def load_matching(model: torch.nn.Module, path: Path, spec: str, skip: tuple[str, ...] = ()) -> None:
    """Load the state_dict at ``path`` into ``model``; every key must match (``skip``: keys dropped first)."""
    state = {k: v for k, v in _load_state(path).items() if k not in skip}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "")
        raise InputError(f"{path}: state_dict does not match {spec} ({detail})") from None
    if result.missing_keys or result.unexpected_keys:
        first = (result.missing_keys or result.unexpected_keys)[0]
        raise InputError(f"{path}: state_dict does not match {spec} (missing {len(result.missing_keys)}, "
                         f"unexpected {len(result.unexpected_keys)} keys, e.g. {first!r})")


def _weights_path(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise InputError(f"weights {weights!r}: expected none, pretrained (the library's default weights, "
                         "downloaded once) or a path to a state_dict file")
    return path


def _download_error(spec: str, exc: Exception) -> InputError:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return InputError(f"cannot load the pretrained weights of {spec} ({type(exc).__name__}: {first}); "
                      "connect to the network once (they are cached), or use --weights none or --weights PATH")


class HubFeatures(PretrainedImageExtractor):
    """Penultimate (pooled, pre-logits) features of a timm or torchvision model.

    Parameters
    ----------
    library : {"timm", "torchvision"}
    model_name : str
        A timm name (a pretrained tag allowed: ``resnet18.a1_in1k``) or a torchvision
        classification model name (``convnext_tiny``).
    weights : str or None
        None / ``pretrained`` / ``imagenet``: the library's default pretrained weights (downloaded
        once, then from its cache); ``none``: seeded random weights; or a state_dict path.
    image_size : int or None
        Crop size (None: the model's own evaluation size).
    """

    def __init__(self, library: str, model_name: str, weights: str | None = None, image_size: int | None = None,
                 device: str = "cpu", seed: int = 0) -> None:
        if library not in LIBRARIES:
            raise InputError(f"unknown model library {library!r}; expected one of: {', '.join(LIBRARIES)}")
        check_model_name(library, model_name)
        self.library, self.model_name = library, model_name
        self.name = f"{library}:{model_name}"
        self.device, self.seed, self.weights = device, seed, weights
        torch.manual_seed(seed)
        build = self._build_timm if library == "timm" else self._build_torchvision
        model, native = build(weights)
        self.prep = self._sized(native, image_size)
        self.image_size = self.prep.size
        self.mean, self.std = self.prep.mean, self.prep.std
        self._place(model)

    @staticmethod
    def _sized(native: Preprocessing, image_size: int | None) -> Preprocessing:
        if image_size is None or image_size == native.size:
            return native
        resize = max(image_size, math.floor(image_size * native.resize / native.size))
        return Preprocessing(image_size, resize, native.interpolation, native.mean, native.std, native.source)

    def _build_timm(self, weights: str | None) -> tuple[torch.nn.Module, Preprocessing]:
        import timm

        path = None if weights == "none" or weights in PRETRAINED else _weights_path(weights)
        try:
            model = timm.create_model(self.model_name, pretrained=weights in PRETRAINED, num_classes=0)
        except (OSError, RuntimeError, ValueError) as exc:  # no network and nothing in the cache
            raise _download_error(self.name, exc) from None
        cfg = model.pretrained_cfg
        if path is not None:
            heads = cfg.get("classifier") or ()
            heads = (heads,) if isinstance(heads, str) else tuple(heads)
            load_matching(model, path, self.name, skip=tuple(f"{h}.{p}" for h in heads for p in ("weight", "bias")))
        tag = f"{cfg.get('architecture', self.model_name)}.{cfg.get('tag')}" if cfg.get("tag") else self.model_name
        self.version = timm.__version__
        self.pretrained_tag = tag
        self.weights_source = cfg.get("hf_hub_id") or cfg.get("url") or ""
        if weights == "none":
            self.weights_id, self.weights_sha = f"none(seed={self.seed})", "none"
        elif weights in PRETRAINED:
            self.weights_id, self.weights_sha = f"timm:{tag}", state_sha256(model)
        else:
            self.weights_id, self.weights_sha = f"file:{Path(weights).name}", file_sha256(Path(weights).expanduser())
        data = timm.data.resolve_model_data_config(model)
        size = int(data["input_size"][-1])
        return model, Preprocessing(size, math.floor(size / float(data.get("crop_pct") or 1.0)),
                                    str(data.get("interpolation") or "bilinear"),
                                    tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
                                    f"timm.data.resolve_model_data_config({tag})")

    def _build_torchvision(self, weights: str | None) -> tuple[torch.nn.Module, Preprocessing]:
        import torchvision
        from torchvision.models import get_model, get_model_weights

        default = get_model_weights(self.model_name).DEFAULT
        self.version = torchvision.__version__
        self.pretrained_tag = str(default)
        self.weights_source = default.url
        if weights == "none":
            model = get_model(self.model_name, weights=None)
            self.weights_id, self.weights_sha = f"none(seed={self.seed})", "none"
        elif weights in PRETRAINED:
            try:
                model = get_model(self.model_name, weights=default)
            except (OSError, RuntimeError, ValueError) as exc:  # no network and nothing in torchvision's cache
                raise _download_error(self.name, exc) from None
            self.weights_id, self.weights_sha = f"torchvision:{default}", state_sha256(model)
        else:
            path = _weights_path(weights)
            model = get_model(self.model_name, weights=None)
            load_matching(model, path, self.name)
            self.weights_id, self.weights_sha = f"file:{path.name}", file_sha256(path)
        _drop_classifier(model, self.name)
        t = default.transforms()
        return model, Preprocessing(int(t.crop_size[0]), int(t.resize_size[0]), t.interpolation.value,
                                    tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std),  # type: ignore[arg-type]
                                    f"{default}.transforms()")

    def preprocess(self, item: np.ndarray) -> torch.Tensor:
        """(h, w[, c]) uint8 -> (3, size, size) float32, resized, cropped and normalised."""
        if item.dtype != np.uint8 or item.ndim not in (2, 3):
            raise InputError(f"{self.name} needs images; got an item of shape {item.shape} and dtype {item.dtype}")
        x = torch.from_numpy(np.array(to_rgb(item), dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        return (_resize_crop(x[None], self.prep)[0] - self._mean) / self._std

    def preprocess_decoded(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(3, h, w) uint8 images on the device -> (b, 3, size, size), as :meth:`preprocess`."""
        mean, std = self._mean.to(images[0].device), self._std.to(images[0].device)
        return torch.cat([(_resize_crop(img.float().div_(255.0)[None], self.prep) - mean) / std for img in images])

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """(b, 3, s, s) -> (b, d) float32 (flattened if the model returns more axes)."""
        out = super().embed(batch)
        return out.reshape(len(out), -1)

    def metadata(self) -> dict[str, str]:
        return {
            "extractor": self.name,
            "library": self.library,
            "library_version": self.version,
            "model": self.model_name,
            "pretrained_tag": self.pretrained_tag,
            "weights": self.weights_id,
            "weights_source": self.weights_source if self.weights_id.startswith(self.library) else "",
            "weights_sha256": self.weights_sha,
            "preprocessing": self.prep.describe(),
        }


def _drop_classifier(model: torch.nn.Module, spec: str) -> None:
    """Replace the model's last ``nn.Linear`` (its classifier) with an identity: penultimate features."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            last = name
    if last is None:
        raise InputError(f"{spec} has no linear classifier to remove; use a model whose last layer is nn.Linear")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, torch.nn.Identity())
