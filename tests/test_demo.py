"""Tests of the synthetic demo cohort (nnqc_pipe.data.demo)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from nnqc_pipe.data import demo
from nnqc_pipe.data.io import spacing_of

SEED = 7
INDICES = range(6)  # covers RAS, LPS and slice-axis-first storage


@pytest.fixture(scope="module")
def subjects() -> dict[int, tuple[nib.Nifti1Image, nib.Nifti1Image]]:
    return {index: demo.make_subject(index, SEED) for index in INDICES}


def _canonical_label(label: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(label).dataobj)


def test_same_index_and_seed_give_identical_subjects(subjects):
    image, label = demo.make_subject(3, SEED)
    np.testing.assert_array_equal(image.get_fdata(), subjects[3][0].get_fdata())
    np.testing.assert_array_equal(np.asarray(label.dataobj), np.asarray(subjects[3][1].dataobj))
    np.testing.assert_array_equal(image.affine, subjects[3][0].affine)


def test_different_indices_and_seeds_give_different_shapes(subjects):
    labels = [_canonical_label(label) for _, label in subjects.values()]
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            assert a.shape != b.shape or not np.array_equal(a, b)
    other_seed = _canonical_label(demo.make_subject(3, SEED + 1)[1])
    mine = _canonical_label(subjects[3][1])
    assert other_seed.shape != mine.shape or not np.array_equal(other_seed, mine)


def test_image_and_label_types_grid_and_content(subjects):
    for image, label in subjects.values():
        assert image.shape == label.shape
        np.testing.assert_array_equal(image.affine, label.affine)
        assert image.get_data_dtype() == np.float32
        assert label.get_data_dtype() == np.uint8
        data = image.get_fdata()
        assert np.all(np.isfinite(data))
        assert data.std() > 0
        assert np.linalg.norm(image.affine[:3, 3]) > 1.0  # non-zero origin


def test_labels_are_wall_enclosing_cavity(subjects):
    in_plane_cross = ndimage.generate_binary_structure(2, 1)[:, :, None]
    for _, label in subjects.values():
        data = _canonical_label(label)
        assert set(np.unique(data).tolist()) == {0, demo.WALL, demo.CAVITY}
        # In every slice the cavity touches only the wall or itself, never the background.
        cavity_neighbourhood = ndimage.binary_dilation(data == demo.CAVITY, structure=in_plane_cross)
        assert not np.any(cavity_neighbourhood & (data == 0))
    assert demo.LABEL_NAMES == {1: "wall", 2: "cavity"}


def test_organ_covers_a_strict_contiguous_subrange_of_slices(subjects):
    for _, label in subjects.values():
        data = _canonical_label(label)
        occupied = np.flatnonzero(data.any(axis=(0, 1)))
        assert occupied.min() >= demo.MIN_EMPTY_SLICES
        assert occupied.max() <= data.shape[2] - 1 - demo.MIN_EMPTY_SLICES
        np.testing.assert_array_equal(occupied, np.arange(occupied.min(), occupied.max() + 1))


def test_spacing_is_anisotropic_with_the_slice_axis_coarsest(subjects):
    for _, label in subjects.values():
        canonical = nib.as_closest_canonical(label)
        sx, sy, sz = spacing_of(canonical)
        assert sx == pytest.approx(sy)
        assert 1.0 <= sx <= 1.5
        assert 2.5 <= sz <= 3.5
        assert sz > 2 * max(sx, sy)
        nx, ny, nz = canonical.shape
        assert 48 <= min(nx, ny) <= max(nx, ny) <= 64
        assert 12 <= nz <= 20


def test_some_subjects_are_stored_non_ras_with_consistent_geometry(subjects):
    codes = {index: nib.aff2axcodes(image.affine) for index, (image, _) in subjects.items()}
    assert codes[0] == ("R", "A", "S")
    non_ras = [index for index, c in codes.items() if c != ("R", "A", "S")]
    assert non_ras == [1, 4]
    assert {codes[1], codes[4]} == set(demo.NON_RAS_ORIENTATIONS)
    for index in non_ras:
        image, label = subjects[index]
        assert tuple(image.header.get_zooms()) == pytest.approx(spacing_of(image))
        # Reoriented to RAS, the slice axis (the coarsest) is last again.
        assert np.argmax(spacing_of(nib.as_closest_canonical(image))) == 2


def test_intensities_are_mr_like(subjects):
    for image, label in subjects.values():
        data = image.get_fdata()
        mask = np.asarray(label.dataobj)
        wall, cavity, outside = (data[mask == value].mean() for value in (demo.WALL, demo.CAVITY, 0))
        assert wall > 2 * cavity
        assert wall > 2 * outside  # unlabelled voxels: air, body, spine, lung
        assert data.min() >= 0.0  # magnitude (Rician) image


def test_write_cohort_writes_images_labels_and_names(tmp_path: Path):
    names = demo.write_cohort(tmp_path / "demo", n_subjects=2, seed=SEED)
    assert names == demo.subject_names(2) == ["demo_000", "demo_001"]
    written = sorted(p.relative_to(tmp_path / "demo").as_posix() for p in (tmp_path / "demo").rglob("*"))
    assert written == [
        "imagesTr",
        "imagesTr/demo_000.nii.gz",
        "imagesTr/demo_001.nii.gz",
        "labelsTr",
        "labelsTr/demo_000.nii.gz",
        "labelsTr/demo_001.nii.gz",
    ]
    image, label = demo.make_subject(1, SEED)
    loaded_image = nib.load(tmp_path / "demo" / "imagesTr" / "demo_001.nii.gz")
    loaded_label = nib.load(tmp_path / "demo" / "labelsTr" / "demo_001.nii.gz")
    np.testing.assert_array_equal(loaded_image.get_fdata(dtype=np.float32), image.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(loaded_label.dataobj), np.asarray(label.dataobj))
    np.testing.assert_allclose(loaded_image.affine, image.affine, atol=1e-5)
    assert nib.aff2axcodes(loaded_label.affine) != ("R", "A", "S")


def test_write_cohort_rejects_an_empty_cohort(tmp_path: Path):
    with pytest.raises(ValueError, match="at least 1"):
        demo.write_cohort(tmp_path, n_subjects=0, seed=SEED)
