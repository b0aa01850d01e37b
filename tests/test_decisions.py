"""Unit tests of nnqc_pipe.qc.decisions on tiny hand-made tables and arrays."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from nnqc_pipe.qc.decisions import (
    VerdictThresholds,
    assign_verdicts,
    error_regions,
    exclusions_table,
    failure_detection,
    review_slices,
    risk_coverage_curve,
    select_sources,
    selection_summary,
)

# ---------------------------------------------------------------------------------------------------------------------
# failure detection
# ---------------------------------------------------------------------------------------------------------------------


def test_failure_auc_is_one_when_predictions_separate_failures_and_zero_when_inverted():
    real = [0.9, 0.85, 0.5, 0.4]
    perfect = failure_detection([0.9, 0.8, 0.6, 0.5], real)
    inverted = failure_detection([0.5, 0.6, 0.8, 0.9], real)
    assert perfect["failure_auc"] == 1.0
    assert inverted["failure_auc"] == 0.0
    assert (perfect["n"], perfect["n_fail"]) == (4, 2)
    assert perfect["sensitivity"] == perfect["specificity"] == perfect["accuracy"] == 1.0
    assert inverted["sensitivity"] == inverted["specificity"] == 0.0
    assert perfect["spearman_rho"] == pytest.approx(1.0)
    assert inverted["spearman_rho"] == pytest.approx(-1.0)
    assert perfect["bias"] == pytest.approx(np.mean([0.0, -0.05, 0.1, 0.1]))


def test_failure_detection_uses_only_finite_pairs_and_decision_threshold():
    predicted = [0.9, np.nan, 0.72, 0.65, 0.3]
    real = [0.95, 0.2, 0.6, 0.8, np.nan]
    default = failure_detection(predicted, real)  # pairs (0.9, 0.95), (0.72, 0.6), (0.65, 0.8)
    assert default["n"] == 3 and default["n_fail"] == 1
    assert default["sensitivity"] == 0.0  # 0.72 is not < 0.7
    assert default["specificity"] == 0.5  # 0.65 flagged but did not fail
    stricter = failure_detection(predicted, real, decision_dsc=0.75)
    assert stricter["sensitivity"] == 1.0
    assert stricter["accuracy"] == pytest.approx(2 / 3)


def test_failure_detection_decision_tie_is_not_flagged():
    result = failure_detection([0.7, 0.9], [0.5, 0.9], fail_dsc=0.7)
    assert result["sensitivity"] == 0.0  # predicted == threshold is not "below"
    assert result["specificity"] == 1.0


def test_failure_detection_without_ground_truth_is_all_nan():
    result = failure_detection([0.9, 0.5, 0.7], [np.nan] * 3)
    assert result["n"] == 0 and result["n_fail"] == 0
    for key in ("failure_auc", "sensitivity", "specificity", "accuracy", "bias", "spearman_rho", "aurc"):
        assert math.isnan(result[key]), key
    assert risk_coverage_curve([0.9], [np.nan]).empty


def test_failure_detection_single_class_gives_nan_auc_but_defined_rates():
    all_pass = failure_detection([0.9, 0.85, 0.95], [0.9, 0.8, 0.92])
    assert math.isnan(all_pass["failure_auc"])
    assert math.isnan(all_pass["sensitivity"])  # no failure to detect
    assert all_pass["specificity"] == 1.0
    assert all_pass["aurc"] == 0.0
    all_fail = failure_detection([0.3, 0.5, 0.6], [0.2, 0.4, 0.5])
    assert math.isnan(all_fail["failure_auc"]) and math.isnan(all_fail["specificity"])
    assert all_fail["sensitivity"] == 1.0
    assert all_fail["aurc"] == 1.0


def test_spearman_needs_three_varying_pairs():
    assert math.isnan(failure_detection([0.9, 0.5], [0.8, 0.4])["spearman_rho"])
    assert math.isnan(failure_detection([0.8, 0.8, 0.8], [0.9, 0.5, 0.6])["spearman_rho"])


def test_aurc_of_perfect_ranking_is_below_random_rankings():
    rng = np.random.default_rng(0)
    real = rng.uniform(0.3, 1.0, 40)
    perfect = failure_detection(real, real)["aurc"]
    shuffled = [failure_detection(rng.permutation(real), real)["aurc"] for _ in range(20)]
    assert perfect < min(shuffled)
    assert perfect < failure_detection(-real, real)["aurc"]


def test_risk_coverage_curve_values_and_tie_invariance():
    curve = risk_coverage_curve([0.9, 0.8, 0.6], [0.9, 0.5, 0.8], fail_dsc=0.7)
    assert curve["coverage"].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert curve["risk"].tolist() == pytest.approx([0.0, 0.5, 1 / 3])
    # A tie between a failure and a success: expected order, whichever comes first in the input.
    a = risk_coverage_curve([0.5, 0.5, 0.9], [0.9, 0.5, 0.95])
    b = risk_coverage_curve([0.5, 0.9, 0.5], [0.5, 0.95, 0.9])
    pd.testing.assert_frame_equal(a, b)
    assert a["risk"].tolist() == pytest.approx([0.0, 0.25, 1 / 3])


# ---------------------------------------------------------------------------------------------------------------------
# verdicts
# ---------------------------------------------------------------------------------------------------------------------


def _subjects(rows: list[dict]) -> pd.DataFrame:
    """A subjects table with defaults for the columns a row does not set."""
    base = {
        "cohort": "c",
        "source": "unet",
        "label": "foreground",
        "uncertainty": 0.01,
        "flag_low_dsc_outlier": False,
        "flag_high_hd95_outlier": False,
        "flag_out_of_distribution": False,
        "ood_reason": "",
    }
    return pd.DataFrame([{**base, **row} for row in rows])


def test_verdicts_and_reasons_for_each_cause():
    table = _subjects(
        [
            {"subject": "pass", "predicted_dsc": 0.9},
            {"subject": "low", "predicted_dsc": 0.62},
            {"subject": "mid", "predicted_dsc": 0.75},
            {"subject": "hd95", "predicted_dsc": 0.9, "flag_high_hd95_outlier": True},
            {"subject": "dscout", "predicted_dsc": 0.9, "flag_low_dsc_outlier": True},
            {"subject": "ood", "predicted_dsc": 0.9, "flag_out_of_distribution": True, "ood_reason": "MRI contrast"},
            {"subject": "unsure", "predicted_dsc": 0.9, "uncertainty": 0.15},
            {"subject": "none", "predicted_dsc": np.nan},
            {"subject": "both", "predicted_dsc": 0.62, "flag_high_hd95_outlier": True},
        ]
    )
    out = assign_verdicts(table, VerdictThresholds()).set_index("subject")
    assert out["verdict"].to_dict() == {
        "pass": "PASS",
        "low": "FAIL",
        "mid": "REVIEW",
        "hd95": "REVIEW",
        "dscout": "REVIEW",
        "ood": "REVIEW",
        "unsure": "REVIEW",
        "none": "REVIEW",
        "both": "FAIL",
    }
    reason = out["verdict_reason"]
    assert reason["low"] == "predicted DSC 0.62 < 0.70"
    assert reason["mid"] == "predicted DSC 0.75 < 0.80"
    assert reason["hd95"] == "HD95 outlier for source unet"
    assert reason["dscout"] == "low DSC outlier for source unet"
    assert reason["ood"] == "out of distribution (MRI contrast)"
    assert reason["unsure"] == "uncertainty 0.15 > 0.10"
    assert reason["none"] == "no prediction"
    assert reason["both"] == "predicted DSC 0.62 < 0.70; HD95 outlier for source unet"
    assert "no warning" in reason["pass"]
    assert out["risk"].between(0, 1).all()
    assert out.loc["low", "risk"] == 1.0
    assert out.loc["pass", "risk"] < out.loc["hd95", "risk"] < VerdictThresholds().fail_risk
    assert len(out) == len(table) and "predicted_dsc" in out  # input columns kept


def test_verdict_ties_at_thresholds():
    t = VerdictThresholds()
    table = _subjects(
        [
            {"subject": "at_pass", "predicted_dsc": t.pass_dsc, "uncertainty": t.review_uncertainty},
            {"subject": "at_fail", "predicted_dsc": t.fail_dsc},
            {"subject": "near_pass", "predicted_dsc": 0.7996},
        ]
    )
    out = assign_verdicts(table, t).set_index("subject")
    assert out.loc["at_pass", "verdict"] == "REVIEW"  # not below pass_dsc, uncertainty not above, but risk 0.25
    assert out.loc["at_pass", "verdict_reason"] == "risk 0.25 ≥ 0.25"
    assert out.loc["at_fail", "verdict"] == "FAIL"  # full shortfall at fail_dsc: risk 1
    assert out.loc["at_fail", "verdict_reason"] == "predicted DSC 0.70 < 0.80; risk 1.00 ≥ 0.90"
    assert out.loc["near_pass", "verdict_reason"] == "predicted DSC 0.7996 < 0.80"


def test_concurring_warnings_fail_a_borderline_but_only_review_a_good_prediction():
    warnings = {
        "flag_low_dsc_outlier": True,
        "flag_high_hd95_outlier": True,
        "flag_out_of_distribution": True,
        "uncertainty": 0.3,
    }
    table = _subjects(
        [
            {"subject": "borderline", "predicted_dsc": 0.75, **warnings},
            {"subject": "good", "predicted_dsc": 0.95, **warnings},
        ]
    )
    out = assign_verdicts(table).set_index("subject")
    assert out.loc["borderline", "verdict"] == "FAIL"
    assert out.loc["borderline", "verdict_reason"].endswith("risk 0.91 ≥ 0.90")
    assert out.loc["good", "verdict"] == "REVIEW"
    assert "risk" not in out.loc["good", "verdict_reason"]
    assert out.loc["good", "verdict_reason"].count(";") == 3  # four causes


def test_all_pass_all_fail_and_missing_optional_columns():
    minimal = pd.DataFrame({"subject": ["a", "b"], "source": "m", "label": "foreground", "predicted_dsc": [0.9, 0.95]})
    passed = assign_verdicts(minimal)
    assert (passed["verdict"] == "PASS").all()
    assert exclusions_table(passed).empty
    failed = assign_verdicts(minimal.assign(predicted_dsc=[0.1, 0.5]))
    assert (failed["verdict"] == "FAIL").all()
    assert len(exclusions_table(failed)) == 2


def test_verdicts_do_not_depend_on_row_order():
    table = _subjects(
        [
            {"subject": f"s{i}", "predicted_dsc": d, "uncertainty": u}
            for i, (d, u) in enumerate([(0.9, 0.3), (0.6, 0.0), (0.78, 0.05)])
        ]
    )
    forward = assign_verdicts(table).set_index("subject").sort_index()
    backward = assign_verdicts(table.iloc[::-1]).set_index("subject").sort_index()
    pd.testing.assert_frame_equal(forward, backward)


def test_thresholds_validate():
    with pytest.raises(ValueError):
        VerdictThresholds(fail_dsc=0.9, pass_dsc=0.8)
    with pytest.raises(ValueError):
        VerdictThresholds(review_risk=0.6, fail_risk=0.5)


def test_exclusions_table_orders_by_risk_then_keys():
    table = _subjects(
        [
            {"subject": "b", "predicted_dsc": 0.5},
            {"subject": "a", "predicted_dsc": 0.6},
            {"subject": "c", "predicted_dsc": 0.75},
            {"subject": "d", "predicted_dsc": 0.95},
        ]
    )
    excluded = exclusions_table(assign_verdicts(table))
    assert excluded.columns.tolist() == ["subject", "source", "label", "verdict", "risk", "reason"]
    assert excluded["subject"].tolist() == ["a", "b", "c"]  # a and b tie at risk 1: by subject
    assert excluded["verdict"].tolist() == ["FAIL", "FAIL", "REVIEW"]


# ---------------------------------------------------------------------------------------------------------------------
# source selection
# ---------------------------------------------------------------------------------------------------------------------


def _candidates_table() -> pd.DataFrame:
    rows = [
        # subject s1: m_b and m_a tie on predicted DSC, m_b is less uncertain
        ("s1", "m_a", 0.85, 0.10, 0.80),
        ("s1", "m_b", 0.85, 0.02, 0.84),
        ("s1", "m_c", 0.70, 0.00, 0.90),
        ("s1", "gt", 0.99, 0.00, 1.00),
        ("s1", "degraded_L1", 0.95, 0.00, 0.95),
        # subject s2: complete tie, resolved by source name
        ("s2", "m_a", 0.80, 0.05, 0.70),
        ("s2", "m_b", 0.80, 0.05, 0.75),
        ("s2", "m_c", 0.60, 0.05, 0.65),
        # subject s3: every candidate below fail_dsc
        ("s3", "m_a", 0.50, 0.05, 0.40),
        ("s3", "m_b", 0.65, 0.05, 0.60),
        ("s3", "m_c", 0.40, 0.05, 0.45),
    ]
    table = pd.DataFrame(rows, columns=["subject", "source", "predicted_dsc", "uncertainty", "real_dsc"])
    other_label = table.assign(label="liver", predicted_dsc=0.1)
    return pd.concat([table.assign(label="foreground"), other_label], ignore_index=True).assign(cohort="c")


def test_select_sources_breaks_ties_and_skips_gt_and_synthetic_sources():
    selection = select_sources(_candidates_table()).set_index("subject")
    assert selection["selected_source"].to_dict() == {"s1": "m_b", "s2": "m_a", "s3": "m_b"}
    assert selection["runner_up_source"].to_dict() == {"s1": "m_a", "s2": "m_b", "s3": "m_a"}
    assert selection.loc["s1", "margin"] == 0.0
    assert selection.loc["s3", "margin"] == pytest.approx(0.15)
    assert (selection["n_candidates"] == 3).all()
    assert selection.loc["s1", "real_dsc"] == 0.84
    assert selection["all_failed"].to_dict() == {"s1": False, "s2": False, "s3": True}
    assert selection["cohort"].eq("c").all()


def test_select_sources_single_candidate_has_nan_margin():
    table = _candidates_table()
    selection = select_sources(table, exclude_sources=("gt", "m_a", "m_b"))
    assert (selection["selected_source"] == "m_c").all()
    assert selection["margin"].isna().all() and selection["runner_up_source"].isna().all()


def test_select_sources_falls_back_to_pgt_when_all_candidates_fail():
    selection = select_sources(_candidates_table(), use_pgt_when_all_fail=True).set_index("subject")
    assert selection.loc["s3", "selected_source"] == "pgt"
    assert selection.loc["s3", "runner_up_source"] == "m_b"
    assert bool(selection.loc["s3", "all_failed"])
    assert math.isnan(selection.loc["s3", "margin"]) and math.isnan(selection.loc["s3", "real_dsc"])
    assert selection.loc["s1", "selected_source"] == "m_b"
    strict = select_sources(_candidates_table(), use_pgt_when_all_fail=True, fail_dsc=0.81)
    assert strict.set_index("subject")["selected_source"].to_dict() == {"s1": "m_b", "s2": "pgt", "s3": "pgt"}


def test_selection_summary_compares_with_best_single_source_and_oracle():
    table = _candidates_table()
    selection = select_sources(table, use_pgt_when_all_fail=True)
    summary = selection_summary(table, selection)
    # evaluated: s1 (m_b 0.84) and s2 (m_a 0.70); s3 fell back to the pGT
    assert (summary["n_subjects"], summary["n_evaluated"], summary["n_pgt_fallback"]) == (3, 2, 1)
    assert summary["selection_real_dsc"] == pytest.approx(0.77)
    assert summary["best_single_source"] == "m_b"  # (0.84 + 0.75) / 2 beats m_c (0.90 + 0.65) / 2 and m_a
    assert summary["best_single_real_dsc"] == pytest.approx(0.795)
    assert summary["oracle_real_dsc"] == pytest.approx((0.90 + 0.75) / 2)  # gt and degraded_L1 are no candidates


def test_sources_without_ground_truth_give_nan_summary():
    table = _candidates_table().assign(real_dsc=np.nan)
    selection = select_sources(table)
    assert selection["real_dsc"].isna().all()
    summary = selection_summary(table, selection)
    assert summary["n_evaluated"] == 0 and summary["best_single_source"] is None
    for key in ("selection_real_dsc", "best_single_real_dsc", "oracle_real_dsc"):
        assert math.isnan(summary[key]), key
    no_column = table.drop(columns="real_dsc")
    assert "real_dsc" not in select_sources(no_column)
    assert math.isnan(selection_summary(no_column, select_sources(no_column))["oracle_real_dsc"])


# ---------------------------------------------------------------------------------------------------------------------
# where to look
# ---------------------------------------------------------------------------------------------------------------------


def test_review_slices_ranks_flagged_rows_by_risk_then_slice_priority():
    verdicts = assign_verdicts(
        _subjects(
            [
                {"subject": "ok", "predicted_dsc": 0.95},
                {"subject": "bad", "predicted_dsc": 0.5},
                {"subject": "meh", "predicted_dsc": 0.75},
            ]
        )
    )
    slices = pd.DataFrame(
        {
            "cohort": "c",
            "source": "unet",
            "label": "foreground",
            "subject": ["ok"] * 2 + ["meh"] * 3 + ["bad"] * 4,
            "slice_index": [0, 1, 0, 1, 2, 0, 1, 2, 3],
            "predicted_dsc": [0.1, 0.2, 0.9, 0.5, 0.5, 0.2, 0.9, 0.0, 0.4],
            "uncertainty": [0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, np.nan],
            "slice_ratio": [0.0, 0.5, 0.0, 0.5, 1.0, 0.0, 0.33, 0.67, 1.0],
            "cand_voxels": [5, 5, 3, 3, 3, 4, 4, 0, 4],
            "pgt_voxels": [5, 5, 3, 3, 3, 4, 4, 0, 4],
        }
    )
    out = review_slices(slices, verdicts, max_slices_per_subject=2)
    assert out.columns.tolist() == [
        *["cohort", "source", "subject", "label"],
        *["slice_index", "slice_ratio", "predicted_dsc", "uncertainty", "priority", "rank"],
    ]
    assert "ok" not in set(out["subject"])
    assert list(zip(out["subject"], out["slice_index"], strict=True)) == [
        ("bad", 0),
        ("bad", 3),
        ("meh", 1),
        ("meh", 2),
    ]
    assert out["rank"].tolist() == [1, 2, 3, 4]
    assert out["priority"].tolist() == pytest.approx([0.8, 0.6, 0.6, 0.5])  # bad slice 2 is empty: skipped


def test_review_slices_empty_when_everything_passes():
    verdicts = assign_verdicts(_subjects([{"subject": "ok", "predicted_dsc": 0.95}]))
    slices = pd.DataFrame(
        {"cohort": "c", "source": "unet", "label": "foreground", "subject": ["ok"], "slice_index": [0]}
        | {"predicted_dsc": [0.1], "uncertainty": [0.0], "slice_ratio": [0.0], "cand_voxels": [1], "pgt_voxels": [1]}
    )
    out = review_slices(slices, verdicts)
    assert out.empty and "rank" in out


def test_error_regions_volumes_with_anisotropic_spacing_and_slice_ranges():
    error = np.zeros((6, 5, 5), dtype=np.uint8)
    error[1:4, 0:2, 0:2] = 2  # 12 missed voxels on slices 1..3 of axis 0
    error[4, 3, 3] = 2  # two voxels away from the block in-plane: a separate component
    error[5, 4, 4] = 2  # corner neighbour of (4, 3, 3): joined to it by 26-connectivity
    error[0, 4, 4] = 1  # one extra voxel
    error[2:4, 4, 0:3] = 1  # 6 extra voxels
    regions = error_regions(error, spacing=(3.0, 0.5, 0.5), slice_axis=0)
    assert regions.columns.tolist() == [
        "kind",
        "component",
        "volume_mm3",
        "n_voxels",
        "slice_first",
        "slice_last",
        "centroid_vox",
    ]
    assert list(zip(regions["kind"], regions["component"], regions["n_voxels"], strict=True)) == [
        ("missed", 1, 12),
        ("extra", 1, 6),
        ("missed", 2, 2),
        ("extra", 2, 1),
    ]
    assert regions["volume_mm3"].tolist() == pytest.approx([9.0, 4.5, 1.5, 0.75])
    assert regions[["slice_first", "slice_last"]].to_numpy().tolist() == [[1, 3], [2, 3], [4, 5], [0, 0]]
    assert regions.loc[0, "centroid_vox"] == pytest.approx([2.0, 0.5, 0.5])
    along_last = error_regions(error, spacing=(3.0, 0.5, 0.5), slice_axis=-1)
    assert along_last[["slice_first", "slice_last"]].to_numpy().tolist() == [[0, 1], [0, 2], [3, 4], [4, 4]]


def test_error_regions_empty_map_and_bad_spacing():
    assert error_regions(np.zeros((3, 3, 3), dtype=int), (1.0, 1.0, 1.0), 2).empty
    with pytest.raises(ValueError):
        error_regions(np.zeros((3, 3)), (1.0, 1.0, 1.0), 0)
