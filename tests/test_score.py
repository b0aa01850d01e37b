"""Scoring one candidate (nnqc_pipe.qc.score.score_subject) on hand-built volumes with hand-computed answers.

The volumes are stored with a permuted, anisotropic affine: array axis 0 is S (5 mm, the slicing axis), axis 1 is L
(1 mm), axis 2 is A (2 mm). ``wall`` (value 1) and ``cavity`` (value 2) are 4×4×4 boxes far apart.

Shifting a 4×4×4 box by one voxel along an axis of spacing ``s``: |C∩R| = 48, so DSC = 96/128 = 0.75. Each box
has 56 edge voxels; per direction 36 distances are 0 (shared side faces), the 16 voxels of the leading face are
``s`` away and the 4 inner voxels of the trailing face are min(s, in-plane neighbour spacing) away. With the
shift along the 5 mm axis that is 16 × 5 mm and 4 × 1 mm: HD95 = 5 mm, NSD at 2 mm = 2·40/112 = 5/7; along the
1 mm axis 20 × 1 mm: HD95 = 1 mm, NSD = 1.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nnqc_pipe.qc import columns
from nnqc_pipe.qc import score as score_module
from nnqc_pipe.qc.score import score_subject
from nnqc_pipe.report import tables

SHAPE = (10, 14, 14)
# array axis 0 -> S at 5 mm, axis 1 -> L (x flipped) at 1 mm, axis 2 -> A at 2 mm
AFFINE = np.array([[0.0, -1.0, 0.0, 20.0], [0.0, 0.0, 2.0, -10.0], [5.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0]])
LABEL_NAMES = {1: "wall", 2: "cavity"}
TOLERANCE_MM = 2.0
WALL = np.s_[2:6, 1:5, 1:5]
CAVITY = np.s_[2:6, 8:12, 8:12]


def _mask(wall: tuple[slice, ...] | None = WALL, cavity: tuple[slice, ...] | None = CAVITY) -> np.ndarray:
    volume = np.zeros(SHAPE, dtype=np.uint8)
    if wall is not None:
        volume[wall] = 1
    if cavity is not None:
        volume[cavity] = 2
    return volume


def _shifted(box: tuple[slice, ...], axis: int) -> tuple[slice, ...]:
    return tuple(slice(s.start + 1, s.stop + 1) if i == axis else s for i, s in enumerate(box))


def _save(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return path


def _score(tmp_path: Path, candidate: np.ndarray, pgt: np.ndarray, gt: np.ndarray | None) -> pd.DataFrame:
    """score_subject on the three masks; the per-slice table carries ratio i/10 and uncertainty i/100."""
    n = SHAPE[0]
    slices = pd.DataFrame({"slice_index": np.arange(n), "slice_ratio": np.arange(n) / 10.0,
                           "uncertainty": np.arange(n) / 100.0})
    record = {"label_values": [1, 2], "orig_affine": AFFINE.tolist(), "orig_shape": list(SHAPE), "slicing_axis": 2}
    gt_path = _save(tmp_path / "gt.nii.gz", gt) if gt is not None else None
    return score_subject("c", "src", "s1", _save(tmp_path / "cand.nii.gz", candidate),
                         _save(tmp_path / "pgt.nii.gz", pgt), gt_path, slices, record, LABEL_NAMES, TOLERANCE_MM)


def _volume(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["level"] == "volume"].set_index("label")


def _slices(table: pd.DataFrame, label: str) -> pd.DataFrame:
    return table[(table["level"] == "slice") & (table["label"] == label)].set_index("slice_index")


def shifted_pgt_case(tmp_path: Path) -> pd.DataFrame:
    """Candidate = GT; pGT = GT with the wall shifted along the 5 mm axis and the cavity along the 1 mm axis."""
    gt = _mask()
    pgt = _mask(_shifted(WALL, 0), _shifted(CAVITY, 1))
    return _score(tmp_path, gt, pgt, gt)


def check_shifted_pgt_scores(table: pd.DataFrame) -> None:
    """The hand-computed answers of :func:`shifted_pgt_case` (predicted: against the pGT; real: against the GT)."""
    volume = _volume(table)
    expected = {  # label: (dsc, hd95_mm, nsd)
        "wall": (0.75, 5.0, 5 / 7),
        "cavity": (0.75, 1.0, 1.0),
        # both boxes pooled: 2·96/256; 112 distances per direction, 16 of them 5 mm; within 2 mm: 96 of 112
        "foreground": (0.75, 5.0, 6 / 7),
    }
    for label, (dsc, hd95, nsd) in expected.items():
        row = volume.loc[label]
        assert row["predicted_dsc"] == pytest.approx(dsc), label
        assert row["predicted_hd95_mm"] == pytest.approx(hd95), label
        assert row["predicted_nsd"] == pytest.approx(nsd), label
        assert row["predicted_iou"] == pytest.approx(0.6), label
        assert row["real_dsc"] == 1.0 and row["real_hd95_mm"] == 0.0 and row["real_nsd"] == 1.0, label
        assert (row["cand_voxels"], row["pgt_voxels"], row["gt_voxels"]) == (
            (128, 128, 128) if label == "foreground" else (64, 64, 64))
    # slices along array axis 0 (the S axis): the wall moved to slices 3..6, the cavity moved in-plane on 2..5
    wall, cavity = _slices(table, "wall"), _slices(table, "cavity")
    assert list(wall.index) == list(range(SHAPE[0]))
    assert wall["predicted_dsc"].tolist() == [1, 1, 0, 1, 1, 1, 0, 1, 1, 1]
    assert cavity["predicted_dsc"].tolist() == pytest.approx([1, 1, 0.75, 0.75, 0.75, 0.75, 1, 1, 1, 1])
    assert cavity.loc[3, "predicted_hd95_mm"] == pytest.approx(1.0)  # in-plane spacing of the slice: 1 mm × 2 mm
    assert (wall["real_dsc"] == 1.0).all()
    assert wall.loc[4, "slice_ratio"] == pytest.approx(0.4)
    assert _slices(table, "foreground").loc[7, "uncertainty"] == pytest.approx(0.07)  # the pGT samples' disagreement
    assert volume.loc["foreground", "uncertainty"] == pytest.approx(np.arange(10).mean() / 100)


def test_shifted_pgt_scores_by_hand(tmp_path: Path) -> None:
    check_shifted_pgt_scores(shifted_pgt_case(tmp_path))


def test_candidate_equal_to_pgt_scores_one(tmp_path: Path) -> None:
    gt = _mask()
    candidate = _mask(_shifted(WALL, 2))  # wrong by one 2 mm voxel against the GT, but identical to the pGT
    table = _score(tmp_path, candidate, candidate, gt)
    assert (table["predicted_dsc"] == 1.0).all() and (table["predicted_nsd"] == 1.0).all()
    volume = _volume(table)
    assert (volume["predicted_hd95_mm"] == 0.0).all() and (volume["predicted_ravd"] == 0.0).all()
    assert volume.loc["wall", "real_dsc"] == pytest.approx(0.75)
    assert volume.loc["wall", "real_hd95_mm"] == pytest.approx(2.0)
    assert volume.loc["cavity", "real_dsc"] == 1.0


def test_eroded_candidate_and_swapped_classes(tmp_path: Path) -> None:
    """An eroded wall (inner 2×2×2 of the 4×4×4 box): DSC 2·8/72, RAVD 56/64; swapping the two classes keeps the
    foreground perfect and zeroes both class scores."""
    gt = _mask()
    eroded = _mask(np.s_[3:5, 2:4, 2:4])
    volume = _volume(_score(tmp_path, eroded, gt, None))
    assert volume.loc["wall", "predicted_dsc"] == pytest.approx(16 / 72)
    assert volume.loc["wall", "predicted_ravd"] == pytest.approx(56 / 64)
    assert volume.loc["cavity", "predicted_dsc"] == 1.0
    assert volume.loc["foreground", "predicted_dsc"] == pytest.approx(2 * 72 / 200)
    assert volume["real_dsc"].isna().all() and volume["gt_voxels"].isna().all()  # no GT given

    swapped = np.where(gt == 1, 2, np.where(gt == 2, 1, 0)).astype(np.uint8)
    volume = _volume(_score(tmp_path, swapped, gt, gt))
    assert volume.loc["wall", "predicted_dsc"] == 0.0 and volume.loc["cavity", "predicted_dsc"] == 0.0
    assert volume.loc["foreground", "predicted_dsc"] == 1.0 and volume.loc["foreground", "real_dsc"] == 1.0


def _constant_dsc(rows: list[dict]) -> list[dict]:
    return [{**row, "dsc": 0.5} for row in rows]


def _shuffled_dsc(rows: list[dict]) -> list[dict]:
    values = np.random.default_rng(0).permutation([row["dsc"] for row in rows])
    return [{**row, "dsc": float(v)} for row, v in zip(rows, values, strict=True)]


@pytest.mark.parametrize("mutate", [_constant_dsc, _shuffled_dsc], ids=["constant", "shuffled"])
def test_hand_computed_check_catches_a_wrong_predicted_dsc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          mutate) -> None:
    """Mutation check: with the metric rows' DSC replaced by a constant or shuffled, the check above fails."""
    real_rows = score_module.all_metric_rows
    monkeypatch.setattr(score_module, "all_metric_rows", lambda *args: mutate(real_rows(*args)))
    table = shifted_pgt_case(tmp_path)
    with pytest.raises(AssertionError):
        check_shifted_pgt_scores(table)


