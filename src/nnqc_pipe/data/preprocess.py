"""Invertible preprocessing: original grid <-> stack of normalised in-plane patches.

Forward, per subject: reorient to RAS (a pure axis permutation/flip, lossless), put the slicing axis first,
resample in-plane to the plan's spacing inside a window centred at the plan's fraction of the field of view
(cropping and padding in the same step), normalise intensities. Every slice along the slicing axis is kept —
the z-range comes from the image, never from a candidate mask.

The inversion record (JSON in the ``.npz``) holds everything needed to go back: the original shape and affine,
the slicing axis and, per in-plane axis, the input coordinate of the first patch voxel (``offset``) and the
input-voxel step between patch voxels (``step``). Patch voxel ``j`` samples input coordinate
``offset + step * j``; the inverse samples patch coordinate ``(x - offset) / step``. When the target spacing
equals the original spacing the offsets are integers and both directions are exact crops/pads.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform
from scipy import ndimage

from nnqc_pipe.data.io import (
    check_same_grid,
    load_mask_on_grid,
    load_volume,
    read_image_array,
    read_label_array,
    spacing_of,
    write_npz,
)

log = logging.getLogger(__name__)

RAS_ORNT = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


@dataclass
class Preprocessed:
    """A preprocessed subject: slices first, ``label`` is None without ground truth."""

    image: np.ndarray
    label: np.ndarray | None
    slice_ratio: np.ndarray
    record: dict[str, Any]


# ---------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------


def to_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorient an array stored with ``affine`` to the closest RAS orientation (as nibabel does)."""
    return apply_orientation(data, io_orientation(affine))


