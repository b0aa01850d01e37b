"""Metric values on hand-made masks with hand-computed answers, and the empty-mask conventions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from nnqc_pipe.qc.metrics import (
    FOREGROUND,
    HIGHER_IS_BETTER,
    METRICS,
    compute_metrics,
    compute_slice_metrics,
    sample_disagreement,
)

ONE_CLASS = {1: "organ"}
ROW_KEYS = {"label", *METRICS, "cand_voxels", "ref_voxels", "hd95_undefined", "ravd_undefined"}


def _by_label(rows: list[dict]) -> dict[str, dict]:
    return {row["label"]: row for row in rows}


def _cube(shape: tuple[int, ...], box: tuple[slice, ...], value: int = 1) -> np.ndarray:
    volume = np.zeros(shape, dtype=np.uint8)
    volume[box] = value
    return volume


def test_metric_names_and_directions() -> None:
    assert set(HIGHER_IS_BETTER) == set(METRICS)
    assert HIGHER_IS_BETTER["dsc"] and not HIGHER_IS_BETTER["hd95_mm"]


def test_overlapping_cubes_dsc_iou_exact() -> None:
    # 4×4×4 cubes shifted by one voxel: |C∩R| = 3·4·4 = 48, |C| = |R| = 64, |C∪R| = 80.
    ref = _cube((10, 10, 10), np.s_[2:6, 2:6, 2:6])
    cand = _cube((10, 10, 10), np.s_[3:7, 2:6, 2:6])
    row = _by_label(compute_metrics(cand, ref, (1.0, 1.0, 1.0), ONE_CLASS))["organ"]
    assert set(row) == ROW_KEYS
    assert row["dsc"] == pytest.approx(96 / 128)
    assert row["iou"] == pytest.approx(48 / 80)
    assert row["ravd"] == 0.0
    assert (row["cand_voxels"], row["ref_voxels"]) == (64, 64)
    assert row["hd95_mm"] == pytest.approx(1.0)
    assert not row["hd95_undefined"]


@pytest.mark.parametrize(
    ("shift_axis", "expected_mm"), [(2, 5.0), (0, 1.0)], ids=["along-5mm-axis", "along-1mm-axis"]
)
def test_hd95_uses_anisotropic_spacing(shift_axis: int, expected_mm: float) -> None:
    box = [slice(4, 12), slice(4, 12), slice(2, 6)]
    ref = _cube((16, 16, 9), tuple(box))
    box[shift_axis] = slice(box[shift_axis].start + 1, box[shift_axis].stop + 1)
    cand = _cube((16, 16, 9), tuple(box))
    row = _by_label(compute_metrics(cand, ref, (1.0, 1.0, 5.0), ONE_CLASS))["organ"]
    assert row["hd95_mm"] == pytest.approx(expected_mm)


def test_both_empty_conventions() -> None:
    empty = np.zeros((6, 6, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI's empty-mask warnings must not leak
        row = _by_label(compute_metrics(empty, empty, (1.0, 1.0, 1.0), ONE_CLASS))["organ"]
    assert (row["dsc"], row["iou"], row["nsd"], row["ravd"]) == (1.0, 1.0, 1.0, 0.0)
    assert math.isnan(row["hd95_mm"]) and row["hd95_undefined"]
    assert not row["ravd_undefined"]


def test_empty_candidate_conventions() -> None:
    ref = _cube((6, 6, 3), np.s_[1:4, 1:4, :])
    empty = np.zeros_like(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = _by_label(compute_metrics(empty, ref, (1.0, 1.0, 1.0), ONE_CLASS))["organ"]
    assert (row["dsc"], row["iou"], row["nsd"], row["ravd"]) == (0.0, 0.0, 0.0, 1.0)
    assert math.isnan(row["hd95_mm"]) and row["hd95_undefined"]
    assert not row["ravd_undefined"]


def test_empty_reference_conventions() -> None:
    cand = _cube((6, 6, 3), np.s_[1:4, 1:4, :])
    row = _by_label(compute_metrics(cand, np.zeros_like(cand), (1.0, 1.0, 1.0), ONE_CLASS))["organ"]
    assert (row["dsc"], row["iou"], row["nsd"]) == (0.0, 0.0, 0.0)
    assert math.isnan(row["hd95_mm"]) and row["hd95_undefined"]
    assert math.isnan(row["ravd"]) and row["ravd_undefined"]


def test_per_class_and_foreground_rows() -> None:
    # Classes swapped: each class is wrong, the foreground is perfect.
    ref = _cube((8, 8, 4), np.s_[1:4, 1:7, :], 1)
    ref[4:7, 1:7, :] = 2
    cand = np.where(ref == 1, 2, np.where(ref == 2, 1, 0)).astype(np.uint8)
    rows = compute_metrics(cand, ref, (1.0, 1.0, 2.0), {2: "posterior", 1: "anterior"})
    assert [r["label"] for r in rows] == ["anterior", "posterior", FOREGROUND]
    by_label = _by_label(rows)
    assert by_label["anterior"]["dsc"] == 0.0 and by_label["posterior"]["dsc"] == 0.0
    assert by_label[FOREGROUND]["dsc"] == 1.0
    assert by_label[FOREGROUND]["hd95_mm"] == 0.0 and by_label[FOREGROUND]["nsd"] == 1.0
    assert by_label[FOREGROUND]["ref_voxels"] == int((ref > 0).sum())


def test_slice_rows_count_and_index() -> None:
    ref = _cube((8, 8, 5), np.s_[2:6, 2:6, 1:4], 1)
    ref[6:8, 2:6, 1:4] = 2
    rows = compute_slice_metrics(ref, ref, (1.0, 1.0, 3.0), {1: "a", 2: "b"}, slice_axis=2)
    assert len(rows) == 3 * 5
    assert [r["slice_index"] for r in rows if r["label"] == "b"] == [0, 1, 2, 3, 4]
    assert all(r["dsc"] == 1.0 for r in rows)
    along_first = compute_slice_metrics(ref, ref, (1.0, 1.0, 3.0), {1: "a", 2: "b"}, slice_axis=0)
    assert len(along_first) == 3 * 8


def test_slice_metrics_in_plane_spacing_and_nsd_tolerance() -> None:
    # A 4×4 square and the same square shifted one voxel along the 3 mm in-plane axis, in slice 1 only.
    # Edge distances (each direction): six at 0 mm, two at 1 mm, four at 3 mm → HD95 = 3 mm,
    # NSD(2 mm) = 8/12, NSD(3 mm) = 1.
    ref = _cube((8, 9, 3), np.s_[2:6, 2:6, 1])
    cand = _cube((8, 9, 3), np.s_[2:6, 3:7, 1])
    spacing = (1.0, 3.0, 7.0)
    rows = compute_slice_metrics(cand, ref, spacing, ONE_CLASS, slice_axis=2, tolerance_mm=2.0)
    organ = {r["slice_index"]: r for r in rows if r["label"] == "organ"}
    assert organ[1]["hd95_mm"] == pytest.approx(3.0)
    assert organ[1]["nsd"] == pytest.approx(8 / 12)
    assert organ[1]["dsc"] == pytest.approx(2 * 12 / 32)
    assert organ[0]["dsc"] == 1.0 and organ[0]["hd95_undefined"]
    wide = compute_slice_metrics(cand, ref, spacing, ONE_CLASS, slice_axis=2, tolerance_mm=3.0)
    assert {r["slice_index"]: r for r in wide if r["label"] == "organ"}[1]["nsd"] == pytest.approx(1.0)


def _random_blobs(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping ellipsoids (in mm) sprinkled with isolated false-positive voxels."""
    rng = np.random.default_rng(0)
    grid = np.indices(shape).astype(float)

    def blob(centre: tuple[float, ...], radius: float) -> np.ndarray:
        dist = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing, strict=True)))
        return (dist < radius) | (rng.random(shape) < 0.01)

    return blob((12, 10, 4), 7.0), blob((11, 9, 3.5), 8.0)


