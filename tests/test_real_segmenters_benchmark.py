"""The split and summarising functions of benchmarks/real_segmenters.py on tiny synthetic tables (no training, no
snakemake run)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import load_benchmark

from nnqc_pipe.data.io import write_parquet
from nnqc_pipe.qc.decisions import VerdictThresholds
from nnqc_pipe.report.methods import build_methods
from nnqc_pipe.report.tables import verdict_shares

rs = load_benchmark("real_segmenters")

# source -> (real DSC of subject i, offset of nnQC's prediction from it); the offsets never reorder two sources
SOURCES = {
    "gt": (lambda i: 1.0, -0.03),
    "degraded_L1": (lambda i: 0.08 + 0.01 * i, 0.02),
    "degraded_L5": (lambda i: 0.86 + 0.015 * i, -0.02),
    "unet_bad": (lambda i: 0.30 + 0.05 * i, 0.01),
    "unet_good": (lambda i: 0.74 + 0.02 * i, -0.01),
    "atlas": (lambda i: 0.60 + 0.02 * i, 0.0),
}


def verdict_of(predicted: float) -> str:
    return "PASS" if predicted >= 0.8 else "REVIEW" if predicted >= 0.7 else "FAIL"


def subjects_table(n_subjects: int = 6) -> pd.DataFrame:
    """A subjects.parquet-like table: foreground rows of every source plus class rows that must be ignored."""
    rows = []
    for i in range(n_subjects):
        for source, (real_of, offset) in SOURCES.items():
            real = real_of(i)
            predicted = real + offset
            for label in ("foreground", "anterior"):
                rows.append({"cohort": "syn", "source": source, "subject": f"s{i}", "label": label,
                             "predicted_dsc": predicted, "real_dsc": real, "calibrated_dsc": real + offset / 2,
                             "baseline_agreement_dsc": 0.9 - 0.1 * abs(real - 0.8) if label == "foreground" else 0.0,
                             "baseline_vae_recon_dsc": 0.95 - 0.2 * (1 - real),
                             "verdict": verdict_of(predicted), "n_slices": 4, "cand_voxels": 100,
                             "pgt_voxels": 100, "uncertainty": 0.01, "flag_hd95_undefined": False,
                             "flag_ravd_undefined": False})
    return pd.DataFrame(rows)


def test_patient_of_strips_the_acdc_frame_only():
    assert rs.patient_of("patient004_frame01") == "patient004"
    assert rs.patient_of("patient004_frame15") == "patient004"
    assert rs.patient_of("hippocampus_014") == "hippocampus_014"


def test_split_patients_is_seeded_disjoint_and_complete():
    patients = [f"p{i:02d}" for i in range(10)] + ["p00"]  # a patient named twice (two frames) counts once
    train, qc = rs.split_patients(patients, 4, None, seed=3)
    assert (train, qc) == rs.split_patients(list(reversed(patients)), 4, None, seed=3)
    assert len(train) == 4 and len(qc) == 6 and not set(train) & set(qc)
    assert sorted(train + qc) == sorted(set(patients)) and train == sorted(train)
    assert rs.split_patients(patients, 4, None, seed=4) != (train, qc)
    _, few = rs.split_patients(patients, 4, 2, seed=3)
    assert len(few) == 2 and set(few) <= set(qc)
    with pytest.raises(ValueError):
        rs.split_patients(patients, 10, None, seed=3)


def test_unet_grid_fits_every_shape_and_divides_by_the_strides():
    cohort = rs.COHORTS["hippocampus"]
    assert rs.unet_grid([(40, 58, 44), (32, 43, 27)], cohort.downsample, cohort.strides) == (40, 64, 48)
    acdc = rs.COHORTS["acdc"]
    assert rs.unet_grid([(216, 256, 13), (184, 220, 6)], acdc.downsample, acdc.strides) == (224, 256, 16)


def test_predictor_table_reads_the_board_and_side_by_side_columns():
    table = rs.predictor_table(build_methods(subjects_table(), fail_dsc=0.7), None)
    assert "best_real" not in set(table["source"]) and set(table["label"]) == {"foreground"}
    dsc = table[table["metric"] == "dsc"]
    assert list(dsc["source"][:3]) == ["all", "all_real", "all_degraded"]
    row = dsc.set_index("source")
    assert row.loc["all_real", "n"] == 18 and row.loc["all", "n"] == 36 and row.loc["all_degraded", "n"] == 12
    assert row.loc["unet_good", "mae"] == pytest.approx(0.01) and row.loc["unet_good", "bias"] == pytest.approx(-0.01)
    assert row.loc["unet_good", "pearson_r"] == pytest.approx(1.0)
    wide = rs.side_by_side(table).set_index("source")
    assert list(wide.index[:3]) == ["all", "all_real", "all_degraded"]
    expected = {"dsc_mae", "calibrated_dsc_failure_auc", "agreement_dsc_pearson_r", "vae_recon_dsc_mae"}
    assert expected <= set(wide.columns)
    assert wide.loc["unet_good", "calibrated_dsc_mae"] == pytest.approx(0.005)
    assert 0.0 <= wide.loc["all_real", "agreement_dsc_failure_auc"] <= 1.0


def test_gt_separation_counts_subjects_with_worse_sources():
    table = subjects_table(3)
    result = rs.gt_separation(table)
    assert result["mean"] == pytest.approx(0.97) and result["n_subjects"] == 3 and result["above_worse"] == 1.0
    beaten = table.copy()
    beaten.loc[(beaten["source"] == "atlas") & (beaten["subject"] == "s0"), "predicted_dsc"] = 0.99
    assert rs.gt_separation(beaten)["above_worse"] == pytest.approx(2 / 3)


def test_verdict_confusion_against_real_classes():
    conf = rs.verdict_confusion(subjects_table(2))
    counts = conf["counts"]
    assert conf["n"] == 12 and sum(sum(c.values()) for c in counts.values()) == 12
    # s0 unet_good: real 0.74, predicted 0.73 -> REVIEW in 0.7-0.8; s0 degraded_L5: real 0.86, predicted 0.84 -> PASS
    assert counts["REVIEW"]["0.7-0.8"] >= 1 and counts["PASS"][">=0.8"] >= 1
    diagonal = counts["PASS"][">=0.8"] + counts["REVIEW"]["0.7-0.8"] + counts["FAIL"]["<0.7"]
    assert conf["agreement"] == pytest.approx(diagonal / 12)
    assert list(rs.real_class(pd.Series([0.95, 0.8, 0.75, 0.7, 0.1]))) == [">=0.8", ">=0.8", "0.7-0.8", "0.7-0.8",
                                                                         "<0.7"]


def test_judge():
    assert rs.judge("real_mae", 0.03) == "PASS" and rs.judge("real_mae", 0.031) == "MISS"
    assert rs.judge("kendall_tau", 1.0) == "PASS" and rs.judge("kendall_tau", float("nan")) == "n/a"
    assert rs.judge("within_best_over_baselines", 0.0) == "MISS"


def write_report(report_dir: Path) -> None:
    subjects = subjects_table()
    meta = {"config_hash": "abc", "verdict_thresholds": {"fail_dsc": 0.7}, "model_card": {"preset": "cpu"}}
    write_parquet(subjects, report_dir / "subjects.parquet", meta)
    fg = subjects[subjects["label"] == "foreground"]
    means = fg.groupby("source")[["predicted_dsc", "real_dsc"]].mean()
    ranking = pd.DataFrame({
        "cohort": "syn", "source": means.index, "mean_predicted_dsc": means["predicted_dsc"].to_numpy(),
        "mean_real_dsc": means["real_dsc"].to_numpy(),
        "predicted_rank": means["predicted_dsc"].rank(ascending=False).astype("Int64").to_numpy(),
        "real_rank": means["real_dsc"].rank(ascending=False).astype("Int64").to_numpy(), "kendall_tau": 1.0})
    write_parquet(ranking, report_dir / "ranking.parquet", meta)
    selection = {"selection_real_dsc": 0.84, "best_single_source": "unet_good", "best_single_real_dsc": 0.855,
                 "oracle_real_dsc": 0.86, "n_evaluated": 6}
    write_parquet(pd.DataFrame({"subject": ["s0"]}), report_dir / "selection.parquet",
                  {**meta, "selection_summary": selection})


def test_summarise_and_targets_on_a_written_report(tmp_path):
    write_report(tmp_path)
    result = rs.summarise(tmp_path)
    checks = {(c["name"], c["predictor"]): c for c in result["targets"]}
    assert result["within_best_model"]["source"] == "unet_good"
    assert result["within_best_model"]["r"]["dsc"] == pytest.approx(1.0)
    assert checks[("gt_mean_predicted", "nnQC")]["verdict"] == "PASS"  # 0.97
    assert checks[("kendall_tau", "nnQC")]["verdict"] == "PASS"
    assert checks[("real_mae", "nnQC")]["value"] == pytest.approx((0.01 * 6 + 0 + 0.01 * 6) / 18)
    assert checks[("real_mae", "calibrated")]["verdict"] == "PASS"
    assert checks[("within_best_over_baselines", "nnQC")]["verdict"] == "PASS"
    assert checks[("degraded_hd95_r", "nnQC")]["verdict"] == "n/a"  # no HD95 in this table
    assert result["pairwise"]["dsc"]["accuracy"] == pytest.approx(1.0)
    assert result["source_tau"]["dsc"] == pytest.approx(1.0)
    assert result["selection"]["best_single_source"] == "unet_good"
    text = rs.format_report(result, {"real_dsc": {"unet_good": 0.855}, "seconds": {"unet": 12.0}})
    assert "all_real" in text and "Kendall tau = 1.000" in text and "unet_good 0.855" in text
    assert "MISS" in text or "PASS" in text


def test_summarise_reads_the_reports_methods_board(tmp_path):
    write_report(tmp_path)
    board = build_methods(subjects_table(), fail_dsc=0.7)
    mark = (board["method"] == "nnqc") & (board["pool"] == "all") & (board["label"] == "foreground")
    board.loc[mark, ["pairwise_accuracy", "kendall_tau"]] = [0.125, 0.25]
    write_parquet(board, tmp_path / "methods.parquet")
    result = rs.summarise(tmp_path)
    assert result["pairwise"]["dsc"]["accuracy"] == 0.125 and result["source_tau"]["dsc"] == 0.25


def test_review_shares_read_the_boards_verdict_columns():
    table = subjects_table()
    board = build_methods(table, 0.7, verdict_shares(table, 0.8, VerdictThresholds()))
    shares = rs.review_shares(board, table, 0.8, 0.7)
    nnqc = shares["dsc"]
    # real models: unet_good 0.74..0.84, unet_bad 0.30..0.55 and atlas 0.60..0.70
    assert nnqc["n_failures"] == 11 and nnqc["failures_flagged"] == 1.0  # atlas s5 is exactly 0.70
    assert nnqc["n_good"] in (2, 3) and 0.0 <= nnqc["good_flagged"] <= 1.0
    assert "learned_dsc" not in shares  # no learned column in this table


def test_error_map_scores_against_hand_made_masks(tmp_path):
    def save(path, array):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array.astype(np.uint8), np.eye(4)), path)

    truth = np.zeros((12, 12, 12), np.uint8)
    truth[2:8, 2:8, 2:8] = 1
    cand = truth.copy()
    cand[2:4, 2:8, 2:8] = 0          # a missed slab of 72 voxels (a real error region)
    reference = truth.copy()
    reference[9:11, 9:11, 9:11] = 1  # the reference also invents an 8-voxel region (too small to count at 10)
    save(tmp_path / "gt" / "s0.nii.gz", truth)
    save(tmp_path / "unet_good" / "s0.nii.gz", cand)
    save(tmp_path / "ref" / "unet_good" / "s0.nii.gz", reference)
    rows = pd.DataFrame({"source": ["unet_good"], "subject": ["s0"], "label": ["foreground"], "real_dsc": [0.8]})
    scores = rs.error_map_scores(rows, {"unet_good": str(tmp_path / "unet_good" / "{subject}.nii.gz")},
                                 str(tmp_path / "gt" / "{subject}.nii.gz"),
                                 {"learned": str(tmp_path / "ref" / "{source}" / "{subject}.nii.gz")}, 10)
    learned = scores["learned"]
    assert learned["region_recall"] == 1.0 and learned["n_real_regions"] == 1
    assert learned["region_precision"] == 1.0 and learned["n_predicted_regions"] == 1
    assert learned["voxel_dice"] == pytest.approx(2 * 72 / (72 + 80))
