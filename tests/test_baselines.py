"""Inter-source agreement and VAE-reconstruction baselines, and the cross-validated calibration of the predicted DSC."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nnqc_pipe.qc.baselines import (
    AGREEMENT_COLUMN,
    agreement_rows,
    agreement_table,
    consensus,
    reconstruction_counts,
    reconstruction_dice,
    voting_sources,
)
from nnqc_pipe.qc.calibration import (
    CALIBRATED_COLUMN,
    MIN_SOURCE_SUBJECTS,
    MIN_SUBJECTS,
    PRIOR_METHOD,
    calibrate,
    calibrate_label,
)

LABELS = {1: "wall", 2: "cavity"}


def _mask(shape=(6, 6, 4), **boxes) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    for value, box in boxes.items():
        out[box] = int(value[1:])
    return out


def test_voting_sources_exclude_gt_and_degraded():
    assert voting_sources(["gt", "degraded_L1", "unet", "atlas"]) == ["unet", "atlas"]


def test_consensus_is_a_strict_majority():
    a, b, c = (np.zeros((4,), np.uint8) for _ in range(3))
    a[:3], b[1:3], c[2:] = 1, 1, 2
    assert consensus([a, b, c], None).tolist() == [False, True, True, False]  # 2 of 3 foreground on 1..2
    assert consensus([a, b, c], 1).tolist() == [False, True, True, False]
    assert consensus([a, b], 1).tolist() == [False, True, True, False]  # two voters: both must agree


def test_agreement_rows_compare_each_source_with_the_others():
    truth = _mask(v1=np.s_[1:4, 1:4, :], v2=np.s_[2:3, 2:3, :])
    shifted = np.roll(truth, 1, axis=0)
    masks = {"gt": truth, "unet": truth.copy(), "atlas": shifted}
    rows = pd.DataFrame(agreement_rows(masks, ["unet", "atlas"], LABELS)).set_index(["source", "label"])
    # gt is compared with the consensus of unet and atlas (both must agree): their overlap
    overlap = (truth > 0) & (shifted > 0)
    expected = 2 * overlap.sum() / ((truth > 0).sum() + overlap.sum())
    assert rows.loc[("gt", "foreground"), AGREEMENT_COLUMN] == pytest.approx(expected)
    # unet's only other voter is atlas, and the other way round: the same DSC
    assert rows.loc[("unet", "wall"), AGREEMENT_COLUMN] == rows.loc[("atlas", "wall"), AGREEMENT_COLUMN] < 1


def test_agreement_table_reads_masks_and_leaves_single_segmenter_subjects_nan(tmp_path):
    truth = _mask(v1=np.s_[1:4, 1:4, :])
    for source, mask in {"gt": truth, "unet": truth}.items():
        for subject in ("s1", "s2"):
            nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / f"{source}_{subject}.nii.gz")
    candidates = {s: str(tmp_path / f"{s}_{{subject}}.nii.gz") for s in ("gt", "unet")}
    subjects = pd.DataFrame({"subject": ["s1", "s1", "s2"], "source": ["gt", "unet", "unet"]})
    table = agreement_table(subjects, candidates, LABELS).set_index(["subject", "source", "label"])
    assert table.loc[("s1", "gt", "foreground"), AGREEMENT_COLUMN] == 1.0  # gt vs the unet consensus
    assert np.isnan(table.loc[("s1", "unet", "foreground"), AGREEMENT_COLUMN])  # no other real segmenter
    assert np.isnan(table.loc[("s2", "unet", "foreground"), AGREEMENT_COLUMN])


def _calibration_rows(n_subjects: int, bias: float = -0.1) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    real = rng.uniform(0.3, 1.0, n_subjects * 3)
    return pd.DataFrame({"subject": np.repeat([f"s{i}" for i in range(n_subjects)], 3), "real_dsc": real,
                         "predicted_dsc": np.clip(real + bias + rng.normal(0, 0.02, real.size), 0, 1)})


def test_calibration_removes_a_bias_out_of_fold():
    rows = _calibration_rows(20)
    calibrated, info = calibrate_label(rows)
    raw_error = np.abs(rows.predicted_dsc - rows.real_dsc).mean()
    assert info["fitted"] and info["folds"] == 5 and info["labelled_subjects"] == 20
    assert np.abs(calibrated - rows.real_dsc).mean() < raw_error / 2


def test_calibration_is_honest_for_labelled_rows():
    """A labelled row's calibrated value does not change when its own real DSC is altered (it was held out)."""
    rows = _calibration_rows(10)
    first, _ = calibrate_label(rows)
    changed = rows.copy()
    changed.loc[0, "real_dsc"] = 0.0
    second, _ = calibrate_label(changed)
    assert first[0] == second[0]


