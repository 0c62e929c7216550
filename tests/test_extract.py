"""Extraction paths: batched JPEG decoding (the GPU path, run here with torchvision on the CPU),
EfficientNet-Lite0's packaged ImageNet weights, batch halving on CUDA out-of-memory, and when loader
worker processes start."""

from pathlib import Path

import numpy as np
import pytest
import torch

from gpu_ops.data import load_dataset
from gpu_ops.errors import InputError
from gpu_ops.features import create_extractor
from gpu_ops.features.extract import AdaptiveEmbedder, extract_to_store
from gpu_ops.store import read_embeddings


def test_batched_jpeg_decoding_matches_per_file_decoding_and_quarantines(cifar_folder, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for src in sorted((cifar_folder / "ship").glob("*.jpg"))[:12]:
        (folder / src.name).write_bytes(src.read_bytes())
    data = (folder / "0000.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(data[:200] + b"\x00" * 50)
    (folder / "empty.jpg").write_bytes(b"")
    ds = load_dataset(f"folder:{folder}")
    extractor = create_extractor("resnet18", weights="none", image_size=48)
    plain = extract_to_store(ds, extractor, tmp_path / "a", progress=False, batch_size=8)
    batched = extract_to_store(ds, extractor, tmp_path / "b", progress=False, batch_size=8, decode_on_device=True)
    assert (plain.rows, batched.rows) == (12, 12) and batched.quarantined == 2
    a, b = read_embeddings(Path(plain.directory)), read_embeddings(Path(batched.directory))
    assert a.image_ids == b.image_ids
    np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=1e-4, atol=1e-4)
    quarantine = (Path(batched.directory) / "quarantine.csv").read_text()
    assert "broken.jpg" in quarantine and "empty.jpg,empty file (0 bytes)" in quarantine


def test_raw_pixels_of_a_folder_decode_on_threads_in_order_and_quarantine(cifar_folder, tmp_path):
    """Raw pixels of an image folder are decoded by threads in this process (no DataLoader, no
    torch): the same store, row for row, as one item at a time, and the broken files set aside."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for src in sorted((cifar_folder / "cat").glob("*.jpg"))[:20]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "broken.jpg").write_bytes((folder / "0000.jpg").read_bytes()[:200] + b"\x00" * 50)
    ds = load_dataset(f"folder:{folder}")
    extractor = create_extractor("raw", image_size=16)
    threaded = extract_to_store(ds, extractor, tmp_path / "a", progress=False, batch_size=6, num_workers=3)
    one_by_one = extract_to_store(ds, extractor, tmp_path / "b", progress=False, batch_size=6, num_workers=0)
    assert (threaded.rows, threaded.quarantined) == (one_by_one.rows, one_by_one.quarantined) == (20, 1)
    a, b = read_embeddings(Path(threaded.directory)), read_embeddings(Path(one_by_one.directory))
    assert a.image_ids == b.image_ids and a.embeddings.shape == (20, 16 * 16 * 3)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert "broken.jpg" in (Path(threaded.directory) / "quarantine.csv").read_text()


def test_device_decoding_needs_an_image_folder():
    with pytest.raises(InputError, match="decoding on the device needs an image folder"):
        extract_to_store(load_dataset("digits"), create_extractor("raw"), Path("/tmp/unused"), decode_on_device=True)


def test_efficientnet_lite0_imagenet_weights_classify_real_photos():
    from sklearn.datasets import load_sample_images

    extractor = create_extractor("efficientnet_lite0")  # packaged ImageNet weights, no download
    meta = extractor.metadata()
    assert meta["weights"] == "imagenet"
    assert meta["weights_sha256"] == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    images = load_sample_images().images  # china.jpg (a temple), flower.jpg (a daisy)
    batch = torch.stack([extractor.preprocess(im) for im in images])
    with torch.inference_mode():
        logits = extractor.model.net._fc(extractor.model(batch))
    assert int(logits[1].argmax()) == 985  # ImageNet class 985: daisy
    assert extractor.embed(batch).shape == (2, 1280)


class _SmallMemory(torch.nn.Module):
    """A real model that raises CUDA's out-of-memory error above a batch size (as a full card does)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.seen = limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x.flatten(1).sum(1, keepdim=True)


def test_out_of_memory_halves_the_batch_and_keeps_every_row(caplog):
    extractor = create_extractor("raw")
    model = _SmallMemory(limit=20)
    extractor.embed = lambda batch: model(batch).numpy()  # type: ignore[method-assign]
    embed = AdaptiveEmbedder(extractor, max_batch=64)
    batch = torch.arange(100 * 3, dtype=torch.float32).reshape(100, 3)
    with caplog.at_level("WARNING"):
        out = embed(batch)
    assert np.array_equal(out[:, 0], batch.sum(1).numpy())
    assert embed.max_batch == 16
    assert "CUDA out of memory at batch size 64: halving to 32" in caplog.text
    assert "halving to 16" in caplog.text


def test_loader_worker_processes_start_only_for_more_than_one_batch(cifar_folder):
    """A worker process costs seconds to start: images that fit in one batch are decoded in this
    process; more get workers (at least one); arrays never do; an explicit count is kept."""
    from gpu_ops.features.extract import loader_workers

    folder = load_dataset(f"folder:{cifar_folder}")
    arrays = load_dataset("digits")
    assert loader_workers(folder, 16, batch_size=16) == 0
    assert loader_workers(folder, 17, batch_size=16) >= 1
    assert loader_workers(arrays, 1000, batch_size=16) == 0
    assert loader_workers(folder, 5, batch_size=16, requested=2) == 2
