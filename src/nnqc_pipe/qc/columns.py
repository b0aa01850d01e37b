"""Column layouts of the scores and report tables, and the typing of a table to its layout.

Fixed dtypes, so that a table's schema does not depend on whether ground truth exists. The scores table of one
candidate (:func:`nnqc_pipe.qc.score.score_rows`) and the report tables (:mod:`nnqc_pipe.report.tables`) share
these columns; :func:`typed` is the one place that casts a table to its schema and refuses an uncomputed column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from nnqc_pipe.qc.baselines import AGREEMENT_COLUMN, LATENT_SEARCH_COLUMN, VAE_RECON_COLUMN
from nnqc_pipe.qc.calibration import CALIBRATED_COLUMN, COMBINED_COLUMN
from nnqc_pipe.qc.learned import LEARNED_DSC, LEARNED_NSD
from nnqc_pipe.qc.metrics import FLAGS, METRICS

PREDICTED, REAL = "predicted", "real"
ID_COLUMNS = ["cohort", "source", "subject", "label"]
COUNT_COLUMNS = {"cand_voxels": "Int64", "pgt_voxels": "Int64", "gt_voxels": "Int64"}
LEARNED_COLUMNS = {LEARNED_DSC: "float64", LEARNED_NSD: "float64"}
# Failure-detection columns of the summary (DSC rows; bias and Spearman ρ for every metric), see
# nnqc_pipe.qc.decisions.failure_detection.
FAILURE_COLUMNS = ("n_fail", "failure_auc", "sensitivity", "specificity", "accuracy", "aurc")


def pair_columns(metrics: Sequence[str]) -> dict[str, str]:
    """The ``predicted_<metric>`` and ``real_<metric>`` columns of ``metrics`` (float64)."""
    return {f"{kind}_{m}": "float64" for m in metrics for kind in (PREDICTED, REAL)}


def scores_schema(metrics: Sequence[str] = METRICS) -> dict[str, str]:
    """Column → dtype of a scores table (``scores/{source}/{subject}.parquet``)."""
    return {
        **{c: "str" for c in ID_COLUMNS},
        "level": "str",
        "slice_index": "Int64",
        "slice_ratio": "float64",
        **pair_columns(metrics),
        **{f"{kind}_{flag}": "bool" for flag in FLAGS for kind in (PREDICTED, REAL)},
        **COUNT_COLUMNS,
        "uncertainty": "float64",
        VAE_RECON_COLUMN: "float64",
        **LEARNED_COLUMNS,
        LATENT_SEARCH_COLUMN: "float64",
    }


def metric_names(df: pd.DataFrame) -> list[str]:
    """The metrics of :data:`METRICS` that ``df`` carries as ``predicted_<metric>`` columns, in order."""
    return [m for m in METRICS if f"{PREDICTED}_{m}" in df.columns]


# The only columns a table builder may leave out; typed fills them with nulls (False for flags). The ground-truth
# side (``real_*``, ``gt_voxels``) exists only for labelled subjects, the domain-shift flag only with a training
# fingerprint, the predictors of nnqc_pipe.report.tables.add_predictors only after it ran, the failure detection
# only on DSC rows, the latent search's score in scores files written before it existed.
NULLABLE_COLUMNS = frozenset({"gt_voxels", "flag_out_of_distribution", "ood_reason", CALIBRATED_COLUMN,
                              COMBINED_COLUMN, AGREEMENT_COLUMN, *LEARNED_COLUMNS, LATENT_SEARCH_COLUMN,
                              *FAILURE_COLUMNS})
# A column that only one table has names that table in the error of typed.
_TABLE_MARKERS = (("verdict", "subjects"), ("level", "scores"), ("metric", "summary"), ("kendall_tau", "ranking"),
                  ("selected_source", "selection"), ("slice_index", "slices"))


def is_nullable(column: str) -> bool:
    """Whether a report column may be left out (all null) by the table builders, see :data:`NULLABLE_COLUMNS`."""
    return column.startswith(f"{REAL}_") or column in NULLABLE_COLUMNS


def typed(df: pd.DataFrame, schema: Mapping[str, str]) -> pd.DataFrame:
    """``df`` with exactly the ``schema`` columns, in order, cast to their dtypes.

    Missing values become null, except in boolean columns where they become False (not flagged). A non-empty ``df``
    lacking a column that is not nullable (:func:`is_nullable`) raises ValueError: a computation that did not run
    must not read as a column of nulls that matches the schema.
    """
    missing = [c for c in schema if c not in df.columns and not is_nullable(c)]
    if len(df) and missing:
        table = next((name for marker, name in _TABLE_MARKERS if marker in schema), "report")
        raise ValueError(f"{table} table: column(s) {missing} were not computed; compute them, or list them in "
                         "NULLABLE_COLUMNS if they may legitimately be absent")
    out = df.reindex(columns=list(schema))
    for column, dtype in schema.items():
        if dtype == "bool":
            out[column] = out[column].astype("boolean").fillna(False)
    return out.astype(dict(schema)).reset_index(drop=True)