def test_calibration_needs_enough_subjects_and_maps_unlabelled_rows():
    few, info = calibrate_label(_calibration_rows(MIN_SUBJECTS - 1))
    assert np.isnan(few).all() and not info["fitted"] and "labelled subjects" in info["reason"]
    rows = pd.concat([_calibration_rows(8), pd.DataFrame({"subject": ["new"], "predicted_dsc": [0.5],
                                                          "real_dsc": [np.nan]})], ignore_index=True)
    rows["label"] = "foreground"
    values, info = calibrate(rows)
    assert values.name == CALIBRATED_COLUMN and np.isfinite(values.iloc[-1]) and info["foreground"]["fitted"]
    assert 0.5 < values.iloc[-1] <= 0.7  # the 0.1 under-estimate is undone for the unlabelled row


def test_a_cohort_without_labels_uses_the_qc_models_map():
    """The map of a labelled cohort (``map``, what a bundle carries) applied where a cohort has too few labels."""
    trained = pd.concat([_calibration_rows(8), pd.DataFrame({"subject": ["new"] * 3, "predicted_dsc": [0.2, 0.5, 0.9],
                                                             "real_dsc": np.nan})], ignore_index=True)
    values, info = calibrate_label(trained)
    prior = info["map"]
    assert sorted(prior) == ["x", "y"] and np.all(np.diff(prior["y"]) >= 0)
    unlabelled = pd.DataFrame({"subject": ["a", "b", "c"], "predicted_dsc": [0.2, 0.5, 0.9], "real_dsc": np.nan})
    transferred, how = calibrate_label(unlabelled, prior)
    np.testing.assert_allclose(transferred, values[-3:])  # what the labelled cohort's own map gives them
    assert not how["fitted"] and how["method"] == PRIOR_METHOD and "0 labelled subjects" in how["reason"]
    column, per_label = calibrate(unlabelled.assign(label="foreground"), {"other_label": prior})
    assert column.isna().all() and "method" not in per_label["foreground"]  # a map of another label is not used


def test_real_segmenters_get_their_own_map_synthetic_sources_the_pooled_one():
    n = MIN_SOURCE_SUBJECTS
    pooled = _calibration_rows(n, bias=0.0).assign(source="degraded_L3")
    unet = _calibration_rows(n, bias=0.1).assign(source="unet")  # this model's masks are rated 0.1 too high
    gt = pd.DataFrame({"subject": [f"s{i}" for i in range(n)], "predicted_dsc": 0.85, "real_dsc": 1.0,
                       "source": "gt"})
    few = _calibration_rows(n - 1, bias=0.1).assign(source="atlas")  # too few subjects for its own map
    rows = pd.concat([pooled, unet, gt, few], ignore_index=True).assign(label="foreground")
    values, info = calibrate(rows)
    assert sorted(info["foreground"]["per_source"]) == ["unet"]
    own = rows.source == "unet"
    assert np.abs(values[own] - rows.real_dsc[own]).mean() < 0.05  # its own bias is undone
    # gt is calibrated by the pooled map (fitted on every labelled row), never by a map of its own constant 1.0
    assert (values[rows.source == "gt"] < 1.0).all()


def test_reconstruction_counts_and_dice_per_slice_and_volume():
    candidate = np.zeros((4, 4, 3), np.uint8)  # slices along the last axis
    candidate[:2, :2, 0] = 1  # slice 0: 4 voxels of class 1
    candidate[:2, :2, 1] = 2  # slice 1: 4 voxels of class 2
    recon = candidate.copy()
    recon[0, 0, 0] = 0  # slice 0 loses one voxel
    recon[:2, :2, 1] = 1  # slice 1: right foreground, wrong class
    counts = reconstruction_counts(candidate, recon, slice_axis=2, n_classes=3)
    assert counts["recon_overlap_fg"].tolist() == [3, 4, 0]
    assert counts["recon_total_fg"].tolist() == [7, 8, 0]
    assert counts["recon_overlap_2"].tolist() == [0, 0, 0] and counts["recon_total_2"].tolist() == [0, 4, 0]
    slices = pd.DataFrame({"slice_index": [0, 1, 2], **counts})
    # label values 5 and 7 stand for class indices 1 and 2
    dsc = reconstruction_dice(slices, {5: "wall", 7: "cavity"}, [5, 7])
    assert dsc[("foreground", 0)] == pytest.approx(6 / 7)
    assert dsc[("foreground", 1)] == 1.0 and dsc[("foreground", 2)] == 1.0  # slice 2 empty in both
    assert dsc[("foreground", None)] == pytest.approx(14 / 15)
    assert dsc[("cavity", 1)] == 0.0 and dsc[("cavity", None)] == 0.0
    assert dsc[("wall", None)] == pytest.approx(2 * 3 / (4 + 3 + 4))  # slice 1's wall voxels are cavity in truth


def test_reconstruction_dice_without_counts_is_empty_and_shapes_must_match():
    assert reconstruction_dice(pd.DataFrame({"slice_index": [0]}), LABELS, [1, 2]) == {}
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_counts(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), 2, 3)
