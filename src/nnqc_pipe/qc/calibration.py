"""Calibration of the predicted DSC on the labelled subjects: a monotone (isotonic) map from predicted to real.

nnQC's pGT has its own bias (e.g. a near-perfect mask rated a little low); where a cohort has ground truth for
some subjects, an isotonic regression fitted on them corrects it without ever reordering candidates. The map is
fitted per label, on every labelled candidate; a real segmenter (a user source, not ``gt`` or ``degraded_*``)
with at least :data:`MIN_SOURCE_SUBJECTS` labelled subjects gets a map of its own, fitted on its rows only, because each
model's masks carry their own bias (e.g. a CNN's masks rated a little high). Its figures must be honest, so every
labelled row gets the prediction of a map fitted *without its subject* (K-fold by subject); rows without ground
truth get the map fitted on every labelled row. ``calibrated_dsc`` sits next to ``predicted_dsc``, never
replacing it.

The same out-of-fold discipline fits ``combined_dsc``, the fusion of every opinion the report computes
(:func:`combine`), and the verdicts' pass threshold (:func:`pass_thresholds`: the score under which the real
segmenters' labelled failures fall, so that good masks just above the configured threshold are not all sent to a
reviewer). A cohort reusing a QC model without labels of its own applies its training cohort's map, fusion and pass
threshold (:func:`exported_fits`, carried by the bundle).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import GroupKFold

from nnqc_pipe.data.io import read_parquet_metadata
from nnqc_pipe.qc.baselines import AGREEMENT_COLUMN, LATENT_SEARCH_COLUMN, SYNTHETIC_SOURCES, VAE_RECON_COLUMN
from nnqc_pipe.qc.learned import LEARNED_DSC

log = logging.getLogger(__name__)

CALIBRATED_COLUMN = "calibrated_dsc"
COMBINED_COLUMN = "combined_dsc"
MIN_SUBJECTS = 5
# A map of one model's own (and the real segmenters' own fusion): on ACDC, 8 labelled subjects per model gave
# out-of-fold maps that reversed the order inside the model (within-model r -0.2); 20 (hippocampus) did not.
MIN_SOURCE_SUBJECTS = 12
MAX_FOLDS = 5


def _isotonic() -> IsotonicRegression:
    return IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")


def calibrate_label(rows: pd.DataFrame, prior: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, object]]:
    """Calibrated DSC of the rows of one label (columns subject, predicted_dsc, real_dsc) and how it was fitted.

    Labelled rows (both values finite) get out-of-fold predictions (:data:`MAX_FOLDS` folds grouped by subject);
    the others the map fitted on all labelled rows (returned as ``map``: its thresholds ``x`` -> ``y``). Fewer
    than :data:`MIN_SUBJECTS` labelled subjects: the ``prior`` map (a QC model's training cohort's, the ``map``
    of its report) where given, else no map (all NaN); the reason is returned.
    """
    predicted = rows["predicted_dsc"].to_numpy(dtype=float)
    real = rows["real_dsc"].to_numpy(dtype=float)
    labelled = np.isfinite(predicted) & np.isfinite(real)
    groups = rows["subject"].to_numpy()[labelled]
    n_subjects = len(set(groups))
    out = np.full(len(rows), np.nan)
    if n_subjects < MIN_SUBJECTS:
        reason = f"{n_subjects} labelled subjects (< {MIN_SUBJECTS})"
        if prior is None:
            return out, {"fitted": False, "reason": reason}
        usable = np.isfinite(predicted)
        out[usable] = np.interp(predicted[usable], prior["x"], prior["y"])
        return out, {"fitted": False, "reason": reason, "method": PRIOR_METHOD}
    x, y = predicted[labelled], real[labelled]
    out[labelled], n_folds = out_of_fold(x, y, groups, _isotonic)
    rest = ~labelled & np.isfinite(predicted)
    full = _isotonic().fit(x, y)
    if rest.any():
        out[rest] = full.predict(predicted[rest])
    info = {"fitted": True, "method": "isotonic regression, predicted -> real DSC",
            "labelled_rows": int(labelled.sum()), "labelled_subjects": n_subjects,
            "folds": n_folds, "cross_validated": CROSS_VALIDATED,
            "map": {"x": full.X_thresholds_.tolist(), "y": full.y_thresholds_.tolist()}}
    return out, info


# How a cohort with too few labelled subjects of its own scores with a QC model's (qc_model) fits.
PRIOR_METHOD = "the fit of the QC model's training cohort (qc_model bundle), applied as it is"


CROSS_VALIDATED = ("by subject: labelled rows are predicted by a map fitted without their subject; other rows by "
                   "the map fitted on all labelled rows")


def out_of_fold(x: np.ndarray, y: np.ndarray, groups: np.ndarray, make_model: Callable[[], Any]
                ) -> tuple[np.ndarray, int]:
    """Out-of-fold predictions of ``make_model()`` fitted on (x, y) with folds grouped by subject (``groups``):
    no row is ever predicted by a model that saw its own subject. Returns the predictions and the fold count."""
    oof = np.empty(len(x))
    folds = GroupKFold(n_splits=min(MAX_FOLDS, len(set(groups))))
    for train, test in folds.split(x, y, groups):
        oof[test] = make_model().fit(x[train], y[train]).predict(x[test])
    return oof, int(folds.n_splits)


# The opinions ``combined_dsc`` fuses, in this order, each where the report has values of it: nnQC's predicted DSC
# (always), the learned opinion, Wang et al.'s latent search, the inter-source agreement and the VAE reconstruction.
FUSED_OPINIONS = ("predicted_dsc", LEARNED_DSC, LATENT_SEARCH_COLUMN, AGREEMENT_COLUMN, VAE_RECON_COLUMN)


def fused_opinions(subjects: pd.DataFrame) -> list[str]:
    """The :data:`FUSED_OPINIONS` the subjects table has at least one value of."""
    return [c for c in FUSED_OPINIONS if c in subjects and subjects[c].notna().any()]


def subject_folds(subjects: np.ndarray) -> dict[object, int]:
    """Subject -> fold (at most :data:`MAX_FOLDS`, balanced by sorted name, deterministic)."""
    names = sorted(set(subjects.tolist()), key=str)
    n_folds = min(MAX_FOLDS, len(names))
    return {name: i % n_folds for i, name in enumerate(names)}


def fusion_regression(x: np.ndarray, y: np.ndarray) -> LinearRegression:
    """The linear regression of y on the columns of x; on too few rows for them (fewer than two per coefficient),
    on the first column (nnQC's predicted DSC) alone, its coefficients padded with zeros."""
    if len(y) >= 2 * (x.shape[1] + 1) or x.shape[1] == 1:
        return LinearRegression().fit(x, y)
    first = LinearRegression().fit(x[:, :1], y)
    first.coef_ = np.concatenate([first.coef_, np.zeros(x.shape[1] - 1)])
    first.n_features_in_ = x.shape[1]
    return first


def prior_fusion(features: np.ndarray, opinions: list[str], coefficients: dict[str, dict[str, float]]
                 ) -> np.ndarray:
    """The fused score of each row from fitted ``coefficients`` (:func:`combine_label`'s, by pattern of opinions):
    each row with the pattern of the most opinions it has all of; the plain mean of its opinions where none fits."""
    available = np.isfinite(features)
    patterns = sorted(((key, key.split("+")) for key in coefficients), key=lambda kv: -len(kv[1]))
    out = np.full(len(features), np.nan)
    for i, row in enumerate(features):
        if not available[i, 0]:
            continue
        have = {name for name, ok in zip(opinions, available[i], strict=True) if ok}
        key, names = next(((k, n) for k, n in patterns if set(n) <= have), (None, None))
        if key is None:
            out[i] = np.nanmean(row)
            continue
        weights = coefficients[key]
        out[i] = weights["intercept"] + sum(weights[n] * row[opinions.index(n)] for n in names)
    return np.clip(out, 0.0, 1.0)


def combine_label(rows: pd.DataFrame, opinions: list[str] | None = None, prior: dict[str, Any] | None = None
                  ) -> tuple[np.ndarray, dict[str, object]]:
    """``combined_dsc`` of the rows of one label (columns subject, real_dsc and the ``opinions``, by default
    :func:`fused_opinions`; the first is nnQC's predicted DSC, which every scored row has).

    A linear regression of the real DSC on the opinions, clipped to [0, 1]. A row is scored with the opinions it has
    (the agreement is missing where a subject has no other real segmenter): each pattern of available opinions gets
    its own regression, fitted on the labelled rows that have all of them. Labelled rows get out-of-fold predictions
    (folds by subject, :func:`subject_folds`: no row is scored by a fit that saw its subject); the others the
    regression fitted on every labelled row. With fewer than :data:`MIN_SUBJECTS` labelled subjects nothing can be
    fitted honestly: the combined score applies the ``prior`` coefficients (a QC model's training cohort's,
    :func:`prior_fusion`) where given, else it is the plain mean of the row's opinions; the info says which.
    """
    opinions = list(opinions) if opinions is not None else fused_opinions(rows)
    features = rows[opinions].to_numpy(dtype=float)
    available = np.isfinite(features)
    usable = available[:, 0]
    real = rows["real_dsc"].to_numpy(dtype=float)
    subjects = rows["subject"].to_numpy()
    labelled = usable & np.isfinite(real)
    n_subjects = len(set(subjects[labelled].tolist()))
    out = np.full(len(rows), np.nan)
    if n_subjects < MIN_SUBJECTS:
        reason = f"{n_subjects} labelled subjects (< {MIN_SUBJECTS})"
        if prior is not None:
            return prior_fusion(features, opinions, prior["coefficients"]), {
                "fitted": False, "reason": reason, "method": PRIOR_METHOD, "coefficients": prior["coefficients"]}
        out[usable] = np.nanmean(features[usable], axis=1)
        return out, {"fitted": False, "method": f"mean of {', '.join(opinions)} (not fitted)", "reason": reason}
    folds = subject_folds(subjects[labelled])
    fold = np.array([folds[s] if lab else -1 for s, lab in zip(subjects, labelled, strict=True)])
    coefficients: dict[str, dict[str, float]] = {}
    for pattern in sorted({tuple(a) for a in available[usable]}, reverse=True):
        columns = np.flatnonzero(pattern)
        x = features[:, columns]
        targets = usable & (available == np.array(pattern)).all(axis=1)
        fit_rows = labelled & available[:, columns].all(axis=1)
        for k in sorted(set(fold[targets & labelled].tolist())):
            train, scored = fit_rows & (fold != k), targets & labelled & (fold == k)
            out[scored] = fusion_regression(x[train], real[train]).predict(x[scored])
        model = fusion_regression(x[fit_rows], real[fit_rows])
        rest = targets & ~labelled
        if rest.any():
            out[rest] = model.predict(x[rest])
        coefficients["+".join(opinions[c] for c in columns)] = {
            **{opinions[c]: float(w) for c, w in zip(columns, model.coef_, strict=True)},
            "intercept": float(model.intercept_), "rows": int(targets.sum())}
    info = {"fitted": True, "method": f"linear regression of the real DSC on {', '.join(opinions)} (those a row has)",
            "coefficients": coefficients, "labelled_rows": int(labelled.sum()), "labelled_subjects": n_subjects,
            "folds": len(set(folds.values())), "cross_validated": CROSS_VALIDATED}
    return np.clip(out, 0.0, 1.0), info


def combine(subjects: pd.DataFrame, prior: dict[str, dict[str, Any]] | None = None
            ) -> tuple[pd.Series, dict[str, dict[str, object]]]:
    """``combined_dsc`` for every row of the subjects table and, per label, how it was fitted
    (:func:`combine_label`, with the label's ``prior`` fit if any); all NaN where the report has fewer than two
    opinions to fuse.

    The real segmenters' rows (the user sources: not ``gt``, not ``degraded_*``) get a fusion of their own, fitted
    on their labelled rows only, once those cover :data:`MIN_SOURCE_SUBJECTS` subjects (``user_sources`` in the
    info): fitted over every candidate, the regression must lift the manual mask and the degradations, which nnQC
    rates low, and so over-rates the good masks of real segmenters (docs/method.md, "Fusing every opinion").
    """
    combined = pd.Series(np.nan, index=subjects.index, name=COMBINED_COLUMN)
    opinions = fused_opinions(subjects)
    if len(opinions) < 2:
        return combined, {"all": {"fitted": False, "reason": f"fewer than two opinions to fuse ({opinions})"}}
    info: dict[str, dict[str, object]] = {}
    for label, rows in subjects.groupby("label", sort=True):
        values, info[str(label)] = combine_label(rows, opinions, (prior or {}).get(str(label)))
        combined.loc[rows.index] = values
        users = rows[~rows["source"].astype(str).str.startswith(SYNTHETIC_SOURCES)] if "source" in rows else rows[:0]
        if users.loc[users["real_dsc"].notna(), "subject"].nunique() >= MIN_SOURCE_SUBJECTS:
            own_values, info[str(label)]["user_sources"] = combine_label(users, opinions)
            combined.loc[users.index] = own_values
    log.info("combined score (%s): %s", "+".join(opinions),
             {k: v.get("labelled_subjects", v.get("reason")) for k, v in info.items()})
    return combined, info


def calibrate(subjects: pd.DataFrame, prior: dict[str, dict[str, Any]] | None = None
              ) -> tuple[pd.Series, dict[str, dict[str, object]]]:
    """``calibrated_dsc`` for every row of the subjects table (aligned to its index) and, per label, how it was
    fitted (for the report metadata; ``per_source`` lists the real segmenters that got a map of their own); a label
    with too few labelled subjects uses its ``prior`` map if any (:func:`calibrate_label`)."""
    calibrated = pd.Series(np.nan, index=subjects.index, name=CALIBRATED_COLUMN)
    info = {}
    for label, rows in subjects.groupby("label", sort=True):
        values, info[str(label)] = calibrate_label(rows, (prior or {}).get(str(label)))
        calibrated.loc[rows.index] = values
        per_source = {}
        for source, own in (rows.groupby("source", sort=True) if "source" in rows else []):
            if str(source).startswith(SYNTHETIC_SOURCES):
                continue
            if own.loc[own["real_dsc"].notna(), "subject"].nunique() < MIN_SOURCE_SUBJECTS:
                continue
            own_values, own_info = calibrate_label(own)
            if own_info["fitted"]:
                calibrated.loc[own.index] = own_values
                per_source[str(source)] = own_info
        if per_source:
            info[str(label)]["per_source"] = per_source
    log.info("calibration: %s", {k: v.get("labelled_subjects", v.get("reason")) for k, v in info.items()})
    return calibrated, info


PASS_THRESHOLD_COLUMN = "pass_threshold"
# The review band a learned pass threshold keeps above fail_dsc (the verdicts' DSC shortfall needs pass > fail).
MIN_REVIEW_BAND = 0.01


def conformal_bound(failure_scores: np.ndarray, max_missed: float) -> float | None:
    """The split-conformal upper bound of failure scores: the k-th smallest of the n finite ``failure_scores``,
    k = ⌈(1 − ``max_missed``)·(n + 1)⌉, under which a new failure (exchangeable with these) scores with probability
    at least 1 − ``max_missed``. None when n is too small for that guarantee (k > n, e.g. n < 19 at 0.05)."""
    scores = np.sort(np.asarray(failure_scores, dtype=float))
    scores = scores[np.isfinite(scores)]
    k = math.ceil((1.0 - max_missed) * (scores.size + 1))
    return float(scores[k - 1]) if k <= scores.size else None


def learned_pass_dsc(failure_scores: np.ndarray, max_missed: float, fail_dsc: float, pass_dsc: float
                     ) -> float | None:
    """The pass threshold the failures justify: just above their :func:`conformal_bound` (a failure scored exactly
    there is still below it), kept within [``fail_dsc`` + :data:`MIN_REVIEW_BAND`, ``pass_dsc``]: the labels only
    ever lower the configured threshold. None when too few failures bound it."""
    bound = conformal_bound(failure_scores, max_missed)
    if bound is None:
        return None
    return float(min(max(np.nextafter(bound, np.inf), fail_dsc + MIN_REVIEW_BAND), pass_dsc))


PASS_METHOD = ("split-conformal bound of the labelled subjects' highest failure score of a real segmenter, within "
               f"[fail_dsc + {MIN_REVIEW_BAND}, qc_pass_dsc]")
LEAVE_ONE_OUT = ("leave one subject out: each labelled subject's rows get the threshold fitted without its "
                 "failures; other rows the fit on every failure")


def pass_threshold_label(rows: pd.DataFrame, score_column: str, fail_dsc: float, pass_dsc: float,
                         max_missed: float, prior: dict[str, Any] | None = None
                         ) -> tuple[np.ndarray, dict[str, object]]:
    """Each row's pass threshold for one label (columns subject, source, real_dsc and ``score_column``).

    The failures are the real segmenters' labelled masks (user sources, not ``gt`` nor ``degraded_*``: their
    scores are what the verdicts must catch; synthetic failures score lower and would set the bar too low) of real
    DSC < ``fail_dsc``. A subject's failures are not independent of one another (a hard image fails every
    segmenter, and its pGT errs on all of them alike), so the exchangeable unit is the subject: the threshold is
    :func:`learned_pass_dsc` of each subject's highest failure score, and bounds all of a new subject's failures at
    once. Leave one subject out: every row of a labelled subject gets the threshold fitted on the other subjects'
    failures (a sort, so every subject can have its own fit; with 5 folds, a cohort just above the bound's minimum
    number of failures fell short in every fold); the other rows the fit on every failure. A fit with too few
    failures falls back to the ``prior`` threshold (a QC model's training cohort's, when fitted on the same score)
    or else to ``pass_dsc``.
    """
    scores = rows[score_column].to_numpy(dtype=float)
    real = rows["real_dsc"].to_numpy(dtype=float)
    subjects = rows["subject"].to_numpy()
    users = ~rows["source"].astype(str).str.startswith(SYNTHETIC_SOURCES).to_numpy()
    labelled = users & np.isfinite(real) & np.isfinite(scores)
    failed = labelled & (real < fail_dsc)
    usable_prior = prior if prior is not None and prior.get("score") == score_column else None
    fallback = float(min(max(usable_prior["threshold"], fail_dsc + MIN_REVIEW_BAND), pass_dsc)) if usable_prior \
        else pass_dsc

    worst = pd.Series(scores[failed]).groupby(subjects[failed]).max()

    def fit(left_out: object = None) -> float | None:
        return learned_pass_dsc(worst[worst.index != left_out].to_numpy(), max_missed, fail_dsc, pass_dsc)

    full = fit()
    out = np.full(len(rows), fallback if full is None else full)
    info: dict[str, object] = {"score": score_column, "max_missed_failures": max_missed, "failures": int(failed.sum()),
                               "subjects_with_failures": int(worst.size),
                               "labelled_subjects": len(set(subjects[labelled].tolist()))}
    if full is None:
        info.update(fitted=False, threshold=fallback,
                    reason=f"{worst.size} labelled subjects with failures of real segmenters: too few to bound "
                           f"{1 - max_missed:.0%} of them",
                    method=PRIOR_METHOD if usable_prior else "the configured qc_pass_dsc")
        return out, info
    own = {subject: fallback if (value := fit(subject)) is None else value
           for subject in sorted(set(subjects[labelled].tolist()))}
    for subject, value in own.items():
        out[subjects == subject] = value
    values = np.array(list(own.values()))
    info.update(fitted=True, threshold=full, method=PASS_METHOD, cross_validated=LEAVE_ONE_OUT,
                subjects_threshold={"min": float(values.min()), "max": float(values.max()),
                                    "at_fallback": int((values == fallback).sum())})
    return out, info


def pass_thresholds(subjects: pd.DataFrame, score_column: str, fail_dsc: float, pass_dsc: float,
                    max_missed: float | None, prior: dict[str, dict[str, Any]] | None = None
                    ) -> tuple[pd.Series, dict[str, dict[str, object]]]:
    """Per row, the score from which a candidate can PASS (:func:`pass_threshold_label`, per label) and how each
    label's threshold was chosen; ``max_missed`` None keeps the configured ``pass_dsc`` everywhere."""
    thresholds = pd.Series(pass_dsc, index=subjects.index, name=PASS_THRESHOLD_COLUMN, dtype=float)
    if max_missed is None:
        return thresholds, {"all": {"fitted": False, "threshold": pass_dsc, "method": "the configured qc_pass_dsc"}}
    info = {}
    for label, rows in subjects.groupby("label", sort=True):
        values, info[str(label)] = pass_threshold_label(rows, score_column, fail_dsc, pass_dsc, max_missed,
                                                        (prior or {}).get(str(label)))
        thresholds.loc[rows.index] = values
    log.info("pass thresholds on %s: %s", score_column, {k: round(float(v["threshold"]), 4) for k, v in info.items()})
    return thresholds, info


def exported_fits(calibration: dict[str, dict[str, Any]], combined: dict[str, dict[str, Any]],
                  passing: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """What a QC model bundle carries to a cohort without labels of its own, from a report's ``calibration``,
    ``combined`` and ``pass_threshold`` metadata: per fitted label, the pooled isotonic map, the fusion's
    coefficients (those of the real segmenters' own fusion where there is one: a new cohort's candidates are real
    segmenters' masks; the per-source maps stay, a new cohort has other sources) and the learned pass threshold
    with the score it was fitted on."""
    return {"calibration": {label: info["map"] for label, info in calibration.items()
                            if info.get("fitted") and "map" in info},
            "combined": {label: {"coefficients": info.get("user_sources", info)["coefficients"]}
                         for label, info in combined.items() if info.get("fitted")},
            "pass_threshold": {label: {"score": info["score"], "threshold": info["threshold"]}
                               for label, info in (passing or {}).items() if info.get("fitted")}}


def report_fits(subjects_parquet: str | os.PathLike, checkpoints: dict[str, str]) -> dict[str, Any] | None:
    """:func:`exported_fits` of a cohort's report (``report/subjects.parquet``) when it was written with the
    networks of ``checkpoints`` (a model card's SHA-256 by file name); None, logged, when there is no report, it is
    stale (other networks) or it fitted nothing."""
    path = Path(subjects_parquet)
    if not path.is_file():
        log.info("no report at %s: the bundle carries no calibration or fusion fit", path)
        return None
    meta = read_parquet_metadata(path)
    stale = sorted(name for name, digest in meta.get("checkpoints", {}).items() if checkpoints.get(name) != digest)
    if stale:
        log.warning("%s was written with other networks (%s): the bundle carries no calibration or fusion fit; "
                    "rerun the report first", path, ", ".join(stale))
        return None
    fits = exported_fits(meta.get("calibration") or {}, meta.get("combined") or {}, meta.get("pass_threshold"))
    if not any(fits.values()):
        log.info("the report at %s fitted no calibration or fusion (too few labelled subjects)", path)
        return None
    return fits
