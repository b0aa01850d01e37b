"""Report aggregation on synthetic score tables: schema, agreement statistics, flags, ranking, metadata."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from nnqc_pipe.data.io import read_parquet_metadata, write_parquet
from nnqc_pipe.qc.calibration import PRIOR_METHOD
from nnqc_pipe.qc.columns import scores_schema
from nnqc_pipe.qc.metrics import FOREGROUND, METRICS
from nnqc_pipe.qc.score import score_rows
from nnqc_pipe.report.figures import plot_mae_per_level, plot_predicted_vs_real
from nnqc_pipe.report.tables import (
    ALL_DEGRADED,
    ALL_SOURCES,
    SUMMARY_SCHEMA,
    build_ranking,
    build_slices,
    build_subjects,
    build_summary,
    ranking_schema,
    slices_schema,
    subjects_schema,
    write_report,
)

COHORT = "demo"
N_SLICES = 4
LABELS = ("liver", FOREGROUND)
# Real foreground DSC of each source (its quality), best first.
SOURCE_QUALITY = {
    "gt": 1.0,
    "user_model": 0.9,
    "degraded_L5": 0.85,
    "degraded_L4": 0.6,
    "degraded_L3": 0.35,
    "degraded_L2": 0.17,
    "degraded_L1": 0.07,
}
METADATA = {"pipeline_version": "0.1.0", "config_hash": "abc123", "checkpoints": {"vae": "h1", "ldm": "h2"}}


def _metric_row(label: str, dsc: float, slice_index: int | None = None) -> dict:
    """A metrics.py-like row whose other metrics follow from the DSC (HD95 grows as DSC drops)."""
    row = {
        "label": label,
        "dsc": dsc,
        "hd95_mm": 20.0 * (1.0 - dsc),
        "nsd": dsc,
        "iou": dsc / (2.0 - dsc),
        "ravd": 1.0 - dsc,
        "cand_voxels": 100,
        "ref_voxels": 100,
        "hd95_undefined": False,
        "ravd_undefined": False,
    }
    return row if slice_index is None else {**row, "slice_index": slice_index}


def _rows(dsc: float) -> list[dict]:
    volume = [_metric_row(label, dsc) for label in LABELS]
    slices = [_metric_row(label, dsc, i) for label in LABELS for i in range(N_SLICES)]
    return volume + slices


def _scores(
    noise: float = 0.0,
    with_gt: bool = True,
    overrides: dict[tuple[str, str], float] | None = None,
    n_subjects: int = 6,
    seed: int = 0,
) -> pd.DataFrame:
    """Scores of every source × subject: predicted DSC = real DSC + noise, or the ``overrides`` value."""
    rng = np.random.default_rng(seed)
    frames = []
    for source, quality in SOURCE_QUALITY.items():
        for k in range(n_subjects):
            subject = f"sub{k:02d}"
            real = float(np.clip(quality - 0.01 * k, 0.0, 1.0))
            predicted = (overrides or {}).get((source, subject), real + noise * rng.standard_normal())
            frames.append(
                score_rows(
                    COHORT,
                    source,
                    subject,
                    _rows(float(np.clip(predicted, 0.0, 1.0))),
                    _rows(real) if with_gt else None,
                    slice_ratio=np.linspace(0.0, 1.0, N_SLICES),
                    uncertainty={(FOREGROUND, None): 0.1},
                )
            )
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------------
# Scores table
# ---------------------------------------------------------------------------------------------------


def test_score_rows_schema_and_levels() -> None:
    table = score_rows(COHORT, "gt", "s1", _rows(0.8), _rows(0.9), np.linspace(0, 1, N_SLICES),
                       {(FOREGROUND, None): 0.25, ("liver", 2): 0.5})
    schema = scores_schema()
    assert list(table.columns) == list(schema)
    assert {c: str(table[c].dtype) for c in schema if schema[c] != "str"} == {
        c: d for c, d in schema.items() if d != "str"
    }
    assert (table["level"] == "volume").sum() == len(LABELS)
    assert (table["level"] == "slice").sum() == len(LABELS) * N_SLICES
    volume = table[table["level"] == "volume"].set_index("label")
    assert volume["slice_index"].isna().all() and volume["slice_ratio"].isna().all()
    assert volume.loc[FOREGROUND, "predicted_dsc"] == 0.8 and volume.loc[FOREGROUND, "real_dsc"] == 0.9
    assert volume.loc[FOREGROUND, "uncertainty"] == 0.25 and math.isnan(volume.loc["liver", "uncertainty"])
    liver = table[(table["level"] == "slice") & (table["label"] == "liver")].set_index("slice_index")
    assert liver.loc[3, "slice_ratio"] == 1.0 and liver.loc[2, "uncertainty"] == 0.5


def test_score_rows_without_gt_keeps_schema() -> None:
    with_gt = score_rows(COHORT, "gt", "s1", _rows(0.8), _rows(0.9), None)
    without = score_rows(COHORT, "user", "s2", _rows(0.8), None, None)
    assert list(without.columns) == list(with_gt.columns)
    assert (without.dtypes == with_gt.dtypes).all()
    assert without[[f"real_{m}" for m in METRICS]].isna().all().all()
    assert not without["real_hd95_undefined"].any()
    assert without["gt_voxels"].isna().all()


def test_score_rows_rejects_mismatched_real_rows() -> None:
    with pytest.raises(ValueError, match="different"):
        score_rows(COHORT, "gt", "s1", _rows(0.8), _rows(0.9)[:-1], None)


# ---------------------------------------------------------------------------------------------------
# Subjects, slices
# ---------------------------------------------------------------------------------------------------


def test_subjects_and_slices_schema() -> None:
    scores = _scores(noise=0.02)
    subjects = build_subjects(scores, qc_pass_dsc=0.5)
    assert list(subjects.columns) == list(subjects_schema())
    assert len(subjects) == len(SOURCE_QUALITY) * 6 * len(LABELS)
    assert not subjects.duplicated(["cohort", "source", "subject", "label"]).any()
    assert (subjects["n_slices"] == N_SLICES).all()
    assert subjects.filter(like="flag_").dtypes.eq(bool).all() and subjects["qc_pass"].dtype == bool
    slices = build_slices(scores)
    assert list(slices.columns) == list(slices_schema())
    assert len(slices) == len(subjects) * N_SLICES
    assert not slices.duplicated(["cohort", "source", "subject", "label", "slice_index"]).any()
    assert slices["slice_ratio"].between(0, 1).all()


def test_qc_pass_threshold() -> None:
    subjects = build_subjects(_scores(), qc_pass_dsc=0.5)
    good = subjects["source"].isin(["gt", "user_model", "degraded_L5", "degraded_L4"])
    assert subjects.loc[good, "qc_pass"].all()
    assert not subjects.loc[~good, "qc_pass"].any()
    assert subjects.loc[~good, "flag_below_threshold"].all()


def test_tukey_flags_hit_planted_outlier() -> None:
    scores = _scores(overrides={("user_model", "sub03"): 0.2}, n_subjects=8)
    subjects = build_subjects(scores, qc_pass_dsc=0.1)
    fg = subjects[subjects["label"] == FOREGROUND]
    low = fg[fg["flag_low_dsc_outlier"]]
    high = fg[fg["flag_high_hd95_outlier"]]
    assert list(zip(low["source"], low["subject"], strict=True)) == [("user_model", "sub03")]
    assert list(zip(high["source"], high["subject"], strict=True)) == [("user_model", "sub03")]
    outlier = fg[(fg["source"] == "user_model") & (fg["subject"] == "sub03")].iloc[0]
    assert not outlier["flag_below_threshold"] and not outlier["qc_pass"]


# ---------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------


def test_summary_perfect_agreement() -> None:
    summary = build_summary(build_subjects(_scores(noise=0.0), qc_pass_dsc=0.5))
    assert list(summary.columns) == list(SUMMARY_SCHEMA)
    pooled = summary[summary["source"] == ALL_SOURCES].set_index(["label", "metric"])
    assert set(pooled.index.get_level_values("metric")) == set(METRICS)
    assert pooled.loc[(FOREGROUND, "dsc"), "pearson_r"] == pytest.approx(1.0)
    assert pooled.loc[(FOREGROUND, "hd95_mm"), "pearson_r"] == pytest.approx(1.0)
    assert pooled.loc[(FOREGROUND, "dsc"), "mae"] == pytest.approx(0.0, abs=1e-12)
    assert pooled.loc[(FOREGROUND, "dsc"), "n"] == len(SOURCE_QUALITY) * 6
    degraded = summary[(summary["source"] == ALL_DEGRADED) & (summary["metric"] == "dsc")]
    assert (degraded["n"] == 5 * 6).all()
    # Within one source the real DSC still varies (quality − 0.01·k), so r is defined.
    gt = summary[(summary["source"] == "gt") & (summary["metric"] == "dsc")]
    assert gt["pearson_r"].to_numpy() == pytest.approx(1.0)


def test_summary_mae_exact_and_small_samples() -> None:
    subjects = pd.DataFrame({
        "cohort": COHORT,
        "source": ["m", "m", "m", "few", "few"],
        "subject": ["a", "b", "c", "a", "b"],
        "label": FOREGROUND,
        "predicted_dsc": [0.9, 0.6, 0.5, 0.5, 0.6],
        "real_dsc": [0.8, 0.8, 0.2, 0.4, np.nan],
    })
    summary = build_summary(subjects).set_index("source")
    assert summary.loc["m", "n"] == 3
    assert summary.loc["m", "mae"] == pytest.approx(0.2)  # |0.1|, |−0.2|, |0.3|
    assert summary.loc["m", "mae_std"] == pytest.approx(0.1)
    assert summary.loc["few", "n"] == 1
    assert math.isnan(summary.loc["few", "pearson_r"]) and math.isnan(summary.loc["few", "mae_std"])
    assert summary.loc["few", "mae"] == pytest.approx(0.1)
    assert summary.loc[ALL_DEGRADED, "n"] == 0 and math.isnan(summary.loc[ALL_DEGRADED, "mae"])


# ---------------------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------------------


def test_ranking_agreeing_orders() -> None:
    table = build_ranking(build_subjects(_scores(noise=0.0), 0.5))
    assert list(table.columns) == list(ranking_schema("dsc"))
    ranking = table.set_index("source")
    expected = {source: i + 1 for i, source in enumerate(SOURCE_QUALITY)}
    assert ranking["predicted_rank"].to_dict() == expected
    assert ranking["real_rank"].to_dict() == expected
    assert ranking["kendall_tau"].to_numpy() == pytest.approx(1.0)
    hd95 = build_ranking(build_subjects(_scores(), 0.5), metric="hd95_mm").set_index("source")
    assert hd95["predicted_rank"].to_dict() == expected  # lower HD95 is better: same order


def test_ranking_disagreeing_orders() -> None:
    # The predictor thinks degraded_L1 is as good as the user model: the orders differ.
    overrides = {("degraded_L1", f"sub{k:02d}"): 0.95 for k in range(6)}
    ranking = build_ranking(build_subjects(_scores(overrides=overrides), 0.5)).set_index("source")
    assert ranking.loc["degraded_L1", "predicted_rank"] == 2
    assert ranking.loc["degraded_L1", "real_rank"] == len(SOURCE_QUALITY)
    assert ranking["kendall_tau"].iloc[0] < 1.0


def test_ranking_without_gt() -> None:
    ranking = build_ranking(build_subjects(_scores(with_gt=False), 0.5))
    assert ranking["real_rank"].isna().all() and ranking["mean_real_dsc"].isna().all()
    assert ranking["kendall_tau"].isna().all()
    assert ranking["predicted_rank"].notna().all()


# ---------------------------------------------------------------------------------------------------
# Writing the report and plots
# ---------------------------------------------------------------------------------------------------


def _write_scores(scores: pd.DataFrame, root: Path) -> list[Path]:
    paths = []
    for (source, subject), table in scores.groupby(["source", "subject"]):
        path = root / "scores" / str(source) / f"{subject}.parquet"
        write_parquet(table, path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("with_gt", [True, False], ids=["with-gt", "no-gt"])
def test_write_report_files_and_metadata(tmp_path: Path, with_gt: bool) -> None:
    paths = _write_scores(_scores(noise=0.03, with_gt=with_gt), tmp_path)
    write_report(paths, tmp_path / "report", COHORT, 0.5, METADATA)
    for name in ("subjects", "slices", "summary", "ranking", "methods"):
        meta = read_parquet_metadata(tmp_path / "report" / f"{name}.parquet")
        assert {k: meta[k] for k in METADATA} == METADATA
        assert meta["cohort"] == COHORT
    ranking_meta = read_parquet_metadata(tmp_path / "report" / "ranking.parquet")
    subjects = pd.read_parquet(tmp_path / "report" / "subjects.parquet")
    board = pd.read_parquet(tmp_path / "report" / "methods.parquet")
    board_meta = read_parquet_metadata(tmp_path / "report" / "methods.parquet")
    # calibrated_dsc needs labelled subjects; fail_dsc follows qc_pass_dsc 0.5 (default_thresholds)
    assert board_meta["methods"] == (["nnqc", "calibrated"] if with_gt else ["nnqc"])
    assert board_meta["fail_dsc"] == pytest.approx(0.4)
    if with_gt:
        assert 0.0 < ranking_meta["kendall_tau"] <= 1.0
        assert subjects["real_dsc"].notna().all()
        assert set(board["pool"]) == {"all", "all_real", "all_degraded", "best_real", *SOURCE_QUALITY}
        assert board_meta["note"] is None and (board["n"] > 0).all()
    else:
        assert ranking_meta["kendall_tau"] is None
        assert subjects["real_dsc"].isna().all() and subjects["real_dsc"].dtype == np.float64
        assert board.empty and "no labelled subject" in board_meta["note"]


def test_report_schema_independent_of_gt(tmp_path: Path) -> None:
    for name, with_gt in (("gt", True), ("nogt", False)):
        paths = _write_scores(_scores(with_gt=with_gt, n_subjects=3), tmp_path / name)
        write_report(paths, tmp_path / name / "report", COHORT, 0.5, METADATA)
    for table in ("subjects", "slices", "summary", "ranking", "methods"):
        schemas = [pq.read_schema(tmp_path / n / "report" / f"{table}.parquet") for n in ("gt", "nogt")]
        assert schemas[0].remove_metadata() == schemas[1].remove_metadata(), table


def _with_learned(scores: pd.DataFrame, wrong_source: str) -> pd.DataFrame:
    """Scores whose learned DSC is the real DSC, except ``wrong_source``'s, which the learned opinion calls 0.2."""
    out = scores.copy()
    out["learned_dsc"] = np.where(out["source"] == wrong_source, 0.2, out["real_dsc"])
    return out


