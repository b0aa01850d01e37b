"""Tests of nnqc_pipe.degrade: DSC conventions, elementary corruptions, binned volumes, slice sampler."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from nnqc_pipe import degrade as D
from nnqc_pipe.dice import class_dice, dice

N_CLASSES = 3


def phantom(shape: tuple[int, ...] = (64, 64, 20), spacing: tuple[float, ...] = (1.0, 1.0, 3.0)) -> np.ndarray:
    """An ellipsoid (class 1) with a nested core (class 2), centred, semi-axes ~70 % of the half-extent (mm)."""
    grids = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    semi_axes = [0.7 * (n / 2) * s for n, s in zip(shape, spacing, strict=True)]
    r2 = sum((g * s / a) ** 2 for g, s, a in zip(grids, spacing, semi_axes, strict=True))
    label = np.zeros(shape, dtype=np.uint8)
    label[r2 <= 1.0] = 1
    label[r2 <= 0.3] = 2
    return label


@pytest.fixture
def volume() -> np.ndarray:
    return phantom()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --- DSC -------------------------------------------------------------------------------------------


def test_dice_conventions():
    empty = np.zeros((4, 4), bool)
    full = np.ones((4, 4), bool)
    half = np.zeros((4, 4), bool)
    half[:2] = True
    assert dice(empty, empty) == 1.0
    assert dice(empty, full) == 0.0
    assert dice(full, empty) == 0.0
    assert dice(full, full) == 1.0
    assert dice(full, half) == pytest.approx(2 * 8 / (16 + 8))


def test_per_class_dice_covers_foreground_classes(volume):
    other = volume.copy()
    other[other == 2] = 1  # class 2 missing: its DSC 0, class 1 only gains voxels
    scores = class_dice(other, volume, N_CLASSES)
    assert len(scores) == 2
    assert scores[1] == 0.0
    assert 0.0 < scores[0] < 1.0
    assert class_dice(volume, volume, 4).tolist() == [1.0, 1.0, 1.0]  # class 3 absent in both


def test_bin_edges():
    assert D.in_bin(0.05, 1) and not D.in_bin(0.10, 1) and D.in_bin(0.10, 2)
    assert D.in_bin(0.95, 5) and not D.in_bin(0.951, 5) and not D.in_bin(0.04, 1)


# --- elementary operations -------------------------------------------------------------------------


def test_erode_whole_foreground_shrinks(volume, rng):
    out = D.erode(volume, rng, kernel_size=5, spacing=(1, 1, 3))
    assert np.count_nonzero(out) < np.count_nonzero(volume)
    assert not np.any((out > 0) & (volume == 0))
    kept = out > 0
    assert np.array_equal(out[kept], volume[kept])


def test_erode_one_class_hands_voxels_to_its_neighbour(volume, rng):
    out = D.erode(volume, rng, kernel_size=3, target=2, spacing=(1, 1, 3))
    assert np.count_nonzero(out == 2) < np.count_nonzero(volume == 2)
    assert np.array_equal(out > 0, volume > 0)  # the eroded core is absorbed by the wall, no hole
    assert np.all(out[(volume == 2) & (out != 2)] == 1)


def test_partial_erosion_is_a_subset_of_full_erosion(volume):
    partial = D.erode(volume, np.random.default_rng(0), kernel_size=5, fraction=0.3)
    full = D.erode(volume, np.random.default_rng(0), kernel_size=5, fraction=1.0)
    n_changed = np.count_nonzero(partial != volume)
    assert 0 < n_changed < np.count_nonzero(full != volume)
    assert np.all(full[partial != volume] == partial[partial != volume])


def test_dilate_whole_foreground_grows(volume, rng):
    out = D.dilate(volume, rng, kernel_size=7, spacing=(1, 1, 3))
    assert np.count_nonzero(out) > np.count_nonzero(volume)
    assert np.array_equal(out[volume > 0], volume[volume > 0])
    assert set(np.unique(out)) <= {0, 1, 2}


def test_dilate_one_class_grows_into_its_neighbour(volume, rng):
    out = D.dilate(volume, rng, kernel_size=5, target=2, spacing=(1, 1, 3))
    assert np.count_nonzero(out == 2) > np.count_nonzero(volume == 2)
    assert np.array_equal(out > 0, volume > 0)


def test_kernels_respect_anisotropic_spacing(rng):
    point = np.zeros((15, 15, 9), dtype=np.uint8)
    point[7, 7, 4] = 1
    thick = D.dilate(point, rng, kernel_size=5, spacing=(1.0, 1.0, 5.0))
    iso = D.dilate(point, rng, kernel_size=5, spacing=(1.0, 1.0, 1.0))
    assert np.flatnonzero(thick.any(axis=(0, 1))).tolist() == [4]  # not dilated across 5 mm slices
    assert np.flatnonzero(iso.any(axis=(0, 1))).tolist() == [2, 3, 4, 5, 6]
    assert np.count_nonzero(thick) > 1


def test_cut_holes_remove_blob_shaped_regions(volume, rng):
    out = D.cut_holes(volume, rng, fraction=0.3, spacing=(1, 1, 3))
    removed = (volume > 0) & (out == 0)
    assert np.count_nonzero(removed) == pytest.approx(0.3 * np.count_nonzero(volume), abs=1)
    assert not np.any((out > 0) & (volume == 0))
    assert np.array_equal(out[out > 0], volume[out > 0])
    _, n_blobs = ndi.label(removed)
    assert n_blobs < np.count_nonzero(removed) / 20  # a few coherent regions, not salt-and-pepper


@pytest.mark.parametrize("near", [True, False])
def test_false_positive_blobs_only_add_in_background(volume, rng, near):
    out = D.add_false_positive_blobs(volume, rng, n_classes=N_CLASSES, volume_ratio=0.3, near=near,
                                     spacing=(1, 1, 3))
    assert np.array_equal(out[volume > 0], volume[volume > 0])
    added = (out > 0) & (volume == 0)
    assert np.count_nonzero(added) == round(0.3 * np.count_nonzero(volume))
    assert set(np.unique(out[added])) <= {1, 2}


def test_near_blobs_are_closer_than_away_blobs(volume):
    wide = np.pad(volume, ((60, 60), (60, 60), (0, 0)))  # room for blobs away from the structure
    distance = ndi.distance_transform_edt(wide == 0, sampling=(1, 1, 3))
    mean_distance = {}
    for near in (True, False):
        out = D.add_false_positive_blobs(wide, np.random.default_rng(5), n_classes=N_CLASSES,
                                         volume_ratio=0.2, near=near, spacing=(1, 1, 3))
        mean_distance[near] = distance[(out > 0) & (wide == 0)].mean()
    assert mean_distance[True] < mean_distance[False]


def test_blobs_on_an_empty_mask(rng):
    out = D.add_false_positive_blobs(np.zeros((32, 32), np.uint8), rng, n_classes=N_CLASSES, volume_ratio=1.0)
    assert np.count_nonzero(out) > 0


def test_drop_slices_empties_whole_slices(volume, rng):
    out = D.drop_slices(volume, rng, n_slices=3, slice_axis=2)
    occupied_before = volume.any(axis=(0, 1))
    occupied_after = out.any(axis=(0, 1))
    dropped = occupied_before & ~occupied_after
    assert np.count_nonzero(dropped) == 3
    assert np.array_equal(out[:, :, ~dropped], volume[:, :, ~dropped])


def test_drop_slices_along_another_axis(volume, rng):
    out = D.drop_slices(volume, rng, n_slices=1, slice_axis=0, contiguous=True)
    dropped = volume.any(axis=(1, 2)) & ~out.any(axis=(1, 2))
    assert np.count_nonzero(dropped) == 1


@pytest.mark.parametrize("merge", [False, True])
def test_remove_structure(volume, rng, merge):
    out = D.remove_structure(volume, rng, target=2, merge=merge)
    assert not np.any(out == 2)
    assert np.all(out[volume == 2] == (1 if merge else 0))
    assert np.array_equal(out[volume != 2], volume[volume != 2])


def test_operations_return_new_arrays_on_2d_slices(volume, rng):
    sl = volume[:, :, 10].copy()
    before = sl.copy()
    ops = [
        lambda: D.erode(sl, rng),
        lambda: D.dilate(sl, rng),
        lambda: D.cut_holes(sl, rng),
        lambda: D.add_false_positive_blobs(sl, rng, n_classes=N_CLASSES),
        lambda: D.drop_slices(sl, rng, slice_axis=0),
        lambda: D.remove_structure(sl, rng),
    ]
    for op in ops:
        out = op()
        assert out is not sl and out.shape == sl.shape and out.dtype == sl.dtype
        assert not np.array_equal(out, sl)
    assert np.array_equal(sl, before)


# --- binned volumes --------------------------------------------------------------------------------


def test_dsc_curve_matches_rendered_masks(volume):
    rng = np.random.default_rng(7)
    spacing = np.array([1.0, 1.0, 3.0])
    for _ in range(5):
        steps = D._draw_steps(volume, N_CLASSES, spacing, rng, slice_axis=2)
        severities, dsc = D._dsc_curve(volume, steps)
        assert dsc[0] == 1.0 and dsc.min() < 0.05  # from unchanged to destroyed
        for k in rng.integers(0, severities.size, 8):
            rendered = D._render(volume, steps, severities[k])
            assert dice(rendered > 0, volume > 0) == pytest.approx(dsc[k], abs=1e-12)


@pytest.mark.parametrize("level", sorted(D.LEVEL_BINS))
def test_degrade_volume_lands_in_bin(volume, level):
    for seed in range(3):
        out, dsc, per_class = D.degrade_volume(volume, (1.0, 1.0, 3.0), N_CLASSES, level,
                                               np.random.default_rng(seed))
        assert D.in_bin(dsc, level), (level, seed, dsc)
        assert dsc == dice(out > 0, volume > 0)
        assert set(per_class) == {1, 2}
        assert out.shape == volume.shape and out.dtype == volume.dtype
        assert set(np.unique(out)) <= {0, 1, 2}


def test_degrade_volume_with_first_slice_axis():
    label = np.ascontiguousarray(phantom(shape=(12, 48, 40), spacing=(4.0, 1.0, 1.0)))
    for level in D.LEVEL_BINS:
        _, dsc, _ = D.degrade_volume(label, (4.0, 1.0, 1.0), N_CLASSES, level, np.random.default_rng(level),
                                     slice_axis=0)
        assert D.in_bin(dsc, level)


def test_degrade_volume_warns_instead_of_raising(caplog):
    empty = np.zeros((16, 16, 4), np.uint8)
    with caplog.at_level(logging.WARNING, logger="nnqc_pipe.degrade"):
        out, dsc, _ = D.degrade_volume(empty, (1.0, 1.0, 1.0), N_CLASSES, 3, np.random.default_rng(0), max_tries=3)
    assert out.shape == empty.shape and dsc in (0.0, 1.0)
    assert "no recipe reached" in caplog.text


def test_degrade_subject_is_deterministic(volume):
    spacing = (1.0, 1.0, 3.0)
    first = D.degrade_subject(volume, spacing, N_CLASSES, seed=3, subject="case_001")
    again = D.degrade_subject(volume, spacing, N_CLASSES, seed=3, subject="case_001")
    other = D.degrade_subject(volume, spacing, N_CLASSES, seed=3, subject="case_002")
    reseeded = D.degrade_subject(volume, spacing, N_CLASSES, seed=4, subject="case_001")
    assert [r["level"] for r in first] == [1, 2, 3, 4, 5]
    assert all(r["in_bin"] for r in first)
    for a, b, c, d in zip(first, again, other, reseeded, strict=True):
        assert set(a) == {"level", "mask", "dsc_foreground", "dsc_per_class", "in_bin"}
        assert np.array_equal(a["mask"], b["mask"]) and a["dsc_foreground"] == b["dsc_foreground"]
        assert not np.array_equal(a["mask"], c["mask"])
        assert not np.array_equal(a["mask"], d["mask"])


# --- training sampler ------------------------------------------------------------------------------


@pytest.fixture
def slice2d() -> np.ndarray:
    return phantom(shape=(64, 64), spacing=(1.0, 1.0))


def test_corrupt_slice_severity_zero_keeps_the_mask(slice2d, rng):
    for _ in range(10):
        out = D.corrupt_slice(slice2d, N_CLASSES, 0.0, rng)
        assert dice(out > 0, slice2d > 0) >= 0.95


def test_corrupt_slice_quality_falls_with_severity(slice2d, rng):
    def mean_dsc(severity: float) -> float:
        return float(np.mean([dice(D.corrupt_slice(slice2d, N_CLASSES, severity, rng) > 0, slice2d > 0)
                              for _ in range(40)]))

    low, mid, high = mean_dsc(0.1), mean_dsc(0.5), mean_dsc(0.95)
    assert low > 0.8 and low > mid > high and high < 0.2


def test_corrupt_slice_can_return_empty_masks(slice2d, rng):
    outs = [D.corrupt_slice(slice2d, N_CLASSES, 1.0, rng) for _ in range(40)]
    assert any(not o.any() for o in outs)


def test_corrupt_slice_on_an_empty_slice(rng):
    empty = np.zeros((64, 64), np.uint8)
    outs = [D.corrupt_slice(empty, N_CLASSES, s, rng) for s in np.linspace(0, 1, 30)]
    assert all(o.shape == empty.shape and o.dtype == empty.dtype for o in outs)
    assert not outs[0].any()
    assert any(o.any() for o in outs)  # false-positive blobs can appear


def test_corrupt_slice_outputs_are_valid(slice2d, rng):
    label = slice2d.astype(np.int64)
    for _ in range(100):
        out = D.corrupt_slice(label, N_CLASSES, D.sample_severity(rng), rng)
        assert out.shape == label.shape and out.dtype == label.dtype
        assert out.min() >= 0 and out.max() < N_CLASSES


def test_sample_severity_spans_the_range(rng):
    values = np.array([D.sample_severity(rng) for _ in range(2000)])
    assert values.min() == 0.0 and values.max() <= 1.0
    assert 0.05 < np.mean(values == 0.0) < 0.2
    assert np.mean(values >= 0.9) > 0.1
    assert np.histogram(values, bins=10, range=(0, 1))[0].min() > 50


def test_sample_severity_mix_shares(rng):
    values = np.array([D.sample_severity(rng, clean=0.3, light=0.4, destroyed=0.0, light_max=0.1)
                       for _ in range(4000)])
    assert 0.27 < np.mean(values == 0.0) < 0.33
    assert 0.65 < np.mean(values <= 0.1) < 0.8  # clean + light + the uniform rest's share below 0.1
    with pytest.raises(ValueError, match="sum to <= 1"):
        D.sample_severity(rng, clean=0.6, light=0.5)


# --- real data -------------------------------------------------------------------------------------


def shared_data() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("NNQC_SHARED_DATA", default))


@pytest.mark.realdata
def test_hippocampus_subjects_land_in_their_bins():
    labels = sorted((shared_data() / "hippocampus" / "labelsTr").glob("*.nii.gz"))
    if not labels:
        pytest.skip(f"no hippocampus labels under {shared_data()}")
    for path in labels[:4]:
        img = nib.as_closest_canonical(nib.load(path))
        label = np.asarray(img.dataobj).astype(np.uint8)  # values 0, 1, 2 are already class indices
        spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
        records = D.degrade_subject(label, spacing, N_CLASSES, seed=0, subject=path.name)
        assert [r["in_bin"] for r in records] == [True] * 5, [(r["level"], r["dsc_foreground"]) for r in records]
