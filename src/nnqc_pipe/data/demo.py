"""The built-in synthetic demo cohort: small, anatomically shaped 3D MR-like phantoms.

Each subject is a hollow, tapered, ventricle-like organ inside a body outline:

- label 1 (``wall``) is the outer shell, label 2 (``cavity``) the core it encloses in every slice; the
  cross-section grows from a truncated base to a maximum and shrinks to a closed apex along the slice axis,
  so the slice position matters, and the organ covers a strict sub-range of the slices;
- the body outline, a bright spine-like disk and a dark lung-like region appear in the image but are not
  labelled;
- the grid is anisotropic (in-plane about 1.1-1.4 mm, slices about 3 mm: the slice axis is the coarsest) and
  the affine carries a non-zero origin; every third subject (index 1, 4, 7, ...) is stored in a non-RAS
  orientation;
- intensities are MR-like: one mean per tissue, partial-volume blur, a smooth multiplicative bias field and
  Rician noise.

Everything is drawn from ``numpy.random.default_rng([seed, index])``, so a subject depends only on
``(index, seed)`` and not on how many subjects are generated or in which order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, ornt_transform
from scipy import ndimage

from nnqc_pipe.data.io import write_nifti

log = logging.getLogger(__name__)

WALL, CAVITY = 1, 2
LABEL_NAMES: dict[int, str] = {WALL: "wall", CAVITY: "cavity"}
"""Label values written to the label files and their names (0 is background)."""

IN_PLANE_VOXELS = (52, 60)
"""Inclusive range of the number of voxels along each in-plane axis."""
N_SLICES = (14, 18)
"""Inclusive range of the number of slices."""
IN_PLANE_SPACING_MM = (1.1, 1.4)
SLICE_SPACING_MM = (2.8, 3.2)
MIN_EMPTY_SLICES = 2
"""Slices at each end of the volume that never contain the organ."""

RAS = ("R", "A", "S")
NON_RAS_ORIENTATIONS = (("L", "P", "S"), ("S", "L", "P"))
"""Storage orientations of the non-RAS subjects, alternating: LPS, then slice axis first."""

TISSUE_MEANS = {
    "background": 10.0,
    "body": 300.0,
    "spine": 450.0,
    "lung": 60.0,
    "wall": 600.0,
    "cavity": 150.0,
}
"""Mean intensity of each tissue before blur, bias and noise (each scaled by a random 0.9-1.1 per subject)."""
PARTIAL_VOLUME_SIGMA_VOXELS = (0.6, 0.6, 0.3)

IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"


@dataclass(frozen=True)
class Grid:
    """The RAS voxel grid of one subject."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """The RAS voxel-to-world affine (axis-aligned, spacing on the diagonal)."""
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine

    @property
    def fov(self) -> np.ndarray:
        """Field of view in mm along each axis."""
        return np.asarray(self.shape) * np.asarray(self.spacing)

    def centred_coordinates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates in mm relative to the volume centre, as broadcastable 3D arrays."""
        axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(self.shape, self.spacing, strict=True)]
        x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
        return x, y, z


@dataclass(frozen=True)
class Organ:
    """Shape parameters of the labelled organ, in mm relative to the volume centre."""

    semi_axes: tuple[float, float]
    rotation: float
    centre: tuple[float, float]
    drift: tuple[float, float]
    z_centre: float
    half_length: float
    peak_position: float
    wall_thickness: float
    wall_phase: float
    harmonic_amplitudes: tuple[float, float]
    harmonic_phases: tuple[float, float]
    harmonic_twists: tuple[float, float]


def subject_names(n_subjects: int) -> list[str]:
    """Names of the first ``n_subjects`` demo subjects: ``demo_000``, ``demo_001``, ..."""
    return [f"demo_{index:03d}" for index in range(n_subjects)]


def make_subject(index: int, seed: int) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Generate demo subject ``index`` of the cohort drawn with ``seed``, deterministically.

    Returns ``(image, label)`` on the same grid: a float32 MR-like image and a uint8 label with values
    0 (background), 1 (wall) and 2 (cavity). The arrays are stored in the subject's orientation (RAS, LPS or
    slice-axis-first); ``nib.as_closest_canonical`` brings them back to RAS with the slice axis last.
    """
    rng = np.random.default_rng([seed, index])
    grid = _sample_grid(rng)
    organ = _sample_organ(rng, grid)
    label = _organ_label(grid, organ)
    tissue = _tissue_intensities(rng, grid, label)
    image = _add_rician_noise(rng, tissue * _bias_field(rng, grid))
    orientation = storage_orientation(index)
    return (
        _to_nifti(image.astype(np.float32), grid.affine, orientation),
        _to_nifti(label, grid.affine, orientation),
    )


def storage_orientation(index: int) -> tuple[str, str, str]:
    """Axis codes subject ``index`` is stored in: RAS, except every third subject (index 1, 4, 7, ...)."""
    if index % 3 != 1:
        return RAS
    return NON_RAS_ORIENTATIONS[(index // 3) % len(NON_RAS_ORIENTATIONS)]


def write_cohort(out_dir: str | os.PathLike, n_subjects: int, seed: int) -> list[str]:
    """Write ``n_subjects`` demo subjects under ``out_dir`` and return their names.

    Files are ``{out_dir}/imagesTr/{name}.nii.gz`` and ``{out_dir}/labelsTr/{name}.nii.gz``, each written
    atomically.
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}")
    out = Path(out_dir)
    names = subject_names(n_subjects)
    for index, name in enumerate(names):
        image, label = make_subject(index, seed)
        write_nifti(image, out / IMAGES_DIR / f"{name}.nii.gz")
        write_nifti(label, out / LABELS_DIR / f"{name}.nii.gz")
    log.info("wrote %d demo subjects (seed %d) to %s", n_subjects, seed, out)
    return names


