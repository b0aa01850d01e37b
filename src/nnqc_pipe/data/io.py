"""Reading and writing volumes and tables safely.

Every reader validates what it loads and raises :class:`InputError` naming the subject and the file;
every writer goes through a temporary file in the destination folder and an atomic rename, so a killed
job never leaves a half-written result behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

AFFINE_TOLERANCE_MM = 1e-3


PathLike = str | os.PathLike


class InputError(ValueError):
    """A problem with one subject's input files; the message names the subject and the file."""

    def __init__(self, subject: str, path: str | os.PathLike | None, problem: str) -> None:
        self.subject = subject
        self.path = str(path) if path is not None else None
        self.problem = problem
        where = f" ({self.path})" if self.path else ""
        super().__init__(f"subject {subject!r}{where}: {problem}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on failure delete it.

    ``suffix`` defaults to the destination's full suffix (``.nii.gz``, ``.parquet``) so that writers that
    infer the format from the extension keep working.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(dest.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_nifti(img: nib.Nifti1Image, path: str | os.PathLike) -> None:
    """Save a NIfTI image atomically."""
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def write_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """Save compressed arrays atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def write_parquet(
    df: pd.DataFrame, path: str | os.PathLike, metadata: dict[str, Any] | None = None
) -> None:
    """Save a DataFrame as Parquet atomically, with ``metadata`` (JSON-encoded values) in the schema."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): json.dumps(v, default=_json_default).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Return the JSON-decoded custom metadata of a Parquet file (pandas' own key left out)."""
    raw = pq.read_schema(path).metadata or {}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode()
        if key == "pandas":
            continue
        try:
            out[key] = json.loads(v.decode())
        except json.JSONDecodeError:
            out[key] = v.decode()
    return out


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (checkpoint provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def concat_parquet(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate Parquet tables (an empty frame when there are none)."""
    frames = [pd.read_parquet(p) for p in paths]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ---------------------------------------------------------------------------------------------------
# Reading and validating volumes
# ---------------------------------------------------------------------------------------------------


def load_volume(path: str | os.PathLike, subject: str, what: str = "image") -> nib.Nifti1Image:
    """Load a 3D NIfTI volume, raising :class:`InputError` for missing, unreadable, 2D or 4D files.

    A trailing singleton dimension (``X×Y×Z×1``, written by some tools) is dropped with a warning.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(subject, p, f"{what} file does not exist")
    try:
        img = nib.load(str(p))
        shape = img.shape
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(subject, p, f"{what} file is unreadable: {exc}") from exc
    if len(shape) == 4 and shape[3] == 1:
        log.warning("subject %s: %s %s is 4D with one volume; using it as 3D", subject, what, p)
        img = nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine, img.header)
        shape = img.shape
    if len(shape) != 3:
        raise InputError(subject, p, f"{what} must be a 3D volume, got {len(shape)}D array of shape {shape}")
    if min(shape) < 1:
        raise InputError(subject, p, f"{what} has an empty dimension: shape {shape}")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise InputError(subject, p, f"{what} has an invalid affine:\n{img.affine}")
    return img


def read_image_array(img: nib.Nifti1Image, subject: str, path: str | os.PathLike) -> np.ndarray:
    """Return the image data as float32, rejecting NaN/inf or constant images."""
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:
        raise InputError(subject, path, f"image data cannot be read: {exc}") from exc
    if not np.all(np.isfinite(data)):
        n_bad = int((~np.isfinite(data)).sum())
        raise InputError(subject, path, f"image contains {n_bad} NaN/inf voxels")
    if data.size == 0 or float(data.max()) == float(data.min()):
        value = float(data.flat[0]) if data.size else "n/a"
        raise InputError(subject, path, f"image is constant (all voxels = {value})")
    return data


def read_label_array(
    img: nib.Nifti1Image, subject: str, path: str | os.PathLike, allowed: Iterable[int]
) -> np.ndarray:
    """Return integer label data (uint8), rejecting non-integer values or values outside ``allowed``.

    ``allowed`` lists the foreground values; 0 (background) is always allowed.
    """
    try:
        raw = np.asarray(img.dataobj)
    except Exception as exc:
        raise InputError(subject, path, f"label data cannot be read: {exc}") from exc
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)):
            raise InputError(subject, path, "label contains NaN/inf values")
        rounded = np.rint(raw)
        if not np.allclose(raw, rounded, atol=1e-3):
            raise InputError(subject, path, "label contains non-integer values (is this a probability map?)")
        raw = rounded
    values = np.unique(raw)
    allowed_set = {0, *(int(v) for v in allowed)}
    unexpected = sorted(int(v) for v in values if int(v) not in allowed_set)
    if unexpected:
        raise InputError(
            subject, path, f"label values {unexpected} are not in the declared set {sorted(allowed_set)}"
        )
    return raw.astype(np.uint8)


def check_same_grid(
    reference: nib.Nifti1Image,
    other: nib.Nifti1Image,
    subject: str,
    other_path: str | os.PathLike,
    what: str = "label",
) -> None:
    """Raise :class:`InputError` unless ``other`` has the shape and affine of ``reference``."""
    if tuple(reference.shape[:3]) != tuple(other.shape[:3]):
        raise InputError(
            subject, other_path, f"{what} shape {tuple(other.shape)} differs from image shape {tuple(reference.shape)}"
        )
    diff = float(np.max(np.abs(reference.affine - other.affine)))
    if diff > AFFINE_TOLERANCE_MM:
        raise InputError(
            subject,
            other_path,
            f"{what} affine differs from the image affine by up to {diff:.4g} (tolerance {AFFINE_TOLERANCE_MM})",
        )


def load_mask_on_grid(
    path: str | os.PathLike,
    reference: nib.Nifti1Image,
    subject: str,
    allowed: Iterable[int],
    what: str = "mask",
) -> np.ndarray:
    """Load a label/candidate mask, check it lies on ``reference``'s grid, and return it as uint8."""
    img = load_volume(path, subject, what)
    check_same_grid(reference, img, subject, path, what)
    return read_label_array(img, subject, path, allowed)


def spacing_of(img_or_affine: nib.Nifti1Image | np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in mm along the array axes, from the affine (not the possibly stale header zooms)."""
    affine = np.asarray(getattr(img_or_affine, "affine", img_or_affine), dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
