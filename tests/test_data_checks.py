"""Numbers in, numbers checked: the one pixel-scale rule, 16-bit images, oversized images, and
malformed array / USPS / IDX files refused with one line naming the file and the array."""

import csv
import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gpu_ops.data import load_dataset
from gpu_ops.data.base import check_vectors, to_uint8_images, to_unit_scale
from gpu_ops.data.readers import decode_image
from gpu_ops.errors import InputError
from gpu_ops.features import create_extractor
from gpu_ops.features.extract import extract_to_store

from conftest import run_cli

FLOAT_HINT = "(float images must be scaled to [0, 1]; uint8 and uint16 are scaled automatically)"
TOO_LARGE = "is too large: |x| must be at most 3.29e+17 for 784-d vectors (squared distances must fit in float32)"
NOT_A_LABEL = "is not a class label (labels must be integers >= 0; leave y out when there are none)"


@pytest.fixture(scope="module")
def mnist(data_dir):
    """The first 500 MNIST test images (uint8, 28x28) and their labels."""
    ds = load_dataset(f"idx:{data_dir / 'mnist'}", "test", limit=500)
    return np.asarray(ds.items), np.asarray(ds.labels)


@pytest.fixture(scope="module")
def digits_float():
    """scikit-learn's digits as the pipeline reads them (uint8) and as float32 in [0, 1]."""
    ds = load_dataset("digits")
    return np.asarray(ds.items), ds.items.astype(np.float32) / 255.0, np.asarray(ds.labels)


def refusal(spec: str, split: str = "all") -> str:
    with pytest.raises(InputError) as err:
        load_dataset(spec, split)
    return str(err.value)


# --- the pixel rule ------------------------------------------------------------------------------

def test_every_image_dtype_reaches_the_same_uint8_and_unit_scale(mnist):
    """uint8, uint16 (x257), bool, float [0, 1] and int64 0..255 are one rule, not a guess from the data."""
    images = mnist[0]
    as_unit = images.astype(np.float32) / 255.0
    variants = (images, images.astype(np.uint16) * 257, as_unit, as_unit.astype(np.float64), images.astype(np.int64))
    for variant in variants:
        assert np.array_equal(to_uint8_images(variant, "mnist"), images), variant.dtype
        np.testing.assert_allclose(to_unit_scale(variant, "mnist"), as_unit, atol=1e-6)
    binary = images > 127
    assert np.array_equal(to_uint8_images(binary, "mnist"), binary.astype(np.uint8) * 255)
    # the scale never depends on the array's maximum: a dark image stays dark
    dark = (images // 4).astype(np.float32) / 255.0
    assert np.array_equal(to_uint8_images(dark, "mnist"), images // 4)


@pytest.mark.parametrize("value, shown", [(1.01, "1.01"), (np.nan, "nan"), (np.inf, "inf"), (-0.2, "-0.2")])
def test_float_image_npz_outside_unit_range_is_refused_naming_the_index(tmp_path, digits_float, value, shown):
    X = digits_float[1].copy()
    X[12, 3, 4] = value
    np.savez(tmp_path / "x.npz", X=X, y=digits_float[2])
    message = refusal(f"npz:{tmp_path / 'x.npz'}")
    assert message == f"{tmp_path / 'x.npz'}: X[12, 3, 4] = {shown} is outside [0, 1] {FLOAT_HINT}"


def test_float_and_uint16_npz_images_read_exactly_as_uint8(tmp_path, digits_float, mnist):
    uint8, unit, labels = digits_float
    np.savez(tmp_path / "u8.npz", X=uint8, y=labels)
    np.savez(tmp_path / "f32.npz", X=unit, y=labels)
    a, b = load_dataset(f"npz:{tmp_path / 'u8.npz'}"), load_dataset(f"npz:{tmp_path / 'f32.npz'}")
    assert b.items.dtype == np.uint8 and np.array_equal(a.items, b.items)
    assert a.fingerprint() == b.fingerprint()
    np.savez(tmp_path / "u16.npz", X=mnist[0].astype(np.uint16) * 257)
    assert np.array_equal(load_dataset(f"npz:{tmp_path / 'u16.npz'}").items, mnist[0])


def test_integer_images_past_8_bits_are_refused_unless_uint16(tmp_path, mnist):
    X = mnist[0].astype(np.int32)
    X[7, 14, 15] = 300
    np.savez(tmp_path / "i32.npz", X=X)
    assert refusal(f"npz:{tmp_path / 'i32.npz'}") == (
        f"{tmp_path / 'i32.npz'}: X[7, 14, 15] = 300 is outside 0..255 "
        "(int32 images hold 8-bit values; store 16-bit images as uint16)")


# --- vectors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, why", [
    (np.nan, "nan is not a finite number"),
    (-np.inf, "-inf is not a finite number"),
    (1e38, f"1e+38 {TOO_LARGE}"),
    (-1e18, f"-1e+18 {TOO_LARGE}"),
])
def test_vector_npz_with_non_finite_or_overflowing_values_is_refused(tmp_path, mnist, value, why):
    X = mnist[0].reshape(len(mnist[0]), -1).astype(np.float64) / 255.0
    X[5, 300] = value
    np.savez(tmp_path / "v.npz", X=X, y=mnist[1])
    assert refusal(f"npz:{tmp_path / 'v.npz'}") == f"{tmp_path / 'v.npz'}: X[5, 300] = {why}"


