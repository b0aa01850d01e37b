"""The learned QC opinion around its network (:mod:`nnqc_pipe.models.qcnet`): the real quality of its training
candidates (:mod:`nnqc_pipe.models.candidates`) and what a trained network says about one candidate.

Each candidate's real DSC and NSD per error group are measured on the subject's original grid, with the real
spacing, against the label file. At inference, the error probabilities are counted per slice on the patch grid the
network works on (:func:`learned_slice_counts`), so the volume's learned DSC is a count over every voxel
(:func:`learned_dice`); the estimated truth (the candidate with the likely errors corrected,
:func:`estimated_truth`) gives the learned NSD and the learned error regions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from nnqc_pipe.data.preprocess import invert_maps, original_slice_order
from nnqc_pipe.models.error_counts import FOREGROUND_GROUP, count_terms, dsc_from_terms, error_groups, group_mask
from nnqc_pipe.qc.metrics import FOREGROUND, compute_metrics

log = logging.getLogger(__name__)

LEARNED_DSC = "learned_dsc"
LEARNED_NSD = "learned_nsd"


def real_group_scores(candidate: np.ndarray, truth: np.ndarray, spacing: Sequence[float], n_classes: int,
                      tolerance_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Real DSC and NSD per error group of a class-index candidate against the truth, both on the original grid."""
    rows = compute_metrics(candidate, truth, spacing, {k: str(k) for k in range(1, n_classes)}, tolerance_mm)
    by_name = {row["label"]: row for row in rows}
    names = [FOREGROUND if group is None else str(group) for _, group in error_groups(n_classes)]
    return (np.array([by_name[n]["dsc"] for n in names], dtype=np.float32),
            np.array([by_name[n]["nsd"] for n in names], dtype=np.float32))


def _count_columns(group: str) -> tuple[str, str, str]:
    return f"learned_tp_{group}", f"learned_fp_{group}", f"learned_fn_{group}"


def learned_slice_counts(probabilities: np.ndarray, candidate: np.ndarray, record: dict[str, Any]
                         ) -> dict[str, np.ndarray]:
    """Per original slice (entry ``i`` = the stored array's slice ``i`` along the slicing axis): soft TP, FP and FN
    of every error group, counted on the PATCH grid from the error probabilities [S, 2G, H, W] and the class-index
    candidate patch stack [S, H, W] the network saw. Keys ``learned_{tp,fp,fn}_{group}``.

    The patch grid is the one the network was trained to count on (its volume-DSC loss sums these terms there).
    Counting on the original grid instead would interpolate the maps first: an error map is a thin band along the
    candidate's boundary, and interpolation spreads half of it across the boundary, where the candidate (or its
    complement) masks it out. On shared hippocampus that lost about half of the error mass and lifted the learned
    DSC of real segmenters' masks by 0.13 on average (docs/method.md, "The learned opinion")."""
    _, original_index = original_slice_order(record)
    if len(original_index) != len(candidate):
        raise ValueError(f"subject {record.get('subject')}: {len(candidate)} patch slices for "
                         f"{len(original_index)} original slices")
    counts = {}
    for g, (name, group) in enumerate(error_groups(record["n_classes"])):
        terms = count_terms(group_mask(candidate, group), probabilities[:, 2 * g], probabilities[:, 2 * g + 1],
                            axis=(1, 2))
        for column, values in zip(_count_columns(name), terms, strict=True):
            stored = np.empty(len(original_index), dtype=np.float64)
            stored[original_index] = values
            counts[column] = stored
    return counts


def estimated_truth(probabilities: np.ndarray, candidate: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """The candidate (class indices, original grid) with its likely errors corrected: voxels of a class whose
    "extra" probability exceeds 0.5 become background, voxels outside a class whose "missed" probability exceeds
    0.5 take the most likely missed class. With one structure the foreground group is that class."""
    maps = invert_maps(probabilities, record, cval=0.0)
    n_classes = record["n_classes"]
    groups = error_groups(n_classes)
    per_class = [(g, k) for g, (_, k) in enumerate(groups) if k is not None] or [(0, 1)]
    truth = candidate.copy()
    for g, k in per_class:
        truth[(candidate == k) & (maps[2 * g] > 0.5)] = 0
    missed = np.stack([np.where(candidate != k, maps[2 * g + 1], 0.0) for g, k in per_class])
    best = missed.argmax(axis=0)
    add = missed.max(axis=0) > 0.5
    truth[add] = np.asarray([k for _, k in per_class], dtype=truth.dtype)[best[add]]
    return truth


def learned_dice(slices: pd.DataFrame, label_names: Mapping[int, str], label_values: Sequence[int]
                 ) -> dict[tuple[str, int | None], float]:
    """Learned DSC per (label name, slice index or None for the volume) from a per-slice table with the
    :func:`learned_slice_counts` columns (the volume's from the summed counts); empty without them."""
    groups = [(FOREGROUND, FOREGROUND_GROUP)]
    groups += [(label_names[v], str(k)) for k, v in enumerate(label_values, start=1) if v in label_names]
    scores: dict[tuple[str, int | None], float] = {}
    for name, group in groups:
        columns = _count_columns(group)
        if not all(c in slices for c in columns):
            if group == str(1) and all(c in slices for c in _count_columns(FOREGROUND_GROUP)):
                columns = _count_columns(FOREGROUND_GROUP)  # one structure: its class is the foreground
            else:
                continue
        tp, fp, fn = (slices[c].to_numpy(dtype=float) for c in columns)
        per_slice = dsc_from_terms(tp, fp, fn)
        scores.update({(name, int(i)): float(d) for i, d in zip(slices["slice_index"], per_slice, strict=True)})
        scores[(name, None)] = float(dsc_from_terms(tp.sum(), fp.sum(), fn.sum()))
    return scores


def learned_scores(dice: Mapping[tuple[str, int | None], float], nsd_rows: Sequence[Mapping[str, Any]]
                   ) -> dict[str, dict[tuple[str, int | None], float]]:
    """``learned_dsc`` and ``learned_nsd`` per (label, slice index or None), the layout
    :func:`nnqc_pipe.qc.score.score_rows` takes: the counted DSC, and the NSD of the candidate against the
    estimated truth (rows of :func:`nnqc_pipe.qc.metrics.compute_metrics` / ``compute_slice_metrics``)."""
    nsd = {(row["label"], row.get("slice_index")): float(row["nsd"]) for row in nsd_rows}
    return {LEARNED_DSC: dict(dice), LEARNED_NSD: nsd}