def test_a_cohort_without_labels_applies_the_qc_models_fits(tmp_path: Path) -> None:
    """A qc_model cohort without ground truth: calibrated_dsc through the bundle's map, combined_dsc with its fusion
    (labels without a fit of their own stay as they would be: no map, the plain mean)."""
    scores = _scores(noise=0.02, with_gt=False)
    paths = _write_scores(scores.assign(learned_dsc=(scores["predicted_dsc"] - 0.1).clip(0, 1)), tmp_path)
    fits = {"calibration": {FOREGROUND: {"x": [0.0, 1.0], "y": [0.1, 0.9]}},
            "combined": {FOREGROUND: {"coefficients": {"predicted_dsc+learned_dsc": {
                "predicted_dsc": 0.25, "learned_dsc": 0.75, "intercept": 0.0, "rows": 50}}}},
            "pass_threshold": {FOREGROUND: {"score": "predicted_dsc", "threshold": 0.75}}}
    subjects = write_report(paths, tmp_path / "report", COHORT, 0.8, METADATA, methods=["nnqc", "learned"],
                            prior_fits=fits, max_missed_failures=0.05)["subjects"]
    assert subjects["real_dsc"].isna().all()
    fg, other = subjects[subjects["label"] == FOREGROUND], subjects[subjects["label"] != FOREGROUND]
    np.testing.assert_allclose(fg["calibrated_dsc"], 0.1 + 0.8 * fg["predicted_dsc"])
    np.testing.assert_allclose(fg["combined_dsc"], 0.25 * fg["predicted_dsc"] + 0.75 * fg["learned_dsc"])
    assert other["calibrated_dsc"].isna().all()
    np.testing.assert_allclose(other["combined_dsc"], (other["predicted_dsc"] + other["learned_dsc"]) / 2)
    meta = read_parquet_metadata(tmp_path / "report" / "subjects.parquet")
    assert meta["combined"][FOREGROUND]["method"] == meta["calibration"][FOREGROUND]["method"] == PRIOR_METHOD
    # the bundle's pass threshold (fitted on the verdict score, nnQC's) for the foreground, qc_pass_dsc elsewhere
    assert (fg["pass_threshold"] == 0.75).all() and (other["pass_threshold"] == 0.8).all()
    assert meta["pass_threshold"][FOREGROUND]["method"] == PRIOR_METHOD
    assert fg["verdict_score"].between(0.75, 0.8, inclusive="left").any()
    assert (fg["flag_below_threshold"] == (fg["verdict_score"] < 0.75)).all()


