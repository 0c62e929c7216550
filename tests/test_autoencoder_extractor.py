"""The autoencoder extractor: trained on the dataset, checkpoint beside the store, reused."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from gpu_ops import pipeline
from gpu_ops.config import make_config
from gpu_ops.fsutil import file_sha256


def test_autoencoder_features_train_once_and_are_reused(tmp_path):
    cfg = make_config(dataset="digits", limit=600, extractor="autoencoder", latent_dim=12, ae_epochs=3,
                      cache_dir=tmp_path)
    params = pipeline.extract_params(cfg)
    first = pipeline.extract_stage(params, progress=False)
    assert (first.rows, first.dim) == (600, 12)
    ae_dir = Path(first.store).parent / "autoencoder"
    (checkpoint,) = ae_dir.glob("ae-conv-z12-*.pt")
    stamp = checkpoint.stat().st_mtime_ns

    meta = {k.decode(): v.decode() for k, v in pq.read_schema(Path(first.store) / "part-00000.parquet").metadata.items()}
    assert meta["extractor"] == "autoencoder" and meta["weights_sha256"] == file_sha256(checkpoint)
    assert json.loads(meta["preprocessing"])["latent_dim"] == 12

    recon = np.load(ae_dir / "reconstructions.npz")
    assert recon["inputs"].shape == recon["outputs"].shape == (20, 8, 8)
    assert 0.0 <= recon["outputs"].min() and recon["outputs"].max() <= 1.0

    second = pipeline.extract_stage(params, progress=False)  # same data and settings: no retraining
    assert checkpoint.stat().st_mtime_ns == stamp and second.store == first.store

    other = pipeline.extract_stage(pipeline.extract_params(cfg.model_copy(update={"latent_dim": 16})), progress=False)
    assert other.store != first.store and other.dim == 16
