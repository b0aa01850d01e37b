"""Per-subject validation records and the deterministic split (nnqc_pipe.data.inspect, nnqc_pipe.data.split)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from conftest import save

from nnqc_pipe.data.inspect import foreground_geometry, inspect_subject
from nnqc_pipe.data.io import write_json
from nnqc_pipe.data.split import CohortError, assign_roles, read_split, write_split


def test_good_subject_record(phantom_dir):
    rec = inspect_subject("demo_004", phantom_dir / "imagesTr/demo_004.nii.gz",
                          phantom_dir / "labelsTr/demo_004.nii.gz", [1, 2])
    assert rec["status"] == "ok"
    assert rec["axcodes"] == "SLP"  # stored slice-axis-first
    assert rec["ras_spacing"][2] > 2 * rec["ras_spacing"][0]  # the slice axis ends up as RAS S
    assert rec["labels_present"] == [1, 2]
    assert len(rec["intensity"]["sample"]) == 2000
    assert all(0 < f < 1 for f in rec["fg_center_fraction"])


@pytest.mark.parametrize(
    ("label_data", "message"),
    [
        (np.zeros((6, 6, 6), np.uint8), "label volume is empty"),
        (np.full((6, 6, 6), 5, np.uint8), r"label values \[5\]"),
        (np.zeros((6, 6, 5), np.uint8), "differs from image shape"),
    ],
)
def test_bad_subject_excluded_with_reason(tmp_path, label_data, message):
    image = save(tmp_path / "img.nii.gz", np.random.default_rng(0).random((6, 6, 6)).astype(np.float32))
    label = save(tmp_path / "lbl.nii.gz", label_data)
    rec = inspect_subject("bad", image, label, [1, 2])
    assert rec["status"] == "excluded"
    assert "subject 'bad'" in rec["reason"] and "lbl.nii.gz" in rec["reason"]
    assert re.search(message, rec["reason"])


def test_missing_label_pair_excluded_when_labels_required(tmp_path):
    image = save(tmp_path / "img.nii.gz", np.random.default_rng(0).random((6, 6, 6)).astype(np.float32))
    rec = inspect_subject("s", image, tmp_path / "missing.nii.gz", [1], require_label=True)
    assert rec["status"] == "excluded" and "label file is missing" in rec["reason"]
    assert "missing.nii.gz" in rec["reason"]


def test_missing_label_file_makes_an_unlabelled_subject(tmp_path):
    """Partial labels: an image without its label file is a valid unlabelled subject with whole-image stats."""
    data = np.random.default_rng(0).random((6, 6, 6)).astype(np.float32)
    image = save(tmp_path / "img.nii.gz", data)
    rec = inspect_subject("s", image, tmp_path / "missing.nii.gz", [1])
    assert rec["status"] == "ok" and rec["has_label"] is False and rec["label"] is None
    assert rec["image_intensity"]["p99_5"] == pytest.approx(np.percentile(data, 99.5), rel=1e-5)
    assert rec["intensity"]["p99_5"] == rec["image_intensity"]["p99_5"]


def test_unlabelled_subject_is_ok(tmp_path):
    image = save(tmp_path / "img.nii.gz", np.random.default_rng(0).random((6, 6, 6)).astype(np.float32))
    rec = inspect_subject("s", image, None, [1])
    assert rec["status"] == "ok" and rec["has_label"] is False


def test_labelled_subject_has_whole_image_and_foreground_stats(phantom_dir):
    rec = inspect_subject("demo_001", phantom_dir / "imagesTr/demo_001.nii.gz",
                          phantom_dir / "labelsTr/demo_001.nii.gz", [1, 2])
    assert rec["has_label"] is True and "sample" not in rec["image_intensity"]
    assert rec["image_intensity"]["p00_5"] <= rec["intensity"]["p00_5"]


def test_foreground_geometry_centre_fraction():
    fg = np.zeros((10, 10, 4), bool)
    fg[4:6, 0:10, 1:3] = True
    geo = foreground_geometry(fg, [1.0, 2.0, 3.0])
    assert geo["fg_center_fraction"] == [0.5, 0.5, 0.5]
    assert geo["fg_extent_mm"] == [2.0, 20.0, 6.0]


def test_roles_are_deterministic_and_cover_everyone():
    names = [f"s{i:02d}" for i in range(20)]
    a = assign_roles(names, ["u1"], 0.2, 0.1, seed=1)
    b = assign_roles(list(reversed(names)), ["u1"], 0.2, 0.1, seed=1)
    pd.testing.assert_frame_equal(a, b)
    counts = a.role.value_counts().to_dict()
    assert counts == {"train": 14, "test": 4, "val": 2, "unlabelled": 1}
    c = assign_roles(names, [], 0.2, 0.1, seed=2)
    assert set(c.loc[c.role == "test", "subject"]) != set(a.loc[a.role == "test", "subject"])


def test_too_few_subjects():
    with pytest.raises(CohortError, match="at least 3"):
        assign_roles(["a", "b"], [], 0.2, 0.1, 0)


def _records(tmp_path, bad: bool, n_unlabelled: int = 0):
    paths = []
    for i in range(6 + n_unlabelled):
        labelled = i < 6
        rec = {"subject": f"s{i}", "status": "ok", "reason": "", "image": "i", "label": "l" if labelled else None,
               "has_label": labelled}
        if bad and i == 0:
            rec.update(status="excluded", reason="subject 's0' (l): label volume is empty")
        paths.append(tmp_path / f"s{i}.json")
        write_json(rec, paths[-1])
    return paths


def test_write_split_excludes_bad_subject(tmp_path):
    split = write_split(_records(tmp_path, True), tmp_path / "subjects.tsv", tmp_path / "split.tsv", 0.2, 0.1, 0)
    assert "s0" not in set(split.subject)
    table = pd.read_csv(tmp_path / "subjects.tsv", sep="\t")
    assert table.set_index("subject").loc["s0", "status"] == "excluded"
    roles = read_split(tmp_path / "split.tsv")
    assert sorted(sum(roles.values(), [])) == ["s1", "s2", "s3", "s4", "s5"]


def test_write_split_fail_mode(tmp_path):
    with pytest.raises(CohortError, match="label volume is empty"):
        write_split(_records(tmp_path, True), tmp_path / "a.tsv", tmp_path / "b.tsv", 0.2, 0.1, 0, "fail")
    assert not (tmp_path / "b.tsv").exists()


def test_write_split_partial_labels(tmp_path):
    """Subjects without a label file are listed as unlabelled in subjects.tsv and split.tsv, never trained on."""
    split = write_split(_records(tmp_path, False, n_unlabelled=3), tmp_path / "subjects.tsv",
                        tmp_path / "split.tsv", 0.2, 0.1, 0)
    table = pd.read_csv(tmp_path / "subjects.tsv", sep="\t").set_index("subject")
    assert table.labelled.to_dict() == {f"s{i}": i < 6 for i in range(9)}
    assert (table.status == "ok").all()
    roles = split.set_index("subject").role
    assert set(roles[["s6", "s7", "s8"]]) == {"unlabelled"}
    assert set(roles[[f"s{i}" for i in range(6)]]) <= {"train", "val", "test"}


def test_write_split_with_a_trained_qc_model(tmp_path):
    """qc_model: nothing is trained, every labelled subject is a test subject (even fewer than 3)."""
    paths = _records(tmp_path, False, n_unlabelled=2)
    split = write_split(paths[4:], tmp_path / "subjects.tsv", tmp_path / "split.tsv", 0.2, 0.1, 0,
                        train_model=False)
    assert split.set_index("subject").role.to_dict() == {"s4": "test", "s5": "test", "s6": "unlabelled",
                                                         "s7": "unlabelled"}
    with pytest.raises(CohortError, match="no usable subject"):
        write_split([], tmp_path / "a.tsv", tmp_path / "b.tsv", 0.2, 0.1, 0, train_model=False)
