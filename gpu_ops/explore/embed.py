"""New images, embedded the way a run embedded its own: its extractor, weights and preprocessing.

At the end of a run :func:`save_embedder` writes ``embedder.json``: the extractor's identity as the
run's store recorded it (extractor, weights, weights sha256, preprocessing), the settings that
build it (from the run's config) and the shape of the run's items (:class:`ItemForm`). New images
are first brought to that shape (:func:`conform`: a CIFAR-10 JPEG assigned to an MNIST run becomes
a 28 x 28 grey image, as the run's own items were) and then go through the one extraction routine
(:func:`gpu_ops.features.extract.extract_to_store` for a dataset, its loader and batched embedder
for single files). Embeddings made by anything else are refused, naming both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpu_ops.data.base import BadImageError, Dataset, hash_strings
from gpu_ops.errors import InputError
from gpu_ops.fsutil import atomic_write_json
from gpu_ops.rundir import RunDir

#: The store metadata entries that identify how embeddings were made.
IDENTITY_KEYS = ("extractor", "weights", "weights_sha256", "preprocessing", "flip_average")
#: The run settings that build its extractor (:func:`gpu_ops.features.extract.build_extractor`).
EXTRACTOR_SETTINGS = ("extractor", "weights", "image_size", "latent_dim", "ae_epochs", "seed", "batch_size",
                      "flip_average")


@dataclass(frozen=True)
class ItemForm:
    """The shape of a run's items: ``image`` of (height, width) with ``channels`` (0: (h, w) grey;
    None size: images of any size, as in a folder), or ``vector`` of ``dim`` numbers."""

    kind: str
    height: int | None = None
    width: int | None = None
    channels: int | None = None
    dim: int | None = None

    def describe(self) -> str:
        if self.kind == "vector":
            return f"{self.dim}-d vectors"
        size = f"{self.height}x{self.width}" if self.height else "any-size"
        return f"{size} {'grey' if self.channels in (0, 1) else 'RGB'} images"


def item_form(dataset: Dataset) -> ItemForm:
    """The form of ``dataset``'s items (array datasets: their shape; image folders: RGB, any size)."""
    items = getattr(dataset, "items", None)
    if dataset.item_kind == "vector":
        return ItemForm("vector", dim=int(items.shape[1]) if items is not None else len(dataset.load(0)))
    if items is not None and items.ndim >= 3:
        return ItemForm("image", int(items.shape[1]), int(items.shape[2]), int(items.shape[3]) if items.ndim == 4 else 0)
    return ItemForm("image", channels=3)


def conform(item: np.ndarray, form: ItemForm, where: str) -> np.ndarray:
    """``item`` (a uint8 image or a vector) in the run's form: same channels, same size."""
    if form.kind == "vector":
        vec = np.asarray(item)
        if vec.ndim != 1 or vec.dtype == np.uint8:
            raise InputError(f"{where}: the run clustered {form.describe()}; this holds images (shape {vec.shape})")
        if len(vec) != form.dim:
            raise InputError(f"{where}: {len(vec)}-d vectors; the run clustered {form.describe()}")
        return vec
    if item.ndim == 1:
        raise InputError(f"{where}: holds vectors; the run clustered {form.describe()}")
    from PIL import Image

    channels = item.shape[2] if item.ndim == 3 else 0
    want = 3 if form.channels is None else form.channels
    size = (form.width, form.height) if form.height else None  # PIL's (width, height)
    if channels == want and (size is None or tuple(item.shape[:2]) == (form.height, form.width)):
        return item
    image = Image.fromarray(item if item.ndim == 2 or item.shape[2] != 1 else item[:, :, 0])
    image = image.convert("L" if want in (0, 1) else ("RGBA" if want == 4 else "RGB"))
    if size is not None and image.size != size:
        image = image.resize(size, Image.BILINEAR)
    out = np.asarray(image, dtype=np.uint8)
    return out[:, :, None] if want == 1 else out


class ConformedDataset(Dataset):
    """A dataset whose items are brought to a run's :class:`ItemForm` as they are loaded."""

    def __init__(self, parent: Dataset, form: ItemForm) -> None:
        self.parent, self.form = parent, form
        self.name = parent.name
        self.image_ids = list(parent.image_ids)
        self.labels = parent.labels
        self.class_names = parent.class_names
        self.item_kind = "vector" if form.kind == "vector" else "image"  # type: ignore[assignment]
        self.uniform_size = form.kind == "vector" or form.height is not None

    def load(self, index: int) -> np.ndarray:
        return conform(self.parent.load(index), self.form, self.parent.source(index))

    def source(self, index: int) -> str:
        return self.parent.source(index)

    def fingerprint(self) -> str:
        return hash_strings([self.parent.fingerprint(), json.dumps(asdict(self.form), sort_keys=True)])


