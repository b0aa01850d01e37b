"""Invertible preprocessing (nnqc_pipe.data.preprocess): phantoms in non-RAS storage and the real cohorts."""

from __future__ import annotations

import glob

import nibabel as nib
import numpy as np
import pytest
from conftest import plan_defaults as _defaults
from conftest import shared_cohort

from nnqc_pipe.config import label_map, load_config
from nnqc_pipe.data import preprocess as pp
from nnqc_pipe.data.fingerprint import compute_fingerprint
from nnqc_pipe.data.inspect import inspect_subject
from nnqc_pipe.data.io import InputError
from nnqc_pipe.data.plan import make_plan
from nnqc_pipe.dice import class_dice
from nnqc_pipe.models.presets import plan_overrides


def _cohort_plan(pairs, label_names, **plan_overrides):
    recs = [inspect_subject(s, i, lbl, list(label_names)) for s, i, lbl in pairs]
    return recs, make_plan(compute_fingerprint(recs, "MR", label_names), _defaults(**plan_overrides))


def _roundtrip_worst_dice(recs, plan) -> float:
    worst = 1.0
    for rec in recs:
        pre = pp.preprocess_subject(rec["subject"], rec["image"], rec["label"], plan)
        back = pp.invert_labels(pre.label, pre.record)
        original = nib.load(rec["label"])
        assert back.shape == original.shape
        out = pp.to_nifti(back, pre.record)
        np.testing.assert_allclose(out.affine, original.affine)
        gt = pp.values_to_indices(np.asarray(original.dataobj), plan["label_values"])
        worst = min(worst, *class_dice(back, gt, plan["n_classes"]))
    return worst


@pytest.fixture(scope="module")
def phantoms(phantom_dir):
    pairs = [(f"demo_{i:03d}", phantom_dir / f"imagesTr/demo_{i:03d}.nii.gz",
              phantom_dir / f"labelsTr/demo_{i:03d}.nii.gz") for i in range(6)]
    return _cohort_plan(pairs, {1: "wall", 2: "cavity"})


def test_orientation_roundtrip_is_exact(phantom_dir):
    img = nib.load(phantom_dir / "imagesTr/demo_004.nii.gz")  # stored S, L, P
    data = np.asarray(img.dataobj)
    ras = pp.to_ras(data, img.affine)
    np.testing.assert_array_equal(ras, np.asarray(nib.as_closest_canonical(img).dataobj))
    np.testing.assert_array_equal(pp.from_ras(ras, img.affine), data)
    assert pp.ras_spacing(img.affine) == pytest.approx(list(nib.as_closest_canonical(img).header.get_zooms()))


def test_phantom_shapes_and_contract(phantoms):
    recs, plan = phantoms
    pre = pp.preprocess_subject(recs[4]["subject"], recs[4]["image"], recs[4]["label"], plan)
    s = pre.record["ras_shape"][plan["slicing_axis"]]
    assert pre.image.shape == (s, *plan["patch_size"]) and pre.image.dtype == np.float32
    assert pre.label.shape == pre.image.shape and pre.label.dtype == np.uint8
    assert pre.slice_ratio[0] == 0 and pre.slice_ratio[-1] == 1 and len(pre.slice_ratio) == s
    assert abs(float(pre.image.mean())) < 1.0  # z-scored
    assert set(np.unique(pre.label)) == {0, 1, 2}
    assert pre.record["fg_inside_fraction"] == 1.0


def test_phantom_roundtrip_non_ras_exact_spacing(phantoms):
    recs, _ = phantoms
    fp = compute_fingerprint(recs, "MR", {1: "wall", 2: "cavity"})
    # a subject's own spacing -> pure crop/pad, exact for every orientation
    for rec in recs:
        plan = make_plan({**fp, "spacing_min": rec["ras_spacing"]}, _defaults())
        assert _roundtrip_worst_dice([rec], plan) == 1.0


def test_phantom_roundtrip_with_resampling(phantoms):
    recs, plan = phantoms
    assert _roundtrip_worst_dice(recs, plan) >= 0.99


def test_save_load_and_candidate_forward(phantoms, tmp_path):
    recs, plan = phantoms
    rec = recs[1]
    pre = pp.preprocess_subject(rec["subject"], rec["image"], rec["label"], plan)
    pp.save_preprocessed(pre, tmp_path / "p.npz")
    back = pp.load_preprocessed(tmp_path / "p.npz")
    np.testing.assert_array_equal(back.label, pre.label)
    assert back.record == pre.record
    values = pp.load_candidate(rec["label"], back.record)
    np.testing.assert_array_equal(pp.to_patch_space(values, back.record), pre.label)


def test_probability_inversion_puts_background_outside_window(phantoms):
    recs, plan = phantoms
    pre = pp.preprocess_subject(recs[0]["subject"], recs[0]["image"], None, plan)
    probs = np.zeros((pre.image.shape[0], plan["n_classes"], *plan["patch_size"]), np.float32)
    probs[:, 1] = 1.0  # the whole patch says "wall"
    back = pp.invert_probabilities(probs, pre.record)
    assert back.shape == tuple(pre.record["orig_shape"])
    assert set(np.unique(back)) <= {0, 1}


def test_candidate_on_wrong_grid_is_rejected(phantoms, tmp_path):
    recs, plan = phantoms
    pre = pp.preprocess_subject(recs[0]["subject"], recs[0]["image"], None, plan)
    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), np.eye(4)), wrong)
    with pytest.raises(InputError, match="demo_000"):
        pp.load_candidate(wrong, pre.record)


@pytest.mark.realdata
@pytest.mark.parametrize("cohort", ["hippocampus", "acdc"])
def test_real_cohort_roundtrip(cohort):
    root = shared_cohort(cohort)
    config = load_config(f"config/cohorts/{cohort}.yaml")
    pairs = [(p.split("/")[-1][: -len(".nii.gz")], p, p.replace("imagesTr", "labelsTr"))
             for p in sorted(glob.glob(str(root / "imagesTr/*.nii.gz")))]
    recs = [inspect_subject(s, i, lbl, list(label_map(config))) for s, i, lbl in pairs]
    plan = make_plan(compute_fingerprint(recs, "MR", label_map(config)), plan_overrides(config))
    assert _roundtrip_worst_dice(recs, plan) >= 0.99