def from_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_ras`: back to the stored orientation of ``affine``."""
    return apply_orientation(data, ornt_transform(RAS_ORNT, io_orientation(affine)))


def ras_spacing(affine: np.ndarray) -> list[float]:
    """Voxel spacing along the RAS-reoriented axes."""
    ornt = io_orientation(affine)
    spacing = spacing_of(affine)
    out = [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _) in enumerate(ornt):
        out[int(dst_axis)] = float(spacing[src_axis])
    return out


def window_geometry(ras_shape: list[int], spacing: list[float], plan: dict[str, Any]) -> dict[str, list[float]]:
    """Offset and step (in input voxels) of the patch grid along each in-plane axis.

    The window is centred at ``crop_center_fraction`` of the field of view; the first patch voxel's input
    coordinate is rounded to a whole voxel so that an unresampled axis is an exact crop/pad.
    """
    offsets, steps = [], []
    for i, axis in enumerate(plan["inplane_axes"]):
        n, s = ras_shape[axis], spacing[axis]
        step = plan["target_spacing"][i] / s
        patch = plan["patch_size"][i]
        centre = plan["crop_center_fraction"][i] * n - 0.5
        offsets.append(float(np.round(centre - (patch - 1) / 2 * step)))
        steps.append(float(step))
    return {"offset": offsets, "step": steps}


def _slices_first(volume_ras: np.ndarray, plan: dict[str, Any]) -> np.ndarray:
    return np.moveaxis(volume_ras, plan["slicing_axis"], 0)


def _slices_back(stack: np.ndarray, slicing_axis: int) -> np.ndarray:
    return np.moveaxis(stack, 0, slicing_axis)


def _resample_forward(stack: np.ndarray, geom: dict[str, list[float]], patch: list[int], order: int,
                      cval: float) -> np.ndarray:
    """Sample a [S, A, B] stack on the patch grid (no interpolation across slices)."""
    return ndimage.affine_transform(
        stack,
        matrix=np.array([1.0, *geom["step"]]),
        offset=(0.0, *geom["offset"]),
        output_shape=(stack.shape[0], *patch),
        order=order,
        mode="constant",
        cval=cval,
        prefilter=False,
    )


def _resample_inverse(stack: np.ndarray, geom: dict[str, list[float]], shape: tuple[int, int], cval: float
                      ) -> np.ndarray:
    """Sample a patch-grid [S, H, W] stack back on the original in-plane grid (linear)."""
    steps = np.asarray(geom["step"])
    return ndimage.affine_transform(
        stack,
        matrix=np.array([1.0, *(1.0 / steps)]),
        offset=(0.0, *(-np.asarray(geom["offset"]) / steps)),
        output_shape=(stack.shape[0], *shape),
        order=1,
        mode="constant",
        cval=cval,
        prefilter=False,
    )


def one_hot(indices: np.ndarray, n_classes: int) -> np.ndarray:
    """Class indices [...] -> float32 one-hot [C, ...]."""
    return (indices[None] == np.arange(n_classes).reshape(-1, *([1] * indices.ndim))).astype(np.float32)


def values_to_indices(labels: np.ndarray, label_values: list[int]) -> np.ndarray:
    """File label values -> contiguous class indices (0 = background)."""
    lut = np.zeros(max([0, *label_values]) + 1, dtype=np.uint8)
    for i, v in enumerate(label_values, start=1):
        lut[v] = i
    return lut[labels]


def indices_to_values(indices: np.ndarray, label_values: list[int]) -> np.ndarray:
    """Contiguous class indices -> file label values."""
    lut = np.array([0, *label_values], dtype=np.uint16)
    out = lut[indices]
    return out.astype(np.uint8) if out.max(initial=0) < 256 else out


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------


def normalise(image: np.ndarray, plan: dict[str, Any]) -> np.ndarray:
    """Intensity normalisation from the plan: per-subject z-score, or CT clip + cohort mean/std."""
    if plan["normalization"] == "ct":
        lo, hi = plan["ct_clip"]
        return ((np.clip(image, lo, hi) - plan["ct_mean"]) / max(plan["ct_std"], 1e-6)).astype(np.float32)
    return ((image - image.mean()) / max(float(image.std()), 1e-6)).astype(np.float32)


def _anti_alias(stack: np.ndarray, steps: list[float]) -> np.ndarray:
    """Gaussian pre-filter along in-plane axes that are downsampled (sigma = (step - 1) / 2)."""
    sigma = [0.0, *(max(0.0, (s - 1.0) / 2.0) for s in steps)]
    return ndimage.gaussian_filter(stack, sigma) if any(sigma) else stack


def forward_image(image_ras: np.ndarray, geom: dict[str, list[float]], plan: dict[str, Any]) -> np.ndarray:
    """Normalise and resample an RAS image to the patch stack [S, H, W]."""
    norm = normalise(image_ras, plan)
    stack = _anti_alias(_slices_first(norm, plan), geom["step"])
    return _resample_forward(stack, geom, plan["patch_size"], order=1, cval=float(norm.min())).astype(np.float32)


def forward_labels(indices_ras: np.ndarray, geom: dict[str, list[float]], plan: dict[str, Any]) -> np.ndarray:
    """Resample an RAS class-index volume to the patch stack [S, H, W] (linear on one-hot, then argmax)."""
    stack = _slices_first(indices_ras, plan)
    probs = np.stack([
        _resample_forward(ch, geom, plan["patch_size"], order=1, cval=float(c == 0))
        for c, ch in enumerate(one_hot(stack, plan["n_classes"]))
    ])
    return probs.argmax(axis=0).astype(np.uint8)


def slice_ratios(n_slices: int) -> np.ndarray:
    """Position of each slice along the slicing axis in [0, 1] (RAS order)."""
    if n_slices == 1:
        return np.array([0.5], dtype=np.float32)
    return (np.arange(n_slices) / (n_slices - 1)).astype(np.float32)


def fraction_inside(indices_ras: np.ndarray, geom: dict[str, list[float]], plan: dict[str, Any]) -> float:
    """Share of foreground voxels inside the in-plane window (1.0 when the window holds the whole organ)."""
    stack = _slices_first(indices_ras > 0, plan)
    total = int(stack.sum())
    if total == 0:
        return 1.0
    keep = stack
    for i in range(2):
        lo = geom["offset"][i] - 0.5 * geom["step"][i]
        hi = geom["offset"][i] + (plan["patch_size"][i] - 0.5) * geom["step"][i]
        coords = np.arange(stack.shape[i + 1])
        inside = (coords >= lo) & (coords <= hi)
        keep = np.compress(inside, keep, axis=i + 1)
    return float(keep.sum()) / total


def make_record(subject: str, img: nib.Nifti1Image, plan: dict[str, Any]) -> dict[str, Any]:
    """The inversion record of a subject: original geometry + patch-grid geometry."""
    spacing = ras_spacing(img.affine)
    ras_shape = list(to_ras(np.empty(img.shape, dtype=np.uint8), img.affine).shape)
    return {
        "subject": subject,
        "orig_shape": list(img.shape),
        "orig_affine": np.asarray(img.affine).tolist(),
        "orig_axcodes": "".join(nib.aff2axcodes(img.affine)),
        "ras_shape": ras_shape,
        "ras_spacing": spacing,
        "slicing_axis": plan["slicing_axis"],
        "inplane_axes": plan["inplane_axes"],
        "slice_spacing": spacing[plan["slicing_axis"]],
        "patch_size": plan["patch_size"],
        "n_classes": plan["n_classes"],
        "label_values": plan["label_values"],
        **window_geometry(ras_shape, spacing, plan),
    }


def preprocess_subject(
    subject: str,
    image_path: str | os.PathLike,
    label_path: str | os.PathLike | None,
    plan: dict[str, Any],
) -> Preprocessed:
    """Load, validate and preprocess one subject (label optional)."""
    img = load_volume(image_path, subject, "image")
    record = make_record(subject, img, plan)
    image_ras = to_ras(read_image_array(img, subject, image_path), img.affine)
    image = forward_image(image_ras, record, plan)
    label = None
    if label_path is not None:
        values = load_mask_on_grid(label_path, img, subject, plan["label_values"], "label")
        indices_ras = to_ras(values_to_indices(values, plan["label_values"]), img.affine)
        label = forward_labels(indices_ras, record, plan)
        record["fg_inside_fraction"] = fraction_inside(indices_ras, record, plan)
        if record["fg_inside_fraction"] < 0.99:
            log.warning("subject %s: only %.1f%% of the foreground lies inside the plan's window",
                        subject, 100 * record["fg_inside_fraction"])
    return Preprocessed(image=image, label=label, slice_ratio=slice_ratios(image.shape[0]), record=record)


def save_preprocessed(pre: Preprocessed, path: str | os.PathLike) -> None:
    """Write the ``.npz`` of the contract (atomically)."""
    arrays: dict[str, Any] = {"image": pre.image, "slice_ratio": pre.slice_ratio,
                              "record": np.array(json.dumps(pre.record))}
    if pre.label is not None:
        arrays["label"] = pre.label
    write_npz(path, **arrays)


def load_preprocessed(path: str | os.PathLike) -> Preprocessed:
    """Read a preprocessed ``.npz``."""
    with np.load(path) as npz:
        return Preprocessed(
            image=npz["image"],
            label=npz["label"] if "label" in npz else None,
            slice_ratio=npz["slice_ratio"],
            record=json.loads(str(npz["record"])),
        )


def to_patch_space(mask_values: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """A mask on the original grid (file label values) -> class-index patch stack [S, H, W]."""
    indices_ras = to_ras(values_to_indices(mask_values, record["label_values"]), np.asarray(record["orig_affine"]))
    return forward_labels(indices_ras, record, record_plan(record))


def load_candidate(path: str | os.PathLike, record: dict[str, Any], what: str = "candidate mask") -> np.ndarray:
    """Load a candidate mask, validate it against the subject's grid and label set, return file values."""
    subject = record["subject"]
    img = load_volume(path, subject, what)
    reference = nib.Nifti1Image(np.empty(record["orig_shape"], dtype=np.uint8), np.asarray(record["orig_affine"]))
    check_same_grid(reference, img, subject, path, what)
    return read_label_array(img, subject, path, record["label_values"])


def record_plan(record: dict[str, Any]) -> dict[str, Any]:
    """The plan fields the resampling functions read, rebuilt from a record."""
    return {k: record[k] for k in ("slicing_axis", "inplane_axes", "patch_size", "n_classes", "label_values")}


# ---------------------------------------------------------------------------------------------------
# Inverse
# ---------------------------------------------------------------------------------------------------


def _maps_on_ras_grid(maps: np.ndarray, record: dict[str, Any], cvals: list[float]) -> np.ndarray:
    """Maps [S, K, H, W] on the patch grid -> [K, *ras_shape-in-slice-first-order] resampled linearly in-plane."""
    axis_a, axis_b = record["inplane_axes"]
    shape = (record["ras_shape"][axis_a], record["ras_shape"][axis_b])
    return np.stack([
        _resample_inverse(maps[:, c].astype(np.float32), record, shape, cval=cvals[c])
        for c in range(maps.shape[1])
    ])


def invert_probabilities(probs: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """Class probabilities [S, C, H, W] on the patch grid -> class indices on the ORIGINAL array grid.

    Each class map is resampled linearly to the original in-plane grid (background = 1 outside the window),
    the argmax taken, then the slicing axis and RAS orientation undone.
    """
    back = _maps_on_ras_grid(probs, record, [float(c == 0) for c in range(probs.shape[1])])
    indices_ras = _slices_back(back.argmax(axis=0).astype(np.uint8), record["slicing_axis"])
    return from_ras(indices_ras, np.asarray(record["orig_affine"]))


def invert_maps(maps: np.ndarray, record: dict[str, Any], cval: float = 0.0) -> np.ndarray:
    """Continuous maps [S, K, H, W] on the patch grid -> [K, *orig_shape] float32 on the ORIGINAL array grid
    (linear in-plane, ``cval`` outside the window)."""
    back = _maps_on_ras_grid(maps, record, [cval] * maps.shape[1])
    affine = np.asarray(record["orig_affine"])
    return np.stack([from_ras(_slices_back(m, record["slicing_axis"]), affine) for m in back])


def patch_spacing(record: dict[str, Any]) -> tuple[float, float, float]:
    """Voxel size (mm) of the preprocessed stack [S, H, W]: the slice spacing, then the in-plane target spacing."""
    inplane = [record["ras_spacing"][axis] * step for axis, step in zip(record["inplane_axes"], record["step"],
                                                                          strict=True)]
    return (float(record["slice_spacing"]), float(inplane[0]), float(inplane[1]))


def invert_labels(indices: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """Class-index patch stack [S, H, W] -> class indices on the original grid."""
    return invert_probabilities(np.moveaxis(one_hot(indices, record["n_classes"]), 0, 1), record)


def to_nifti(indices: np.ndarray, record: dict[str, Any]) -> nib.Nifti1Image:
    """Class indices on the original grid -> NIfTI with the file label values and the original affine."""
    return nifti_on_original_grid(indices_to_values(indices, record["label_values"]), record)


def nifti_on_original_grid(data: np.ndarray, record: dict[str, Any]) -> nib.Nifti1Image:
    """An array on the subject's original grid as NIfTI with the original affine (qform and sform)."""
    img = nib.Nifti1Image(data, np.asarray(record["orig_affine"]))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return img


def original_slice_axis(affine: np.ndarray, ras_axis: int) -> int:
    """The stored array axis that becomes RAS axis ``ras_axis`` after reorientation."""
    return int(np.nonzero(io_orientation(affine)[:, 0] == ras_axis)[0][0])


def original_slice_order(record: dict[str, Any]) -> tuple[int, np.ndarray]:
    """The original array axis of the slicing axis, and for each preprocessed slice its original index."""
    affine = np.asarray(record["orig_affine"])
    axis = original_slice_axis(affine, record["slicing_axis"])
    order = np.arange(record["orig_shape"][axis])
    return axis, (order[::-1] if io_orientation(affine)[axis, 1] < 0 else order)


def spacing_from_record(record: dict[str, Any]) -> tuple[float, float, float]:
    """Original voxel spacing (array order) from a record."""
    return spacing_of(np.asarray(record["orig_affine"]))
