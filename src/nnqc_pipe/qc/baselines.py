"""Simple baselines computed beside nnQC on the same candidates, so the report says when nnQC loses.

Inter-source agreement (the strongest simple baseline of the failure-detection literature, e.g. Zenk et al.
2025): the DSC of a candidate against the consensus of the *other* real segmenters' masks of the same subject
(the user's ``sources``; the ground truth and the synthetic ``degraded_*`` levels never vote). The consensus is the
voxel-wise strict majority of the others per class (with one other source, that source itself); a candidate with
no other real source has no baseline (NaN).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from nnqc_pipe.chunks import fill
from nnqc_pipe.qc.metrics import FOREGROUND, dice

log = logging.getLogger(__name__)

AGREEMENT_COLUMN = "baseline_agreement_dsc"
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
