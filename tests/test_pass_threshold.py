"""The learned pass threshold: a split-conformal bound of the real segmenters' labelled failures, out of fold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nnqc_pipe.qc.calibration import (
    MIN_REVIEW_BAND,
    conformal_bound,
    learned_pass_dsc,
    pass_threshold_label,
    pass_thresholds,
)
from nnqc_pipe.qc.decisions import VerdictThresholds
from nnqc_pipe.report.tables import apply_verdicts


def test_conformal_bound_is_the_order_statistic_that_covers_all_but_the_allowed_share():
    scores = np.linspace(0.3, 0.69, 40)
    # k = ceil(0.95 * 41) = 39: the 39th smallest of 40
    assert conformal_bound(scores, 0.05) == pytest.approx(np.sort(scores)[38])
    assert conformal_bound(scores[:19], 0.05) == pytest.approx(scores[18])  # 19 failures: the largest
    assert conformal_bound(scores[:18], 0.05) is None  # too few for a 95 % bound
    assert conformal_bound(np.append(scores[:19], np.nan), 0.05) == pytest.approx(scores[18])  # NaN ignored


def test_the_learned_threshold_catches_the_bounding_failure_and_only_ever_lowers_the_configured_one():
    failures = np.full(19, 0.75)
    value = learned_pass_dsc(failures, 0.05, fail_dsc=0.7, pass_dsc=0.8)
    assert 0.75 < value < 0.7501  # a failure scored exactly at the bound stays below the threshold
    assert learned_pass_dsc(np.full(19, 0.95), 0.05, 0.7, 0.8) == 0.8  # never above qc_pass_dsc
    assert learned_pass_dsc(np.full(19, 0.2), 0.05, 0.7, 0.8) == pytest.approx(0.7 + MIN_REVIEW_BAND)
    assert learned_pass_dsc(np.full(5, 0.2), 0.05, 0.7, 0.8) is None


def cohort(n_subjects: int = 30, seed: int = 0) -> pd.DataFrame:
    """One label; per subject a failed real segmenter (score 0.55-0.75), a good one (score 0.85), gt and a
    degradation."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_subjects):
        subject = f"s{i:02d}"
        rows += [{"subject": subject, "source": "bad_net", "real_dsc": 0.5, "predicted_dsc": rng.uniform(0.55, 0.75)},
                 {"subject": subject, "source": "good_net", "real_dsc": 0.9, "predicted_dsc": 0.85},
                 {"subject": subject, "source": "gt", "real_dsc": 1.0, "predicted_dsc": 0.88},
                 {"subject": subject, "source": "degraded_L1", "real_dsc": 0.1, "predicted_dsc": 0.1}]
    return pd.DataFrame(rows).assign(label="foreground")


def test_no_subject_sets_its_own_threshold():
    """Every row of a labelled subject gets a threshold fitted without its failures: raising that subject's own
    failure score cannot move it (it moves the others', whose fits see it). 19 failures of other subjects suffice:
    with 20 subjects every one gets a fit of its own."""
    rows = cohort()
    before, _ = pass_threshold_label(rows, "predicted_dsc", 0.7, 0.8, 0.05)
    bad = (rows["subject"] == "s07") & (rows["source"] == "bad_net")
    changed = rows.copy()
    changed.loc[bad, "predicted_dsc"] = 0.79
    after, info = pass_threshold_label(changed, "predicted_dsc", 0.7, 0.8, 0.05)
    own = (rows["subject"] == "s07").to_numpy()
    np.testing.assert_array_equal(after[own], before[own])
    assert (after[~own] > before[~own]).any()
    assert info["fitted"] and info["failures"] == 30 and info["subjects_threshold"]["at_fallback"] == 0
    values, info = pass_threshold_label(cohort(n_subjects=20), "predicted_dsc", 0.7, 0.8, 0.05)
    assert info["subjects_threshold"]["at_fallback"] == 0 and (values < 0.8).all()


