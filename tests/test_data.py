import gzip

import numpy as np
import pytest
from PIL import Image

from gpu_ops.data import load_dataset
from gpu_ops.data.readers import read_idx
from gpu_ops.errors import InputError


def test_digits_is_the_embedded_default():
    ds = load_dataset("digits")
    assert len(ds) == 1797
    assert ds.load(0).shape == (8, 8) and ds.load(0).dtype == np.uint8
    assert ds.labels is not None and set(np.unique(ds.labels)) == set(range(10))
    assert ds.image_ids[0] == "digits/0000000"


def test_mnist_idx_splits(data_dir):
    test = load_dataset(f"idx:{data_dir / 'mnist'}", "test")
    both = load_dataset(f"idx:{data_dir / 'mnist'}", "all")
    assert len(test) == 10_000 and len(both) == 70_000
    assert np.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert both.image_ids[60_000] == "test/0000000"
    assert np.array_equal(both.load(60_000), test.load(0))


def test_idx_raw_and_gz_read_the_same(data_dir, tmp_path):
    gz = data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.open(gz).read())
    assert np.array_equal(read_idx(gz), read_idx(raw))


def test_truncated_idx_names_the_file(data_dir, tmp_path):
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(gzip.open(data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").read()[:5000])
    with pytest.raises(InputError, match=r"t10k-images-idx3-ubyte: IDX header says shape \[10000, 28, 28\]"):
        load_dataset(f"idx:{tmp_path}", "test")


def test_folder_labels_from_subfolders(cifar_folder):
    ds = load_dataset(f"folder:{cifar_folder}")
    assert len(ds) == 200
    assert ds.class_names[:3] == ["airplane", "automobile", "bird"]
    assert np.bincount(ds.labels).tolist() == [20] * 10
    assert ds.image_ids[0] == "airplane/0000.jpg"
    assert ds.load(0).shape == (32, 32, 3)


def test_flat_folder_has_no_labels(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((10, 12), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.labels is None
    assert ds.load(2).shape == (10, 12, 3)


def test_npz_with_and_without_labels(tmp_path):
    X = np.random.default_rng(0).random((30, 5)).astype(np.float32)
    np.savez(tmp_path / "a.npz", X=X, y=np.arange(30) % 3)
    np.savez(tmp_path / "b.npz", X=X)
    a = load_dataset(f"npz:{tmp_path / 'a.npz'}")
    b = load_dataset(f"npz:{tmp_path / 'b.npz'}", limit=10)
    assert a.item_kind == "vector" and np.array_equal(a.load(3), X[3]) and a.labels[4] == 1
    assert b.labels is None and len(b) == 10


@pytest.mark.parametrize("spec, message", [
    ("mnist", "unknown dataset 'mnist'; expected digits or KIND:PATH"),
    ("folder:/nonexistent/x", "/nonexistent/x: image folder does not exist"),
    ("idx:/nonexistent/y", "/nonexistent/y: IDX dataset directory does not exist"),
    ("npz:/nonexistent/z.npz", "/nonexistent/z.npz: array file does not exist"),
])
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(InputError) as err:
        load_dataset(spec)
    assert str(err.value).startswith(message)


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no image files"):
        load_dataset(f"folder:{tmp_path}")


def test_npz_without_X(tmp_path):
    np.savez(tmp_path / "c.npz", data=np.zeros((3, 3)))
    with pytest.raises(InputError, match=r"c.npz: .npz has no array 'X' \(found: data\)"):
        load_dataset(f"npz:{tmp_path / 'c.npz'}")


def test_limit_cuts_every_per_item_sequence(cifar_folder):
    ds = load_dataset("digits", limit=100)
    assert len(ds.items) == len(ds.labels) == len(ds.image_ids) == 100
    folder = load_dataset(f"folder:{cifar_folder}", limit=7)
    assert len(folder.paths) == 7 and folder.load(6).shape == (32, 32, 3)
