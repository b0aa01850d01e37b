"""Simple baselines computed beside nnQC on the same candidates, so the report says when nnQC loses.

Inter-source agreement (the strongest simple baseline of the failure-detection literature, e.g. Zenk et al.
2025): the DSC of a candidate against the consensus of the *other* real segmenters' masks of the same subject
(the user's ``sources``; the ground truth and the synthetic ``degraded_*`` levels never vote). The consensus is the
voxel-wise strict majority of the others per class (with one other source, that source itself); a candidate with
no other real source has no baseline (NaN).

VAE reconstruction (the "distance to the manifold of plausible shapes" family, Galati et al. 2021, Wang et al.
2020): the DSC of a candidate against its own reconstruction by the trained mask autoencoder (encoder mean,
decoded). It needs no other source and no image. The inference stage counts, per original slice, the overlap and
the total size of candidate and reconstruction (:func:`reconstruction_counts`, stored in the per-slice table);
the score stage turns the counts into slice and volume DSCs (:func:`reconstruction_dice`).

Wang et al.'s latent search (:mod:`nnqc_pipe.models.latent_search`), the same family with the image and an
iterative search, is counted the same way against its surrogate segmentation (prefix :data:`LATENT_PREFIX`,
column :data:`LATENT_SEARCH_COLUMN`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from nnqc_pipe.chunks import fill
from nnqc_pipe.dice import dice, dice_from_counts
from nnqc_pipe.qc.metrics import FOREGROUND

log = logging.getLogger(__name__)

AGREEMENT_COLUMN = "baseline_agreement_dsc"
VAE_RECON_COLUMN = "baseline_vae_recon_dsc"
LATENT_SEARCH_COLUMN = "latent_search_dsc"
RECON_PREFIX = "recon"
LATENT_PREFIX = "latent"
RECON_GROUP_FOREGROUND = "fg"
SYNTHETIC_SOURCES = ("gt", "degraded_")


def voting_sources(sources: Sequence[str]) -> list[str]:
    """The sources that vote in the consensus: the real segmenters (not ``gt``, not ``degraded_*``)."""
    return [s for s in sources if not s.startswith(SYNTHETIC_SOURCES)]


def consensus(masks: Sequence[np.ndarray], value: int | None) -> np.ndarray:
    """Voxel-wise strict majority of ``masks`` for label ``value`` (None: any foreground)."""
    votes = sum(((m > 0) if value is None else (m == value)).astype(np.int16) for m in masks)
    return votes * 2 > len(masks)


def agreement_rows(masks: Mapping[str, np.ndarray], voters: Sequence[str], label_names: Mapping[int, str]
                   ) -> list[dict[str, object]]:
    """Per (source, label) of one subject, the DSC of the source's mask against the consensus of the other voters."""
    rows = []
    for source, mask in masks.items():
        others = [masks[v] for v in voters if v != source and v in masks]
        for value, name in [(None, FOREGROUND), *label_names.items()]:
            score = np.nan
            if others:
                own = (mask > 0) if value is None else (mask == value)
                score = dice(own, consensus(others, value))
            rows.append({"source": source, "label": name, AGREEMENT_COLUMN: score})
    return rows


def agreement_table(subjects: pd.DataFrame, candidates: Mapping[str, str], label_names: Mapping[int, str]
                    ) -> pd.DataFrame:
    """Inter-source agreement of every (subject, source, label) of the report: columns subject, source, label and
    :data:`AGREEMENT_COLUMN`; a candidate without another real segmenter's mask of its subject gets NaN."""
    tables = []
    for subject, rows in subjects.groupby("subject", sort=True):
        sources = sorted(set(rows["source"]))
        voters = voting_sources(sources)
        if not any(v != s for v in voters for s in sources):  # nobody has another real segmenter to compare with
            tables.append(pd.DataFrame({"subject": subject, "source": sources, "label": FOREGROUND,
                                        AGREEMENT_COLUMN: np.nan}))
            continue
        masks = {s: np.asarray(nib.load(fill(candidates[s], subject=subject)).dataobj) for s in sources}
        tables.append(pd.DataFrame(agreement_rows(masks, voters, label_names)).assign(subject=subject))
    if not tables:
        return pd.DataFrame(columns=["subject", "source", "label", AGREEMENT_COLUMN])
    table = pd.concat(tables, ignore_index=True)
    log.info("inter-source agreement baseline: %d of %d candidates scored", table[AGREEMENT_COLUMN].notna().sum(),
             len(table))
    return table


def _recon_count_columns(group: str, prefix: str) -> tuple[str, str]:
    return f"{prefix}_overlap_{group}", f"{prefix}_total_{group}"


def reconstruction_counts(candidate: np.ndarray, reconstruction: np.ndarray, slice_axis: int, n_classes: int,
                          prefix: str = RECON_PREFIX) -> dict[str, np.ndarray]:
    """Per slice along ``slice_axis``: overlap and total voxel count of a candidate and its VAE reconstruction
    (with ``prefix`` :data:`LATENT_PREFIX`: its latent-search surrogate).

    Both are class-index volumes on one grid. Keys ``<prefix>_overlap_<g>`` and ``<prefix>_total_<g>`` (|A| + |B|)
    for ``g`` = ``fg`` (any foreground) and each class index ``1 .. n_classes - 1``; each value has one entry per
    slice.
    """
    if candidate.shape != reconstruction.shape:
        raise ValueError(f"candidate {candidate.shape} and reconstruction {reconstruction.shape} differ in shape")
    other_axes = tuple(a for a in range(candidate.ndim) if a != slice_axis)
    counts = {}
    groups = [(RECON_GROUP_FOREGROUND, None), *((str(k), k) for k in range(1, n_classes))]
    for group, k in groups:
        a = (candidate > 0) if k is None else (candidate == k)
        b = (reconstruction > 0) if k is None else (reconstruction == k)
        overlap, total = _recon_count_columns(group, prefix)
        counts[overlap] = np.count_nonzero(a & b, axis=other_axes).astype(np.int64)
        counts[total] = (np.count_nonzero(a, axis=other_axes) + np.count_nonzero(b, axis=other_axes)).astype(np.int64)
    return counts


def reconstruction_dice(slices: pd.DataFrame, label_names: Mapping[int, str], label_values: Sequence[int],
                        prefix: str = RECON_PREFIX) -> dict[tuple[str, int | None], float]:
    """VAE-reconstruction DSC (with ``prefix`` :data:`LATENT_PREFIX`: latent-search DSC) per (label name, slice
    index or None for the volume, counted over every voxel) from a per-slice table.

    ``slices`` has ``slice_index`` and the :func:`reconstruction_counts` columns of ``prefix``; class index ``k``
    is label value ``label_values[k - 1]``. A table without those columns (a pGT written without them) gives an
    empty dict.
    """
    groups = [(FOREGROUND, RECON_GROUP_FOREGROUND)]
    groups += [(label_names[v], str(k)) for k, v in enumerate(label_values, start=1) if v in label_names]
    scores: dict[tuple[str, int | None], float] = {}
    for name, group in groups:
        overlap_col, total_col = _recon_count_columns(group, prefix)
        if overlap_col not in slices or total_col not in slices:
            continue
        overlap, total = slices[overlap_col].to_numpy(), slices[total_col].to_numpy()
        per_slice = dice_from_counts(overlap, total, np.zeros_like(total))
        scores.update({(name, int(i)): float(d) for i, d in zip(slices["slice_index"], per_slice, strict=True)})
        scores[(name, None)] = float(dice_from_counts(overlap.sum(), total.sum(), 0))
    return scores