def test_vectors_within_the_float32_bound_pass_through(mnist):
    X = mnist[0].reshape(len(mnist[0]), -1).astype(np.float64) * 1e15  # large but safe for 784-d
    out = check_vectors(X, "v")
    assert out.dtype == np.float32 and np.isfinite(((out[:50, None] - out[None, :50]) ** 2).sum(-1)).all()


def test_parquet_embeddings_with_a_nan_are_refused(tmp_path, mnist):
    import pyarrow as pa
    import pyarrow.parquet as pq

    X = mnist[0].reshape(len(mnist[0]), -1).astype(np.float32) / 255.0
    X[3, 7] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])
    pq.write_table(pa.table({"image_id": [f"m/{i}" for i in range(len(X))], "embedding": column}),
                   tmp_path / "part-00000.parquet")
    assert refusal(f"parquet:{tmp_path}") == (f"{tmp_path / 'part-00000.parquet'}: row 3 (image_id 'm/3') holds a "
                                              "non-finite value (nan) in its embedding")


# --- malformed npz -------------------------------------------------------------------------------

def test_malformed_npz_files_name_the_file_and_the_array(tmp_path, digits_float):
    uint8, _, labels = digits_float
    path = tmp_path / "d.npz"
    cases = {
        "string X": ({"X": np.array([["a", "b"]] * 5)}, "X has dtype <U1; vectors must be numbers (integer or float)"),
        "string y": ({"X": uint8, "y": labels.astype("U1")}, "y has dtype <U1; labels must be integers >= 0"),
        "NaN in y": ({"X": uint8, "y": np.r_[labels[:-1], np.nan]}, f"y[1796] = nan {NOT_A_LABEL}"),
        "negative y": ({"X": uint8, "y": np.r_[-1, labels[1:]]}, f"y[0] = -1 {NOT_A_LABEL}"),
        "short y": ({"X": uint8, "y": labels[:-3]}, "y must hold one label per row of X (1797); got shape (1794,)"),
    }
    for case, (arrays, expected) in cases.items():
        np.savez(path, **arrays)
        assert refusal(f"npz:{path}") == f"{path}: {expected}", case
    # whole-number float labels are labels
    np.savez(path, X=uint8, y=labels.astype(np.float64))
    assert np.array_equal(load_dataset(f"npz:{path}").labels, labels)


def test_truncated_npz_is_refused(tmp_path, mnist):
    np.savez_compressed(tmp_path / "t.npz", X=mnist[0], y=mnist[1])
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    assert refusal(f"npz:{tmp_path / 't.npz'}") == f"{tmp_path / 't.npz'}: cannot read arrays (File is not a zip file)"


