"""Per-subject inference (nnqc_pipe.qc.infer): a hand-placed pGT on the patch grid comes back where it belongs on a
flipped, permuted, anisotropic original grid, with file label values and the per-slice table in original order.

The sampler is replaced by a stub that returns the hand-built pGT, so no network is involved. Geometry, worked out
by hand: the image is stored as (L 0.8 mm, I 3 mm, P 1.2 mm) with shape (10, 6, 12); in RAS it is (10, 12, 6) with
the slicing axis S last. With the plan's in-plane spacing equal to the image's (step 1) and a 16×16 patch centred
on the field of view, patch rows start at RAS x = -3 and columns at RAS y = -2, so patch voxel (s, h, w) is RAS
(h - 3, w - 2, s), i.e. original voxel (9 - (h - 3), 5 - s, 11 - (w - 2)) = (12 - h, 5 - s, 13 - w).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nnqc_pipe.data import preprocess as pp
from nnqc_pipe.models.pgt import PGT
from nnqc_pipe.qc import infer as infer_module
from nnqc_pipe.qc.infer import infer_subject, save_inference

SHAPE = (10, 6, 12)
AFFINE = np.array([[-0.8, 0.0, 0.0, 10.0], [0.0, 0.0, -1.2, 8.0], [0.0, -3.0, 0.0, 4.0], [0.0, 0.0, 0.0, 1.0]])
LABEL_VALUES = [2, 5]  # file values of class indices 1 and 2
PATCH = [16, 16]
N_SLICES = SHAPE[1]
PLAN = {"slicing_axis": 2, "inplane_axes": [0, 1], "target_spacing": [0.8, 1.2], "patch_size": PATCH,
        "crop_center_fraction": [0.5, 0.5], "n_classes": 3, "label_values": LABEL_VALUES, "normalization": "zscore"}
INFERENCE = {"ddim_steps": 1, "samples": 1, "batch_size": 4}


def original_voxel(s: int, h: int, w: int) -> tuple[int, int, int]:
    """Where patch voxel (s, h, w) lies on the original grid (hand-derived, see the module docstring)."""
    return 12 - h, 5 - s, 13 - w


# (class index, patch voxel) of the hand-placed pGT; (0, 8, 8) lies outside the image (RAS x = -3) and is cropped
PLACED = [(1, (1, 4, 3)), (1, (1, 5, 3)), (2, (4, 10, 12)), (2, (0, 12, 5)), (1, (0, 0, 8))]


def _patch_pgt() -> np.ndarray:
    indices = np.zeros((N_SLICES, *PATCH), dtype=np.uint8)
    for cls, voxel in PLACED:
        indices[voxel] = cls
    return indices


def _expected_pgt() -> np.ndarray:
    """The pGT on the original grid, class indices, from :func:`original_voxel` alone."""
    expected = np.zeros(SHAPE, dtype=np.uint8)
    for cls, (s, h, w) in PLACED:
        i, j, k = original_voxel(s, h, w)
        if 0 <= i < SHAPE[0] and 0 <= k < SHAPE[2]:
            expected[i, j, k] = cls
    return expected


@pytest.fixture
def subject(tmp_path: Path) -> SimpleNamespace:
    """The preprocessed subject and an empty candidate on its grid."""
    rng = np.random.default_rng(0)
    image = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=SHAPE).astype(np.float32), AFFINE), image)
    candidate = tmp_path / "candidate.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, dtype=np.uint8), AFFINE), candidate)
    pre = pp.preprocess_subject("s1", image, None, PLAN)
    return SimpleNamespace(pre=pre, candidate=candidate, dir=tmp_path)


@pytest.fixture
def stub_sampler(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace sampling and reconstruction by the hand-placed pGT; records what the sampler was given."""
    seen: dict = {}

    def generate(models, candidate, slice_ratio, embeddings, **kwargs) -> PGT:
        seen.update(candidate=candidate, slice_ratio=slice_ratio, seed=kwargs["seed"])
        probs = np.moveaxis(pp.one_hot(_patch_pgt(), 3), 0, 1)
        return PGT(probs, np.arange(N_SLICES, dtype=np.float32) / 10)  # uncertainty of RAS slice s: s/10

    monkeypatch.setattr(infer_module, "generate_pgt", generate)
    monkeypatch.setattr(infer_module, "reconstruct",
                        lambda models, candidate, batch_size: np.moveaxis(pp.one_hot(candidate, 3), 0, 1))
    return seen


def test_patch_geometry_is_the_hand_derived_one(subject: SimpleNamespace) -> None:
    record = subject.pre.record
    assert record["orig_axcodes"] == "LIP" and record["ras_shape"] == [10, 12, 6]
    assert record["offset"] == [-3.0, -2.0] and record["step"] == pytest.approx([1.0, 1.0])
    assert pp.original_slice_order(record)[0] == 1  # the stored I axis is the slicing axis, reversed


