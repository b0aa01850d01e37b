"""Domain shift: is a QC'd subject, and its candidate, inside what the QC model was trained on?

A pGT (and so a predicted quality) is only as trustworthy as the model is at home with the image. Each QC'd
(subject, source) is compared with the training subjects' ranges recorded in ``fingerprint.json`` (``ranges``,
see :mod:`nnqc_pipe.data.fingerprint`), widened on each side by the larger of a relative tolerance (default 10 %
of the larger magnitude of the range's bounds) and half the range's width. The width term is there because a bare
[min, max] of n training subjects leaves out an in-distribution subject with probability 2/(n + 1) per feature
(about 10 % at n = 20, and there are a dozen features): on the shared hippocampus benchmark (20 training subjects)
it sent subjects to review for a foreground contrast 0.1 SD beyond the training maximum while every segmenter did
well on them (docs/method.md). Half the width puts the bound near 3.7 SD of a normal feature whose 20 training
values span their expected 3.7 SD (a rough estimate, not measured), and still flags a shift of several training
spreads:

- every subject: voxel spacing and field of view (mm, per RAS axis), whole-image intensity percentiles 0.5/99.5;
- subjects with a label file: their ground truth's foreground intensity percentiles and extent (mm per axis);
- every candidate: its foreground volume (mm³) against the training foreground volumes.

Intensities are compared in the units the models see: for a modality z-scored per subject (every one but CT) in
the subject's own z units (:func:`nnqc_pipe.data.fingerprint.standardised_intensities`), so an MR scanner's
arbitrary scale is no shift. A fingerprint of an older version, with raw ranges only, is compared raw.

An unlabelled subject has no foreground to measure intensities or extent on; its intensities are compared on the
whole image, against the training subjects' whole-image percentiles, and nothing else is assumed. A feature
whose training range is not in the fingerprint (an older fingerprint) is not checked.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from nnqc_pipe.data.fingerprint import STANDARDISED_SUFFIX, subject_features

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.10
# The share of the training range's width added beyond each bound (see the module docstring).
SPREAD_MARGIN = 0.5
OOD_COLUMNS = ["subject", "source", "flag_out_of_distribution", "ood_reason"]
AXES = ("R", "A", "S")


def widened(lo: float, hi: float, tolerance: float, spread: float = SPREAD_MARGIN) -> tuple[float, float]:
    """The range [lo, hi] widened on both sides by the larger of ``tolerance`` times the larger magnitude of its
    bounds and ``spread`` times its width."""
    margin = max(tolerance * max(abs(lo), abs(hi)), spread * (hi - lo))
    return lo - margin, hi + margin


def deviations(features: dict[str, Any], ranges: dict[str, dict[str, Any]], tolerance: float) -> list[str]:
    """A reason per feature value (per axis) outside its widened training range; features without a range are
    skipped."""
    reasons = []
    for name, value in features.items():
        if name not in ranges:
            continue
        values, los, his = (np.atleast_1d(np.asarray(v, dtype=float))
                            for v in (value, ranges[name]["min"], ranges[name]["max"]))
        for axis, (v, lo, hi) in enumerate(zip(values, los, his, strict=True)):
            low, high = widened(lo, hi, tolerance)
            if not low <= v <= high:
                where = f"[{AXES[axis]}]" if len(values) > 1 else ""
                reasons.append(f"{name}{where} {v:.4g} outside training range [{lo:.4g}, {hi:.4g}]")
    return reasons


def subject_deviations(record: dict[str, Any], ranges: dict[str, dict[str, Any]], tolerance: float,
                       modality: str | None = None) -> list[str]:
    """The subject-level reasons (geometry, intensities, GT extent; intensities as the fingerprint of ``modality``
    holds them: in z units where it has their ranges, raw otherwise); the GT's volume is left to the ``gt``
    candidate."""
    standardised = any(name.endswith(STANDARDISED_SUFFIX) for name in ranges)
    features = subject_features(record, modality if standardised else None)
    features.pop("fg_volume_mm3", None)
    return deviations(features, ranges, tolerance)


def candidate_volume_mm3(cand_voxels: float, record: dict[str, Any]) -> float:
    """A candidate's foreground volume in mm³ from its voxel count and the subject's voxel spacing."""
    return float(cand_voxels) * float(np.prod(record["spacing"]))


def candidate_deviations(cand_voxels: float, record: dict[str, Any], ranges: dict[str, dict[str, Any]],
                         tolerance: float) -> list[str]:
    """The candidate's foreground volume against the training foreground volumes (nothing without a count)."""
    if pd.isna(cand_voxels) or "fg_volume_mm3" not in ranges:
        return []
    return deviations({"candidate_volume_mm3": candidate_volume_mm3(cand_voxels, record)},
                      {"candidate_volume_mm3": ranges["fg_volume_mm3"]}, tolerance)


def ood_table(records: dict[str, dict[str, Any]], fingerprint: dict[str, Any], candidates: pd.DataFrame,
              tolerance: float = DEFAULT_TOLERANCE) -> pd.DataFrame:
    """Per (subject, source): ``flag_out_of_distribution`` and ``ood_reason`` (every feature outside the training
    range, "; "-separated; empty when none).

    ``records``: subject -> ingestion record (``inspect/{subject}.json``); ``fingerprint``: the training
    fingerprint (the cohort's ``fingerprint.json``, with ``qc_model`` the bundle's); ``candidates``: columns
    ``subject``, ``source``, ``cand_voxels`` (candidate foreground voxels; with a ``label`` column, as in the
    report's subjects table, its ``foreground`` rows are used).
    """
    if "label" in candidates.columns:
        candidates = candidates[candidates.label == "foreground"]
    ranges = fingerprint.get("ranges", {})
    if not ranges:
        log.warning("fingerprint has no training ranges (computed by an older version): domain shift not checked")
    missing = sorted(set(candidates.subject) - set(records))
    if missing:
        raise ValueError(f"no ingestion record for subject(s) {missing[:10]} (inspect/<subject>.json)")
    if candidates.duplicated(["subject", "source"]).any():
        raise ValueError("ood_table: candidates must have one row per (subject, source)")
    modality = fingerprint.get("modality")
    per_subject = {s: subject_deviations(records[s], ranges, tolerance, modality) for s in candidates.subject.unique()}
    rows = []
    for subject, source, voxels in candidates[["subject", "source", "cand_voxels"]].itertuples(index=False):
        reasons = per_subject[subject] + candidate_deviations(voxels, records[subject], ranges, tolerance)
        rows.append({"subject": subject, "source": source, "flag_out_of_distribution": bool(reasons),
                     "ood_reason": "; ".join(reasons)})
    return pd.DataFrame(rows, columns=OOD_COLUMNS)
