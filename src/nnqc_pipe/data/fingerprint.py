"""Cohort fingerprint (nnU-Net style) from the per-subject ingestion records of the training subjects.

``fingerprint.json`` fields (all geometry in RAS array order, spacing in mm):

- ``n_subjects``, ``subjects``: the training subjects it was computed from
- ``modality``, ``label_values``, ``label_names``: from the config; ``labels_seen``: values found in the files
- ``median_spacing``, ``spacing_min``, ``spacing_max``: voxel spacing per axis
- ``median_shape``: volume shape; ``median_cropped_shape``: foreground bounding-box size in voxels
- ``fg_extent_mm_max``: largest foreground extent per axis; ``fg_center_fraction_median``: median centre of
  the foreground bounding box as a fraction of the field of view
- ``fg_half_width_mm``: per subject and axis, the distance in mm from the median centre to the far side of
  the foreground box (the plan sizes its window from it)
- ``orientations``: count of orientation codes as stored (before reorientation to RAS)
- ``intensity``: foreground ``mean``, ``std``, ``p00_5``, ``p99_5`` over a pooled sample of foreground voxels
- ``ranges``: feature -> ``{"min", "max"}`` over the training subjects (lists per axis for geometry), the
  reference of the domain-shift check (:mod:`nnqc_pipe.qc.ood`): ``spacing_mm``, ``fov_mm`` (image extent),
  ``image_p00_5``/``image_p99_5`` (whole-image intensity percentiles), ``fg_p00_5``/``fg_p99_5`` (foreground
  intensity percentiles), ``fg_volume_mm3``, ``fg_extent_mm``. A feature that no record carries (ingestion
  records of an older version) is left out. For every modality but CT, preprocessing z-scores each image on its
  own (:mod:`nnqc_pipe.data.plan`), so the models never see an absolute intensity: the four percentiles are then
  expressed in the subject's own z units, ``(value − image mean) / image std``, under the names with ``_z``
  appended (an MR scanner's arbitrary intensity scale is no domain shift; a different contrast still is).
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np


def compute_fingerprint(
    records: list[dict[str, Any]], modality: str, label_names: dict[int, str]
) -> dict[str, Any]:
    """Aggregate ingestion records (status ok, with labels) into the cohort fingerprint."""
    records = [r for r in records if r.get("status") == "ok" and r.get("has_label")]
    if not records:
        raise ValueError("no usable labelled subject to compute the fingerprint from")
    spacing = np.array([r["ras_spacing"] for r in records])
    shapes = np.array([r["ras_shape"] for r in records])
    cropped = np.array([r["fg_extent_vox"] for r in records])
    centre = np.median(np.array([r["fg_center_fraction"] for r in records]), axis=0)
    pooled = np.concatenate([np.asarray(r["intensity"]["sample"], dtype=np.float64) for r in records])
    return {
        "n_subjects": len(records),
        "subjects": [r["subject"] for r in records],
        "modality": modality,
        "label_values": sorted(label_names),
        "label_names": [label_names[v] for v in sorted(label_names)],
        "labels_seen": sorted({v for r in records for v in r.get("labels_present", [])}),
        "median_spacing": np.median(spacing, axis=0).tolist(),
        "spacing_min": spacing.min(axis=0).tolist(),
        "spacing_max": spacing.max(axis=0).tolist(),
        "median_shape": np.median(shapes, axis=0).tolist(),
        "median_cropped_shape": np.median(cropped, axis=0).tolist(),
        "fg_extent_mm_max": np.max(np.array([r["fg_extent_mm"] for r in records]), axis=0).tolist(),
        "fg_center_fraction_median": centre.tolist(),
        "fg_half_width_mm": [half_width_mm(r, centre) for r in records],
        "orientations": dict(collections.Counter(r["axcodes"] for r in records)),
        "intensity": {
            "mean": float(pooled.mean()),
            "std": float(pooled.std()),
            "p00_5": float(np.percentile(pooled, 0.5)),
            "p99_5": float(np.percentile(pooled, 99.5)),
        },
        "ranges": feature_ranges(records, modality),
    }


INTENSITY_FEATURES = ("image_p00_5", "image_p99_5", "fg_p00_5", "fg_p99_5")
STANDARDISED_SUFFIX = "_z"


def standardised_per_subject(modality: str | None) -> bool:
    """Whether preprocessing z-scores each image on its own (every modality but CT; :mod:`nnqc_pipe.data.plan`),
    so that absolute intensities never reach the models."""
    return modality is not None and modality != "CT"


def standardised_intensities(features: dict[str, Any], image_stats: dict[str, Any]) -> dict[str, Any]:
    """``features`` with the intensity percentiles in the subject's z units (``(value − mean) / std`` of the whole
    image, as preprocessing normalises) under their ``_z`` names; unchanged for a record without the whole
    image's mean and std (an older ingestion record)."""
    if "mean" not in image_stats or "std" not in image_stats:
        return features
    mean, std = float(image_stats["mean"]), max(float(image_stats["std"]), 1e-6)
    return {(f"{k}{STANDARDISED_SUFFIX}" if k in INTENSITY_FEATURES else k):
            ((float(v) - mean) / std if k in INTENSITY_FEATURES else v) for k, v in features.items()}


def subject_features(record: dict[str, Any], modality: str | None = None) -> dict[str, float | list[float]]:
    """The domain-shift features of a subject's ingestion record (lists per axis): geometry and whole-image
    intensity percentiles of every subject; foreground intensity percentiles, volume and extent with a label.
    With a ``modality`` whose images are z-scored per subject, the intensities in z units
    (:func:`standardised_intensities`)."""
    spacing = np.asarray(record["ras_spacing"], dtype=float)
    features: dict[str, float | list[float]] = {
        "spacing_mm": spacing.tolist(),
        "fov_mm": (np.asarray(record["ras_shape"]) * spacing).tolist(),
    }
    if "image_intensity" in record:
        features["image_p00_5"] = record["image_intensity"]["p00_5"]
        features["image_p99_5"] = record["image_intensity"]["p99_5"]
    if record.get("has_label"):
        features["fg_p00_5"] = record["intensity"]["p00_5"]
        features["fg_p99_5"] = record["intensity"]["p99_5"]
        features["fg_volume_mm3"] = record["fg_voxels"] * float(np.prod(spacing))
        features["fg_extent_mm"] = list(record["fg_extent_mm"])
    if standardised_per_subject(modality):
        features = standardised_intensities(features, record.get("image_intensity", {}))
    return features


def feature_ranges(records: list[dict[str, Any]], modality: str | None = None
                   ) -> dict[str, dict[str, float | list[float]]]:
    """Per feature of :func:`subject_features` (for ``modality``): its min and max over the records that carry
    it."""
    values: dict[str, list[float | list[float]]] = collections.defaultdict(list)
    for record in records:
        for name, value in subject_features(record, modality).items():
            values[name].append(value)
    return {name: {"min": np.min(v, axis=0).tolist(), "max": np.max(v, axis=0).tolist()}
            for name, v in values.items()}


def half_width_mm(record: dict[str, Any], centre_fraction: np.ndarray) -> list[float]:
    """Per axis: how far (mm) the subject's foreground box reaches from the window centre placed at
    ``centre_fraction`` of its field of view."""
    out = []
    for axis in range(3):
        n, s = record["ras_shape"][axis], record["ras_spacing"][axis]
        c = centre_fraction[axis] * n
        lo, hi = record["fg_bbox_lo"][axis], record["fg_bbox_hi"][axis] + 1
        out.append(float(max(c - lo, hi - c) * s))
    return out
