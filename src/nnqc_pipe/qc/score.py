"""Scoring one (source, subject): candidate vs pseudo-GT (predicted quality) and vs GT (real quality).

Every metric is computed on the subject's original grid with its real voxel spacing (mm).
"""

from __future__ import annotations

import os
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from nnqc_pipe.data.io import check_same_grid, load_volume, read_label_array, spacing_of
from nnqc_pipe.data.preprocess import original_slice_order
from nnqc_pipe.qc.baselines import reconstruction_dice
from nnqc_pipe.qc.learned import learned_dice, learned_scores
from nnqc_pipe.qc.metrics import compute_metrics, compute_slice_metrics
from nnqc_pipe.report.tables import score_rows


def _load_on_grid(path: str | os.PathLike, reference: nib.Nifti1Image, subject: str, values: list[int],
                  what: str) -> np.ndarray:
    img = load_volume(path, subject, what)
    check_same_grid(reference, img, subject, path, what)
    return read_label_array(img, subject, path, values)


def all_metric_rows(candidate: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...],
                    label_names: dict[int, str], slice_axis: int, tolerance_mm: float) -> list[dict[str, Any]]:
    """Volume rows followed by per-slice rows of every label group."""
    return (compute_metrics(candidate, reference, spacing, label_names, tolerance_mm)
            + compute_slice_metrics(candidate, reference, spacing, label_names, slice_axis, tolerance_mm))


def score_subject(
    cohort: str,
    source: str,
    subject: str,
    candidate_path: str | os.PathLike,
    pgt_path: str | os.PathLike,
    gt_path: str | os.PathLike | None,
    slices: pd.DataFrame,
    record: dict[str, Any],
    label_names: dict[int, str],
    tolerance_mm: float,
    learned_path: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """The scores table of one candidate (see :func:`nnqc_pipe.report.tables.score_rows`); with
    ``learned_path`` (the learned opinion's estimated truth) also ``learned_dsc`` (counted from the per-slice
    error counts in ``slices``) and ``learned_nsd`` (candidate against the estimated truth)."""
    values = record["label_values"]
    pgt_img = load_volume(pgt_path, subject, "pseudo ground truth")
    candidate = _load_on_grid(candidate_path, pgt_img, subject, values, "candidate mask")
    pgt = read_label_array(pgt_img, subject, pgt_path, values)
    spacing = spacing_of(pgt_img)
    axis, _ = original_slice_order(record)
    predicted = all_metric_rows(candidate, pgt, spacing, label_names, axis, tolerance_mm)
    real = None
    if gt_path is not None:
        gt = _load_on_grid(gt_path, pgt_img, subject, values, "label")
        real = all_metric_rows(candidate, gt, spacing, label_names, axis, tolerance_mm)
    ratio = np.full(candidate.shape[axis], np.nan)
    ratio[slices.slice_index.to_numpy()] = slices.slice_ratio.to_numpy()
    uncertainty = {("foreground", int(i)): float(u) for i, u in zip(slices.slice_index, slices.uncertainty,
                                                                    strict=True)}
    uncertainty[("foreground", None)] = float(slices.uncertainty.mean())
    recon = reconstruction_dice(slices, label_names, values)
    learned = None
    if learned_path is not None:
        estimated = _load_on_grid(learned_path, pgt_img, subject, values, "learned estimated truth")
        nsd = all_metric_rows(candidate, estimated, spacing, label_names, axis, tolerance_mm)
        learned = learned_scores(learned_dice(slices, label_names, values), nsd)
    return score_rows(cohort, source, subject, predicted, real, ratio, uncertainty, recon, learned)
