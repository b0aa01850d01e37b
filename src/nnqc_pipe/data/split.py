"""Subject table and the deterministic train/val/test split.

``subjects.tsv`` lists every discovered subject with its ingestion status and, for excluded ones, the reason.
``split.tsv`` lists the usable subjects with a role: ``train`` and ``val`` (model fitting and checkpoint
selection), ``test`` (degraded candidates, predicted-vs-real evaluation), ``unlabelled`` (no ground truth:
QC of the user's sources only). The split depends only on the sorted subject names and the seed.

A cohort QC'd with a model from elsewhere (config ``qc_model``) trains nothing: all its labelled subjects are
``test`` (their GT and user sources measure predicted-vs-real agreement on this cohort), the others
``unlabelled``.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from nnqc_pipe.data.io import atomic_path, read_json

log = logging.getLogger(__name__)

ROLES = ("train", "val", "test", "unlabelled")


class CohortError(RuntimeError):
    """The cohort as a whole cannot be processed (e.g. too few usable subjects, or a bad subject with fail)."""


def assign_roles(
    labelled: list[str], unlabelled: list[str], test_fraction: float, val_fraction: float, seed: int
) -> pd.DataFrame:
    """Deterministic roles: a seeded permutation of the sorted labelled subjects is cut into test/val/train."""
    names = sorted(labelled)
    n = len(names)
    if n < 3:
        raise CohortError(f"need at least 3 labelled subjects to train and evaluate, got {n} (or set qc_model to use "
                          "a QC model trained on another cohort)")
    order = np.random.default_rng(seed).permutation(n)
    n_test = min(max(1, round(n * test_fraction)), n - 2)
    n_val = min(max(1, math.ceil((n - n_test) * val_fraction)), n - n_test - 1) if val_fraction > 0 else 0
    roles = np.empty(n, dtype=object)
    roles[order[:n_test]] = "test"
    roles[order[n_test : n_test + n_val]] = "val"
    roles[order[n_test + n_val :]] = "train"
    rows = [{"subject": s, "role": r} for s, r in zip(names, roles, strict=True)]
    rows += [{"subject": s, "role": "unlabelled"} for s in sorted(unlabelled)]
    return pd.DataFrame(rows, columns=["subject", "role"])


def evaluation_roles(labelled: list[str], unlabelled: list[str]) -> pd.DataFrame:
    """Roles of a cohort that uses a trained QC model: every labelled subject ``test``, the others ``unlabelled``."""
    if not labelled and not unlabelled:
        raise CohortError("no usable subject to QC")
    rows = [{"subject": s, "role": "test"} for s in sorted(labelled)]
    rows += [{"subject": s, "role": "unlabelled"} for s in sorted(unlabelled)]
    return pd.DataFrame(rows, columns=["subject", "role"])


def subject_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per discovered subject: status, reason, whether it has a label file (``labelled``), files."""
    cols = ["subject", "status", "reason", "labelled", "image", "label"]
    rows = [{**{c: r.get(c) for c in cols}, "labelled": r.get("has_label", r.get("label") is not None)}
            for r in records]
    return pd.DataFrame(rows, columns=cols).sort_values("subject")


def write_split(
    inspect_paths: list[str | os.PathLike],
    subjects_tsv: str | os.PathLike,
    split_tsv: str | os.PathLike,
    test_fraction: float,
    val_fraction: float,
    seed: int,
    on_bad_subject: str = "exclude",
    train_model: bool = True,
) -> pd.DataFrame:
    """Gather the ingestion records, apply the bad-subject rule, and write both tables atomically.

    ``train_model`` False (config ``qc_model``): no train/val subjects, see :func:`evaluation_roles`.
    """
    records = [read_json(p) for p in inspect_paths]
    table = subject_table(records)
    bad = table[table.status != "ok"]
    for _, row in bad.iterrows():
        log.warning("excluded subject %s: %s", row.subject, row.reason)
    if len(bad) and on_bad_subject == "fail":
        raise CohortError(f"{len(bad)} subject(s) failed validation (on_bad_subject: fail):\n"
                          + "\n".join(bad.reason))
    ok = [r for r in records if r["status"] == "ok"]
    labelled = [r["subject"] for r in ok if r.get("has_label")]
    unlabelled = [r["subject"] for r in ok if not r.get("has_label")]
    if unlabelled:
        log.info("%d usable subject(s) without a label file: unlabelled (QC of their sources only, no training)",
                 len(unlabelled))
    if train_model:
        split = assign_roles(labelled, unlabelled, test_fraction, val_fraction, seed)
    else:
        split = evaluation_roles(labelled, unlabelled)
    log.info("%d subjects usable (%d excluded): %s", len(split), len(bad), split.role.value_counts().to_dict())
    with atomic_path(subjects_tsv) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    with atomic_path(split_tsv) as tmp:
        split.to_csv(tmp, sep="\t", index=False)
    return split


def read_split(split_tsv: str | os.PathLike) -> dict[str, list[str]]:
    """Role -> sorted subject list."""
    df = pd.read_csv(split_tsv, sep="\t", dtype=str)
    return {role: sorted(df.loc[df.role == role, "subject"]) for role in ROLES}


def assign_folds(subjects: Sequence[str], n_folds: int, seed: int) -> dict[str, int]:
    """Subject -> fold in ``0 .. n_folds - 1``: a seeded permutation of the sorted names dealt round-robin, so
    folds differ in size by at most one and the same config always gives the same folds."""
    if n_folds < 2:
        raise ValueError(f"learned.folds must be at least 2, got {n_folds}")
    names = sorted(subjects)
    order = np.random.default_rng([seed, zlib.crc32(b"folds")]).permutation(len(names))
    return {names[i]: int(rank % n_folds) for rank, i in enumerate(order)}
