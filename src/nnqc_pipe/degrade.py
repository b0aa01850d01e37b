"""Corrupting ground-truth masks into imperfect ones (method step 3, "Degradation").

Two users:

* **Evaluation** — :func:`degrade_subject` turns one subject's ground truth into five saved masks whose
  volume-level foreground DSC lies in the bins of :data:`LEVEL_BINS` (L1 worst … L5 best), deterministically
  from a seed and the subject name.
* **Training** — :func:`corrupt_slice` corrupts one 2D slice at a continuous ``severity`` in [0, 1]
  (sampled with :func:`sample_severity`) on the fly in the data loader, so the diffusion model sees candidate
  masks of every quality, empty ones included.

Both build on the same elementary operations, each also public as a small function (:func:`erode`,
:func:`dilate`, :func:`cut_holes`, :func:`add_false_positive_blobs`, :func:`drop_slices`,
:func:`remove_structure`). Internally an operation is an ordered list of voxel edits (:class:`_Edits`): which
voxels it changes, to which class, and how far into the operation each change happens (``progress``).
Erosion/dilation shells, holes and false-positive blobs are ordered by a smooth random field, so a partial
operation affects blob-shaped patches that grow with its progress.

A **recipe** mixes several operations (:class:`_Step`): each maps its progress onto a global severity axis
(``onset + span * progress``), so one scalar severity controls the whole mixture — boundary errors come first,
holes, false positives, missed slices and missing structures as the severity rises. Because every edit has a
fixed activation severity, the foreground DSC of the mixture at *every* severity follows from one sort and a
cumulative sum (:func:`_dsc_curve`); :func:`degrade_volume` thus searches the severity exhaustively instead
of bisecting, picks the in-bin severity nearest to a random target inside the bin, and draws a new recipe only
when the curve jumps over the bin (a dropped slice or a removed structure can).

Conventions: class indices ``0..C-1`` with 0 = background; DSC of two empty masks is 1, of exactly one empty
mask 0 (the conventions of :mod:`nnqc_pipe.dice`); 3D operations take the voxel ``spacing`` in mm so that
kernels, blob sizes and distances are physical (a 5 mm slice spacing is not dilated across like a 1 mm one).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from nnqc_pipe.dice import class_dice, dice, dice_from_counts

log = logging.getLogger(__name__)

LEVEL_BINS: dict[int, tuple[float, float]] = {
    1: (0.05, 0.10),
    2: (0.10, 0.25),
    3: (0.25, 0.50),
    4: (0.50, 0.75),
    5: (0.75, 0.95),
}
"""Volume-level foreground DSC bins per degradation level: [lo, hi), the last one [lo, hi]."""

KERNEL_SIZES = (3, 5, 7)
"""Structuring-element sizes (voxels along the finest axis) for erosion and dilation."""

DEFAULT_MAX_TRIES = 20
"""Recipes drawn by :func:`degrade_volume` before it gives up on a bin and keeps the closest attempt."""

EMPTY_AT_FULL_SEVERITY = 0.25
"""Probability that :func:`corrupt_slice` returns an empty slice at severity 1 (grows as severity²)."""

MIN_FP_REFERENCE = 0.01
"""False-positive budgets are relative to max(foreground voxels, this fraction of the array)."""

# Recipe probabilities (see _draw_steps).
P_MISSING_STRUCTURE = 0.25
P_CLASS_HOLES = 0.3
P_DROPPED_SLICES = 0.4
P_DROP_CONTIGUOUS = 0.6
P_MERGE = 0.5


# ---------------------------------------------------------------------------------------------------
# DSC
# ---------------------------------------------------------------------------------------------------


def in_bin(dsc: float, level: int) -> bool:
    """Whether ``dsc`` lies in the bin of ``level``: [lo, hi), except the best level's [lo, hi]."""
    lo, hi = LEVEL_BINS[level]
    return lo <= dsc <= hi if level == max(LEVEL_BINS) else lo <= dsc < hi


def _bin_distance(dsc: np.ndarray, level: int) -> np.ndarray:
    """How far each DSC lies outside the level's bin (0 inside)."""
    lo, hi = LEVEL_BINS[level]
    top = hi if level == max(LEVEL_BINS) else np.nextafter(hi, -np.inf)
    return np.maximum(np.maximum(lo - dsc, dsc - top), 0.0)


# ---------------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------------


