"""Experiment plan derived from the fingerprint, with the config's overrides.

``plan.json`` fields:

- ``slicing_axis``: RAS axis the volumes are sliced along — the lowest-resolution axis when its spacing is at
  least ``anisotropy_threshold`` times the finest one, otherwise axial (2); ``inplane_axes``: the other two
- ``target_spacing``: in-plane spacing (mm) along ``inplane_axes``: the finest in-plane spacing of the training
  subjects, so that no subject's masks are downsampled and forward-then-inverse stays near-lossless (nnU-Net's
  median would blur the finer half of the cohort); coarsened when the window would not fit ``max_patch_size``
- ``window_mm``: in-plane field of view kept around the organ: twice the largest foreground half-width seen in
  training (from a centre at ``crop_center_fraction`` of each subject's field of view) plus a margin per side
- ``patch_size``: ``[H, W]`` = window / spacing rounded up to a multiple of ``divisor``, within
  ``[min_patch_size, max_patch_size]`` (square; an explicit ``patch_size`` such as 256 is taken as given)
- ``crop_center_fraction``: window centre, as a fraction of the in-plane field of view (from the image
  geometry and the fingerprint only — never from a candidate mask)
- ``normalization``: ``zscore`` (per subject; MR and other) or ``ct`` (clip to the foreground 0.5/99.5
  percentiles, then the cohort foreground mean/std); ``ct_clip``, ``ct_mean``, ``ct_std`` for ``ct``
- ``n_classes``, ``label_values``, ``label_names``, ``modality``, ``divisor``
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from nnqc_pipe.data.fingerprint import standardised_per_subject

log = logging.getLogger(__name__)

AXIAL = 2


def choose_slicing_axis(median_spacing: list[float], requested: str | int, threshold: float) -> int:
    """The slicing axis: the requested one, else the coarsest axis if clearly anisotropic, else axial."""
    if requested != "auto":
        return int(requested)
    spacing = np.asarray(median_spacing, dtype=float)
    coarsest = int(np.argmax(spacing))
    if spacing[coarsest] >= threshold * spacing.min():
        return coarsest
    return AXIAL


def round_up(value: float, divisor: int) -> int:
    """Smallest multiple of ``divisor`` that is >= ``value``."""
    return int(math.ceil(value / divisor - 1e-9) * divisor)


def choose_patch(
    window_mm: float, spacing_mm: float, overrides: dict[str, Any]
) -> tuple[int, float]:
    """Square in-plane patch size and the in-plane spacing it is sampled at.

    With ``patch_size: auto`` the window at the median spacing is rounded up to the divisor; if that exceeds
    ``max_patch_size``, the spacing is coarsened so the window fits. An explicit patch size keeps the median
    spacing unless the window does not fit, in which case the spacing is coarsened the same way.
    """
    divisor = int(overrides["divisor"])
    if overrides["patch_size"] == "auto":
        patch = round_up(window_mm / spacing_mm, divisor)
        patch = max(patch, round_up(overrides["min_patch_size"], divisor))
        cap = int(overrides["max_patch_size"]) // divisor * divisor
        if patch > cap:
            return cap, float(window_mm / cap)
        return patch, spacing_mm
    patch = int(overrides["patch_size"])
    if patch % divisor:
        raise ValueError(f"plan.patch_size {patch} is not a multiple of plan.divisor {divisor}")
    return patch, float(max(spacing_mm, window_mm / patch))


def make_plan(fingerprint: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Derive the plan (see module docstring) from the fingerprint and the config's ``plan`` section."""
    median_spacing = fingerprint["median_spacing"]
    axis = choose_slicing_axis(median_spacing, overrides["slicing_axis"], overrides["anisotropy_threshold"])
    inplane = [a for a in range(3) if a != axis]
    half = np.max(np.asarray(fingerprint["fg_half_width_mm"]), axis=0)
    window = max(2 * half[a] + 2 * overrides["margin_mm"] for a in inplane)
    if overrides["target_spacing"] == "auto":
        spacing = float(min(fingerprint["spacing_min"][a] for a in inplane))
    else:
        spacing = float(overrides["target_spacing"])
    patch, spacing = choose_patch(window, spacing, overrides)
    modality = fingerprint["modality"]
    plan = {
        "slicing_axis": axis,
        "inplane_axes": inplane,
        "target_spacing": [spacing, spacing],
        "window_mm": float(patch * spacing),
        "patch_size": [patch, patch],
        "crop_center_fraction": [fingerprint["fg_center_fraction_median"][a] for a in inplane],
        "divisor": int(overrides["divisor"]),
        "modality": modality,
        "normalization": "zscore" if standardised_per_subject(modality) else "ct",
        "ct_clip": None,
        "ct_mean": None,
        "ct_std": None,
        "n_classes": 1 + len(fingerprint["label_values"]),
        "label_values": fingerprint["label_values"],
        "label_names": fingerprint["label_names"],
    }
    if plan["normalization"] == "ct":
        ints = fingerprint["intensity"]
        plan.update(ct_clip=[ints["p00_5"], ints["p99_5"]], ct_mean=ints["mean"], ct_std=ints["std"])
    log.info("plan: slice along RAS axis %d, patch %s at %.3g mm (window %.1f mm)",
             axis, plan["patch_size"], spacing, plan["window_mm"])
    return plan


@dataclass(frozen=True)
class Plan:
    """Typed, validated view of ``plan.json`` for the stages (the dict is kept for the functions that take it)."""

    slicing_axis: int
    inplane_axes: tuple[int, int]
    target_spacing: tuple[float, float]
    patch_size: tuple[int, int]
    n_classes: int
    label_values: tuple[int, ...]
    label_names: tuple[str, ...]
    normalization: str
    raw: dict[str, Any]

    @classmethod
    def from_dict(cls, plan: dict[str, Any], source: str = "plan") -> Plan:
        """Check the fields the stages rely on and build the view; a missing or inconsistent field is named."""
        missing = [k for k in PLAN_FIELDS if k not in plan]
        if missing:
            raise ValueError(f"{source}: plan lacks {missing}; rerun the plan rule")
        if len(plan["label_values"]) != len(plan["label_names"]) or plan["n_classes"] != 1 + len(plan["label_values"]):
            raise ValueError(f"{source}: label_values, label_names and n_classes disagree")
        return cls(slicing_axis=int(plan["slicing_axis"]), inplane_axes=tuple(plan["inplane_axes"]),
                   target_spacing=tuple(float(v) for v in plan["target_spacing"]),
                   patch_size=tuple(int(v) for v in plan["patch_size"]), n_classes=int(plan["n_classes"]),
                   label_values=tuple(int(v) for v in plan["label_values"]),
                   label_names=tuple(plan["label_names"]), normalization=str(plan["normalization"]), raw=plan)

    @property
    def label_map(self) -> dict[int, str]:
        """Label value in the files -> class name."""
        return dict(zip(self.label_values, self.label_names, strict=True))


PLAN_FIELDS = ("slicing_axis", "inplane_axes", "target_spacing", "patch_size", "n_classes", "label_values",
               "label_names", "normalization")


def read_plan(path: str | os.PathLike) -> Plan:
    """``plan.json`` as a validated :class:`Plan`."""
    with open(path) as fh:
        return Plan.from_dict(json.load(fh), str(path))