def _sample_grid(rng: np.random.Generator) -> Grid:
    """Draw the grid size, the anisotropic spacing and a non-zero origin (volume centre within 20 mm of 0)."""
    n_inplane = rng.integers(IN_PLANE_VOXELS[0], IN_PLANE_VOXELS[1] + 1, size=2)
    n_slices = int(rng.integers(N_SLICES[0], N_SLICES[1] + 1))
    inplane = float(rng.uniform(*IN_PLANE_SPACING_MM))
    spacing = (inplane, inplane, float(rng.uniform(*SLICE_SPACING_MM)))
    shape = (int(n_inplane[0]), int(n_inplane[1]), n_slices)
    centre_offset = rng.uniform(-20.0, 20.0, size=3)
    origin = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing) + centre_offset
    return Grid(shape=shape, spacing=spacing, origin=tuple(float(v) for v in origin))


def _sample_organ(rng: np.random.Generator, grid: Grid) -> Organ:
    """Draw the organ's size, eccentricity, position, extent along the slices and smooth deformation."""
    fov = float(min(grid.fov[:2]))
    major = rng.uniform(0.18, 0.23) * fov
    minor = major * rng.uniform(0.75, 0.95)
    n_slices, slice_spacing = grid.shape[2], grid.spacing[2]
    # Largest |z| an organ end may reach while MIN_EMPTY_SLICES slices at each end stay empty, with half a
    # slice of margin so that the end slices never touch the organ.
    z_limit = ((n_slices - 1) / 2.0 - MIN_EMPTY_SLICES) * slice_spacing - 0.5 * slice_spacing
    half_length = rng.uniform(0.75, 0.95) * z_limit
    z_centre = rng.uniform(-1.0, 1.0) * (z_limit - half_length)
    return Organ(
        semi_axes=(float(major), float(minor)),
        rotation=float(rng.uniform(0.0, np.pi)),
        centre=(float(0.08 * fov + rng.uniform(-0.05, 0.05) * fov), float(rng.uniform(-0.04, 0.07) * fov)),
        drift=tuple(float(v) for v in rng.uniform(-0.05, 0.05, size=2) * fov),
        z_centre=float(z_centre),
        half_length=float(half_length),
        peak_position=float(rng.uniform(0.2, 0.4)),
        wall_thickness=float(rng.uniform(0.3, 0.4) * minor),
        wall_phase=float(rng.uniform(0.0, 2 * np.pi)),
        harmonic_amplitudes=tuple(float(v) for v in rng.uniform(0.0, 0.06, size=2)),
        harmonic_phases=tuple(float(v) for v in rng.uniform(0.0, 2 * np.pi, size=2)),
        harmonic_twists=tuple(float(v) for v in rng.uniform(-1.0, 1.0, size=2)),
    )


def _taper_profile(t: np.ndarray, peak: float) -> np.ndarray:
    """Relative cross-section radius along the long axis ``t`` (0 at the base, 1 at the apex).

    The radius is 0.7 at the base, 1 at ``peak`` and 0 at the apex, and 0 outside [0, 1]; each side of the
    peak is a quarter ellipse, so the radius changes smoothly from slice to slice.
    """
    base_reach = peak / np.sqrt(1.0 - 0.7**2)
    reach = np.where(t < peak, base_reach, 1.0 - peak)
    profile = np.sqrt(np.clip(1.0 - ((t - peak) / reach) ** 2, 0.0, None))
    return np.where((t >= 0.0) & (t <= 1.0), profile, 0.0)


def _ellipse_radius(theta: np.ndarray, semi_axes: tuple[float, float], rotation: float) -> np.ndarray:
    """Distance from the centre to a rotated ellipse's boundary in direction ``theta``."""
    a, b = semi_axes
    phi = theta - rotation
    return a * b / np.sqrt((b * np.cos(phi)) ** 2 + (a * np.sin(phi)) ** 2)