def test_synthetic_failures_do_not_set_the_threshold():
    """gt and degraded_* rows are left out of the fit: a degradation scored high changes nothing."""
    rows = cohort()
    base, _ = pass_threshold_label(rows, "predicted_dsc", 0.7, 0.8, 0.05)
    rows.loc[rows["source"] == "degraded_L1", "predicted_dsc"] = 0.79
    moved, _ = pass_threshold_label(rows, "predicted_dsc", 0.7, 0.8, 0.05)
    np.testing.assert_array_equal(moved, base)
    assert base.max() < 0.8


def test_too_few_failures_keep_the_configured_threshold_or_the_qc_models():
    rows = cohort(n_subjects=10)
    values, info = pass_threshold_label(rows, "predicted_dsc", 0.7, 0.8, 0.05)
    assert not info["fitted"] and (values == 0.8).all() and "10 labelled subjects with failures" in info["reason"]
    prior = {"score": "predicted_dsc", "threshold": 0.76}
    values, info = pass_threshold_label(rows, "predicted_dsc", 0.7, 0.8, 0.05, prior)
    assert (values == 0.76).all() and "QC model" in info["method"]
    # a threshold fitted on another score does not apply
    values, _ = pass_threshold_label(rows, "predicted_dsc", 0.7, 0.8, 0.05, {**prior, "score": "combined_dsc"})
    assert (values == 0.8).all()


def test_fixed_policy_and_per_label_fits():
    rows = pd.concat([cohort(), cohort(n_subjects=10).assign(label="tail")], ignore_index=True)
    fixed, info = pass_thresholds(rows, "predicted_dsc", 0.7, 0.8, None)
    assert (fixed == 0.8).all() and not info["all"]["fitted"]
    learned, info = pass_thresholds(rows, "predicted_dsc", 0.7, 0.8, 0.05)
    assert info["foreground"]["fitted"] and not info["tail"]["fitted"]
    assert (learned[rows["label"] == "tail"] == 0.8).all() and (learned[rows["label"] == "foreground"] < 0.8).all()


def test_verdicts_and_qc_pass_use_each_rows_threshold():
    rows = pd.DataFrame({"cohort": "c", "source": "net", "subject": ["a", "b"], "label": "foreground",
                         "predicted_dsc": [0.78, 0.78], "real_dsc": [0.85, 0.85], "cand_voxels": 100,
                         "pgt_voxels": 100, "uncertainty": 0.0, "n_slices": 3, "flag_hd95_undefined": False,
                         "flag_ravd_undefined": False, "baseline_vae_recon_dsc": 0.8})
    decided = apply_verdicts(rows, 0.8, VerdictThresholds(), "nnqc", pd.Series([0.77, 0.8]))
    assert decided["verdict"].tolist() == ["PASS", "REVIEW"]
    assert decided["qc_pass"].tolist() == [True, False]
    assert decided["pass_threshold"].tolist() == [0.77, 0.8]
    assert "< 0.80" in decided["verdict_reason"].iloc[1]


def test_the_exchangeable_unit_is_the_subject():
    """Two failures of one subject count once (its highest score): 10 subjects with two failures each are too few
    for a 95 % bound; 20 subjects bound the highest failure of each."""
    rows = cohort(n_subjects=10)
    doubled = pd.concat([rows, rows[rows["source"] == "bad_net"].assign(source="bad_net_2")], ignore_index=True)
    _, info = pass_threshold_label(doubled, "predicted_dsc", 0.7, 0.8, 0.05)
    assert info["failures"] == 20 and info["subjects_with_failures"] == 10 and not info["fitted"]
    rows = cohort(n_subjects=20)
    second = rows[rows["source"] == "bad_net"].assign(source="bad_net_2", predicted_dsc=0.4)
    values, info = pass_threshold_label(pd.concat([rows, second], ignore_index=True), "predicted_dsc", 0.7, 0.8, 0.05)
    base, _ = pass_threshold_label(rows, "predicted_dsc", 0.7, 0.8, 0.05)
    np.testing.assert_array_equal(values[: len(rows)], base)  # a lower second failure changes no bar
