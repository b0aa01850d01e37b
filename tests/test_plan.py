"""Fingerprint and plan (nnqc_pipe.data.fingerprint, nnqc_pipe.data.plan)."""

from __future__ import annotations

import json

import pytest
from conftest import plan_defaults as _defaults

from nnqc_pipe.data.fingerprint import compute_fingerprint
from nnqc_pipe.data.inspect import inspect_subject
from nnqc_pipe.data.plan import choose_patch, choose_slicing_axis, make_plan, read_plan, round_up


@pytest.fixture(scope="module")
def fingerprint(phantom_dir):
    recs = [inspect_subject(f"demo_{i:03d}", phantom_dir / f"imagesTr/demo_{i:03d}.nii.gz",
                            phantom_dir / f"labelsTr/demo_{i:03d}.nii.gz", [1, 2]) for i in range(6)]
    return compute_fingerprint(recs, "MR", {1: "wall", 2: "cavity"})


def test_fingerprint_fields(fingerprint):
    fp = fingerprint
    assert fp["n_subjects"] == 6 and fp["label_values"] == [1, 2] and fp["labels_seen"] == [1, 2]
    assert fp["median_spacing"][2] > 2 * fp["median_spacing"][0]  # anisotropic phantoms, slices along S
    assert set(fp["orientations"]) == {"RAS", "LPS", "SLP"}
    assert fp["intensity"]["p00_5"] < fp["intensity"]["mean"] < fp["intensity"]["p99_5"]
    assert all(c <= s for c, s in zip(fp["median_cropped_shape"], fp["median_shape"], strict=True))


def test_fingerprint_ranges_over_training_subjects(fingerprint):
    """Per-subject ranges for the domain-shift check; the existing keys are unchanged, the intensities of these MR
    phantoms in z units (images z-scored per subject)."""
    ranges = fingerprint["ranges"]
    assert set(ranges) == {"spacing_mm", "fov_mm", "image_p00_5_z", "image_p99_5_z", "fg_p00_5_z", "fg_p99_5_z",
                           "fg_volume_mm3", "fg_extent_mm"}
    assert ranges["spacing_mm"] == {"min": fingerprint["spacing_min"], "max": fingerprint["spacing_max"]}
    assert 0 < ranges["fg_volume_mm3"]["min"] <= ranges["fg_volume_mm3"]["max"]
    assert ranges["image_p00_5_z"]["max"] < 0 < ranges["image_p99_5_z"]["min"]
    assert ranges["image_p00_5_z"]["max"] <= ranges["fg_p99_5_z"]["max"]
    assert all(lo <= hi for lo, hi in zip(ranges["fg_extent_mm"]["min"], ranges["fg_extent_mm"]["max"], strict=True))
    assert max(ranges["fg_extent_mm"]["max"]) == max(fingerprint["fg_extent_mm_max"])


def test_plan_from_phantoms(fingerprint):
    plan = make_plan(fingerprint, _defaults())
    assert plan["slicing_axis"] == 2 and plan["inplane_axes"] == [0, 1]
    assert plan["patch_size"][0] % 8 == 0 and 32 <= plan["patch_size"][0] <= 128
    assert plan["n_classes"] == 3 and plan["normalization"] == "zscore"
    # the window holds every training organ plus the margin
    widest = max(max(h[0], h[1]) for h in fingerprint["fg_half_width_mm"])
    assert plan["window_mm"] >= 2 * widest + 2 * 10.0 - 1e-6


def test_slicing_axis_choice():
    assert choose_slicing_axis([1.0, 1.0, 1.0], "auto", 2.0) == 2
    assert choose_slicing_axis([5.0, 1.0, 1.0], "auto", 2.0) == 0
    assert choose_slicing_axis([1.2, 1.0, 1.5], "auto", 2.0) == 2
    assert choose_slicing_axis([5.0, 1.0, 1.0], 1, 2.0) == 1


def test_patch_rounding_and_cap():
    assert round_up(41, 8) == 48 and round_up(48, 8) == 48
    assert choose_patch(60.0, 1.0, _defaults()) == (64, 1.0)
    patch, spacing = choose_patch(300.0, 1.0, _defaults(max_patch_size=128))
    assert patch == 128 and spacing == pytest.approx(300 / 128)
    assert choose_patch(10.0, 1.0, _defaults()) == (32, 1.0)  # min patch size


def test_paper_patch_size_is_taken_as_given():
    assert choose_patch(150.0, 1.0, _defaults(patch_size=256)) == (256, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        choose_patch(150.0, 1.0, _defaults(patch_size=100))


def test_ct_normalisation_parameters(fingerprint):
    plan = make_plan({**fingerprint, "modality": "CT"}, _defaults())
    assert plan["normalization"] == "ct" and plan["ct_clip"][0] < plan["ct_clip"][1]


def test_read_plan_gives_a_typed_view_and_names_missing_fields(tmp_path):
    plan = {"slicing_axis": 2, "inplane_axes": [0, 1], "target_spacing": [1.0, 1.0], "patch_size": [48, 48],
            "n_classes": 3, "label_values": [1, 2], "label_names": ["wall", "cavity"], "normalization": "zscore"}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    view = read_plan(path)
    assert view.patch_size == (48, 48) and view.label_map == {1: "wall", 2: "cavity"} and view.raw == plan
    path.write_text(json.dumps({k: v for k, v in plan.items() if k != "patch_size"}))
    with pytest.raises(ValueError, match="patch_size"):
        read_plan(path)
    path.write_text(json.dumps(plan | {"n_classes": 4}))
    with pytest.raises(ValueError, match="disagree"):
        read_plan(path)
