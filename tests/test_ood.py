"""Domain-shift flags against the training fingerprint (nnqc_pipe.qc.ood)."""

from __future__ import annotations

import pandas as pd
import pytest

from nnqc_pipe.data.fingerprint import compute_fingerprint
from nnqc_pipe.data.inspect import inspect_subject
from nnqc_pipe.qc.ood import OOD_COLUMNS, deviations, ood_table, widened


def _record(subject: str, spacing=(1.0, 1.0, 3.0), shape=(40, 40, 10), image=(0.0, 100.0), fg=(20.0, 90.0),
            fg_voxels=1000, extent=(10.0, 12.0, 9.0), labelled=True) -> dict:
    """A minimal ingestion record (status ok) with the fields the fingerprint and the check read."""
    rec = {"subject": subject, "status": "ok", "has_label": labelled, "spacing": list(spacing),
           "ras_spacing": list(spacing), "ras_shape": list(shape), "axcodes": "RAS",
           "image_intensity": {"p00_5": image[0], "p99_5": image[1]}}
    if labelled:
        rec.update(intensity={"mean": 50.0, "std": 10.0, "p00_5": fg[0], "p99_5": fg[1], "sample": [20.0, 90.0]},
                   fg_voxels=fg_voxels, fg_extent_mm=list(extent), fg_extent_vox=[10, 12, 3],
                   fg_bbox_lo=[10, 10, 3], fg_bbox_hi=[19, 21, 5], fg_center_fraction=[0.4, 0.4, 0.4],
                   labels_present=[1])
    else:
        rec["intensity"] = {"mean": 50.0, "std": 10.0, "p00_5": image[0], "p99_5": image[1], "sample": []}
    return rec


@pytest.fixture
def fingerprint():
    training = [_record("t1"), _record("t2", spacing=(1.2, 1.2, 3.0), image=(-5.0, 120.0), fg_voxels=2000)]
    return compute_fingerprint(training, "MR", {1: "organ"})


def test_widened_range_is_relative_to_the_larger_bound_or_to_its_width():
    assert widened(100.0, 200.0, 0.1, spread=0.0) == (80.0, 220.0)
    assert widened(-1000.0, -900.0, 0.1) == (-1100.0, -800.0)  # 10 % of 1000 beats half the width, 50
    assert widened(100.0, 200.0, 0.1) == (50.0, 250.0)  # half the width, 50, beats 10 % of 200
    assert widened(0.586, 1.136, 0.1)[1] == pytest.approx(1.411)  # a z-unit range: the width decides


def test_deviations_name_feature_axis_and_range():
    ranges = {"spacing_mm": {"min": [1.0, 1.0, 3.0], "max": [1.2, 1.2, 3.0]}}
    assert deviations({"spacing_mm": [1.25, 1.0, 3.2]}, ranges, 0.1) == []  # inside the 10 % tolerance
    (reason,) = deviations({"spacing_mm": [1.0, 1.0, 5.0]}, ranges, 0.1)
    assert reason == "spacing_mm[S] 5 outside training range [3, 3]"
    assert deviations({"unknown": 1.0}, ranges, 0.1) == []  # no training range: not checked


def test_in_distribution_subject_is_not_flagged(fingerprint):
    records = {"a": _record("a", spacing=(1.1, 1.1, 3.0)), "u": _record("u", labelled=False)}
    candidates = pd.DataFrame({"subject": ["a", "a", "u"], "source": ["gt", "model", "model"],
                               "cand_voxels": [1500, 1800, 1200]})
    table = ood_table(records, fingerprint, candidates)
    assert list(table.columns) == OOD_COLUMNS and len(table) == 3
    assert not table.flag_out_of_distribution.any() and (table.ood_reason == "").all()


def test_every_out_of_range_feature_is_listed(fingerprint):
    """A shifted unlabelled subject (spacing, intensity scale) and a tiny candidate: each reason is listed."""
    records = {"u": _record("u", spacing=(0.5, 1.0, 3.0), image=(0.0, 4000.0), labelled=False)}
    candidates = pd.DataFrame({"subject": ["u", "u"], "source": ["m1", "m2"], "cand_voxels": [10, 1500]})
    table = ood_table(records, fingerprint, candidates).set_index("source")
    assert table.flag_out_of_distribution.all()
    reason = table.loc["m1", "ood_reason"]
    assert "spacing_mm[R] 0.5" in reason and "image_p99_5 4000" in reason and "candidate_volume_mm3 15 " in reason
    assert "candidate_volume_mm3" not in table.loc["m2", "ood_reason"]
    assert "fg_" not in reason  # an unlabelled subject has no foreground statistics to compare


