"""GPU extraction: autocast + channels_last, nvJPEG batched decoding, and parity with the CPU."""

from pathlib import Path

import numpy as np
import pytest
import torch

from gpu_ops.data import load_dataset
from gpu_ops.device import cuda_available
from gpu_ops.features import create_extractor
from gpu_ops.features.extract import extract_to_store
from gpu_ops.store import read_embeddings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="no CUDA device visible")]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_resnet50_cuda_autocast_matches_cpu_features(cifar_folder, tmp_path):
    ds = load_dataset(f"folder:{cifar_folder}", limit=64)
    cpu = extract_to_store(ds, create_extractor("resnet50", weights="none", image_size=96), tmp_path / "c", progress=False)
    gpu_ex = create_extractor("resnet50", weights="none", image_size=96, device="cuda")
    assert gpu_ex.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    gpu = extract_to_store(ds, gpu_ex, tmp_path / "g", progress=False)
    a, b = read_embeddings(Path(cpu.directory)).embeddings, read_embeddings(Path(gpu.directory)).embeddings
    assert _cosine(a, b).min() > 0.99  # bf16/fp16 autocast: same features up to rounding


def test_nvjpeg_decodes_the_batch_on_the_device(cifar_folder):
    """The batched call really runs on the GPU (no silent CPU fallback), and its pixels are
    libjpeg's up to IDCT rounding."""
    from gpu_ops.features.jpeg import DecodeCounts, decode_batch

    paths = sorted(Path(cifar_folder).rglob("*.jpg"))[:64]
    raw = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    counts = DecodeCounts()
    images, reasons = decode_batch(["jpeg"] * len(raw), raw, "cuda", counts)
    assert counts == DecodeCounts(batched=len(raw)), counts
    assert reasons == [""] * len(raw)
    assert all(img.is_cuda and img.dtype == torch.uint8 for img in images)
    cpu, _ = decode_batch(["jpeg"] * len(raw), raw, "cpu")
    for g, c in zip(images, cpu):
        assert g.shape == c.shape
        assert (g.cpu().float() - c.float()).abs().mean() < 2.0


def test_nvjpeg_batched_decoding_matches_cpu_decoding(cifar_folder, tmp_path, caplog):
    import logging

    ds = load_dataset(f"folder:{cifar_folder}", limit=64)
    ex = create_extractor("efficientnet_lite0", image_size=128, device="cuda")
    host = extract_to_store(ds, ex, tmp_path / "h", progress=False)
    with caplog.at_level(logging.WARNING, logger="gpu_ops.features.jpeg"):
        dev = extract_to_store(ds, ex, tmp_path / "d", progress=False, decode_on_device=True)
    assert "batched JPEG decoding on cuda failed" not in caplog.text  # every batch decoded on the GPU
    a, b = read_embeddings(Path(host.directory)).embeddings, read_embeddings(Path(dev.directory)).embeddings
    assert _cosine(a, b).min() > 0.98  # nvJPEG and libjpeg differ slightly in IDCT rounding


def test_extraction_runs_in_the_precision_of_the_device():
    from gpu_ops.device import precision_for

    ex = create_extractor("resnet50", weights="none", image_size=64, device="cuda")
    expected = precision_for(torch.cuda.get_device_capability())
    assert ex.precision() == expected
    captured = {}
    handle = ex.model.register_forward_hook(lambda m, i, o: captured.setdefault("dtype", o.dtype))
    ex.embed(ex.preprocess(np.zeros((64, 64, 3), np.uint8))[None])
    handle.remove()
    assert captured["dtype"] == {"bf16": torch.bfloat16, "fp16": torch.float16}[expected]
