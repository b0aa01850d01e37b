"""Input validation and atomic writing (nnqc_pipe.data.io)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import save

from nnqc_pipe.data import io


def test_missing_file_names_subject_and_path(tmp_path):
    with pytest.raises(io.InputError, match=r"subject 's1'.*nope\.nii\.gz.*does not exist"):
        io.load_volume(tmp_path / "nope.nii.gz", "s1")


def test_unreadable_file(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file")
    with pytest.raises(io.InputError, match="unreadable"):
        io.load_volume(bad, "s1")


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 4, 2)])
def test_2d_and_4d_rejected(tmp_path, shape):
    path = save(tmp_path / "x.nii.gz", np.ones(shape, np.float32))
    with pytest.raises(io.InputError, match="must be a 3D volume"):
        io.load_volume(path, "s1")


def test_trailing_singleton_4d_accepted(tmp_path):
    path = save(tmp_path / "x.nii.gz", np.random.default_rng(0).random((4, 5, 6, 1)).astype(np.float32))
    assert io.load_volume(path, "s1").shape == (4, 5, 6)


def test_nan_and_constant_images_rejected(tmp_path):
    data = np.random.default_rng(0).random((4, 4, 4)).astype(np.float32)
    data[1, 1, 1] = np.nan
    img = io.load_volume(save(tmp_path / "nan.nii.gz", data), "s1")
    with pytest.raises(io.InputError, match="1 NaN/inf"):
        io.read_image_array(img, "s1", "nan.nii.gz")
    img = io.load_volume(save(tmp_path / "const.nii.gz", np.full((4, 4, 4), 3.0, np.float32)), "s1")
    with pytest.raises(io.InputError, match="constant"):
        io.read_image_array(img, "s1", "const.nii.gz")


def test_label_values_outside_declared_set(tmp_path):
    data = np.zeros((4, 4, 4), np.uint8)
    data[0, 0, 0], data[1, 1, 1] = 1, 7
    img = io.load_volume(save(tmp_path / "l.nii.gz", data), "s1")
    with pytest.raises(io.InputError, match=r"label values \[7\] are not in the declared set \[0, 1, 2\]"):
        io.read_label_array(img, "s1", "l.nii.gz", [1, 2])


def test_probability_map_as_label_rejected(tmp_path):
    img = io.load_volume(save(tmp_path / "p.nii.gz", np.full((4, 4, 4), 0.4, np.float32)), "s1")
    with pytest.raises(io.InputError, match="non-integer"):
        io.read_label_array(img, "s1", "p.nii.gz", [1])


def test_grid_mismatch(tmp_path):
    ref = io.load_volume(save(tmp_path / "i.nii.gz", np.ones((4, 4, 4), np.float32)), "s1")
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    other = io.load_volume(save(tmp_path / "m.nii.gz", np.zeros((4, 4, 4), np.uint8), shifted), "s1")
    with pytest.raises(io.InputError, match="affine differs"):
        io.check_same_grid(ref, other, "s1", "m.nii.gz")
    other = io.load_volume(save(tmp_path / "m2.nii.gz", np.zeros((4, 4, 5), np.uint8)), "s1")
    with pytest.raises(io.InputError, match=r"shape \(4, 4, 5\) differs"):
        io.check_same_grid(ref, other, "s1", "m2.nii.gz")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.json"
    with pytest.raises(RuntimeError), io.atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    io.write_json({"a": np.float32(1.5)}, dest)
    assert io.read_json(dest) == {"a": 1.5}


def test_parquet_metadata_roundtrip(tmp_path):
    path = tmp_path / "t.parquet"
    io.write_parquet(pd.DataFrame({"x": [1, 2]}), path, metadata={"config_hash": "abc", "n": 3})
    assert io.read_parquet_metadata(path) == {"config_hash": "abc", "n": 3}
    assert io.concat_parquet([path, path]).x.tolist() == [1, 2, 1, 2]
