"""Calibration of the predicted DSC on the labelled subjects: a monotone (isotonic) map from predicted to real.

nnQC's pGT has its own bias (e.g. a near-perfect mask rated a little low); where a cohort has ground truth for
some subjects, an isotonic regression fitted on them corrects it without ever reordering candidates. The map is
fitted per label, on every labelled candidate; a real segmenter (a user source, not ``gt`` or ``degraded_*``)
with at least :data:`MIN_SOURCE_SUBJECTS` labelled subjects gets a map of its own, fitted on its rows only, because each
model's masks carry their own bias (e.g. a CNN's masks rated a little high). Its figures must be honest, so every
labelled row gets the prediction of a map fitted *without its subject* (K-fold by subject); rows without ground
truth get the map fitted on every labelled row. ``calibrated_dsc`` sits next to ``predicted_dsc``, never
replacing it.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import GroupKFold

from nnqc_pipe.qc.baselines import SYNTHETIC_SOURCES

log = logging.getLogger(__name__)

CALIBRATED_COLUMN = "calibrated_dsc"
MIN_SUBJECTS = 5
# A map of one model's own: on ACDC, 8 labelled subjects per model gave out-of-fold maps that reversed the order
# inside the model (within-model r -0.2); 20 (hippocampus) did not.
MIN_SOURCE_SUBJECTS = 12
MAX_FOLDS = 5


def _isotonic() -> IsotonicRegression:
    return IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")


def calibrate_label(rows: pd.DataFrame) -> tuple[np.ndarray, dict[str, object]]:
    """Calibrated DSC of the rows of one label (columns subject, predicted_dsc, real_dsc) and how it was fitted.

    Labelled rows (both values finite) get out-of-fold predictions (:data:`MAX_FOLDS` folds grouped by subject);
    the others the map fitted on all labelled rows. Fewer than :data:`MIN_SUBJECTS` labelled subjects: no map
    (all NaN), and the reason is returned.
    """
    predicted = rows["predicted_dsc"].to_numpy(dtype=float)
    real = rows["real_dsc"].to_numpy(dtype=float)
    labelled = np.isfinite(predicted) & np.isfinite(real)
    groups = rows["subject"].to_numpy()[labelled]
    n_subjects = len(set(groups))
    out = np.full(len(rows), np.nan)
    if n_subjects < MIN_SUBJECTS:
        return out, {"fitted": False, "reason": f"{n_subjects} labelled subjects (< {MIN_SUBJECTS})"}
    x, y = predicted[labelled], real[labelled]
    oof = np.empty(len(x))
    folds = GroupKFold(n_splits=min(MAX_FOLDS, n_subjects))
    for train, test in folds.split(x, y, groups):
        oof[test] = _isotonic().fit(x[train], y[train]).predict(x[test])
    out[labelled] = oof
    rest = ~labelled & np.isfinite(predicted)
    if rest.any():
        out[rest] = _isotonic().fit(x, y).predict(predicted[rest])
    info = {"fitted": True, "method": "isotonic regression, predicted -> real DSC",
            "labelled_rows": int(labelled.sum()), "labelled_subjects": n_subjects,
            "folds": int(folds.n_splits), "cross_validated": "by subject: labelled rows are predicted by a map "
            "fitted without their subject; other rows by the map fitted on all labelled rows"}
    return out, info


def calibrate(subjects: pd.DataFrame) -> tuple[pd.Series, dict[str, dict[str, object]]]:
    """``calibrated_dsc`` for every row of the subjects table (aligned to its index) and, per label, how it was
    fitted (for the report metadata; ``per_source`` lists the real segmenters that got a map of their own)."""
    calibrated = pd.Series(np.nan, index=subjects.index, name=CALIBRATED_COLUMN)
    info = {}
    for label, rows in subjects.groupby("label", sort=True):
        values, info[str(label)] = calibrate_label(rows)
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