def test_labelled_subject_foreground_statistics_are_checked(fingerprint):
    records = {"a": _record("a", fg=(20.0, 400.0), extent=(10.0, 40.0, 9.0))}
    candidates = pd.DataFrame({"subject": ["a"], "source": ["gt"], "cand_voxels": [1500]})
    reason = ood_table(records, fingerprint, candidates).ood_reason.iloc[0]
    assert "fg_p99_5 400" in reason and "fg_extent_mm[A] 40" in reason


def test_report_subjects_table_uses_foreground_rows(fingerprint):
    candidates = pd.DataFrame({"subject": ["a", "a"], "source": ["gt", "gt"], "label": ["organ", "foreground"],
                               "cand_voxels": [1, 1500]})
    table = ood_table({"a": _record("a")}, fingerprint, candidates)
    assert len(table) == 1 and not table.flag_out_of_distribution.iloc[0]


def test_missing_record_names_the_subject(fingerprint):
    with pytest.raises(ValueError, match="zz"):
        ood_table({}, fingerprint, pd.DataFrame({"subject": ["zz"], "source": ["m"], "cand_voxels": [1]}))


def test_real_phantom_records(phantom_dir):
    """Records from ingestion itself: a training phantom is in distribution, a resampled one is not."""
    recs = [inspect_subject(f"demo_{i:03d}", phantom_dir / f"imagesTr/demo_{i:03d}.nii.gz",
                            phantom_dir / f"labelsTr/demo_{i:03d}.nii.gz", [1, 2]) for i in range(6)]
    fp = compute_fingerprint(recs[:5], "MR", {1: "wall", 2: "cavity"})
    shifted = dict(recs[5], spacing=[s * 3 for s in recs[5]["spacing"]],
                   ras_spacing=[s * 3 for s in recs[5]["ras_spacing"]])
    records = {"demo_000": recs[0], "demo_005": shifted}
    voxels = [recs[0]["fg_voxels"], recs[5]["fg_voxels"]]
    candidates = pd.DataFrame({"subject": list(records), "source": ["gt", "gt"], "cand_voxels": voxels})
    table = ood_table(records, fp, candidates).set_index("subject")
    assert not table.loc["demo_000", "flag_out_of_distribution"]
    assert table.loc["demo_005", "flag_out_of_distribution"] and "spacing_mm" in table.loc["demo_005", "ood_reason"]


def _scaled(subject: str, scale: float, contrast: float = 1.0) -> dict:
    """A labelled record whose whole image has mean 50·scale, std 10·scale; ``contrast`` stretches the bright tail
    (the 99.5th percentiles) away from the mean."""
    rec = _record(subject, image=(30.0 * scale, (50.0 + 30.0 * contrast) * scale),
                  fg=(40.0 * scale, (50.0 + 25.0 * contrast) * scale))
    rec["image_intensity"].update(mean=50.0 * scale, std=10.0 * scale)
    return rec


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_intensities_are_compared_in_the_units_the_models_see(modality):
    """MR images are z-scored per subject: a scanner's intensity scale ×3 is no shift, a changed contrast is. CT is
    not: the same scale change is flagged there."""
    fingerprint = compute_fingerprint([_scaled("t1", 1.0), _scaled("t2", 1.1)], modality, {1: "organ"})
    assert ("image_p99_5_z" in fingerprint["ranges"]) == (modality == "MR")
    records = {"scaled": _scaled("scaled", 3.0), "contrast": _scaled("contrast", 1.0, contrast=2.0)}
    candidates = pd.DataFrame({"subject": list(records), "source": "gt", "cand_voxels": 1000})
    table = ood_table(records, fingerprint, candidates).set_index("subject")
    assert table.loc["scaled", "flag_out_of_distribution"] == (modality == "CT")
    assert table.loc["contrast", "flag_out_of_distribution"]
    if modality == "MR":
        assert "image_p99_5_z 6 outside training range [3, 3]" in table.loc["contrast", "ood_reason"]
