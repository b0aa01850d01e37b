"""Turn nnQC quality estimates into decisions: failure detection, verdicts, source selection, review lists.

All functions are pure: they take the report tables (``subjects``: one row per cohort/source/subject/label,
``slices``: one row per slice of those) or arrays, and return new tables or dicts without touching their inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import ndimage, stats
from sklearn.metrics import confusion_matrix, roc_auc_score

from nnqc_pipe.qc.metrics import ERROR_CODES as METRIC_ERROR_CODES

logger = logging.getLogger(__name__)

KEYS = ["cohort", "source", "subject", "label"]
VERDICTS = ("PASS", "REVIEW", "FAIL")
PGT_SOURCE = "pgt"
SYNTHETIC_PREFIX = "degraded_"
# The error kinds of qc.metrics.error_map (0, agreement, is not an error).
ERROR_CODES: Mapping[int, str] = MappingProxyType({k: v for k, v in METRIC_ERROR_CODES.items() if k > 0})


# --------------------------------------------------------------------------------------------------------------------
# Failure detection
# --------------------------------------------------------------------------------------------------------------------


def _finite_pairs(predicted: ArrayLike, real: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The (predicted, real) pairs where both values are finite: only those can be compared."""
    p = np.asarray(predicted, dtype=float).ravel()
    r = np.asarray(real, dtype=float).ravel()
    if p.shape != r.shape:
        raise ValueError(f"predicted and real differ in length: {p.size} vs {r.size}")
    keep = np.isfinite(p) & np.isfinite(r)
    return p[keep], r[keep]


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is 0 (an undefined rate, not a zero one)."""
    return float(numerator / denominator) if denominator else float("nan")


def risk_coverage_curve(predicted: ArrayLike, real: ArrayLike, fail_dsc: float = 0.7) -> pd.DataFrame:
    """Selective-classification risk–coverage curve of a predicted quality score.

    Cases are accepted most-confident first (predicted DSC descending). At coverage ``k/n`` the risk is the
    failure rate (real DSC < ``fail_dsc``) among the ``k`` accepted cases. Cases with tied predicted scores
    cannot be ordered by the score, so inside a tie block the cumulative failure count grows linearly (the
    expectation over all orders of the block): the curve is deterministic and independent of input order.
    Only pairs where both values are finite are used; columns ``coverage`` and ``risk`` (one row per k).
    """
    p, r = _finite_pairs(predicted, real)
    n = p.size
    if n == 0:
        return pd.DataFrame({"coverage": pd.Series(dtype=float), "risk": pd.Series(dtype=float)})
    order = np.argsort(-p, kind="stable")
    p, failed = p[order], (r[order] < fail_dsc).astype(float)
    cum_failures = np.cumsum(failed)
    # Tie blocks [start, end): replace the order-dependent count by start count + position · block failure rate.
    _, starts, sizes = np.unique(-p, return_index=True, return_counts=True)
    before = np.concatenate([[0.0], cum_failures])[starts]
    rate = (cum_failures[starts + sizes - 1] - before) / sizes
    block = np.repeat(np.arange(starts.size), sizes)
    position = np.arange(n) - starts[block] + 1
    expected = before[block] + position * rate[block]
    k = np.arange(1, n + 1)
    return pd.DataFrame({"coverage": k / n, "risk": expected / k})


def failure_detection(
    predicted: ArrayLike, real: ArrayLike, fail_dsc: float = 0.7, decision_dsc: float | None = None
) -> dict[str, float]:
    """How well a predicted DSC detects real failures (real DSC < ``fail_dsc``).

    Over the pairs where both values are finite:

    - ``n``, ``n_fail``: pairs, and real failures among them;
    - ``failure_auc``: ROC AUC of ``-predicted`` for the failure event (1 = every failure scored below every
      success; NaN when only one class is present);
    - ``sensitivity``, ``specificity``, ``accuracy`` of the rule "predicted < ``decision_dsc`` ⇒ fail"
      (``decision_dsc`` defaults to ``fail_dsc``; a rate with an empty denominator is NaN);
    - ``bias``: mean(predicted − real); ``spearman_rho``: rank correlation (NaN below 3 pairs or for constant input);
    - ``aurc``: area under the risk–coverage curve, the mean risk over coverages 1/n … n/n
      (see :func:`risk_coverage_curve`); lower is better, the perfect ranking reaches the minimum
      attainable for the failure rate.
    """
    p, r = _finite_pairs(predicted, real)
    n = p.size
    failed = r < fail_dsc
    flagged = p < (fail_dsc if decision_dsc is None else decision_dsc)
    tn, fp, fn, tp = confusion_matrix(failed, flagged, labels=[False, True]).ravel() if n else (0, 0, 0, 0)
    two_classes = 0 < failed.sum() < n
    ranks_defined = n >= 3 and np.ptp(p) > 0 and np.ptp(r) > 0
    return {
        "n": int(n),
        "n_fail": int(failed.sum()),
        "failure_auc": float(roc_auc_score(failed, -p)) if two_classes else float("nan"),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, n),
        "bias": float(np.mean(p - r)) if n else float("nan"),
        "spearman_rho": float(stats.spearmanr(p, r).statistic) if ranks_defined else float("nan"),
        "aurc": float(risk_coverage_curve(p, r, fail_dsc)["risk"].mean()) if n else float("nan"),
    }


# --------------------------------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerdictThresholds:
    """Thresholds and risk weights for :func:`assign_verdicts`.

    ``risk`` is a noisy-OR of warning signs, each read as an independent chance that the segmentation failed::

        risk = 1 − (1 − s)·(1 − w_u·u)·(1 − w_o·o_dsc)·(1 − w_o·o_hd95)·(1 − w_ood·d)

    with ``s = clip((pass_dsc − pDSC) / (pass_dsc − fail_dsc), 0, 1)`` (0 at ``pass_dsc``, 1 at ``fail_dsc`` or
    below), ``u = clip(uncertainty / (2·review_uncertainty), 0, 1)``, ``o_*`` the Tukey outlier flags and ``d`` the
    out-of-distribution flag (0/1; missing values count as 0).

    Defaults: ``fail_dsc``/``pass_dsc`` 0.7/0.8 are the usual "failed"/"good enough" DSC levels. Each single warning
    sign alone (uncertainty at ``review_uncertainty`` → 0.25, one outlier flag or OOD → 0.3) reaches
    ``review_risk`` = 0.25 but stays far below ``fail_risk``. ``fail_risk`` = 0.9 is reached by the DSC shortfall
    alone only within 0.01 of ``fail_dsc``, otherwise only by a shortfall backed by several concurring signs, so a
    high predicted DSC is never failed on warning signs alone (they send it to review).
    """

    fail_dsc: float = 0.7
    pass_dsc: float = 0.8
    review_uncertainty: float = 0.1
    fail_risk: float = 0.9
    review_risk: float = 0.25
    w_uncertainty: float = 0.5
    w_outlier: float = 0.3
    w_ood: float = 0.3

    def __post_init__(self) -> None:
        if not self.fail_dsc < self.pass_dsc:
            raise ValueError(f"fail_dsc ({self.fail_dsc}) must be below pass_dsc ({self.pass_dsc})")
        if not 0 < self.review_risk <= self.fail_risk <= 1:
            raise ValueError("need 0 < review_risk <= fail_risk <= 1")
        if self.review_uncertainty <= 0:
            raise ValueError("review_uncertainty must be positive")


def default_thresholds(pass_dsc: float) -> VerdictThresholds:
    """The default thresholds with ``pass_dsc`` (e.g. the report's ``qc_pass_dsc``): ``fail_dsc`` stays 0.7 unless
    ``pass_dsc`` is that low or lower, then it sits 0.1 below it."""
    return VerdictThresholds(pass_dsc=pass_dsc, fail_dsc=min(0.7, max(pass_dsc - 0.1, 0.0)))


def _flag(table: pd.DataFrame, column: str) -> np.ndarray:
    """A boolean column as a numpy array; a missing column or missing values count as False."""
    if column not in table:
        return np.zeros(len(table), dtype=bool)
    return table[column].astype("boolean").fillna(False).to_numpy(dtype=bool)


def _number(table: pd.DataFrame, column: str) -> np.ndarray:
    """A numeric column as a float array; a missing column is all NaN."""
    if column not in table:
        return np.full(len(table), np.nan)
    return pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)


def _compare(value: float, sign: str, threshold: float) -> str:
    """'value <sign> threshold' in words, with enough decimals that the two numbers do not print equal."""
    digits = next((d for d in (2, 3, 4) if round(value, d) != round(threshold, d)), 2)
    return f"{value:.{digits}f} {sign} {threshold:.2f}"


def assign_verdicts(subjects: pd.DataFrame, thresholds: VerdictThresholds | None = None,
                    score_column: str = "predicted_dsc") -> pd.DataFrame:
    """Copy of ``subjects`` with ``risk`` (0–1), ``verdict`` (PASS/REVIEW/FAIL) and ``verdict_reason`` per row.

    Rules (``t`` = thresholds, risk formula in :class:`VerdictThresholds`):

    - no predicted DSC (NaN) → REVIEW, reason "no prediction" (plus any warning sign);
    - FAIL when predicted DSC < ``t.fail_dsc`` or risk ≥ ``t.fail_risk``;
    - else REVIEW when predicted DSC < ``t.pass_dsc``, a Tukey outlier flag, the OOD flag,
      uncertainty > ``t.review_uncertainty`` or risk ≥ ``t.review_risk``;
    - else PASS.

    Boundaries: a DSC equal to a threshold is not below it, but at exactly ``fail_dsc`` the shortfall is full, so risk
    is 1 and the row FAILs. The reason lists every triggered cause in words; the risk threshold is named only when it
    is what set the verdict (FAIL without a DSC below ``fail_dsc``, REVIEW without any other cause). The DSC is
    ``score_column`` (the report's verdict score; nnQC's ``predicted_dsc`` by default).
    """
    t = thresholds or VerdictThresholds()
    dsc = _number(subjects, score_column)
    uncertainty = _number(subjects, "uncertainty")
    low_dsc = _flag(subjects, "flag_low_dsc_outlier")
    high_hd95 = _flag(subjects, "flag_high_hd95_outlier")
    ood = _flag(subjects, "flag_out_of_distribution")
    no_prediction = np.isnan(dsc)

    shortfall = np.nan_to_num(np.clip((t.pass_dsc - dsc) / (t.pass_dsc - t.fail_dsc), 0, 1))
    spread = np.nan_to_num(np.clip(uncertainty / (2 * t.review_uncertainty), 0, 1))
    survive = (
        (1 - shortfall)
        * (1 - t.w_uncertainty * spread)
        * (1 - t.w_outlier * low_dsc)
        * (1 - t.w_outlier * high_hd95)
        * (1 - t.w_ood * ood)
    )
    risk = np.clip(1 - survive, 0, 1)

    dsc_fail = dsc < t.fail_dsc
    dsc_review = ~dsc_fail & (dsc < t.pass_dsc)
    uncertain = uncertainty > t.review_uncertainty
    other_review = dsc_review | low_dsc | high_hd95 | ood | uncertain
    risk_fail = ~no_prediction & ~dsc_fail & (risk >= t.fail_risk)
    fail = ~no_prediction & (dsc_fail | risk_fail)
    risk_review = ~no_prediction & ~fail & ~other_review & (risk >= t.review_risk)
    review = ~fail & (no_prediction | other_review | risk_review)
    verdict = np.select([fail, review], ["FAIL", "REVIEW"], default="PASS")

    sources = subjects["source"].astype(str).to_numpy() if "source" in subjects else np.full(len(subjects), "?")
    ood_reasons = (
        subjects["ood_reason"].fillna("").astype(str).to_numpy()
        if "ood_reason" in subjects
        else np.full(len(subjects), "")
    )
    reasons = []
    for i in range(len(subjects)):
        causes = []
        if no_prediction[i]:
            causes.append("no prediction")
        elif dsc_fail[i]:
            causes.append(f"predicted DSC {_compare(dsc[i], '<', t.fail_dsc)}")
        elif dsc_review[i]:
            causes.append(f"predicted DSC {_compare(dsc[i], '<', t.pass_dsc)}")
        if low_dsc[i]:
            causes.append(f"low DSC outlier for source {sources[i]}")
        if high_hd95[i]:
            causes.append(f"HD95 outlier for source {sources[i]}")
        if ood[i]:
            causes.append(f"out of distribution ({ood_reasons[i]})" if ood_reasons[i] else "out of distribution")
        if uncertain[i]:
            causes.append(f"uncertainty {_compare(uncertainty[i], '>', t.review_uncertainty)}")
        if risk_fail[i]:
            causes.append(f"risk {_compare(risk[i], '≥', t.fail_risk)}")
        if risk_review[i]:
            causes.append(f"risk {_compare(risk[i], '≥', t.review_risk)}")
        reasons.append("; ".join(causes) if causes else f"predicted DSC {dsc[i]:.2f} ≥ {t.pass_dsc:.2f}, no warning")

    out = subjects.copy()
    out["risk"] = risk
    out["verdict"] = verdict
    out["verdict_reason"] = reasons
    counts = pd.Series(verdict).value_counts().reindex(VERDICTS, fill_value=0)
    logger.info("verdicts: %s", ", ".join(f"{v} {counts[v]}" for v in VERDICTS))
    return out


def exclusions_table(subjects_with_verdicts: pd.DataFrame) -> pd.DataFrame:
    """The FAIL and REVIEW rows (subject, source, label, verdict, risk, reason), riskiest first.

    Ties in risk are ordered by subject, source and label so the table is the same whatever the input order.
    """
    rows = subjects_with_verdicts[subjects_with_verdicts["verdict"].isin(["FAIL", "REVIEW"])]
    columns = ["subject", "source", "label", "verdict", "risk", "reason"]
    table = rows.rename(columns={"verdict_reason": "reason"})[columns]
    return table.sort_values(
        ["risk", "subject", "source", "label"], ascending=[False, True, True, True], kind="stable", na_position="last"
    ).reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------------
# Source selection
# --------------------------------------------------------------------------------------------------------------------


def _candidates(subjects: pd.DataFrame, label: str, exclude_sources: Sequence[str]) -> pd.DataFrame:
    """Rows of ``label`` from real candidate sources: not excluded and not synthetic ``degraded_*`` ones."""
    source = subjects["source"].astype(str)
    keep = (subjects["label"] == label) & ~source.isin(list(exclude_sources)) & ~source.str.startswith(SYNTHETIC_PREFIX)
    return subjects[keep]


def _subject_keys(table: pd.DataFrame) -> list[str]:
    """Columns identifying a subject: the cohort too when present, since subject ids may repeat across cohorts."""
    return ["cohort", "subject"] if "cohort" in table else ["subject"]


def select_sources(
    subjects: pd.DataFrame,
    label: str = "foreground",
    exclude_sources: Sequence[str] = ("gt",),
    use_pgt_when_all_fail: bool = False,
    fail_dsc: float = 0.7,
    fallback_sources: Sequence[str] = (),
) -> pd.DataFrame:
    """Per subject, the candidate source with the highest predicted DSC for ``label``, and why.

    Candidates are the sources not in ``exclude_sources`` and not synthetic (``degraded_*``) with a finite
    predicted DSC. ``fallback_sources`` (the repair stage's cohort segmenter) are candidates of a subject only when
    none of its other candidates reaches ``fail_dsc`` (or it has no other). Ties are broken by lowest uncertainty
    (missing last), then source name. Columns: (cohort,) subject, selected_source, predicted_dsc, runner_up_source,
    margin (best − runner-up predicted DSC; NaN with a single candidate), n_candidates, all_failed (every candidate
    predicted below ``fail_dsc``), selected_reason (in words: where the kept mask comes from and why) and, when the
    table has it, real_dsc of the selected source. With ``use_pgt_when_all_fail``, subjects where all candidates
    fail select "pgt" instead: predicted_dsc, margin and real_dsc are NaN and runner_up_source is the best candidate.
    """
    keys = _subject_keys(subjects)
    candidates = _candidates(subjects, label, exclude_sources)
    candidates = candidates[np.isfinite(_number(candidates, "predicted_dsc"))].assign(
        _uncertainty=lambda d: _number(d, "uncertainty"),
        _fallback=lambda d: d["source"].astype(str).isin(list(fallback_sources)),
    )
    primary = candidates[~candidates["_fallback"]]
    best_primary = primary.sort_values("predicted_dsc", ascending=False, kind="stable").groupby(keys).nth(0)
    best_primary = best_primary.set_index(keys)[["source", "predicted_dsc"]]
    passing = best_primary.index[best_primary["predicted_dsc"].astype(float) >= fail_dsc]
    in_passing = candidates.set_index(keys).index.isin(passing)
    candidates = candidates[~(candidates["_fallback"].to_numpy() & in_passing)]
    ranked = candidates.sort_values(
        [*keys, "predicted_dsc", "_uncertainty", "source"],
        ascending=[*[True] * len(keys), False, True, True],
        kind="stable",
        na_position="last",
    )
    groups = ranked.groupby(keys, sort=True)
    best = groups.nth(0).set_index(keys)
    runner_up = groups.nth(1).set_index(keys).reindex(best.index)
    selection = pd.DataFrame(
        {
            "selected_source": best["source"],
            "predicted_dsc": best["predicted_dsc"].astype(float),
            "runner_up_source": runner_up["source"],
            "margin": best["predicted_dsc"].astype(float) - runner_up["predicted_dsc"].astype(float),
            "n_candidates": groups.size().reindex(best.index).astype(int),
            "all_failed": best["predicted_dsc"].astype(float) < fail_dsc,
        },
        index=best.index,
    )
    if "real_dsc" in subjects:
        selection["real_dsc"] = best["real_dsc"].astype(float)
    primary_best = best_primary.reindex(best.index)
    selection["selected_reason"] = [
        _selection_reason(row, primary_best.loc[index], set(fallback_sources), fail_dsc)
        for index, row in selection.iterrows()
    ]
    if use_pgt_when_all_fail:
        fallback = selection["all_failed"]
        selection.loc[fallback, "selected_reason"] = [
            f"every candidate predicted below {fail_dsc:.2f} (best {source} {score:.2f}): the pGT as a pseudo-label"
            for source, score in zip(selection.loc[fallback, "selected_source"],
                                     selection.loc[fallback, "predicted_dsc"], strict=True)
        ]
        selection.loc[fallback, "runner_up_source"] = selection.loc[fallback, "selected_source"]
        selection.loc[fallback, "selected_source"] = PGT_SOURCE
        selection.loc[fallback, ["predicted_dsc", "margin"]] = np.nan
        if "real_dsc" in selection:
            selection.loc[fallback, "real_dsc"] = np.nan
        if fallback.any():
            logger.info("%d subject(s) fall back to the pGT: all candidates below %.2f", fallback.sum(), fail_dsc)
    n_without = subjects.loc[subjects["label"] == label, keys].drop_duplicates().shape[0] - len(selection)
    if n_without > 0:
        logger.warning("%d subject(s) have no candidate source with a predicted DSC for %r", n_without, label)
    return selection.reset_index()


def _selection_reason(row: pd.Series, best_primary: pd.Series, fallback_sources: set[str], fail_dsc: float) -> str:
    """Why ``row`` (a selection row) keeps its source, in words; ``best_primary`` is the subject's best candidate
    outside ``fallback_sources`` (source and predicted_dsc, NaN without one)."""
    chosen = f"{row['selected_source']} {row['predicted_dsc']:.2f}"
    if row["selected_source"] in fallback_sources:
        failing = f", itself below {fail_dsc:.2f}" if row["all_failed"] else ""
        if pd.isna(best_primary["predicted_dsc"]):
            return f"no user source: the cohort segmenter's {chosen}{failing}"
        return (f"every user source predicted below {fail_dsc:.2f} (best {best_primary['source']} "
                f"{best_primary['predicted_dsc']:.2f}): the cohort segmenter's {chosen}{failing}")
    if row["all_failed"]:
        return f"every candidate predicted below {fail_dsc:.2f}; the best is {chosen}"
    if row["n_candidates"] == 1:
        return f"the only candidate: {chosen}"
    return (f"highest predicted DSC of {row['n_candidates']} candidates: {chosen} "
            f"(runner-up {row['runner_up_source']} by {row['margin']:.2f})")


def selection_summary(
    subjects: pd.DataFrame,
    selection: pd.DataFrame,
    label: str = "foreground",
    exclude_sources: Sequence[str] = ("gt",),
) -> dict[str, float | int | str | None]:
    """Real DSC of the selection against the best single source and a per-subject oracle.

    Evaluated on the selected subjects whose chosen source has a real DSC (pGT fallbacks have none and are counted
    apart). ``best_single_source`` is the candidate source (same filter as :func:`select_sources`) with the highest
    mean real DSC among those covering all evaluated subjects; ``oracle_real_dsc`` averages, per subject, the
    highest real DSC of any candidate. Means are NaN (and the source None) when no ground truth exists.
    """
    keys = _subject_keys(selection)
    real_selected = _number(selection, "real_dsc")
    evaluated = selection.loc[np.isfinite(real_selected), keys]
    summary: dict[str, float | int | str | None] = {
        "n_subjects": len(selection),
        "n_evaluated": len(evaluated),
        "n_pgt_fallback": int((selection["selected_source"] == PGT_SOURCE).sum()),
        "selection_real_dsc": np.nan,
        "best_single_source": None,
        "best_single_real_dsc": np.nan,
        "oracle_real_dsc": np.nan,
    }
    if evaluated.empty:
        logger.info("source selection: no ground truth to evaluate it")
        return summary
    candidates = _candidates(subjects, label, exclude_sources)
    candidates = candidates[np.isfinite(_number(candidates, "real_dsc"))]
    real = candidates.pivot_table(index=keys, columns="source", values="real_dsc", aggfunc="mean")
    real = real.reindex(evaluated.set_index(keys).index)
    per_source = real.dropna(axis=1, how="any").mean(axis=0).sort_index()
    summary["selection_real_dsc"] = float(np.mean(real_selected[np.isfinite(real_selected)]))
    summary["oracle_real_dsc"] = float(real.max(axis=1).mean())
    if not per_source.empty:
        summary["best_single_source"] = str(per_source.idxmax())
        summary["best_single_real_dsc"] = float(per_source.max())
    logger.info("source selection: %s", summary)
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Where to look
# --------------------------------------------------------------------------------------------------------------------

REVIEW_SLICE_COLUMNS = [*KEYS, "slice_index", "slice_ratio", "predicted_dsc", "uncertainty", "priority", "rank"]


def review_slices(slices: pd.DataFrame, verdicts: pd.DataFrame, max_slices_per_subject: int = 5) -> pd.DataFrame:
    """The slices to inspect first for every REVIEW or FAIL row of ``verdicts``.

    Only slices where the candidate or the pGT has foreground count. Slice priority = predicted slice error
    (1 − predicted slice DSC; 0 when undefined) + uncertainty (0 when missing); each (cohort, source, subject,
    label) keeps its ``max_slices_per_subject`` highest. ``rank`` orders all kept slices: riskiest row first,
    then by priority within a row, ties by keys and slice index.
    """
    keys = [k for k in KEYS if k in slices and k in verdicts]
    flagged = verdicts.loc[verdicts["verdict"].isin(["FAIL", "REVIEW"]), [*keys, "risk"]]
    nonempty = (_number(slices, "cand_voxels") > 0) | (_number(slices, "pgt_voxels") > 0)
    table = slices[nonempty].merge(flagged, on=keys, how="inner")
    error = np.nan_to_num(1 - _number(table, "predicted_dsc"))
    table["priority"] = error + np.nan_to_num(_number(table, "uncertainty"))
    table = table.sort_values(
        ["risk", *keys, "priority", "slice_index"],
        ascending=[False, *[True] * len(keys), False, True],
        kind="stable",
        na_position="last",
    )
    table = table.groupby(keys, sort=False, dropna=False).head(max_slices_per_subject)
    table["rank"] = np.arange(1, len(table) + 1)
    return table.reindex(columns=REVIEW_SLICE_COLUMNS).reset_index(drop=True)


def error_regions(
    error_map: np.ndarray,
    spacing: Sequence[float],
    slice_axis: int,
    codes: Mapping[int, str] = ERROR_CODES,
) -> pd.DataFrame:
    """Connected regions of each error kind in an integer error map, largest first.

    ``error_map`` codes voxels by ``codes`` (default: the codes of ``qc.metrics.error_map``, 1 = "extra":
    candidate foreground the pGT lacks, 2 = "missed": pGT foreground the candidate lacks, 3 = "class_confusion").
    Components use full connectivity (26 neighbours in 3D) and are numbered per kind from the largest.
    Columns: kind, component, volume_mm3 (voxels × product of ``spacing``), n_voxels,
    slice_first and slice_last (index range along ``slice_axis``), centroid_vox (voxel coordinates).
    """
    error_map = np.asarray(error_map)
    if len(spacing) != error_map.ndim:
        raise ValueError(f"spacing has {len(spacing)} values for a {error_map.ndim}-D error map")
    axis = slice_axis % error_map.ndim
    voxel_mm3 = float(np.prod(spacing))
    structure = ndimage.generate_binary_structure(error_map.ndim, error_map.ndim)
    rows = []
    for code, kind in codes.items():
        labels, n = ndimage.label(error_map == code, structure=structure)
        if n == 0:
            continue
        ids = np.arange(1, n + 1)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        boxes = ndimage.find_objects(labels)
        centroids = ndimage.center_of_mass(np.ones_like(labels), labels, ids)
        for component, i in enumerate(np.argsort(-sizes, kind="stable"), start=1):
            rows.append(
                {
                    "kind": kind,
                    "component": component,
                    "volume_mm3": float(sizes[i]) * voxel_mm3,
                    "n_voxels": int(sizes[i]),
                    "slice_first": boxes[i][axis].start,
                    "slice_last": boxes[i][axis].stop - 1,
                    "centroid_vox": [float(c) for c in centroids[i]],
                }
            )
    columns = ["kind", "component", "volume_mm3", "n_voxels", "slice_first", "slice_last", "centroid_vox"]
    table = pd.DataFrame(rows, columns=columns)
    table = table.sort_values(["volume_mm3", "kind", "component"], ascending=[False, True, True], kind="stable")
    return table.reset_index(drop=True)
