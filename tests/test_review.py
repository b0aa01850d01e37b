"""The report's mask-based outputs: error regions of REVIEW/FAIL candidates and the selected mask per subject."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd

from nnqc_pipe.report.review import error_region_table, write_selected_masks

SPACING = (0.5, 0.5, 3.0)


def _save(path, mask):
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.diag([*SPACING, 1.0])), path)


def _setup(tmp_path):
    pgt = np.zeros((8, 8, 5), np.uint8)
    pgt[2:6, 2:6, 1:4] = 1
    cand = pgt.copy()
    cand[2:6, 2:6, 3] = 0  # missed: the last slice of the structure (16 voxels)
    cand[0, 0, 0] = 1  # extra: one voxel far away
    (tmp_path / "pgt" / "unet").mkdir(parents=True)
    _save(tmp_path / "pgt" / "unet" / "s1.nii.gz", pgt)
    _save(tmp_path / "unet_s1.nii.gz", cand)
    _save(tmp_path / "atlas_s1.nii.gz", pgt)
    candidates = {"unet": str(tmp_path / "unet_{subject}.nii.gz"), "atlas": str(tmp_path / "atlas_{subject}.nii.gz")}
    return candidates, str(tmp_path / "pgt" / "{source}" / "{subject}.nii.gz")


def test_error_regions_of_flagged_candidates_in_mm_and_original_slices(tmp_path):
    candidates, pgt = _setup(tmp_path)
    subjects = pd.DataFrame({"cohort": "c", "source": ["unet", "atlas"], "subject": "s1", "label": "foreground",
                             "verdict": ["REVIEW", "PASS"], "risk": [0.4, 0.0]})
    regions = error_region_table(subjects, candidates, pgt, slicing_axis=2)
    assert set(regions.source) == {"unet"}  # PASS rows are not reviewed
    missed = regions[regions.kind == "missed"].iloc[0]
    assert missed.n_voxels == 16 and missed.volume_mm3 == 16 * 0.75
    assert (missed.slice_first, missed.slice_last) == (3, 3)
    extra = regions[regions.kind == "extra"].iloc[0]
    assert extra.n_voxels == 1 and (extra.slice_first, extra.slice_last) == (0, 0)


def test_selected_masks_copy_the_chosen_source_or_the_pgt(tmp_path):
    candidates, pgt = _setup(tmp_path)
    selection = pd.DataFrame({"subject": ["s1"], "selected_source": ["unet"], "runner_up_source": ["atlas"]})
    out = str(tmp_path / "selected" / "{subject}.nii.gz")
    written = write_selected_masks(selection, candidates, pgt, out)
    chosen = np.asarray(nib.load(written[0]).dataobj)
    assert np.array_equal(chosen, np.asarray(nib.load(tmp_path / "unet_s1.nii.gz").dataobj))
    fallback = pd.DataFrame({"subject": ["s1"], "selected_source": ["pgt"], "runner_up_source": ["unet"]})
    written = write_selected_masks(fallback, candidates, pgt, out)
    assert np.array_equal(np.asarray(nib.load(written[0]).dataobj),
                          np.asarray(nib.load(tmp_path / "pgt/unet/s1.nii.gz").dataobj))