def _monai_surface(cand: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """MONAI's own HD95 and NSD(1.5 mm) for a batch of masks (N, *spatial)."""
    pred, gt = (torch.from_numpy(m[:, None]) for m in (cand, ref))
    hd95 = compute_hausdorff_distance(pred, gt, include_background=True, percentile=95, spacing=spacing)
    nsd = compute_surface_dice(pred, gt, class_thresholds=[1.5], include_background=True, spacing=spacing)
    return hd95.numpy().ravel(), nsd.numpy().ravel()


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_surface_metrics_match_monai_functions() -> None:
    """The cropped, batched path gives compute_hausdorff_distance / compute_surface_dice numbers."""
    spacing = (0.8, 1.1, 4.0)
    cand, ref = _random_blobs((24, 20, 8), spacing)
    row = _by_label(compute_metrics(cand.astype(np.uint8), ref.astype(np.uint8), spacing, ONE_CLASS, 1.5))
    hd95, nsd = _monai_surface(cand[None], ref[None], spacing)
    assert row["organ"]["hd95_mm"] == pytest.approx(hd95[0], rel=1e-5)
    assert row["organ"]["nsd"] == pytest.approx(nsd[0], rel=1e-6)

    rows = compute_slice_metrics(cand.astype(np.uint8), ref.astype(np.uint8), spacing, ONE_CLASS, 2, 1.5)
    organ = [r for r in rows if r["label"] == "organ"]
    hd95, nsd = _monai_surface(np.moveaxis(cand, 2, 0), np.moveaxis(ref, 2, 0), spacing[:2])
    assert [r["hd95_mm"] for r in organ] == pytest.approx(hd95, rel=1e-5)
    assert [r["nsd"] for r in organ] == pytest.approx(nsd, rel=1e-6)


@pytest.mark.parametrize(
    ("cand", "ref", "kwargs", "message"),
    [
        (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8), {}, "shape"),
        (np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), {}, "integer"),
        (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), {"spacing": (1.0, 1.0)}, "spacing"),
        (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), {"label_names": {1: FOREGROUND}},
         "reserved"),
    ],
)
def test_invalid_inputs_raise(cand: np.ndarray, ref: np.ndarray, kwargs: dict, message: str) -> None:
    args = {"spacing": (1.0, 1.0, 1.0), "label_names": ONE_CLASS, **kwargs}
    with pytest.raises(ValueError, match=message):
        compute_metrics(cand, ref, **args)


def test_sample_disagreement() -> None:
    a = _cube((6, 6, 2), np.s_[0:4, 0:4, :])
    b = _cube((6, 6, 2), np.s_[0:4, 0:2, :])  # half of a: DSC = 2·8/(16+8) = 2/3 per slice
    out = sample_disagreement([a, a, b], ONE_CLASS, slice_axis=2)
    # Pairs (a, a), (a, b), (a, b): mean DSC = (1 + 2/3 + 2/3) / 3.
    expected = 1 - (1 + 2 / 3 + 2 / 3) / 3
    assert out[("organ", None)] == pytest.approx(expected)
    assert out[("organ", 1)] == pytest.approx(expected)
    assert out[(FOREGROUND, 0)] == pytest.approx(expected)
    assert sample_disagreement([a, a], ONE_CLASS, slice_axis=2)[("organ", None)] == 0.0