# ---------------------------------------------------------------------------------------------------
# The table builders refuse a column they should have computed instead of filling it with nulls
# ---------------------------------------------------------------------------------------------------


def test_a_computed_column_left_out_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = shifted_pgt_case(tmp_path)
    with pytest.raises(ValueError, match=r"scores table: column\(s\) \['uncertainty'\] were not computed"):
        columns.typed(table.drop(columns="uncertainty"), columns.scores_schema())
    real_verdicts = tables.assign_verdicts
    monkeypatch.setattr(tables, "assign_verdicts", lambda *a, **k: real_verdicts(*a, **k).drop(columns="risk"))
    with pytest.raises(ValueError, match=r"subjects table: column\(s\) \['risk'\] were not computed"):
        tables.build_subjects(table, qc_pass_dsc=0.8)


def test_columns_without_ground_truth_may_stay_null(tmp_path: Path) -> None:
    """No GT, no OOD input: the real_* columns, gt_voxels and the OOD flag are null (False) as documented."""
    subjects = tables.build_subjects(_score(tmp_path, _mask(), _mask(), None), qc_pass_dsc=0.8)
    assert subjects["real_dsc"].isna().all() and subjects["gt_voxels"].isna().all()
    assert not subjects["flag_out_of_distribution"].any() and (subjects["predicted_dsc"] == 1.0).all()
    assert all(columns.is_nullable(c) for c in ("real_dsc", "gt_voxels", "ood_reason"))
    assert not any(columns.is_nullable(c) for c in ("predicted_dsc", "risk", "verdict", "uncertainty"))