# --- USPS and IDX ---------------------------------------------------------------------------------

def test_usps_that_is_not_hdf5_or_lacks_a_split_is_refused(tmp_path, data_dir):
    import h5py

    real = data_dir / "usps" / "usps.h5"
    with h5py.File(real, "r") as fh:  # the real file still reads by the rule: [0, 1] floats x 255
        expected = np.rint(np.asarray(fh["test"]["data"]) * 255).astype(np.uint8)
    assert np.array_equal(load_dataset(f"usps:{real}", "test").items.reshape(2007, 256), expected)
    fake = tmp_path / "usps.h5"
    fake.write_bytes((data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert refusal(f"usps:{fake}").startswith(f"{fake}: not a readable HDF5 file (")
    only_test = tmp_path / "only_test.h5"
    with h5py.File(real, "r") as src, h5py.File(only_test, "w") as dst:
        src.copy("test", dst)
    assert refusal(f"usps:{only_test}") == (
        f"{only_test}: USPS HDF5 needs datasets train/data and train/target (top level holds: test)")
    assert len(load_dataset(f"usps:{only_test}", "test")) == 2007  # the split it has still reads


def test_corrupt_gzip_idx_names_the_file(tmp_path, data_dir):
    data = bytearray((data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    for i in range(100, 400):
        data[i] ^= 0x5A
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bytes(data))
    (tmp_path / "t10k-images-idx3-ubyte.gz").symlink_to(data_dir / "mnist" / "t10k-images-idx3-ubyte.gz")
    message = refusal(f"idx:{tmp_path}", "test")
    assert message.startswith(f"{bad}: cannot read IDX file (Error -3 while decompressing data")


def test_idx_images_file_that_holds_labels_is_refused(tmp_path, data_dir):
    labels = gzip.open(data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(labels)
    assert refusal(f"idx:{tmp_path}", "test") == (
        f"{tmp_path / 't10k-images-idx3-ubyte'}: expected n x h x w images; the IDX file holds shape [10000]")


# --- image folders: 16-bit and oversized images --------------------------------------------------

def test_sixteen_bit_png_decodes_to_its_8_bit_original(tmp_path, mnist):
    images = mnist[0][:20]
    for i, image in enumerate(images):
        Image.fromarray(image.astype(np.uint16) * 257).save(tmp_path / f"{i:02d}.png")
    with Image.open(tmp_path / "00.png") as im:
        assert im.mode == "I;16"
    ds = load_dataset(f"folder:{tmp_path}")
    decoded = np.stack([ds.load(i) for i in range(len(ds))])
    assert decoded.shape == (20, 28, 28, 3)
    assert np.abs(decoded[..., 0].astype(int) - images.astype(int)).max() <= 1
    assert (decoded == 255).mean() < 0.05  # not saturated to white


def test_float_tiff_outside_unit_range_is_a_bad_image(tmp_path, mnist):
    from gpu_ops.data import BadImageError

    pixels = mnist[0][0].astype(np.float32) / 255.0
    Image.fromarray(pixels).save(tmp_path / "ok.tif")
    assert np.array_equal(decode_image(tmp_path / "ok.tif")[..., 0], mnist[0][0])
    pixels[3, 4] = 2.0
    Image.fromarray(pixels).save(tmp_path / "bad.tif")
    with pytest.raises(BadImageError, match=r"^mode F image: pixel\[3, 4\] = 2 is outside \[0, 1\]"):
        decode_image(tmp_path / "bad.tif")


def test_image_over_the_decompression_bomb_limit_is_quarantined(tmp_path, cifar_folder):
    folder = tmp_path / "imgs"
    folder.mkdir()
    sources = sorted((cifar_folder / "cat").glob("*.jpg"))[:10]
    for src in sources:
        (folder / src.name).write_bytes(src.read_bytes())
    side = math.isqrt(2 * Image.MAX_IMAGE_PIXELS) + 100  # over twice the limit: Pillow refuses to open it
    Image.new("1", (side, side)).save(folder / "huge.png", optimize=True)
    assert (folder / "huge.png").stat().st_size < 200_000  # a bilevel blank page compresses to a few KB
    ds = load_dataset(f"folder:{folder}")
    summary = extract_to_store(ds, create_extractor("raw", image_size=32), tmp_path / "store", progress=False,
                               num_workers=0)
    assert summary.rows == 10 and summary.quarantined == 1
    with open(Path(summary.directory) / "quarantine.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["source"] for r in rows] == [str(folder / "huge.png")]
    assert rows[0]["reason"].startswith(f"image too large (Image size ({side * side} pixels) exceeds limit of "
                                        f"{2 * Image.MAX_IMAGE_PIXELS} pixels")


# --- the command line -----------------------------------------------------------------------------

def _single_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def test_cli_refuses_bad_arrays_and_usps_files_in_one_line(tmp_path, mnist):
    np.savez_compressed(tmp_path / "t.npz", X=mnist[0])
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    np.savez(tmp_path / "ny.npz", X=mnist[0], y=np.r_[mnist[1][:-1], np.nan])
    (tmp_path / "u.h5").write_text("not HDF5\n")
    expected = {
        f"npz:{tmp_path / 't.npz'}": f"gpuclust: error: {tmp_path / 't.npz'}: cannot read arrays "
                                     "(File is not a zip file)",
        f"npz:{tmp_path / 'ny.npz'}": f"gpuclust: error: {tmp_path / 'ny.npz'}: y[499] = nan {NOT_A_LABEL}",
        f"usps:{tmp_path / 'u.h5'}": (f"gpuclust: error: {tmp_path / 'u.h5'}: not a readable HDF5 file "
                                      "(Unable to synchronously open file (file signature not found))"),
    }
    for spec, line in expected.items():
        result = run_cli(["run", "--dataset", spec, "--extractor", "raw", "--algorithm", "kmeans", "--k", "10",
                          "--reducer", "none", "--backend", "cpu", "--out", str(tmp_path / "run")], timeout=300)
        assert _single_error_line(result) == line
        assert not (tmp_path / "run").exists()


def test_one_pixel_over_1_is_refused_and_the_clipped_array_clusters_like_uint8(prefect_server, tmp_path,
                                                                               digits_float):
    """A float image array is never rescaled by its maximum: one pixel at 1.01 once dropped ACC from
    about 0.8 to about 0.4 silently. Now it is refused before any work; clipped, it is the uint8 data."""
    uint8, unit, labels = digits_float
    bad = unit.copy()
    bad[12, 4, 4] = 1.01  # a full-intensity pixel: clipping it gives back exactly the uint8 data
    assert uint8[12, 4, 4] == 255
    np.savez(tmp_path / "bad.npz", X=bad, y=labels)
    np.savez(tmp_path / "clipped.npz", X=np.clip(bad, 0, 1), y=labels)
    np.savez(tmp_path / "uint8.npz", X=uint8, y=labels)
    args = ["--extractor", "raw", "--algorithm", "kmeans", "--reducer", "none", "--backend", "cpu", "--k", "10"]

    refused = run_cli(["run", "--dataset", f"npz:{tmp_path / 'bad.npz'}", *args, "--out", str(tmp_path / "bad")])
    assert _single_error_line(refused) == (
        f"gpuclust: error: {tmp_path / 'bad.npz'}: X[12, 4, 4] = 1.01 is outside [0, 1] {FLOAT_HINT}")
    assert not (tmp_path / "bad").exists()

    acc = {}
    for name in ("clipped", "uint8"):
        result = run_cli(["run", "--dataset", f"npz:{tmp_path / f'{name}.npz'}", *args, "--out", str(tmp_path / name)],
                         api_url=prefect_server["url"])
        assert result.returncode == 0, result.stderr[-3000:]
        acc[name] = json.loads((tmp_path / name / "metrics.json").read_text())["algorithms"]["kmeans"]["acc"]
    assert acc["clipped"] == acc["uint8"] and acc["uint8"] > 0.7, acc
