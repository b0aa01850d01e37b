"""The learned opinion's error groups and how a candidate's quality is counted from its error probabilities.

Torch-free (the functions take NumPy arrays or torch tensors alike), so that the scoring and report stages use
the same counting as the network's training without importing torch. See :mod:`nnqc_pipe.models.qcnet`.
"""

from __future__ import annotations

from typing import Any

FOREGROUND_GROUP = "fg"
# Smoothing of the counted DSC (voxels): two empty masks score 1, as in qc/metrics.
COUNT_EPS = 1.0


def error_groups(n_classes: int) -> list[tuple[str, int | None]]:
    """(name, class index or None for any foreground) of every error group: the foreground, then each class when
    the cohort has more than one structure."""
    groups: list[tuple[str, int | None]] = [(FOREGROUND_GROUP, None)]
    if n_classes > 2:
        groups += [(str(k), k) for k in range(1, n_classes)]
    return groups


def group_mask(indices: Any, group: int | None) -> Any:
    """Boolean mask of a group in a class-index array (NumPy or torch)."""
    return indices > 0 if group is None else indices == group


def count_terms(cand: Any, p_extra: Any, p_missed: Any, axis: Any = None) -> tuple[Any, Any, Any]:
    """Soft TP, FP, FN of a candidate group mask from its error probabilities, summed over ``axis`` (NumPy arrays
    or torch tensors alike)."""
    cand = cand * 1.0
    return ((cand * (1 - p_extra)).sum(axis=axis), (cand * p_extra).sum(axis=axis),
            ((1 - cand) * p_missed).sum(axis=axis))


def dsc_from_terms(tp: Any, fp: Any, fn: Any) -> Any:
    """The DSC counted from soft TP/FP/FN (smoothed by :data:`COUNT_EPS` voxels: two empty masks score 1)."""
    return (2 * tp + COUNT_EPS) / (2 * tp + fp + fn + COUNT_EPS)
