"""Ingestion: validate one subject's files and collect the statistics the fingerprint needs.

The result is a small JSON record per subject. A subject whose files are bad gets ``status: excluded`` and
a ``reason`` naming the file and the problem; the split stage lists it in ``subjects.tsv`` and leaves it out
of every later stage (config ``on_bad_subject: exclude``), or stops the run (``on_bad_subject: fail``).

Labels may cover only part of a cohort: an image whose label file does not exist is a valid *unlabelled*
subject (``has_label: false``; its candidate masks are QC'd, it never enters training), unless the cohort
requires labels (config ``require_labels: true``), in which case the missing pair excludes it. A label file
that exists but is bad always excludes the subject.

Intensity statistics: ``intensity`` holds the foreground's (labelled subjects) or, without a label, the whole
image's; ``image_intensity`` holds the whole image's for every subject, so that labelled and unlabelled subjects
can be compared on the same footing (:mod:`nnqc_pipe.qc.ood`).
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from nnqc_pipe.data.io import InputError, check_same_grid, load_volume, read_image_array, read_label_array, spacing_of

log = logging.getLogger(__name__)

INTENSITY_SAMPLES_PER_SUBJECT = 2000


def inspect_subject(
    subject: str,
    image_path: str | os.PathLike,
    label_path: str | os.PathLike | None,
    label_values: list[int],
    require_label: bool = False,
) -> dict[str, Any]:
    """Validate a subject and return its record; never raises for bad input (the record says why).

    ``label_path`` None or, unless ``require_label``, a path that does not exist: the subject is unlabelled.
    """
    if label_path is not None and not require_label and not Path(label_path).exists():
        label_path = None
    try:
        stats = _inspect(subject, image_path, label_path, label_values)
    except InputError as exc:
        log.warning("excluding %s", exc)
        return {"subject": subject, "status": "excluded", "reason": str(exc), "image": str(image_path),
                "label": str(label_path) if label_path else None}
    return {"subject": subject, "status": "ok", "reason": "", "image": str(image_path),
            "label": str(label_path) if label_path else None, **stats}


def _inspect(
    subject: str, image_path: str | os.PathLike, label_path: str | os.PathLike | None, label_values: list[int]
) -> dict[str, Any]:
    img = load_volume(image_path, subject, "image")
    data = read_image_array(img, subject, image_path)
    stats: dict[str, Any] = {
        "shape": list(img.shape),
        "spacing": list(spacing_of(img)),
        "axcodes": "".join(nib.aff2axcodes(img.affine)),
    }
    ras = nib.as_closest_canonical(img)
    stats["ras_shape"] = list(ras.shape)
    stats["ras_spacing"] = list(spacing_of(ras))
    stats["has_label"] = label_path is not None
    whole = intensity_stats(data, None, subject)
    stats["image_intensity"] = {k: v for k, v in whole.items() if k != "sample"}
    if label_path is None:
        stats["intensity"] = whole
        return stats
    if not Path(label_path).exists():
        raise InputError(subject, label_path, "label file is missing for this image (pair incomplete)")
    lbl_img = load_volume(label_path, subject, "label")
    check_same_grid(img, lbl_img, subject, label_path)
    labels = read_label_array(lbl_img, subject, label_path, label_values)
    if not labels.any():
        raise InputError(subject, label_path, "label volume is empty (no foreground voxel)")
    stats["labels_present"] = sorted(int(v) for v in np.unique(labels) if v > 0)
    stats["intensity"] = intensity_stats(data, labels > 0, subject)
    ras_labels = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(labels, img.affine)).dataobj)
    stats.update(foreground_geometry(ras_labels > 0, stats["ras_spacing"]))
    return stats


def intensity_stats(data: np.ndarray, foreground: np.ndarray | None, subject: str) -> dict[str, Any]:
    """Mean, std, 0.5/99.5 percentiles and a deterministic sample of foreground (or all) intensities."""
    values = data[foreground] if foreground is not None else data.ravel()
    rng = np.random.default_rng(zlib.crc32(subject.encode()))
    n = min(INTENSITY_SAMPLES_PER_SUBJECT, values.size)
    sample = rng.choice(values, size=n, replace=False) if values.size > n else values
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "p00_5": float(np.percentile(values, 0.5)),
        "p99_5": float(np.percentile(values, 99.5)),
        "sample": [round(float(v), 5) for v in sample],
    }


def foreground_geometry(foreground: np.ndarray, spacing: list[float]) -> dict[str, Any]:
    """Bounding box of the foreground in RAS voxel indices, its size, and its centre as a fraction of the FOV.

    The centre fraction uses continuous coordinates where voxel ``i`` covers ``[i, i + 1)``, so a box centred
    in the volume has fraction 0.5 whatever the shape.
    """
    idx = np.nonzero(foreground)
    lo = [int(v.min()) for v in idx]
    hi = [int(v.max()) for v in idx]
    shape = foreground.shape
    return {
        "fg_bbox_lo": lo,
        "fg_bbox_hi": hi,
        "fg_extent_vox": [h - lo_ + 1 for lo_, h in zip(lo, hi, strict=True)],
        "fg_extent_mm": [(h - lo_ + 1) * s for lo_, h, s in zip(lo, hi, spacing, strict=True)],
        "fg_center_fraction": [(lo_ + h + 1) / 2 / n for lo_, h, n in zip(lo, hi, shape, strict=True)],
        "fg_voxels": int(foreground.sum()),
    }