def test_verdict_score_chooses_the_opinion_the_verdicts_act_on(tmp_path: Path) -> None:
    scores = _with_learned(_scores(noise=0.0), wrong_source="user_model")
    paths = _write_scores(scores, tmp_path)
    by_score = {}
    for score in ("nnqc", "learned", "combined"):
        tables = write_report(paths, tmp_path / score, COHORT, 0.8, METADATA, verdict_score=score)
        subjects = tables["subjects"].set_index(["source", "subject", "label"])
        by_score[score] = subjects
        meta = read_parquet_metadata(tmp_path / score / "subjects.parquet")
        assert meta["verdict_score"]["score"] == score and meta["combined"]["foreground"]["fitted"]
    key = ("user_model", "sub00", FOREGROUND)
    assert by_score["nnqc"].loc[key, "verdict_score"] == pytest.approx(0.9)
    assert by_score["nnqc"].loc[key, "verdict"] != "FAIL"
    assert by_score["learned"].loc[key, "verdict_score"] == pytest.approx(0.2)
    assert by_score["learned"].loc[key, "verdict"] == "FAIL"
    # The combined score is fitted out of fold on the labelled rows: between the two opinions for this source.
    assert 0.2 <= by_score["combined"].loc[key, "combined_dsc"] <= 0.95
    np.testing.assert_allclose(by_score["combined"]["verdict_score"], by_score["combined"]["combined_dsc"])


