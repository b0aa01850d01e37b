"""What the report writes from the masks themselves: error regions of the candidates to review, and the selected
mask per subject.

Both read files on the subjects' original grids (candidates, pGTs), never the patch space, so volumes are in mm³
and slice ranges index the image a reviewer opens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from nnqc_pipe.chunks import fill
from nnqc_pipe.data.io import spacing_of, write_nifti
from nnqc_pipe.data.preprocess import original_slice_axis
from nnqc_pipe.qc.decisions import PGT_SOURCE, error_regions
from nnqc_pipe.qc.metrics import FOREGROUND, error_map

log = logging.getLogger(__name__)

REGION_COLUMNS = ["cohort", "source", "subject", "verdict", "risk", "opinion", "kind", "component", "volume_mm3",
                  "n_voxels", "slice_first", "slice_last", "centroid_vox"]


def candidate_errors(candidate_path: str, pgt_path: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    """The error map (codes of :func:`nnqc_pipe.qc.metrics.error_map`) of a candidate against its pGT, on the
    original grid, and the candidate image (for its geometry)."""
    cand_img = nib.load(candidate_path)
    candidate = np.asarray(cand_img.dataobj)
    pgt = np.asarray(nib.load(pgt_path).dataobj)
    if candidate.shape != pgt.shape:
        raise ValueError(f"candidate {candidate_path} {candidate.shape} and pGT {pgt_path} {pgt.shape} differ")
    return error_map(candidate, pgt), cand_img


def error_region_table(subjects: pd.DataFrame, candidates: dict[str, str], pgt: str, slicing_axis: int,
                       min_voxels: int = 1, opinion: str = "nnqc") -> pd.DataFrame:
    """Connected error regions (missed, extra, class confusion) of every REVIEW/FAIL foreground candidate.

    ``candidates``: source -> candidate path pattern with ``{subject}``; ``pgt``: path pattern with ``{source}``
    and ``{subject}`` of the reference the errors are taken against (nnQC's pGT, or the learned opinion's
    estimated truth; ``opinion`` names it in the table); ``slicing_axis``: the plan's (RAS) slicing axis, mapped
    to each subject's array axis so that ``slice_first``/``slice_last`` index the stored image. Regions below
    ``min_voxels`` are left out.
    """
    flagged = subjects[(subjects["label"] == FOREGROUND) & subjects["verdict"].isin(["REVIEW", "FAIL"])]
    tables = []
    for row in flagged.itertuples(index=False):
        errors, img = candidate_errors(fill(candidates[row.source], subject=row.subject),
                                       fill(pgt, source=row.source, subject=row.subject))
        regions = error_regions(errors, spacing_of(img), original_slice_axis(img.affine, slicing_axis))
        regions = regions[regions["n_voxels"] >= min_voxels]
        tables.append(regions.assign(cohort=row.cohort, source=row.source, subject=row.subject,
                                     verdict=row.verdict, risk=row.risk, opinion=opinion))
    if not tables:
        return pd.DataFrame(columns=REGION_COLUMNS)
    table = pd.concat(tables, ignore_index=True)[REGION_COLUMNS]
    return table.sort_values(["risk", "source", "subject", "volume_mm3"], ascending=[False, True, True, False],
                             kind="stable").reset_index(drop=True)


def write_selected_masks(selection: pd.DataFrame, candidates: dict[str, str], pgt: str, out: str) -> list[str]:
    """Write each subject's selected mask to ``out`` (NIfTI pattern with ``{subject}``): the chosen source's
    candidate, or, where the selection fell back to the pGT, the pGT generated from the runner-up (best) candidate."""
    Path(fill(out, subject="_")).parent.mkdir(parents=True, exist_ok=True)
    written = []
    for row in selection.itertuples(index=False):
        if row.selected_source == PGT_SOURCE:
            source = fill(pgt, source=row.runner_up_source, subject=row.subject)
        else:
            source = fill(candidates[row.selected_source], subject=row.subject)
        target = fill(out, subject=row.subject)
        write_nifti(nib.load(source), target)
        written.append(target)
    log.info("selected masks of %d subjects written to %s", len(written), out)
    return written