class FilesDataset(Dataset):
    """Image files given one by one (``gpuclust similar --image``); ids are the paths as given."""

    def __init__(self, paths: list[Path]) -> None:
        for p in paths:
            if not p.is_file():
                raise InputError(f"{p}: image file does not exist")
        self.paths = paths
        self.name = "files"
        self.image_ids = [str(p) for p in paths]
        self.labels = None
        self.uniform_size = False

    def load(self, index: int) -> np.ndarray:
        from gpu_ops.data.readers import decode_image

        return decode_image(self.paths[index])

    def source(self, index: int) -> str:
        return str(self.paths[index])

    def fingerprint(self) -> str:
        return hash_strings([f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in self.paths])


def identity_of(metadata: dict[str, str]) -> dict[str, str]:
    """The entries of a store's metadata that say how its embeddings were made."""
    return {k: metadata[k] for k in IDENTITY_KEYS if k in metadata}


def describe_identity(identity: dict[str, str]) -> str:
    """``raw (weights none, preprocessing {...})`` for messages."""
    if not identity.get("extractor"):
        return "an unrecorded extractor"
    sha = identity.get("weights_sha256", "none")
    weights = identity.get("weights", "?") + (f", sha256 {sha[:12]}" if sha not in ("none", "") else "")
    return f"{identity['extractor']} (weights {weights}, preprocessing {identity.get('preprocessing', '?')})"


def save_embedder(run: RunDir, cfg: Any, store_metadata: dict[str, str], dataset: Dataset, store: str) -> dict[str, Any]:
    """Write ``embedder.json``: how new images are embedded like this run's (see the module)."""
    settings = {k: getattr(cfg, k) for k in EXTRACTOR_SETTINGS}
    autoencoder = None
    if cfg.extractor == "autoencoder":
        autoencoder = str(Path(store).parent / "autoencoder" / store_metadata["weights"].split(":", 1)[1])
    doc = {"identity": identity_of(store_metadata), "settings": settings, "item_form": asdict(item_form(dataset)),
           "dataset": cfg.dataset, "store": store, "autoencoder_checkpoint": autoencoder,
           "cache_root": str(cfg.cache_root())}
    atomic_write_json(run.embedder, doc, sort_keys=False)
    return doc


