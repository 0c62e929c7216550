"""Feature extractors, created by name (``create_extractor``), and batched extraction.

A name is one of :data:`EXTRACTORS`, ``timm:NAME`` or ``torchvision:NAME`` (any model of those
libraries), or several image backbones joined by ``+`` (one store, rows concatenated). An image
backbone may carry its own input size, ``NAME@SIZE``: ``efficientnet_lite2@128+efficientnet_lite2@192``
is the same network at two scales side by side."""

from __future__ import annotations

from gpu_ops.errors import InputError, choice_error
from gpu_ops.features.base import Extractor

EXTRACTORS = ("raw", "resnet18", "resnet34", "resnet50", "efficientnet_lite0", "efficientnet_lite1",
              "efficientnet_lite2", "autoencoder")
#: Prefixes of the extractors that take any model of a library by name.
MODEL_LIBRARIES = ("timm", "torchvision")
#: Extractors that are not an image backbone (they cannot be flip-averaged or combined).
NOT_BACKBONES = ("raw", "autoencoder")


def _unknown(name: str) -> InputError:
    return InputError(f"{choice_error('extractor', name, EXTRACTORS)}, timm:NAME, torchvision:NAME "
                      "(or several backbones joined by +)")


def split_size(part: str) -> tuple[str, int | None]:
    """``NAME@SIZE`` -> (NAME, SIZE); ``NAME`` -> (NAME, None). InputError unless SIZE is an integer >= 16."""
    name, sep, size = part.partition("@")
    if not sep:
        return part, None
    if not size.isdigit() or int(size) < 16:
        raise InputError(f"extractor part {part!r}: the size after @ must be an integer >= 16 (pixels), e.g. "
                         f"{name}@192")
    return name, int(size)


def check_extractor(spec: str) -> None:
    """InputError (one line) unless ``spec`` names an extractor, a library model or a backbone combination.

    Library model names are checked against the library's own list (importing it)."""
    parts = spec.split("+")
    names = [split_size(part)[0] for part in parts]
    for part, name in zip(parts, names):
        if name in NOT_BACKBONES and len(parts) > 1:
            raise InputError(f"extractor {spec!r}: {name} cannot be combined; join pretrained image backbones "
                             "with + (e.g. efficientnet_lite0+efficientnet_lite2)")
        if name in NOT_BACKBONES and part != name:
            raise InputError(f"extractor {spec!r}: a size after @ is for pretrained image backbones, not {name} "
                             "(use --image-size)")
    if len(set(parts)) < len(parts):
        raise InputError(f"extractor {spec!r} names a backbone twice")
    for name in names:
        library, sep, model = name.partition(":")
        if sep and library in MODEL_LIBRARIES and model:
            from gpu_ops.features.hub import check_model_name

            check_model_name(library, model)
        elif name not in EXTRACTORS:
            raise _unknown(name)


def create_extractor(name: str, *, weights: str | None = None, image_size: int | None = None,
                     device: str = "cpu", seed: int = 0, flip_average: bool = False) -> Extractor:
    """Build extractor ``name``; an unknown name raises InputError listing the valid ones.

    ``image_size``: the input size of every backbone that does not name its own (``NAME@SIZE``).

    ``weights`` None means the extractor's default: ImageNet for the pretrained networks (the
    library's default pretrained weights for ``timm:`` / ``torchvision:`` models). A combination
    ``a+b`` takes ``weights`` None, ``imagenet`` or ``none`` (for every backbone).
    ``flip_average`` averages each image's features with its mirror image's (image backbones only).
    """
    check_extractor(name)
    if "+" in name:
        from gpu_ops.features.combine import Concatenated

        if weights not in (None, "imagenet", "none"):
            raise InputError(f"weights {weights!r}: a combination of backbones ({name}) takes none or imagenet; "
                             "a state_dict file belongs to one backbone")
        return Concatenated([create_extractor(part, weights=weights, image_size=image_size, device=device, seed=seed,
                                              flip_average=flip_average) for part in name.split("+")], name=name)
    name, own_size = split_size(name)
    image_size = own_size or image_size
    if flip_average:
        if name in NOT_BACKBONES:
            raise InputError(f"flip averaging is for pretrained image backbones; not for extractor {name}")
        from gpu_ops.features.combine import FlipAveraged

        return FlipAveraged(create_extractor(name, weights=weights, image_size=image_size, device=device,  # type: ignore[arg-type]
                                             seed=seed))
    library, sep, model = name.partition(":")
    if sep:
        from gpu_ops.features.hub import HubFeatures

        return HubFeatures(library, model, weights=weights, image_size=image_size, device=device, seed=seed)
    if name == "raw":
        from gpu_ops.features.raw import RawPixels

        return RawPixels(image_size=image_size)
    if name in ("resnet18", "resnet34", "resnet50"):
        from gpu_ops.features.torchvision_models import ResNetFeatures

        return ResNetFeatures(name, weights=weights or "imagenet", image_size=image_size or 224, device=device, seed=seed)
    if name.startswith("efficientnet_lite"):
        from gpu_ops.features.efficientnet import EfficientNetLiteFeatures

        return EfficientNetLiteFeatures(name, weights=weights or "imagenet", image_size=image_size, device=device,
                                        seed=seed)
    raise InputError("the autoencoder extractor is trained on the dataset first: "
                     "use gpu_ops.features.autoencoder.trained_autoencoder")


__all__ = ["EXTRACTORS", "Extractor", "check_extractor", "create_extractor", "split_size"]