def test_verdict_score_without_its_values_is_refused(tmp_path: Path) -> None:
    paths = _write_scores(_scores(n_subjects=2), tmp_path)
    with pytest.raises(ValueError, match="no learned_dsc values"):
        write_report(paths, tmp_path / "report", COHORT, 0.5, METADATA, verdict_score="learned")


def test_methods_left_out_leave_no_column(tmp_path: Path) -> None:
    """The config's methods: an opinion left out has no column in any table and no row on the board."""
    paths = _write_scores(_with_learned(_scores(noise=0.02), wrong_source="user_model"), tmp_path)
    full = write_report(paths, tmp_path / "full", COHORT, 0.8, METADATA)
    assert {"learned_dsc", "combined_dsc", "baseline_vae_recon_dsc"} <= set(full["subjects"].columns)
    assert {"learned", "combined"} <= set(full["methods"]["method"])
    only = write_report(paths, tmp_path / "nnqc", COHORT, 0.8, METADATA, methods=["nnqc"])
    opinions = {"learned_dsc", "learned_nsd", "combined_dsc", "baseline_vae_recon_dsc", "baseline_agreement_dsc"}
    for name in ("subjects", "slices"):
        assert not opinions & set(pd.read_parquet(tmp_path / "nnqc" / f"{name}.parquet").columns), name
    assert set(only["methods"]["method"]) == {"nnqc", "calibrated"}
    assert not {"learned_dsc", "combined_dsc"} & set(only["summary"]["metric"])
    with pytest.raises(ValueError, match="needs its opinion in methods"):
        write_report(paths, tmp_path / "refused", COHORT, 0.8, METADATA, verdict_score="combined",
                     methods=["nnqc"])
    with pytest.raises(ValueError, match="needs its opinion in methods"):
        write_report(paths, tmp_path / "refused", COHORT, 0.8, METADATA, verdict_score="learned",
                     methods=["nnqc", "agreement"])
    # An opinion left out of methods is not fused although the scores have it: here the learned DSC, leaving nnQC
    # alone (these scores have no VAE reconstruction values), so nothing is fused.
    fused = write_report(paths, tmp_path / "fused", COHORT, 0.8, METADATA, methods=["nnqc", "vae_recon"])
    info = read_parquet_metadata(tmp_path / "fused" / "subjects.parquet")["combined"]
    assert "learned_dsc" not in fused["subjects"] and fused["subjects"]["combined_dsc"].isna().all()
    assert info["all"]["reason"] == "fewer than two opinions to fuse (['predicted_dsc'])"


def test_write_report_rejects_other_cohort(tmp_path: Path) -> None:
    paths = _write_scores(_scores(n_subjects=1), tmp_path)
    with pytest.raises(ValueError, match="other cohorts"):
        write_report(paths, tmp_path / "report", "another", 0.5, METADATA)


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_plots_are_written(tmp_path: Path, suffix: str) -> None:
    subjects = build_subjects(_scores(noise=0.05, n_subjects=3), 0.5)
    plot_predicted_vs_real(subjects, "dsc", tmp_path / f"scatter.{suffix}")
    plot_mae_per_level(build_summary(subjects), tmp_path / f"mae.{suffix}")
    assert (tmp_path / f"scatter.{suffix}").stat().st_size > 0
    assert (tmp_path / f"mae.{suffix}").stat().st_size > 0
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