class RunEmbedder:
    """The run's extractor, rebuilt from ``embedder.json``, and the form its items had."""

    def __init__(self, run: RunDir, device: str | None = None) -> None:
        path = run.embedder
        if not path.is_file():
            raise InputError(f"{run.path}: the run does not say how it embedded its images ({path.name} is missing); "
                             "runs made before gpuclust kept it must be rerun")
        self.run = run
        self.doc = json.loads(path.read_text())
        self.identity: dict[str, str] = self.doc["identity"]
        self.form = ItemForm(**self.doc["item_form"])
        self.settings: dict[str, Any] = self.doc["settings"]
        self.cache_root = Path(self.doc["cache_root"])
        self._device = device
        self._extractor: Any = None

    def describe(self) -> str:
        return f"run {self.run.path} used {describe_identity(self.identity)}"

    def check_identity(self, identity: dict[str, str], what: str) -> None:
        """Refuse embeddings made another way than the run's, naming both."""
        if identity_of(identity) != self.identity:
            raise InputError(f"{what}: embeddings made with {describe_identity(identity)}, but {self.describe()}; "
                             "new images must be embedded with the run's extractor and weights")

    def device(self) -> str:
        if self._device is None:
            from gpu_ops.device import cuda_available

            self._device = "cuda" if cuda_available() else "cpu"
        return self._device

    def extractor(self, dataset: Dataset) -> Any:
        """The run's extractor (checked against the identity the run's store recorded)."""
        if self._extractor is None:
            if self.form.kind == "vector" and self.settings["extractor"] != "raw":
                raise InputError(f"{self.run.path}: clustered {self.form.describe()} with {self.settings['extractor']}")
            if self.settings["extractor"] == "autoencoder":
                from gpu_ops.deep import load_autoencoder
                from gpu_ops.features.autoencoder import AutoencoderFeatures

                checkpoint = Path(self.doc["autoencoder_checkpoint"])
                if not checkpoint.is_file():
                    raise InputError(f"{checkpoint}: the run's autoencoder checkpoint is missing (cleared cache?)")
                model = load_autoencoder(checkpoint, self.device())
                model.latent_dim = self.settings["latent_dim"]  # type: ignore[assignment]
                extractor = AutoencoderFeatures(model, checkpoint, self.device())
            else:
                from gpu_ops.features.extract import build_extractor

                extractor = build_extractor({**self.settings, "cache_root": str(self.cache_root)}, dataset,
                                            device=self.device(), progress=False)
            self.check_identity(extractor.metadata(), f"the run's extractor rebuilt now ({self.run.path})")
            self._extractor = extractor
        return self._extractor

    def conformed(self, dataset: Dataset) -> ConformedDataset:
        return ConformedDataset(dataset, self.form)

    def embed_files(self, paths: list[Path]) -> np.ndarray:
        """Embeddings (len(paths), d) of image files; an unreadable file is an InputError."""
        from gpu_ops.features.extract import AdaptiveEmbedder, batch_loader

        dataset = self.conformed(FilesDataset(paths))
        extractor = self.extractor(dataset)
        embed = AdaptiveEmbedder(extractor, int(self.settings["batch_size"]))
        out = []
        for _good, tensor, bad in batch_loader(dataset, extractor, list(range(len(paths))),
                                               batch_size=int(self.settings["batch_size"]), num_workers=0):
            if bad:
                raise InputError(f"{paths[bad[0][0]]}: {bad[0][1]}")
            out.append(embed(tensor))
        return np.concatenate(out).astype(np.float32)

    def images_of_files(self, paths: list[Path]) -> np.ndarray:
        """Image files as the run's deep methods read its items: in the run's form (channels, size),
        stacked as uint8 (len(paths), h, w[, c])."""
        dataset = self.conformed(FilesDataset(paths))
        return images_of(dataset, dataset.image_ids, int(self.settings.get("image_size") or 32))

    def embed_dataset(self, spec: str, split: str = "all", limit: int | None = None,
                      progress: bool = False) -> tuple[Path, ConformedDataset | None]:
        """Embed a dataset of new images into a store in the run's cache (a rerun reuses it), or
        check ``parquet:DIR`` embeddings against the run's way; returns (the store directory, the
        conformed dataset, None for ``parquet:``)."""
        from gpu_ops.data import load_dataset
        from gpu_ops.store import read_embeddings

        if spec.partition(":")[0] == "parquet":
            from gpu_ops.data.readers import env_path

            directory = env_path(spec.partition(":")[2])
            if not directory.exists():
                raise InputError(f"{directory}: Parquet embeddings path does not exist")
            table = read_embeddings(directory)
            self.check_identity(table.metadata, spec)
            if table.embeddings.shape[1] != self._dim():
                raise InputError(f"{spec}: {table.embeddings.shape[1]}-d embeddings; the run's are {self._dim()}-d")
            return directory, None
        from gpu_ops.features.extract import checked_summary, extract_to_store

        dataset = self.conformed(load_dataset(spec, split, limit))
        extractor = self.extractor(dataset)
        summary = extract_to_store(dataset, extractor, self.cache_root / "stores", progress=progress,
                                   batch_size=int(self.settings["batch_size"]))
        checked_summary(summary, spec, len(dataset))
        return Path(summary.directory), dataset

    def _dim(self) -> int:
        from gpu_ops.explore.search import IndexInfo

        return IndexInfo.read(self.run).dim


def images_of(dataset: ConformedDataset, image_ids: list[str], size: int) -> np.ndarray:
    """The conformed images of ``image_ids`` as one uint8 array (deep methods read images); images
    of a run over a folder (any size) are resized to ``size``, as the run's deep clustering did."""
    if dataset.form.height is None:
        from gpu_ops.pipeline import images_for_ids

        return images_for_ids(dataset, image_ids, size)
    position = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    try:
        return np.stack([dataset.load(position[i]) for i in image_ids])
    except (BadImageError, ValueError) as exc:
        raise InputError(f"{dataset.name}: cannot stack its images for a deep model ({exc})") from None
