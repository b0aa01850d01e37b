"""The one Dice similarity coefficient (DSC), from voxel counts: used by the degradation, the training code and
every metric (:mod:`nnqc_pipe.qc.metrics`), so it sits below all of them.

Conventions: two empty masks have DSC 1, exactly one empty mask DSC 0 (never NaN).
"""

from __future__ import annotations

import numpy as np


def dice_from_counts(intersection: np.ndarray, size_a: np.ndarray, size_b: np.ndarray) -> np.ndarray:
    """Vectorised DSC from voxel counts: 2·|A∩B| / (|A| + |B|), 1 where both masks are empty (0 where one is)."""
    total = np.asarray(size_a, dtype=np.float64) + np.asarray(size_b, dtype=np.float64)
    return np.where(total > 0, 2.0 * np.asarray(intersection, dtype=np.float64) / np.maximum(total, 1.0), 1.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """DSC of two boolean masks of one shape; both empty → 1.0, exactly one empty → 0.0 (never NaN)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return float(dice_from_counts(np.count_nonzero(a & b), np.count_nonzero(a), np.count_nonzero(b)))


def class_dice(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """DSC per foreground class ``1..n_classes-1`` of two class-index arrays (conventions of :func:`dice`)."""
    return np.array([dice(pred == c, truth == c) for c in range(1, n_classes)], dtype=np.float64)