def _organ_label(grid: Grid, organ: Organ) -> np.ndarray:
    """Rasterise the organ on the RAS grid: 1 where the wall is, 2 inside it (voxel centres), 0 elsewhere."""
    x, y, z = grid.centred_coordinates()
    # t runs from the base (superior end, t = 0) to the apex (inferior end, t = 1).
    t = (organ.z_centre + organ.half_length - z) / (2.0 * organ.half_length)
    dx = x - (organ.centre[0] + organ.drift[0] * (t - 0.5))
    dy = y - (organ.centre[1] + organ.drift[1] * (t - 0.5))
    rho = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    deformation = 1.0 + sum(
        amplitude * np.cos(k * theta + phase + twist * np.pi * t)
        for k, amplitude, phase, twist in zip(
            (2, 3), organ.harmonic_amplitudes, organ.harmonic_phases, organ.harmonic_twists, strict=True
        )
    )
    outer = _ellipse_radius(theta, organ.semi_axes, organ.rotation) * _taper_profile(t, organ.peak_position)
    outer = outer * deformation
    inner = outer - organ.wall_thickness * (1.0 + 0.15 * np.cos(theta - organ.wall_phase))
    label = np.zeros(grid.shape, dtype=np.uint8)
    label[rho <= outer] = WALL
    label[rho <= inner] = CAVITY
    return label


def _ellipse_mask(
    x: np.ndarray,
    y: np.ndarray,
    centre: tuple[float, float],
    semi_axes: tuple[float | np.ndarray, float | np.ndarray],
) -> np.ndarray:
    """Axis-aligned ellipse in the plane, broadcast over the grid (semi-axes may vary along the slices)."""
    return ((x - centre[0]) / semi_axes[0]) ** 2 + ((y - centre[1]) / semi_axes[1]) ** 2 <= 1.0


def _tissue_intensities(rng: np.random.Generator, grid: Grid, label: np.ndarray) -> np.ndarray:
    """Noise-free image: tissue means (body, unlabelled spine and lung, organ) with partial-volume blur."""
    x, y, z = grid.centred_coordinates()
    fov_x, fov_y = (float(v) for v in grid.fov[:2])
    means = {name: value * rng.uniform(0.9, 1.1) for name, value in TISSUE_MEANS.items()}
    z_scale = 1.0 + 0.03 * z / (grid.fov[2] / 2.0)  # the body narrows slightly towards the feet
    body_axes = (
        0.45 * fov_x * rng.uniform(0.93, 1.0) * z_scale,
        0.40 * fov_y * rng.uniform(0.93, 1.0) * z_scale,
    )
    tissue = np.full(grid.shape, means["background"])
    tissue = np.where(_ellipse_mask(x, y, (0.0, 0.0), body_axes), means["body"], tissue)
    spine = _ellipse_mask(x, y, (0.0, -0.32 * fov_y), (0.05 * fov_x, 0.05 * fov_x))
    tissue = np.where(spine, means["spine"], tissue)
    lung = _ellipse_mask(x, y, (-0.33 * fov_x, 0.02 * fov_y), (0.07 * fov_x, 0.18 * fov_y))
    tissue = np.where(lung, means["lung"], tissue)
    tissue[label == WALL] = means["wall"]
    tissue[label == CAVITY] = means["cavity"]
    return ndimage.gaussian_filter(tissue, sigma=PARTIAL_VOLUME_SIGMA_VOXELS)


def _bias_field(rng: np.random.Generator, grid: Grid) -> np.ndarray:
    """Smooth multiplicative bias field: exp of a random low-order polynomial in normalised coordinates."""
    x, y, z = (c / (f / 2.0) for c, f in zip(grid.centred_coordinates(), grid.fov, strict=True))
    linear = rng.uniform(-0.1, 0.1, size=3)
    quadratic = rng.uniform(-0.08, 0.08, size=3)
    log_field = linear[0] * x + linear[1] * y + linear[2] * z
    log_field = log_field + quadratic[0] * x**2 + quadratic[1] * y**2 + quadratic[2] * x * y
    return np.exp(log_field)


def _add_rician_noise(rng: np.random.Generator, signal: np.ndarray) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (Rician), as in magnitude MR images."""
    sigma = rng.uniform(12.0, 20.0)
    real = signal + rng.normal(0.0, sigma, size=signal.shape)
    imaginary = rng.normal(0.0, sigma, size=signal.shape)
    return np.hypot(real, imaginary)


def _to_nifti(data: np.ndarray, ras_affine: np.ndarray, orientation: tuple[str, str, str]) -> nib.Nifti1Image:
    """Wrap RAS-ordered ``data`` as a NIfTI image stored in ``orientation``, keeping the physical geometry."""
    img = nib.Nifti1Image(data, ras_affine)
    if orientation != RAS:
        img = img.as_reoriented(ornt_transform(axcodes2ornt(RAS), axcodes2ornt(orientation)))
    img.set_qform(img.affine, code="scanner")
    img.set_sform(img.affine, code="scanner")
    img.header.set_xyzt_units("mm")
    return img
