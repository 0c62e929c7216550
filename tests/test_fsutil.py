"""One atomic-write mechanism: a target is replaced whole or not at all, and no temp file stays."""

from pathlib import Path

import numpy as np
import pytest

from gpu_ops.fsutil import atomic_path, atomic_write_json


def test_a_failed_writer_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"acc": 0.9})
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text('{"acc": 0.')  # half a file, then Ctrl-C
            raise KeyboardInterrupt
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_writers_that_pick_the_format_by_suffix_write_the_target(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "reconstructions.npz"
    with atomic_path(target) as tmp:
        np.savez(tmp, inputs=np.arange(3))  # np.savez appends .npz unless the name ends with it
    assert np.load(target)["inputs"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in target.parent.iterdir()) == ["reconstructions.npz"]