def test_pgt_comes_back_where_it_belongs(subject: SimpleNamespace, stub_sampler: dict) -> None:
    result = infer_subject(SimpleNamespace(n_classes=3), subject.pre, subject.candidate, None, INFERENCE, seed=7)
    assert stub_sampler["candidate"].shape == (N_SLICES, *PATCH) and not stub_sampler["candidate"].any()
    assert stub_sampler["seed"] == 7
    expected = _expected_pgt()
    assert expected.sum() == 1 + 1 + 2 + 2  # four voxels placed inside the image, one cropped
    np.testing.assert_array_equal(result.pgt, expected)
    # per-slice facts in ORIGINAL slice order: original slice j is RAS slice 5 - j
    slices = result.slices
    assert slices["slice_index"].tolist() == list(range(N_SLICES))
    np.testing.assert_allclose(slices["uncertainty"], [(5 - j) / 10 for j in range(N_SLICES)])
    np.testing.assert_allclose(slices["slice_ratio"], [(5 - j) / 5 for j in range(N_SLICES)])
    assert (slices["recon_total_fg"] == 0).all()  # the empty candidate and its reconstruction


def test_vae_recon_left_out_is_not_computed(subject: SimpleNamespace, stub_sampler: dict,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """methods without vae_recon: no reconstruction, no count columns (the baseline's scores are then null)."""
    def refuse(*args, **kwargs):
        raise AssertionError("reconstruct called")

    monkeypatch.setattr(infer_module, "reconstruct", refuse)
    result = infer_subject(SimpleNamespace(n_classes=3), subject.pre, subject.candidate, None,
                           {**INFERENCE, "vae_recon": False}, seed=7)
    assert list(result.slices.columns) == ["slice_index", "slice_ratio", "uncertainty"]


def test_saved_pgt_has_file_values_and_original_affine(subject: SimpleNamespace, stub_sampler: dict) -> None:
    result = infer_subject(SimpleNamespace(n_classes=3), subject.pre, subject.candidate, None, INFERENCE, seed=0)
    out = subject.dir
    save_inference(result, subject.pre.record, out / "pgt.nii.gz", out / "slices.parquet", out / "errors.nii.gz")
    img = nib.load(out / "pgt.nii.gz")
    np.testing.assert_allclose(img.affine, AFFINE)
    values = np.asarray(img.dataobj)
    assert values[original_voxel(1, 4, 3)] == 2 and values[original_voxel(4, 10, 12)] == 5
    np.testing.assert_array_equal(values, np.array([0, *LABEL_VALUES])[_expected_pgt()])
    errors = np.asarray(nib.load(out / "errors.nii.gz").dataobj)
    np.testing.assert_array_equal(errors, np.where(_expected_pgt() > 0, 2, 0))  # all "missed": empty candidate
    pd.testing.assert_frame_equal(pd.read_parquet(out / "slices.parquet"), result.slices)


def test_latent_search_counts_and_surrogate_on_the_original_grid(subject: SimpleNamespace, stub_sampler: dict
                                                                 ) -> None:
    """A surrogate equal to the candidate (a stub search: one-hot of the candidate patch) comes back on the original
    grid as the candidate, so the per-slice counts give a latent-search DSC of 1 per slice and per volume. The search
    is handed the pGT (class indices on the patch grid) as the locator of its window."""
    from nnqc_pipe.qc.baselines import LATENT_PREFIX, reconstruction_dice

    candidate = subject.dir / "gt.nii.gz"
    nib.save(nib.Nifti1Image(np.array([0, *LABEL_VALUES], np.uint8)[_expected_pgt()], AFFINE), candidate)
    seen = {}

    def probabilities(image: np.ndarray, patch: np.ndarray, locator: np.ndarray) -> np.ndarray:
        seen.update(image=image, patch=patch, locator=locator)
        return np.moveaxis(pp.one_hot(patch, 3), 0, 1)

    latent = SimpleNamespace(n_classes=3, probabilities=probabilities)
    result = infer_subject(SimpleNamespace(n_classes=3), subject.pre, candidate, None, INFERENCE, seed=0,
                           latent=latent)
    assert seen["image"] is subject.pre.image and seen["patch"].shape == (N_SLICES, *PATCH)
    np.testing.assert_array_equal(result.surrogate, _expected_pgt())
    np.testing.assert_array_equal(pp.invert_probabilities(np.moveaxis(pp.one_hot(seen["locator"], 3), 0, 1),
                                                          subject.pre.record), _expected_pgt())
    slices = result.slices
    assert {"latent_overlap_fg", "latent_total_fg", "latent_overlap_2"} <= set(slices.columns)
    np.testing.assert_array_equal(slices["latent_total_fg"], 2 * slices["latent_overlap_fg"])
    scores = reconstruction_dice(slices, {2: "a", 5: "b"}, LABEL_VALUES, LATENT_PREFIX)
    assert scores[("foreground", None)] == 1.0 and scores[("b", None)] == 1.0
    out = subject.dir
    save_inference(result, subject.pre.record, out / "pgt.nii.gz", out / "slices.parquet", None,
                   surrogate_path=out / "surrogate.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(out / "surrogate.nii.gz").dataobj),
                                  np.asarray(nib.load(candidate).dataobj))
