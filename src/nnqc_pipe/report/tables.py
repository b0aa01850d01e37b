"""Aggregation of per-subject scores into the Parquet report tables and the decisions built on them.

Input: one scores table per (source, subject), ``scores/{source}/{subject}.parquet``, built by
:func:`nnqc_pipe.qc.score.score_rows` from :mod:`nnqc_pipe.qc.metrics` rows (columns and typing:
:mod:`nnqc_pipe.qc.columns`). ``predicted_<metric>`` scores the candidate against the pseudo ground truth (what nnQC
predicts), ``real_<metric>`` against the ground truth (NaN when the subject has none). Output (schema in
docs/report.md): ``subjects``, ``slices``, ``summary``, ``ranking``, ``selection`` and ``review`` tables and
``exclusions.tsv``, each Parquet file written with the caller's provenance metadata (pipeline version, config and
checkpoint hashes).

Rules:

- **Outliers** (per cohort, source and label, over subjects): Tukey fences on the *predicted* scores,
  ``flag_low_dsc_outlier`` = DSC < Q1 − 1.5·IQR, ``flag_high_hd95_outlier`` = HD95 > Q3 + 1.5·IQR.
- **qc_pass** (per row, i.e. per subject and label): verdict score ≥ the row's ``pass_threshold`` (``qc_pass_dsc``,
  or lower where the labelled failures justify it: :func:`nnqc_pipe.qc.calibration.pass_thresholds`) and neither
  outlier flag.
  The ``foreground`` row is the subject-level verdict; class rows judge each structure. An undefined HD95
  alone does not fail a row (both masks empty gives DSC 1; one empty gives DSC 0, which fails).
- **Summary pools**: ``all`` = every source (only subjects with both predicted and real finite values count,
  so sources without ground truth add nothing); ``all_degraded`` = the ``degraded_*`` sources only, the
  controlled benchmark of the paper. ``mae_std`` is the sample standard deviation of the absolute errors.
- **Ranking**: sources ranked by the mean predicted score over all their subjects and by the mean real score
  over subjects with ground truth (1 = best, direction from :data:`nnqc_pipe.qc.metrics.HIGHER_IS_BETTER`);
  Kendall τ between the two over the sources that have both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nnqc_pipe.data.io import atomic_path, concat_parquet, write_parquet
from nnqc_pipe.qc.baselines import AGREEMENT_COLUMN, LATENT_SEARCH_COLUMN, VAE_RECON_COLUMN
from nnqc_pipe.qc.calibration import (
    CALIBRATED_COLUMN,
    COMBINED_COLUMN,
    PASS_THRESHOLD_COLUMN,
    calibrate,
    combine,
    pass_thresholds,
)
from nnqc_pipe.qc.columns import (
    COUNT_COLUMNS,
    FAILURE_COLUMNS,
    ID_COLUMNS,
    LEARNED_COLUMNS,
    PREDICTED,
    REAL,
    metric_names,
    pair_columns,
    typed,
)
from nnqc_pipe.qc.decisions import (
    VerdictThresholds,
    assign_verdicts,
    default_thresholds,
    exclusions_table,
    failure_detection,
    review_slices,
    select_sources,
    selection_summary,
)
from nnqc_pipe.qc.learned import LEARNED_DSC
from nnqc_pipe.qc.metrics import FLAGS, FOREGROUND, HIGHER_IS_BETTER, METRICS
from nnqc_pipe.qc.ood import ood_table
from nnqc_pipe.report.methods import (
    ALL_DEGRADED,
    ALL_SOURCES,
    BOARD_KEYS,
    DEGRADED_PREFIX,
    METHODS,
    OPINIONS,
    REAL_DSC,
    VERDICT_SHARES,
    agreement,
    board_metadata,
    build_methods,
    kendall_tau,
    left_out_columns,
    pools,
    review_shares,
)

log = logging.getLogger(__name__)

TUKEY_K = 1.5


# ---------------------------------------------------------------------------------------------------
# Column layouts (fixed dtypes so that the schema does not depend on whether ground truth exists)
# ---------------------------------------------------------------------------------------------------


def _flag_columns() -> dict[str, str]:
    return {
        "flag_low_dsc_outlier": "bool",
        "flag_high_hd95_outlier": "bool",
        **{f"flag_{flag}": "bool" for flag in FLAGS},
        "flag_below_threshold": "bool",
        "flag_out_of_distribution": "bool",
        "qc_pass": "bool",
    }


def subjects_schema(metrics: Sequence[str] = METRICS) -> dict[str, str]:
    """Column → dtype of ``subjects.parquet``."""
    return {
        **{c: "str" for c in ID_COLUMNS},
        **pair_columns(metrics),
        **COUNT_COLUMNS,
        "uncertainty": "float64",
        "n_slices": "int64",
        **_flag_columns(),
        "ood_reason": "str",
        CALIBRATED_COLUMN: "float64",
        AGREEMENT_COLUMN: "float64",
        VAE_RECON_COLUMN: "float64",
        **LEARNED_COLUMNS,
        LATENT_SEARCH_COLUMN: "float64",
        COMBINED_COLUMN: "float64",
        "verdict_score": "float64",
        PASS_THRESHOLD_COLUMN: "float64",
        "risk": "float64",
        "verdict": "str",
        "verdict_reason": "str",
    }


def slices_schema(metrics: Sequence[str] = METRICS) -> dict[str, str]:
    """Column → dtype of ``slices.parquet``."""
    return {
        **{c: "str" for c in ID_COLUMNS},
        "slice_index": "int64",
        "slice_ratio": "float64",
        **pair_columns(metrics),
        **COUNT_COLUMNS,
        "uncertainty": "float64",
        VAE_RECON_COLUMN: "float64",
        **LEARNED_COLUMNS,
        LATENT_SEARCH_COLUMN: "float64",
        **{f"flag_{flag}": "bool" for flag in FLAGS},
    }


SUMMARY_SCHEMA = {
    "cohort": "str",
    "source": "str",
    "label": "str",
    "metric": "str",
    "n": "int64",
    "pearson_r": "float64",
    "mae": "float64",
    "mae_std": "float64",
    "bias": "float64",
    "spearman_rho": "float64",
    "n_fail": "Int64",
    "failure_auc": "float64",
    "sensitivity": "float64",
    "specificity": "float64",
    "accuracy": "float64",
    "aurc": "float64",
}
SELECTION_SCHEMA = {
    "cohort": "str",
    "subject": "str",
    "selected_source": "str",
    "predicted_dsc": "float64",
    "runner_up_source": "str",
    "margin": "float64",
    "n_candidates": "int64",
    "all_failed": "bool",
    "real_dsc": "float64",
    "selected_reason": "str",
}
# selection.repair_sources: how the repair stage's masks enter the selection.
REPAIR_MODES = ("fallback", "compete")
EXCLUSIONS_COLUMNS = ["subject", "source", "label", "verdict", "risk", "reason"]


def ranking_schema(metric: str = "dsc") -> dict[str, str]:
    """Column → dtype of ``ranking.parquet`` for the ranking ``metric``."""
    return {
        "cohort": "str",
        "source": "str",
        "n_subjects": "int64",
        "n_real": "int64",
        f"mean_{PREDICTED}_{metric}": "float64",
        f"mean_{REAL}_{metric}": "float64",
        "predicted_rank": "Int64",
        "real_rank": "Int64",
        "kendall_tau": "float64",
        "n_out_of_distribution": "int64",
        "n_pass": "int64",
        "n_review": "int64",
        "n_fail": "int64",
    }


# ---------------------------------------------------------------------------------------------------
# Report tables
# ---------------------------------------------------------------------------------------------------


def subject_rows(scores: pd.DataFrame, ood: pd.DataFrame | None = None) -> pd.DataFrame:
    """The volume rows of the scores, one per (cohort, source, subject, label), with ``n_slices``, the metric flags
    and, from ``ood`` (columns subject, source, flag_out_of_distribution, ood_reason), the domain-shift flag."""
    volume = scores[scores["level"] == "volume"].copy()
    n_slices = scores[scores["level"] == "slice"].groupby(ID_COLUMNS).size().rename("n_slices").reset_index()
    subjects = volume.merge(n_slices, on=ID_COLUMNS, how="left")
    subjects["n_slices"] = subjects["n_slices"].fillna(0)
    for flag in FLAGS:
        subjects[f"flag_{flag}"] = subjects[f"{PREDICTED}_{flag}"]
    if ood is not None and not ood.empty:
        subjects = subjects.merge(ood, on=["subject", "source"], how="left")
    return subjects


# selection.score: the verdict score (the default), else a method of the board (its METHODS column).
VERDICT_SELECTION = "verdict"
# report.verdict_score -> the column the verdicts, Tukey flags, qc_pass (and, by default, the selection) act on.
VERDICT_SCORES = {"nnqc": f"{PREDICTED}_dsc", "learned": LEARNED_DSC, "combined": COMBINED_COLUMN,
                  "calibrated": CALIBRATED_COLUMN}


def apply_verdicts(subjects: pd.DataFrame, qc_pass_dsc: float, thresholds: VerdictThresholds | None = None,
                   verdict_score: str = "nnqc", pass_dsc: pd.Series | None = None) -> pd.DataFrame:
    """``verdict_score`` (the chosen score's values), the Tukey outlier flags, ``qc_pass`` and the verdict
    (:func:`nnqc_pipe.qc.decisions.assign_verdicts`) of every subject row, typed and sorted.

    ``pass_dsc`` (aligned to the rows; :func:`nnqc_pipe.qc.calibration.pass_thresholds`) is each row's score from
    which it can PASS, in ``qc_pass`` and the verdict alike (``pass_threshold``); by default ``qc_pass_dsc``."""
    if verdict_score not in VERDICT_SCORES:
        raise ValueError(f"report.verdict_score {verdict_score!r} is not one of {sorted(VERDICT_SCORES)}")
    column = VERDICT_SCORES[verdict_score]
    if column not in subjects or subjects[column].isna().all():
        raise ValueError(f"report.verdict_score {verdict_score!r}: the report has no {column} values to act on")
    metrics = metric_names(subjects)
    subjects = subjects.copy()
    subjects["verdict_score"] = subjects[column].astype(float)
    subjects["flag_low_dsc_outlier"] = _tukey_low(subjects, "verdict_score")
    subjects["flag_high_hd95_outlier"] = (
        _tukey_high(subjects, f"{PREDICTED}_hd95_mm") if "hd95_mm" in metrics else False
    )
    subjects[PASS_THRESHOLD_COLUMN] = qc_pass_dsc if pass_dsc is None else pass_dsc.astype(float)
    subjects["flag_below_threshold"] = ~(subjects["verdict_score"] >= subjects[PASS_THRESHOLD_COLUMN])
    failing = ["flag_below_threshold", "flag_low_dsc_outlier", "flag_high_hd95_outlier"]
    subjects["qc_pass"] = ~subjects[failing].any(axis=1)
    thresholds = thresholds or default_thresholds(qc_pass_dsc)
    subjects = pd.concat([assign_verdicts(rows, replace(thresholds, pass_dsc=float(value)), "verdict_score")
                          for value, rows in subjects.groupby(PASS_THRESHOLD_COLUMN, sort=True)])
    subjects = subjects.sort_values(ID_COLUMNS, kind="stable")
    return typed(subjects, subjects_schema(metrics))


def verdict_shares(subjects: pd.DataFrame, qc_pass_dsc: float, thresholds: VerdictThresholds,
                   max_missed_failures: float | None = None, prior: dict[str, dict[str, Any]] | None = None,
                   left_out: Sequence[str] = ()) -> pd.DataFrame:
    """For each score the verdicts can act on (:data:`VERDICT_SCORES`, where ``subjects`` has values of it and its
    column is not ``left_out``: the opinions the config's ``methods`` leaves out) and each board pool of the
    labelled rows (:func:`nnqc_pipe.report.methods.pools`): the shares of good masks and of failures sent to REVIEW
    or FAIL (:func:`nnqc_pipe.report.methods.review_shares`) when the verdicts act on that score, with its own pass
    thresholds (:func:`nnqc_pipe.qc.calibration.pass_thresholds`, the report's policy and the QC model's ``prior``
    thresholds). One row per :data:`nnqc_pipe.report.methods.BOARD_KEYS`."""
    rows = []
    for name, column in VERDICT_SCORES.items():
        if column in left_out or column not in subjects or subjects[column].isna().all():
            continue
        scored = subjects.reset_index(drop=True)
        passing, _ = pass_thresholds(scored, column, thresholds.fail_dsc, qc_pass_dsc, max_missed_failures, prior)
        decided = apply_verdicts(scored, qc_pass_dsc, thresholds, name, passing)
        for (cohort, label), group in decided[decided[REAL_DSC].notna()].groupby(["cohort", "label"], sort=True):
            rows += [{"cohort": cohort, "label": label, "method": name, "pool": pool,
                      **review_shares(members, qc_pass_dsc, thresholds.fail_dsc)} for pool, members in pools(group)]
    return pd.DataFrame(rows, columns=[*BOARD_KEYS, *VERDICT_SHARES])


def build_subjects(scores: pd.DataFrame, qc_pass_dsc: float, thresholds: VerdictThresholds | None = None,
                   ood: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (cohort, source, subject, label) with predicted/real metrics, flags, ``qc_pass`` and the verdict
    on nnQC's predicted DSC (:func:`subject_rows`, :func:`apply_verdicts`; the report adds the other opinions
    first, :func:`write_report`)."""
    return apply_verdicts(subject_rows(scores, ood), qc_pass_dsc, thresholds)


def _tukey_low(df: pd.DataFrame, column: str) -> pd.Series:
    """True where ``column`` < Q1 − 1.5·IQR of its (cohort, source, label) group; NaN never flags."""
    q1, q3 = _group_quartiles(df, column)
    return (df[column] < q1 - TUKEY_K * (q3 - q1)).fillna(False)


def _tukey_high(df: pd.DataFrame, column: str) -> pd.Series:
    """True where ``column`` > Q3 + 1.5·IQR of its (cohort, source, label) group; NaN never flags."""
    q1, q3 = _group_quartiles(df, column)
    return (df[column] > q3 + TUKEY_K * (q3 - q1)).fillna(False)


def _group_quartiles(df: pd.DataFrame, column: str) -> tuple[pd.Series, pd.Series]:
    grouped = df.groupby(["cohort", "source", "label"])[column]
    return grouped.transform("quantile", q=0.25), grouped.transform("quantile", q=0.75)


def build_slices(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per (cohort, source, subject, label, slice_index) with ``slice_ratio`` and the metrics."""
    slices = scores[scores["level"] == "slice"].copy()
    for flag in FLAGS:
        slices[f"flag_{flag}"] = slices[f"{PREDICTED}_{flag}"]
    slices = slices.sort_values([*ID_COLUMNS, "slice_index"], kind="stable")
    return typed(slices, slices_schema(metric_names(scores)))


def build_summary(subjects: pd.DataFrame, fail_dsc: float = 0.7) -> pd.DataFrame:
    """Agreement of predicted and real scores per (cohort, source or pool, label, metric).

    Pools: ``all`` (every source) and ``all_degraded`` (``degraded_*`` sources). Only subjects with both
    values finite count (``n``); ``pearson_r`` is NaN below 3 pairs or for a constant side. Every row has the
    bias (mean predicted − real) and Spearman ρ; DSC rows also the failure detection at real DSC < ``fail_dsc``
    (:func:`nnqc_pipe.qc.decisions.failure_detection`: ROC AUC, sensitivity/specificity/accuracy of "predicted <
    ``fail_dsc``", area under the risk–coverage curve).
    """
    rows = []
    for (cohort, label), group in subjects.groupby(["cohort", "label"], sort=True):
        for source, members in _source_pools(group):
            for metric, pred_col, real_col in _summary_pairs(subjects):
                pred = members[pred_col].to_numpy(dtype=np.float64)
                real = members[real_col].to_numpy(dtype=np.float64)
                detection = failure_detection(pred, real, fail_dsc)
                if real_col != f"{REAL}_dsc":
                    detection = {k: v for k, v in detection.items() if k not in FAILURE_COLUMNS}
                rows.append({"cohort": cohort, "source": source, "label": label, "metric": metric,
                             **detection, **agreement(pred, real)})
    return typed(pd.DataFrame(rows), SUMMARY_SCHEMA)


# Other predictors of the real DSC in the summary, each a row ``metric`` of its own: the calibrated nnQC score, the
# two baselines (inter-source agreement, VAE reconstruction), the learned opinion, the fusion of the opinions, and the
# latent search (nnqc_pipe.qc.calibration, nnqc_pipe.qc.baselines, nnqc_pipe.qc.learned).
EXTRA_PREDICTORS = {"calibrated_dsc": CALIBRATED_COLUMN, "agreement_dsc": AGREEMENT_COLUMN,
                    "vae_recon_dsc": VAE_RECON_COLUMN, "learned_dsc": LEARNED_DSC, "combined_dsc": COMBINED_COLUMN,
                    "latent_search_dsc": LATENT_SEARCH_COLUMN}


def _summary_pairs(subjects: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(metric name, predicted column, real column) of every summary row: the metrics, then the extra predictors
    of the real DSC that ``subjects`` has values of."""
    pairs = [(m, f"{PREDICTED}_{m}", f"{REAL}_{m}") for m in metric_names(subjects)]
    extra = [(name, col) for name, col in EXTRA_PREDICTORS.items() if col in subjects and subjects[col].notna().any()]
    return pairs + [(name, col, f"{REAL}_dsc") for name, col in extra]


def _source_pools(group: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(name, rows) for each source, then the ``all`` and ``all_degraded`` pools."""
    pools = [(str(source), rows) for source, rows in group.groupby("source", sort=True)]
    degraded = group[group["source"].str.startswith(DEGRADED_PREFIX)]
    return [*pools, (ALL_SOURCES, group), (ALL_DEGRADED, degraded)]


def build_ranking(subjects: pd.DataFrame, metric: str = "dsc", label: str = FOREGROUND) -> pd.DataFrame:
    """One row per (cohort, source): mean predicted/real ``metric`` for ``label``, ranks, Kendall τ, and the counts
    of candidates out of the training distribution and of each verdict.

    Rank 1 is the best source (highest mean for DSC-like metrics, lowest for HD95/RAVD); a source without
    real values has a null ``real_rank``. ``kendall_tau`` (same value on every row of a cohort) compares the
    two orders over the sources with both means; NaN with fewer than 2 such sources.
    """
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown ranking metric {metric!r}; known: {sorted(HIGHER_IS_BETTER)}")
    pred_col, real_col = f"mean_{PREDICTED}_{metric}", f"mean_{REAL}_{metric}"
    rows = subjects[subjects["label"] == label]
    ranking = (
        rows.groupby(["cohort", "source"], sort=True)
        .agg(
            n_subjects=("subject", "size"),
            n_real=(f"{REAL}_{metric}", "count"),
            **{pred_col: (f"{PREDICTED}_{metric}", "mean"), real_col: (f"{REAL}_{metric}", "mean")},
        )
        .reset_index()
    )
    descending = HIGHER_IS_BETTER[metric]
    by_cohort = ranking.groupby("cohort")
    ranking["predicted_rank"] = by_cohort[pred_col].rank(method="min", ascending=not descending)
    ranking["real_rank"] = by_cohort[real_col].rank(method="min", ascending=not descending)
    taus = {c: kendall_tau(g[pred_col], g[real_col]) for c, g in by_cohort}
    ranking["kendall_tau"] = ranking["cohort"].map(taus).astype("float64")
    ranking = ranking.merge(_source_counts(rows), on=["cohort", "source"], how="left")
    return typed(ranking, ranking_schema(metric))


def _source_counts(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (cohort, source): candidates out of the training distribution and verdict counts."""
    flags = rows.get("flag_out_of_distribution", pd.Series(False, index=rows.index)).astype("boolean").fillna(False)
    verdicts = rows.get("verdict", pd.Series("", index=rows.index))
    counts = rows[["cohort", "source"]].assign(
        n_out_of_distribution=flags.astype(int), n_pass=(verdicts == "PASS").astype(int),
        n_review=(verdicts == "REVIEW").astype(int), n_fail=(verdicts == "FAIL").astype(int))
    return counts.groupby(["cohort", "source"], sort=True).sum().reset_index()


# ---------------------------------------------------------------------------------------------------
# Writing the report
# ---------------------------------------------------------------------------------------------------


def add_predictors(subjects: pd.DataFrame, agreement: pd.DataFrame | None, left_out: Sequence[str] = (),
                   prior_fits: dict[str, dict[str, Any]] | None = None
                   ) -> tuple[pd.DataFrame, dict[str, dict[str, object]]]:
    """The subject rows with ``calibrated_dsc`` (isotonic map fitted on the labelled rows, cross-validated), the
    inter-source agreement baseline (null where not computed) and ``combined_dsc`` (the opinions fused, fitted out
    of fold; the ``left_out`` opinion columns never take part); also how the calibration and the combination were
    fitted. ``prior_fits`` (a QC model's, :func:`nnqc_pipe.qc.calibration.exported_fits`) serve the labels with
    too few labelled subjects of their own."""
    prior_fits = prior_fits or {}
    subjects = subjects.drop(columns=[AGREEMENT_COLUMN], errors="ignore")
    if agreement is not None and not agreement.empty:
        subjects = subjects.merge(agreement, on=["subject", "source", "label"], how="left")
    subjects = subjects.reset_index(drop=True)
    subjects[CALIBRATED_COLUMN], calibration = calibrate(subjects, prior_fits.get("calibration"))
    subjects[COMBINED_COLUMN], combination = combine(subjects.drop(columns=list(left_out), errors="ignore"),
                                                     prior_fits.get("combined"))
    return subjects, {"calibration": calibration, "combined": combination}


def selection_column(score: str) -> str:
    """The subjects column that ``selection.score`` names: the verdict score, or one method's DSC score."""
    if score == VERDICT_SELECTION:
        return "verdict_score"
    if score not in METHODS:
        raise ValueError(f"selection.score {score!r} is not one of {[VERDICT_SELECTION, *METHODS]}")
    return METHODS[score]


def build_selection(subjects: pd.DataFrame, use_pgt_when_all_fail: bool, fail_dsc: float,
                    repair_sources: Sequence[str] = (), repair_mode: str = "fallback",
                    score: str = VERDICT_SELECTION) -> pd.DataFrame:
    """The best source per subject by its foreground ``score`` (:func:`selection_column`;
    :func:`nnqc_pipe.qc.decisions.select_sources`; the table's ``predicted_dsc`` is that score). The repair stage's
    ``repair_sources`` are fallbacks (considered only where every user source fails, ``repair_mode``
    ``fallback``) or ordinary candidates (``compete``)."""
    if repair_mode not in REPAIR_MODES:
        raise ValueError(f"selection.repair_sources {repair_mode!r} is not one of {REPAIR_MODES}")
    column = selection_column(score)
    if column not in subjects or not subjects[column].notna().any():
        raise ValueError(f"selection.score {score!r}: the report has no {column} values to select on")
    selection = select_sources(subjects.assign(**{f"{PREDICTED}_dsc": subjects[column]}), FOREGROUND,
                               use_pgt_when_all_fail=use_pgt_when_all_fail, fail_dsc=fail_dsc,
                               fallback_sources=repair_sources if repair_mode == "fallback" else ())
    return typed(selection, SELECTION_SCHEMA)


def write_report(
    scores_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    cohort: str,
    qc_pass_dsc: float,
    metadata: Mapping[str, Any],
    ranking_metric: str = "dsc",
    ranking_label: str = FOREGROUND,
    thresholds: VerdictThresholds | None = None,
    ood_inputs: tuple[Mapping[str, dict], dict] | None = None,
    use_pgt_when_all_fail: bool = False,
    review_slices_per_subject: int = 5,
    agreement: pd.DataFrame | None = None,
    verdict_score: str = "nnqc",
    methods: Sequence[str] = OPINIONS,
    repair_sources: Sequence[str] = (),
    repair_mode: str = "fallback",
    selection_score: str = VERDICT_SELECTION,
    prior_fits: dict[str, dict[str, Any]] | None = None,
    max_missed_failures: float | None = None,
) -> dict[str, pd.DataFrame]:
    """Build the report tables from the scores files and write them to ``out_dir``.

    Tables: ``subjects`` (with verdicts), ``slices``, ``summary`` (with failure detection), ``ranking``,
    ``selection`` (best source per subject), ``review`` (slices to look at first), ``methods`` (the methods board,
    :func:`nnqc_pipe.report.methods.build_methods`) and ``exclusions.tsv``. The columns of the opinions not in
    ``methods`` (the config's ``methods``, :data:`nnqc_pipe.report.methods.OPINION_COLUMNS`) are left out of every
    table.
    Every Parquet file's schema metadata holds ``metadata`` (pipeline version, config hash, checkpoint hashes)
    plus ``cohort``, ``qc_pass_dsc`` and the verdict thresholds; ``ranking.parquet`` also holds ``kendall_tau``,
    ``ranking_metric`` and ``ranking_label``; ``selection.parquet`` the real DSC of the selection against the best
    single source and an oracle (where ground truth exists). ``ood_inputs`` (ingestion records by subject, training
    fingerprint) flags the candidates outside the training range (:func:`nnqc_pipe.qc.ood.ood_table`);
    ``verdict_score`` (:data:`VERDICT_SCORES`) is the score the verdicts act on (and the selection, unless
    ``selection_score`` names another); ``max_missed_failures`` (the config's ``report.max_missed_failures`` when
    ``report.pass_threshold`` is ``learned``; None: ``qc_pass_dsc`` as it is) lowers each label's pass threshold to
    what its labelled failures justify (:func:`nnqc_pipe.qc.calibration.pass_thresholds`);
    ``repair_sources`` (the repair stage's two sources) enter the selection as ``repair_mode`` says
    (:func:`build_selection`); ``selection_score`` (:func:`selection_column`) is the score the selection ranks on.
    Returns the tables by name.
    """
    thresholds = thresholds or default_thresholds(qc_pass_dsc)
    left_out = left_out_columns(methods)
    if VERDICT_SCORES.get(verdict_score) in left_out:
        raise ValueError(f"report.verdict_score {verdict_score!r} needs its opinion in methods (combined: at least "
                         "two opinions)")
    scores = concat_parquet(scores_paths)
    if scores.empty:
        raise ValueError(f"cohort {cohort!r}: no score rows in {len(scores_paths)} scores files")
    other = sorted(set(scores["cohort"]) - {cohort})
    if other:
        raise ValueError(f"cohort {cohort!r}: scores files contain rows of other cohorts {other}")
    ood = None
    if ood_inputs is not None:
        records, fingerprint = ood_inputs
        ood = ood_table(dict(records), fingerprint, scores[scores["level"] == "volume"])
    subjects, fits = add_predictors(subject_rows(scores, ood), agreement, left_out, prior_fits)
    passing, fits["pass_threshold"] = pass_thresholds(subjects, VERDICT_SCORES[verdict_score], thresholds.fail_dsc,
                                                      qc_pass_dsc, max_missed_failures,
                                                      (prior_fits or {}).get("pass_threshold"))
    subjects = apply_verdicts(subjects, qc_pass_dsc, thresholds, verdict_score, passing)
    tables = {"subjects": subjects.drop(columns=left_out),
              "slices": build_slices(scores).drop(columns=left_out, errors="ignore")}
    tables["summary"] = build_summary(tables["subjects"], thresholds.fail_dsc)
    tables["ranking"] = build_ranking(tables["subjects"], ranking_metric, ranking_label)
    tables["selection"] = build_selection(tables["subjects"], use_pgt_when_all_fail, thresholds.fail_dsc,
                                          repair_sources, repair_mode, selection_score)
    tables["review"] = review_slices(tables["slices"], tables["subjects"], review_slices_per_subject)
    shares = verdict_shares(subjects, qc_pass_dsc, thresholds, max_missed_failures,
                            (prior_fits or {}).get("pass_threshold"), left_out)
    tables["methods"] = build_methods(tables["subjects"], thresholds.fail_dsc, shares)
    common = {**metadata, "cohort": cohort, "qc_pass_dsc": qc_pass_dsc, "verdict_thresholds": asdict(thresholds),
              "verdict_score": {"score": verdict_score, "column": VERDICT_SCORES[verdict_score]}, **fits}
    tau = _single_tau(tables["ranking"])
    extra_meta = {
        "ranking": {"kendall_tau": tau, "ranking_metric": ranking_metric, "ranking_label": ranking_label},
        "selection": {"selection_summary": _json_safe(selection_summary(tables["subjects"], tables["selection"])),
                      "use_pgt_when_all_fail": use_pgt_when_all_fail,
                      "repair_sources": list(repair_sources), "repair_mode": repair_mode,
                      "selection_score": {"score": selection_score, "column": selection_column(selection_score)}},
        "methods": board_metadata(tables["methods"], tables["subjects"], thresholds.fail_dsc),
    }
    out = Path(out_dir)
    for name, table in tables.items():
        write_parquet(table, out / f"{name}.parquet", {**common, **extra_meta.get(name, {})})
    exclusions = exclusions_table(tables["subjects"]).reindex(columns=EXCLUSIONS_COLUMNS)
    with atomic_path(out / "exclusions.tsv") as tmp:
        exclusions.to_csv(tmp, sep="\t", index=False, float_format="%.4f")
    counts = tables["subjects"].loc[tables["subjects"]["label"] == FOREGROUND, "verdict"].value_counts().to_dict()
    log.info(
        "cohort %s: report of %d subject rows, %d slice rows, %d sources; Kendall tau (%s, %s) = %s; "
        "foreground verdicts %s; %d rows in exclusions.tsv",
        cohort, len(tables["subjects"]), len(tables["slices"]), len(tables["ranking"]),
        ranking_metric, ranking_label, tau, counts, len(exclusions),
    )
    board = extra_meta["methods"]
    log.info("methods board: %d rows, methods %s%s", len(tables["methods"]), board["methods"],
             f" ({board['note']})" if board["note"] else "")
    return tables


def _json_safe(values: Mapping[str, Any]) -> dict[str, Any]:
    """NaN -> None (JSON metadata has no NaN)."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in values.items()}


def _single_tau(ranking: pd.DataFrame) -> float | None:
    """The cohort's Kendall τ for the metadata (None when undefined: JSON has no NaN)."""
    values = ranking["kendall_tau"].dropna().unique()
    return float(values[0]) if values.size else None