def _spacing_for(label: np.ndarray, spacing: Sequence[float] | None) -> np.ndarray:
    """Voxel spacing as an array with one entry per axis (isotropic 1 mm when not given)."""
    if spacing is None:
        return np.ones(label.ndim)
    out = np.asarray(spacing, dtype=np.float64)
    if out.shape != (label.ndim,) or np.any(out <= 0):
        raise ValueError(f"spacing {tuple(spacing)} does not fit a {label.ndim}D array")
    return out


def _footprint(kernel_size: int, spacing: np.ndarray) -> np.ndarray:
    """Ellipsoidal structuring element of ``kernel_size`` voxels along the finest axis, physical elsewhere.

    The radius is ``kernel_size // 2`` voxels of the finest spacing in mm; coarser axes get fewer voxels
    (none at all when the spacing exceeds the radius), so thick slices are not dilated across.
    """
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel size must be odd and >= 3, got {kernel_size}")
    radius_mm = (kernel_size // 2) * float(spacing.min())
    half = np.floor(radius_mm / spacing + 1e-6).astype(int)
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    dist2 = sum((g * s) ** 2 for g, s in zip(grids, spacing, strict=True))
    return dist2 <= radius_mm**2 + 1e-6


def _bbox(mask: np.ndarray, margin: np.ndarray | int) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` grown by ``margin`` voxels per axis and clipped; None when it is empty."""
    if not mask.any():
        return None
    margin = np.broadcast_to(np.asarray(margin, dtype=int), (mask.ndim,))
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        box.append(slice(max(hits[0] - margin[axis], 0), min(hits[-1] + 1 + margin[axis], mask.shape[axis])))
    return tuple(box)


def _equivalent_radius_mm(n_voxels: int, spacing: np.ndarray) -> float:
    """Radius (mm) of the disc/ball with the volume of ``n_voxels`` voxels (at least one voxel)."""
    volume = max(n_voxels, 1) * float(np.prod(spacing))
    ndim = len(spacing)
    unit_ball = math.pi ** (ndim / 2) / math.gamma(ndim / 2 + 1)
    return (volume / unit_ball) ** (1.0 / ndim)


def _blob_scale_mm(n_voxels: int, spacing: np.ndarray, rng: np.random.Generator) -> float:
    """Random smoothing scale (mm) for blob-shaped patches, relative to the size of the structure."""
    return _equivalent_radius_mm(n_voxels, spacing) * rng.uniform(0.15, 0.45)


def _smooth_field(
    shape: tuple[int, ...], spacing: np.ndarray, scale_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """Gaussian-smoothed white noise; its superlevel sets are random smooth blobs of about ``scale_mm``."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    sigma = np.maximum(scale_mm / spacing, 0.5)
    return ndi.gaussian_filter(noise, sigma, truncate=3.0)


def _rank_progress(values: np.ndarray) -> np.ndarray:
    """Progress in (0, 1] ordering ``values`` from highest (first) to lowest (last)."""
    progress = np.empty(values.size, dtype=np.float64)
    progress[np.argsort(-values, kind="stable")] = np.arange(1, values.size + 1) / max(values.size, 1)
    return progress


def _patch_progress(
    candidates: np.ndarray, spacing: np.ndarray, rng: np.random.Generator, scale_mm: float | None = None
) -> np.ndarray:
    """Order the ``candidates`` voxels (C order) in growing blob-shaped patches, as progress in (0, 1]."""
    if scale_mm is None:
        scale_mm = _blob_scale_mm(int(np.count_nonzero(candidates)), spacing, rng)
    field = _smooth_field(candidates.shape, spacing, scale_mm, rng)
    return _rank_progress(field[candidates])


# ---------------------------------------------------------------------------------------------------
# Operations as ordered voxel edits
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Edits:
    """What one operation does: set ``index`` (flat, unique) to ``value`` once its ``progress`` is reached."""

    index: np.ndarray
    value: np.ndarray
    progress: np.ndarray

    @staticmethod
    def none() -> _Edits:
        """No edits (an operation with nothing to act on)."""
        return _Edits(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64))

    @staticmethod
    def from_crop(
        shape: tuple[int, ...],
        crop: tuple[slice, ...],
        selected: np.ndarray,
        value: np.ndarray | int,
        progress: np.ndarray | float,
    ) -> _Edits:
        """Edits of the ``selected`` voxels of a crop; ``value``/``progress`` follow their C order."""
        coords = np.nonzero(selected)
        index = np.ravel_multi_index(tuple(c + s.start for c, s in zip(coords, crop, strict=True)), shape)
        n = index.size
        return _Edits(
            index.astype(np.int64),
            np.broadcast_to(np.asarray(value, dtype=np.int64), (n,)).copy(),
            np.broadcast_to(np.asarray(progress, dtype=np.float64), (n,)).copy(),
        )

    def replace_value(self, old: int, new: int) -> _Edits:
        """The same edits, writing ``new`` wherever they would write ``old``."""
        return _Edits(self.index, np.where(self.value == old, new, self.value), self.progress)


def _apply(label: np.ndarray, edits: _Edits, fraction: float) -> np.ndarray:
    """A copy of ``label`` with the edits up to ``fraction`` of the operation applied."""
    out = label.copy()
    active = edits.progress <= fraction
    out.flat[edits.index[active]] = edits.value[active]
    return out


def _target_mask(label: np.ndarray, target: int | None) -> np.ndarray:
    """Voxels of class ``target``, or of the whole foreground when ``target`` is None."""
    return label > 0 if target is None else label == target


def _erosion_edits(
    label: np.ndarray, footprint: np.ndarray, target: int | None, spacing: np.ndarray, rng: np.random.Generator
) -> _Edits:
    """Shrink ``target`` (or the whole foreground) by ``footprint``.

    Eroded voxels of one class take the class of the nearest voxel outside it (an eroded inner cavity is
    absorbed by the surrounding wall, not punched into background); the whole foreground erodes to background.
    """
    inside = _target_mask(label, target)
    crop = _bbox(inside, np.array(footprint.shape) // 2 + 1)
    if crop is None:
        return _Edits.none()
    sub, mask = label[crop], inside[crop]
    shell = mask & ~ndi.binary_erosion(mask, footprint, border_value=1)
    if target is None or mask.all():
        value: np.ndarray | int = 0
    else:
        nearest = ndi.distance_transform_edt(mask, sampling=spacing, return_distances=False, return_indices=True)
        value = sub[tuple(nearest)][shell]
    progress = _patch_progress(shell, spacing, rng, _blob_scale_mm(int(mask.sum()), spacing, rng))
    return _Edits.from_crop(label.shape, crop, shell, value, progress)


def _dilation_edits(
    label: np.ndarray, footprint: np.ndarray, target: int | None, spacing: np.ndarray, rng: np.random.Generator
) -> _Edits:
    """Grow ``target`` over its neighbours by ``footprint``; the whole foreground grows into background only,
    each new voxel taking the class of the nearest foreground voxel."""
    inside = _target_mask(label, target)
    crop = _bbox(inside, np.array(footprint.shape) // 2 + 1)
    if crop is None:
        return _Edits.none()
    sub, mask = label[crop], inside[crop]
    grown = ndi.binary_dilation(mask, footprint) & ~mask
    if target is None:
        nearest = ndi.distance_transform_edt(~mask, sampling=spacing, return_distances=False, return_indices=True)
        value: np.ndarray | int = sub[tuple(nearest)][grown]
    else:
        value = target
    progress = _patch_progress(grown, spacing, rng, _blob_scale_mm(int(mask.sum()), spacing, rng))
    return _Edits.from_crop(label.shape, crop, grown, value, progress)


def _hole_edits(label: np.ndarray, inside: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> _Edits:
    """Remove blob-shaped regions of the ``inside`` voxels, growing until all of them are gone."""
    crop = _bbox(inside, 0)
    if crop is None:
        return _Edits.none()
    mask = inside[crop]
    return _Edits.from_crop(label.shape, crop, mask, 0, _patch_progress(mask, spacing, rng))


def _blob_edits(
    label: np.ndarray,
    classes: Sequence[int],
    n_voxels: int,
    near: bool,
    spacing: np.ndarray,
    rng: np.random.Generator,
) -> _Edits:
    """Add about ``n_voxels`` of smooth false-positive blobs in the background, each of a random class.

    ``near`` blobs lie within a random distance of the structure (leakage, neighbouring look-alikes); the
    others lie outside that neighbourhood (anywhere in the field of view when there is no foreground).
    """
    fg = label > 0
    n_fg = int(np.count_nonzero(fg))
    reach_mm = _equivalent_radius_mm(n_fg, spacing) * rng.uniform(0.5, 1.5)
    margin = np.ceil(reach_mm / spacing).astype(int)
    near_box = _bbox(fg, margin)
    if near and near_box is not None:
        crop = near_box
        distance = ndi.distance_transform_edt(~fg[crop], sampling=spacing)
        candidates = (distance > 0) & (distance <= reach_mm)
    else:
        crop = tuple(slice(0, n) for n in label.shape)
        candidates = ~fg
        if near_box is not None:
            away = candidates.copy()
            away[near_box] = False
            candidates = away if away.any() else candidates
    n_candidates = int(np.count_nonzero(candidates))
    n_voxels = min(n_voxels, n_candidates)
    if n_voxels <= 0 or not classes:
        return _Edits.none()
    field = _smooth_field(candidates.shape, spacing, _blob_scale_mm(max(n_fg, n_voxels), spacing, rng), rng)
    values = field[candidates]
    top = np.argpartition(-values, n_voxels - 1)[:n_voxels]
    chosen = np.zeros(n_candidates, dtype=bool)
    chosen[top] = True
    selected = np.zeros_like(candidates)
    selected[candidates] = chosen
    components, n_components = ndi.label(selected)
    component_class = rng.choice(np.asarray(classes), size=n_components + 1)
    value = component_class[components[selected]]
    return _Edits.from_crop(label.shape, crop, selected, value, _rank_progress(field[selected]))


def _slice_drop_edits(
    label: np.ndarray, may_be_foreground: np.ndarray, n_slices: int, slice_axis: int, contiguous: bool,
    rng: np.random.Generator,
) -> _Edits:
    """Empty ``n_slices`` slices holding foreground, contiguous from one end of the structure or scattered.

    ``may_be_foreground`` marks every voxel another operation might fill, so a dropped slice stays empty.
    """
    others = tuple(a for a in range(label.ndim) if a != slice_axis)
    occupied = np.flatnonzero(may_be_foreground.any(axis=others))
    n_slices = min(n_slices, occupied.size)
    if n_slices <= 0:
        return _Edits.none()
    if contiguous:
        ordered = occupied if rng.random() < 0.5 else occupied[::-1]
        dropped = ordered[:n_slices]
    else:
        dropped = rng.permutation(occupied)[:n_slices]
    rank = np.full(label.shape[slice_axis], -1)
    rank[dropped] = np.arange(n_slices)
    shape = [1] * label.ndim
    shape[slice_axis] = -1
    slice_rank = np.broadcast_to(rank.reshape(shape), label.shape)
    selected = may_be_foreground & (slice_rank >= 0)
    full = tuple(slice(0, n) for n in label.shape)
    return _Edits.from_crop(label.shape, full, selected, 0, (slice_rank[selected] + 1) / n_slices)


def _neighbour_class(label: np.ndarray, target: int) -> int | None:
    """The foreground class sharing the longest border with ``target`` (None when it touches none)."""
    inside = label == target
    crop = _bbox(inside, 1)
    if crop is None:
        return None
    ring = ndi.binary_dilation(inside[crop]) & ~inside[crop]
    counts = np.bincount(label[crop][ring].astype(np.int64), minlength=target + 1)
    counts[0] = 0
    counts[target] = 0
    return int(counts.argmax()) if counts.max() > 0 else None


def _structure_edits(label: np.ndarray, target: int, replacement: int) -> _Edits:
    """Relabel every voxel of ``target`` as ``replacement`` (0 = the structure is missed)."""
    full = tuple(slice(0, n) for n in label.shape)
    return _Edits.from_crop(label.shape, full, label == target, replacement, 1.0)


def _present_classes(label: np.ndarray) -> list[int]:
    """Foreground classes that occur in ``label``."""
    counts = np.bincount(label.ravel().astype(np.int64))
    return [int(c) + 1 for c in np.flatnonzero(counts[1:])]


def _fp_reference(label: np.ndarray) -> int:
    """Voxel count that false-positive budgets are relative to."""
    return max(int(np.count_nonzero(label)), int(MIN_FP_REFERENCE * label.size), 1)


# ---------------------------------------------------------------------------------------------------
# Elementary operations (public)
# ---------------------------------------------------------------------------------------------------


def _draw_kernel(rng: np.random.Generator) -> int:
    """A random structuring-element size from :data:`KERNEL_SIZES`."""
    return int(rng.choice(KERNEL_SIZES))


def erode(
    label: np.ndarray,
    rng: np.random.Generator,
    *,
    kernel_size: int | None = None,
    target: int | None = None,
    spacing: Sequence[float] | None = None,
    fraction: float = 1.0,
) -> np.ndarray:
    """Under-segment: shrink class ``target`` (None: the whole foreground) by a ``kernel_size`` element.

    ``kernel_size`` defaults to a random one of :data:`KERNEL_SIZES`; ``fraction`` < 1 erodes only that share
    of the boundary shell, in blob-shaped patches (a locally too small mask).
    """
    sp = _spacing_for(label, spacing)
    footprint = _footprint(kernel_size or _draw_kernel(rng), sp)
    return _apply(label, _erosion_edits(label, footprint, target, sp, rng), fraction)


def dilate(
    label: np.ndarray,
    rng: np.random.Generator,
    *,
    kernel_size: int | None = None,
    target: int | None = None,
    spacing: Sequence[float] | None = None,
    fraction: float = 1.0,
) -> np.ndarray:
    """Over-segment: grow class ``target`` (None: the whole foreground, into background) by a kernel.

    Arguments as in :func:`erode`.
    """
    sp = _spacing_for(label, spacing)
    footprint = _footprint(kernel_size or _draw_kernel(rng), sp)
    return _apply(label, _dilation_edits(label, footprint, target, sp, rng), fraction)


def cut_holes(
    label: np.ndarray,
    rng: np.random.Generator,
    *,
    fraction: float | None = None,
    target: int | None = None,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Missed regions: set blob-shaped parts (``fraction`` of the voxels, default 10–40 %) of class ``target``
    (None: of the foreground) to background."""
    if fraction is None:
        fraction = rng.uniform(0.1, 0.4)
    edits = _hole_edits(label, _target_mask(label, target), _spacing_for(label, spacing), rng)
    return _apply(label, edits, fraction)


def add_false_positive_blobs(
    label: np.ndarray,
    rng: np.random.Generator,
    *,
    n_classes: int,
    volume_ratio: float | None = None,
    near: bool | None = None,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """False positives: add smooth blobs of random foreground classes in the background.

    The blobs total ``volume_ratio`` (default 10–50 %) of the foreground volume (or of 1 % of the array when
    the mask is nearly empty); ``near`` (default random) puts them close to the structure instead of away.
    """
    if volume_ratio is None:
        volume_ratio = rng.uniform(0.1, 0.5)
    if near is None:
        near = bool(rng.random() < 0.5)
    n_voxels = round(volume_ratio * _fp_reference(label))
    edits = _blob_edits(label, range(1, n_classes), n_voxels, near, _spacing_for(label, spacing), rng)
    return _apply(label, edits, 1.0)


def drop_slices(
    label: np.ndarray,
    rng: np.random.Generator,
    *,
    n_slices: int | None = None,
    slice_axis: int = -1,
    contiguous: bool | None = None,
) -> np.ndarray:
    """Missed slices: empty ``n_slices`` (default 1 to a third of them) of the slices holding foreground
    along ``slice_axis``, contiguous from one end of the structure (``contiguous``, default random) or
    scattered."""
    axis = slice_axis % label.ndim
    others = tuple(a for a in range(label.ndim) if a != axis)
    n_occupied = int(np.count_nonzero((label > 0).any(axis=others)))
    if n_slices is None:
        n_slices = int(rng.integers(1, max(n_occupied // 3, 1) + 1))
    if contiguous is None:
        contiguous = bool(rng.random() < P_DROP_CONTIGUOUS)
    return _apply(label, _slice_drop_edits(label, label > 0, n_slices, axis, contiguous, rng), 1.0)


def remove_structure(
    label: np.ndarray, rng: np.random.Generator, *, target: int | None = None, merge: bool | None = None
) -> np.ndarray:
    """Missing structure: class ``target`` (default random among those present) disappears — set to
    background, or merged into the class it borders most when ``merge`` (default random) is true."""
    present = _present_classes(label)
    if not present:
        return label.copy()
    if target is None:
        target = int(rng.choice(present))
    if merge is None:
        merge = bool(rng.random() < P_MERGE)
    replacement = (_neighbour_class(label, target) or 0) if merge else 0
    return _apply(label, _structure_edits(label, target, replacement), 1.0)


# ---------------------------------------------------------------------------------------------------
# Recipes: a mixture of operations on one severity axis
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One operation of a recipe; its edits take effect at severity ``onset + span * progress``."""

    name: str
    edits: _Edits
    onset: float
    span: float

    @property
    def activation(self) -> np.ndarray:
        return self.onset + self.span * self.edits.progress


def _draw_steps(
    label: np.ndarray,
    n_classes: int,
    spacing: np.ndarray,
    rng: np.random.Generator,
    slice_axis: int | None,
) -> list[_Step]:
    """Draw a random recipe for ``label``, in the order its edits are applied (later steps win).

    Always: 1–2 boundary errors (erosion/dilation, kernel 3–7, of one class or the whole foreground) that are
    complete early (severity 0.1–0.6), and holes over the whole foreground that start by severity 0.3 and
    remove everything by 0.8–1.0 — so severity 0 is the input and severity 1 has lost its foreground.
    Sometimes: holes in one class, 1–2 sets of false-positive blobs (near or away), dropped slices (3D,
    ``slice_axis`` given) and one missing structure (when two classes or more are present).
    """
    present = _present_classes(label)
    missing: tuple[int, int] | None = None
    steps: list[_Step] = []
    if len(present) >= 2 and rng.random() < P_MISSING_STRUCTURE:
        target = int(rng.choice(present))
        replacement = (_neighbour_class(label, target) or 0) if rng.random() < P_MERGE else 0
        missing = (target, replacement)
        edits = _structure_edits(label, target, replacement)
        steps.append(_Step("missing_structure", edits, rng.uniform(0.3, 1.0), 0.0))
    targets: list[int | None] = [None, *(c for c in present if missing is None or c != missing[0])]

    for _ in range(int(rng.integers(1, 3))):
        footprint = _footprint(_draw_kernel(rng), spacing)
        target = targets[int(rng.integers(len(targets)))]
        grow = rng.random() < 0.5
        edits = (_dilation_edits if grow else _erosion_edits)(label, footprint, target, spacing, rng)
        steps.append(_Step("dilation" if grow else "erosion", edits, 0.0, rng.uniform(0.1, 0.6)))

    if len(targets) > 1 and rng.random() < P_CLASS_HOLES:
        target = targets[int(rng.integers(1, len(targets)))]
        edits = _hole_edits(label, _may_become(label, steps, target), spacing, rng)
        steps.append(_Step("class_holes", edits, 0.0, rng.uniform(0.3, 1.0)))
    onset = rng.uniform(0.0, 0.3)
    edits = _hole_edits(label, _may_become(label, steps), spacing, rng)
    steps.append(_Step("holes", edits, onset, rng.uniform(0.8, 1.0) - onset))

    fp_classes = [c for c in range(1, n_classes) if missing is None or c != missing[0]]
    for _ in range(int(rng.integers(0, 3))):
        n_voxels = round(rng.uniform(0.1, 1.0) * _fp_reference(label))
        edits = _blob_edits(label, fp_classes, n_voxels, bool(rng.random() < 0.5), spacing, rng)
        steps.append(_Step("false_positives", edits, rng.uniform(0.0, 0.5), rng.uniform(0.2, 0.6)))

    if missing is not None:  # the missing class must not come back through another operation
        steps[1:] = [_Step(s.name, s.edits.replace_value(*missing), s.onset, s.span) for s in steps[1:]]

    if slice_axis is not None and rng.random() < P_DROPPED_SLICES:
        steps.append(_drop_step(label, steps, slice_axis, rng))
    return steps


def _may_become(label: np.ndarray, steps: Sequence[_Step], target: int | None = None) -> np.ndarray:
    """Voxels that are class ``target`` (None: foreground) in ``label`` or that one of ``steps`` can make so.

    Later steps that remove or empty voxels use it, so that e.g. holes also cut into a dilated rim.
    """
    mask = _target_mask(label, target)
    for step in steps:
        writes = step.edits.value > 0 if target is None else step.edits.value == target
        mask.flat[step.edits.index[writes]] = True
    return mask


def _drop_step(label: np.ndarray, steps: Sequence[_Step], slice_axis: int, rng: np.random.Generator) -> _Step:
    """A dropped-slices step covering every voxel that the earlier ``steps`` could fill."""
    may_be_foreground = _may_become(label, steps)
    others = tuple(a for a in range(label.ndim) if a != slice_axis)
    n_occupied = int(np.count_nonzero((label > 0).any(axis=others)))
    n_slices = int(rng.integers(1, max(n_occupied // 3, 1) + 1))
    contiguous = bool(rng.random() < P_DROP_CONTIGUOUS)
    edits = _slice_drop_edits(label, may_be_foreground, n_slices, slice_axis, contiguous, rng)
    return _Step("dropped_slices", edits, rng.uniform(0.1, 0.6), rng.uniform(0.2, 0.5))


def _render(label: np.ndarray, steps: Sequence[_Step], severity: float) -> np.ndarray:
    """``label`` with every edit active at ``severity`` applied, later steps overriding earlier ones."""
    out = label.copy()
    for step in steps:
        active = step.activation <= severity
        out.flat[step.edits.index[active]] = step.edits.value[active]
    return out


def _dsc_curve(label: np.ndarray, steps: Sequence[_Step]) -> tuple[np.ndarray, np.ndarray]:
    """Foreground DSC of ``_render(label, steps, s)`` vs ``label`` for every distinct activation ``s``.

    Returns (severities, DSC), starting at severity 0 (DSC of the unchanged mask). A voxel can be edited by
    several steps; it only changes when an edit of a later step (higher priority) than the one currently
    showing becomes active, so the transitions are the edits beating the running maximum priority per voxel
    (in activation order), and the DSC follows from cumulative counts of foreground gained and lost.
    """
    gt = label.ravel()
    index = np.concatenate([s.edits.index for s in steps])
    value = np.concatenate([s.edits.value for s in steps])
    activation = np.concatenate([s.activation for s in steps])
    priority = np.concatenate([np.full(s.edits.index.size, i, dtype=np.int64) for i, s in enumerate(steps)])
    n_ref = int(np.count_nonzero(gt))
    if index.size == 0:
        return np.zeros(1), dice_from_counts(np.array([n_ref]), n_ref, np.array([n_ref]))

    order = np.lexsort((priority, activation, index))
    index, value, activation, priority = index[order], value[order], activation[order], priority[order]
    key = index * len(steps) + priority  # groups by voxel: keys of a later voxel exceed all earlier ones
    shows = np.ones(key.size, dtype=bool)
    shows[1:] = key[1:] > np.maximum.accumulate(key)[:-1]
    index, value, activation = index[shows], value[shows], activation[shows]

    first = np.ones(index.size, dtype=bool)
    first[1:] = index[1:] != index[:-1]
    before = np.where(first, gt[index], np.roll(value, 1))
    d_pred = (value > 0).astype(np.int64) - (before > 0)
    d_inter = np.where(gt[index] > 0, d_pred, 0)

    order = np.argsort(activation, kind="stable")
    activation = activation[order]
    ends = np.flatnonzero(np.r_[activation[1:] != activation[:-1], True])
    pred = n_ref + np.cumsum(d_pred[order])[ends]
    inter = n_ref + np.cumsum(d_inter[order])[ends]
    severities = np.r_[0.0, activation[ends]]
    dsc = dice_from_counts(np.r_[n_ref, inter], n_ref, np.r_[n_ref, pred])
    return severities, dsc


# ---------------------------------------------------------------------------------------------------
# Evaluation: volumes at five quality levels
# ---------------------------------------------------------------------------------------------------


def _check_label(label: np.ndarray, n_classes: int) -> None:
    if not np.issubdtype(label.dtype, np.integer):
        raise TypeError(f"label must hold integer class indices, got dtype {label.dtype}")
    if label.size and (int(label.min()) < 0 or int(label.max()) >= n_classes):
        raise ValueError(f"label values must lie in 0..{n_classes - 1}, got {int(label.min())}..{int(label.max())}")


def degrade_volume(
    label: np.ndarray,
    spacing: tuple[float, float, float],
    n_classes: int,
    level: int,
    rng: np.random.Generator,
    slice_axis: int = 2,
    max_tries: int = DEFAULT_MAX_TRIES,
) -> tuple[np.ndarray, float, dict[int, float]]:
    """Corrupt a 3D class-index ``label`` so its foreground DSC vs ``label`` falls in ``LEVEL_BINS[level]``.

    Draws a recipe (a random mixture of operations on one severity axis), computes its DSC at every
    severity and keeps the in-bin severity closest to a random target inside the bin; draws a new recipe when
    the curve skips the bin. After ``max_tries`` recipes it logs a warning and returns the closest attempt.
    Returns (mask, achieved foreground DSC, per-class DSC for classes 1..n_classes-1).
    """
    if label.ndim != 3:
        raise ValueError(f"degrade_volume needs a 3D label, got shape {label.shape}")
    if level not in LEVEL_BINS:
        raise ValueError(f"level must be one of {sorted(LEVEL_BINS)}, got {level}")
    _check_label(label, n_classes)
    sp = _spacing_for(label, spacing)
    axis = slice_axis % label.ndim
    lo, hi = LEVEL_BINS[level]
    best: tuple[float, list[_Step], float] | None = None
    for attempt in range(1, max_tries + 1):
        steps = _draw_steps(label, n_classes, sp, rng, axis)
        severities, dsc = _dsc_curve(label, steps)
        distance = _bin_distance(dsc, level)
        inside = np.flatnonzero(distance == 0)
        if inside.size:
            target = rng.uniform(lo, hi)
            pick = inside[np.argmin(np.abs(dsc[inside] - target))]
            best = (0.0, steps, float(severities[pick]))
            log.debug("level %d: recipe %s in bin after %d tries", level, [s.name for s in steps], attempt)
            break
        pick = int(np.argmin(distance))
        if best is None or distance[pick] < best[0]:
            best = (float(distance[pick]), steps, float(severities[pick]))
    assert best is not None  # max_tries >= 1
    out = _render(label, best[1], best[2])
    achieved = dice(out > 0, label > 0)
    if best[0] > 0:
        log.warning(
            "level %d: no recipe reached the DSC bin [%.2f, %.2f] in %d tries; keeping DSC %.3f",
            level, lo, hi, max_tries, achieved,
        )
    return out, achieved, dict(enumerate(class_dice(out, label, n_classes).tolist(), start=1))


def degrade_subject(
    label: np.ndarray,
    spacing: tuple[float, float, float],
    n_classes: int,
    seed: int,
    subject: str,
    slice_axis: int = 2,
) -> list[dict]:
    """All five degradation levels of one subject, deterministic in (``seed``, ``subject``, level).

    Each level has its own generator seeded with ``[seed, crc32(subject), level]`` (stable across runs and
    machines, unlike Python's ``hash``), so levels do not depend on each other or on the subject order.
    Returns one record per level: ``level``, ``mask``, ``dsc_foreground``, ``dsc_per_class``, ``in_bin``.
    """
    subject_key = zlib.crc32(subject.encode("utf-8"))
    records = []
    for level in sorted(LEVEL_BINS):
        rng = np.random.default_rng([seed, subject_key, level])
        mask, dsc, dsc_per_class = degrade_volume(label, spacing, n_classes, level, rng, slice_axis=slice_axis)
        records.append(
            {
                "level": level,
                "mask": mask,
                "dsc_foreground": dsc,
                "dsc_per_class": dsc_per_class,
                "in_bin": in_bin(dsc, level),
            }
        )
    return records


# ---------------------------------------------------------------------------------------------------
# Training: on-the-fly slice corruption
# ---------------------------------------------------------------------------------------------------


def corrupt_slice(mask: np.ndarray, n_classes: int, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Corrupt a 2D class-index slice at ``severity`` in [0, 1] for training the diffusion model.

    0 returns the slice unchanged, mid severities mix boundary errors, holes, false positives and missing
    structures, 1 removes the whole structure (leaving at most false-positive blobs). With probability
    ``EMPTY_AT_FULL_SEVERITY · severity²`` the result is empty outright. An empty input can gain
    false-positive blobs. Returns a new array of the input's shape and dtype.
    """
    if mask.ndim != 2:
        raise ValueError(f"corrupt_slice needs a 2D slice, got shape {mask.shape}")
    _check_label(mask, n_classes)
    severity = float(np.clip(severity, 0.0, 1.0))
    if severity == 0.0:
        return mask.copy()
    if rng.random() < EMPTY_AT_FULL_SEVERITY * severity**2:
        return np.zeros_like(mask)
    steps = _draw_steps(mask, n_classes, np.ones(2), rng, slice_axis=None)
    return _render(mask, steps, severity)


def check_severity_mix(clean: float, light: float, destroyed: float) -> None:
    """Reject severity shares below 0 or summing to more than 1 (see :func:`sample_severity`)."""
    if min(clean, light, destroyed) < 0 or clean + light + destroyed > 1:
        raise ValueError(f"severity shares must be >= 0 and sum to <= 1, got clean {clean}, light {light}, "
                         f"destroyed {destroyed}")


def sample_severity(rng: np.random.Generator, clean: float = 0.1, light: float = 0.0, destroyed: float = 0.1,
                    light_max: float = 0.2) -> float:
    """A training severity spanning [0, 1]: a share ``clean`` exactly 0, ``light`` uniform in [0, ``light_max``],
    ``destroyed`` in [0.9, 1], the rest uniform in [0, 1] (defaults: 10 % clean, 10 % destroyed)."""
    check_severity_mix(clean, light, destroyed)
    u = rng.random()
    if u < clean:
        return 0.0
    if u < clean + light:
        return float(rng.uniform(0.0, light_max))
    if u < clean + light + destroyed:
        return float(rng.uniform(0.9, 1.0))
    return float(rng.uniform(0.0, 1.0))
