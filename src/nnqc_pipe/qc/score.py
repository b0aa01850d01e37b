"""Scoring one (source, subject): candidate vs pseudo-GT (predicted quality) and vs GT (real quality).

Every metric is computed on the subject's original grid with its real voxel spacing (mm).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from nnqc_pipe.data.io import check_same_grid, load_volume, read_label_array, spacing_of
from nnqc_pipe.data.preprocess import original_slice_order
from nnqc_pipe.qc.baselines import LATENT_PREFIX, LATENT_SEARCH_COLUMN, VAE_RECON_COLUMN, reconstruction_dice
from nnqc_pipe.qc.columns import LEARNED_COLUMNS, PREDICTED, REAL, metric_names, scores_schema, typed
from nnqc_pipe.qc.learned import learned_dice, learned_scores
from nnqc_pipe.qc.metrics import FLAGS, METRICS, compute_metrics, compute_slice_metrics


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
    """The scores table of one candidate (see :func:`score_rows`); with
    ``learned_path`` (the learned opinion's estimated truth) also ``learned_dsc`` (counted from the per-slice
    error counts in ``slices``) and ``learned_nsd`` (candidate against the estimated truth). ``latent_search_dsc``
    is counted from the latent search's per-slice counts in ``slices`` (NaN without them)."""
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
    latent = reconstruction_dice(slices, label_names, values, LATENT_PREFIX)
    return score_rows(cohort, source, subject, predicted, real, ratio, uncertainty, recon, learned, latent)


def score_rows(
    cohort: str,
    source: str,
    subject: str,
    predicted_rows: Sequence[Mapping[str, Any]],
    real_rows: Sequence[Mapping[str, Any]] | None,
    slice_ratio: Sequence[float] | np.ndarray | None,
    uncertainty: Mapping[tuple[str, int | None], float] | None = None,
    vae_recon: Mapping[tuple[str, int | None], float] | None = None,
    learned: Mapping[str, Mapping[tuple[str, int | None], float]] | None = None,
    latent_search: Mapping[tuple[str, int | None], float] | None = None,
) -> pd.DataFrame:
    """The scores table of one (source, subject) from :mod:`nnqc_pipe.qc.metrics` rows.

    ``predicted_rows``/``real_rows`` are ``compute_metrics(...) + compute_slice_metrics(...)`` of the
    candidate against the pseudo-GT and against the GT (``real_rows`` is None when the subject has no GT;
    otherwise it must cover the same labels and slices). ``slice_ratio[i]`` is the ratio of slice ``i`` (None:
    NaN); ``uncertainty`` maps ``(label, slice_index or None)`` to the disagreement between pGT samples (see
    ``metrics.sample_disagreement``; None: NaN); ``vae_recon`` maps the same keys to the VAE-reconstruction
    baseline (:func:`nnqc_pipe.qc.baselines.reconstruction_dice`; None or a missing key: NaN); ``learned`` maps
    ``learned_dsc`` / ``learned_nsd`` to such a mapping (:func:`nnqc_pipe.qc.learned.learned_scores`; None: NaN);
    ``latent_search`` maps the ``vae_recon`` keys to the latent-search DSC (None or a missing key: NaN).
    """
    predicted = _prefixed_frame(predicted_rows, PREDICTED, "pgt_voxels")
    if real_rows is None:
        table = predicted
    else:
        real = _prefixed_frame(real_rows, REAL, "gt_voxels")
        _check_same_keys(predicted, real, source, subject)
        table = predicted.merge(real.drop(columns="cand_voxels"), on=["label", "slice_index"], how="left")
    for flag in FLAGS:
        column = f"{REAL}_{flag}"
        table[column] = table[column].fillna(False) if column in table else False
    table["cohort"], table["source"], table["subject"] = cohort, source, subject
    table["level"] = np.where(table["slice_index"].isna(), "volume", "slice")
    table["slice_ratio"] = _slice_ratios(table["slice_index"], slice_ratio)
    table["uncertainty"] = _per_row(table, uncertainty)
    table[VAE_RECON_COLUMN] = _per_row(table, vae_recon)
    for column in LEARNED_COLUMNS:
        table[column] = _per_row(table, (learned or {}).get(column))
    table[LATENT_SEARCH_COLUMN] = _per_row(table, latent_search)
    return typed(table, scores_schema(metric_names(table)))


def _per_row(table: pd.DataFrame, values: Mapping[tuple[str, int | None], float] | None) -> list[float]:
    """``values[(label, slice_index or None)]`` for every row of ``table``, NaN where missing."""
    return [(values or {}).get((label, None if pd.isna(i) else int(i)), np.nan)
            for label, i in zip(table["label"], table["slice_index"], strict=True)]


def _prefixed_frame(rows: Sequence[Mapping[str, Any]], kind: str, ref_voxels: str) -> pd.DataFrame:
    """Metric rows as a frame keyed by (label, slice_index), metric and flag columns prefixed by ``kind``."""
    if not rows:
        raise ValueError(f"no {kind} metric rows given")
    df = pd.DataFrame(list(rows))
    if "slice_index" not in df.columns:
        df["slice_index"] = pd.NA
    df["slice_index"] = df["slice_index"].astype("Int64")
    renames = {m: f"{kind}_{m}" for m in (*METRICS, *FLAGS) if m in df.columns}
    return df.rename(columns={**renames, "ref_voxels": ref_voxels})


def _check_same_keys(predicted: pd.DataFrame, real: pd.DataFrame, source: str, subject: str) -> None:
    keys = ["label", "slice_index"]
    pred_keys = set(map(tuple, predicted[keys].astype(object).itertuples(index=False)))
    real_keys = set(map(tuple, real[keys].astype(object).itertuples(index=False)))
    if pred_keys != real_keys:
        raise ValueError(
            f"{source}/{subject}: predicted and real metric rows cover different (label, slice) pairs"
        )


def _slice_ratios(slice_index: pd.Series, slice_ratio: Sequence[float] | np.ndarray | None) -> np.ndarray:
    """Ratio per row: ``slice_ratio[slice_index]`` for slice rows, NaN for volume rows or when not given."""
    out = np.full(len(slice_index), np.nan)
    if slice_ratio is None:
        return out
    ratios = np.asarray(slice_ratio, dtype=np.float64)
    is_slice = slice_index.notna().to_numpy()
    indices = slice_index[is_slice].to_numpy(dtype=np.int64)
    if indices.size and indices.max() >= ratios.size:
        raise ValueError(f"slice_ratio has {ratios.size} values but slice index {indices.max()} was scored")
    out[is_slice] = ratios[indices]
    return out


# ---------------------------------------------------------------------------------------------------
