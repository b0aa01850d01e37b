"""The methods board: every QC method of the report against the real quality, on the same candidates.

Methods (:data:`METHODS`) are the report's scores of a candidate's DSC: nnQC's ``predicted_dsc`` and its
cross-validated ``calibrated_dsc``, the learned opinion, the fusion of the opinions, Wang et al.'s latent search and
the two baselines; a method is on the board when its column exists and has a value. Pools of candidates
(:func:`pools`): ``all``, ``all_real`` (the user's sources: not ``gt``, not ``degraded_*``), ``all_degraded``,
``best_real`` (the user's source with the highest mean real DSC of the label, alone) and each source. Only
labelled candidates (a real DSC) count; a pool without one has no row.

Figures of one (method, pool, label), over the pool's pairs with both the score and the real DSC finite:

- ``n``, ``pearson_r`` (NaN below 3 pairs or for a constant side), ``mae``;
- ``bias``, ``spearman_rho``, ``n_fail``, ``failure_auc``, ``sensitivity``, ``specificity``, ``accuracy`` and
  ``aurc`` at real DSC < ``fail_dsc`` (:func:`nnqc_pipe.qc.decisions.failure_detection`);
- ``kendall_tau``: the pool's sources ranked by their mean score against their mean real DSC, over their labelled
  candidates (:func:`source_tau`; NaN for a one-source pool);
- ``pairwise_accuracy``: per subject, over the pairs of the pool's sources with different real DSC, the share the
  score orders the same way (a tie in the score counts one half; :func:`pairwise_accuracy`);
- ``good_reviewed``, ``failures_reviewed``: for a method the verdicts can act on (``report.verdict_score``), the
  share of the pool's good masks (real DSC ≥ ``qc_pass_dsc``) and of its failures (real DSC < ``fail_dsc``) that
  REVIEW or FAIL when the verdicts act on it, with its own pass threshold
  (:func:`nnqc_pipe.report.tables.verdict_shares`); NaN for the other methods or without such masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats

from nnqc_pipe.qc.baselines import AGREEMENT_COLUMN, LATENT_SEARCH_COLUMN, SYNTHETIC_SOURCES, VAE_RECON_COLUMN
from nnqc_pipe.qc.calibration import CALIBRATED_COLUMN, COMBINED_COLUMN
from nnqc_pipe.qc.decisions import failure_detection
from nnqc_pipe.qc.learned import LEARNED_DSC, LEARNED_NSD

REAL_DSC = "real_dsc"
DEGRADED_PREFIX = "degraded_"
ALL_SOURCES = "all"
ALL_REAL = "all_real"
ALL_DEGRADED = "all_degraded"
BEST_REAL = "best_real"
MIN_PEARSON_PAIRS = 3
# Board name -> the subjects column holding the method's score of the candidate's DSC.
METHODS = {"nnqc": "predicted_dsc", "calibrated": CALIBRATED_COLUMN, "learned": LEARNED_DSC,
           "combined": COMBINED_COLUMN, "agreement": AGREEMENT_COLUMN, "vae_recon": VAE_RECON_COLUMN,
           "latent_search": LATENT_SEARCH_COLUMN}
# The QC opinions the config's ``methods`` chooses from -> the report columns that exist only with it. nnQC is the
# report's backbone (verdicts, selection, review lists and error regions act on its pGT): it is always on. The
# fusion of the opinions (``combined_dsc``) exists with at least two of them.
OPINION_COLUMNS = {"nnqc": (), "learned": (LEARNED_DSC, LEARNED_NSD),
                   "vae_recon": (VAE_RECON_COLUMN,), "agreement": (AGREEMENT_COLUMN,),
                   "latent_search": (LATENT_SEARCH_COLUMN,)}
OPINIONS = tuple(OPINION_COLUMNS)
METHODS_SCHEMA = {
    "cohort": "str",
    "method": "str",
    "score_column": "str",
    "pool": "str",
    "sources": "str",
    "label": "str",
    "n": "int64",
    "pearson_r": "float64",
    "mae": "float64",
    "bias": "float64",
    "spearman_rho": "float64",
    "n_fail": "int64",
    "failure_auc": "float64",
    "sensitivity": "float64",
    "specificity": "float64",
    "accuracy": "float64",
    "aurc": "float64",
    "n_sources": "int64",
    "kendall_tau": "float64",
    "n_pairs": "int64",
    "pairwise_accuracy": "float64",
    "good_reviewed": "float64",
    "failures_reviewed": "float64",
}
# The board's keys: one row per (cohort, label, method, pool).
BOARD_KEYS = ["cohort", "label", "method", "pool"]
NO_LABELS_NOTE = ("no candidate has a real DSC (no labelled subject): the board is empty; the report shows each "
                  "method's predicted distribution instead")


def left_out_columns(methods: Sequence[str]) -> list[str]:
    """The report columns of the opinions not in ``methods`` (a subset of :data:`OPINIONS` with ``nnqc``), and
    ``combined_dsc`` with fewer than two opinions to fuse."""
    unknown = sorted(set(methods) - set(OPINIONS))
    if unknown or "nnqc" not in methods:
        raise ValueError(f"methods {list(methods)}: must include nnqc and name only {list(OPINIONS)}")
    left_out = [column for method, columns in OPINION_COLUMNS.items() if method not in methods for column in columns]
    return left_out + ([COMBINED_COLUMN] if len(set(methods)) < 2 else [])


def is_user_source(source: str) -> bool:
    """A source of the user's (a real segmenter): not the ground truth, not a degradation level."""
    return not source.startswith(SYNTHETIC_SOURCES)


def agreement(predicted: np.ndarray, real: np.ndarray) -> dict[str, float | int]:
    """n, Pearson r, MAE and the sample std of the absolute errors over the pairs with both values finite."""
    both = np.isfinite(predicted) & np.isfinite(real)
    pred, ref = predicted[both], real[both]
    errors = np.abs(pred - ref)
    constant = pred.size > 0 and (np.ptp(pred) == 0 or np.ptp(ref) == 0)
    pearson = np.nan if pred.size < MIN_PEARSON_PAIRS or constant else float(stats.pearsonr(pred, ref)[0])
    return {
        "n": int(pred.size),
        "pearson_r": pearson,
        "mae": float(errors.mean()) if errors.size else np.nan,
        "mae_std": float(errors.std(ddof=1)) if errors.size > 1 else np.nan,
    }


def kendall_tau(predicted: pd.Series, real: pd.Series) -> float:
    """Kendall τ-b between two orders of sources; NaN with < 2 complete sources or a constant side."""
    both = predicted.notna() & real.notna()
    pred, ref = predicted[both].to_numpy(), real[both].to_numpy()
    if pred.size < 2 or np.ptp(pred) == 0 or np.ptp(ref) == 0:
        return float("nan")
    return float(stats.kendalltau(pred, ref).statistic)


def source_tau(rows: pd.DataFrame, column: str) -> tuple[float, int]:
    """Kendall τ of the sources of ``rows`` ranked by their mean ``column`` against their mean real DSC, and the
    number of sources with both means."""
    means = rows.groupby("source")[[column, REAL_DSC]].mean().dropna()
    return kendall_tau(means[column], means[REAL_DSC]), len(means)


def pairwise_accuracy(rows: pd.DataFrame, column: str) -> tuple[float, int]:
    """Over the pairs of sources of one subject with different real DSC (``column`` finite on both), the share
    ordered the same way by ``column`` as by the real DSC (a tie in ``column`` counts one half), and the number
    of pairs (accuracy NaN without one)."""
    rows = rows[np.isfinite(rows[column].to_numpy(dtype=float)) & rows[REAL_DSC].notna()]
    keys = ["cohort", "subject"] if "cohort" in rows else ["subject"]
    score, n = 0.0, 0
    for _, group in rows.groupby(keys, sort=True):
        values = zip(group[REAL_DSC].to_numpy(float), group[column].to_numpy(float), strict=True)
        for (real_a, pred_a), (real_b, pred_b) in combinations(list(values), 2):
            if real_a == real_b:
                continue
            n += 1
            agree = np.sign(real_a - real_b) * np.sign(pred_a - pred_b)
            score += 1.0 if agree > 0 else 0.5 if agree == 0 else 0.0
    return (score / n if n else float("nan")), n


def best_source(rows: pd.DataFrame) -> str | None:
    """The user's source with the highest mean real DSC in ``rows`` (None without one)."""
    user = rows[rows["source"].map(is_user_source) & rows[REAL_DSC].notna()]
    means = user.groupby("source")[REAL_DSC].mean()
    return None if means.empty else str(means.idxmax())


def pools(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(pool, its rows) of the labelled ``rows`` of one label: ``all``, ``all_real``, ``all_degraded``,
    ``best_real``, then each source by name; pools without a row are left out."""
    user = rows["source"].map(is_user_source).astype(bool)
    best = best_source(rows)
    named = [
        (ALL_SOURCES, rows),
        (ALL_REAL, rows[user]),
        (ALL_DEGRADED, rows[rows["source"].str.startswith(DEGRADED_PREFIX)]),
        (BEST_REAL, rows[rows["source"] == best]),
        *((str(s), group) for s, group in rows.groupby("source", sort=True)),
    ]
    return [(name, group) for name, group in named if len(group)]


def present_methods(subjects: pd.DataFrame) -> dict[str, str]:
    """The :data:`METHODS` whose column ``subjects`` has with at least one value."""
    return {m: c for m, c in METHODS.items() if c in subjects and subjects[c].notna().any()}


def build_methods(subjects: pd.DataFrame, fail_dsc: float = 0.7, verdicts: pd.DataFrame | None = None
                  ) -> pd.DataFrame:
    """The board (schema :data:`METHODS_SCHEMA`): one row per (cohort, label, method, pool) of the labelled
    subject rows, in that order (pools as :func:`pools` lists them); empty, with the schema, without labels.
    ``verdicts`` (:data:`BOARD_KEYS` with ``good_reviewed``, ``failures_reviewed``) fills those two columns."""
    methods = present_methods(subjects)
    labelled = subjects[subjects[REAL_DSC].notna()] if REAL_DSC in subjects else subjects.iloc[:0]
    board = []
    for (cohort, label), group in labelled.groupby(["cohort", "label"], sort=True):
        members = pools(group)
        for method, column in methods.items():
            for pool, rows in members:
                pred, real = rows[column].to_numpy(dtype=float), rows[REAL_DSC].to_numpy(dtype=float)
                tau, n_sources = source_tau(rows, column)
                accuracy, n_pairs = pairwise_accuracy(rows, column)
                board.append({"cohort": cohort, "method": method, "score_column": column, "pool": pool,
                              "sources": ",".join(sorted(rows["source"].unique())), "label": label,
                              **failure_detection(pred, real, fail_dsc), **agreement(pred, real),
                              "n_sources": n_sources, "kendall_tau": tau, "n_pairs": n_pairs,
                              "pairwise_accuracy": accuracy})
    table = pd.DataFrame(board, columns=[c for c in METHODS_SCHEMA if c not in VERDICT_SHARES])
    if verdicts is not None and len(verdicts) and len(table):
        table = table.merge(verdicts[BOARD_KEYS + VERDICT_SHARES], on=BOARD_KEYS, how="left")
    return table.reindex(columns=list(METHODS_SCHEMA)).astype(METHODS_SCHEMA)


VERDICT_SHARES = ["good_reviewed", "failures_reviewed"]


def review_shares(decided: pd.DataFrame, pass_dsc: float, fail_dsc: float) -> dict[str, float]:
    """Of the labelled rows of ``decided`` (with verdicts): the share of good masks (real DSC ≥ ``pass_dsc``) and of
    failures (real DSC < ``fail_dsc``) that REVIEW or FAIL; NaN where there is no such mask."""
    flagged = decided["verdict"].isin(["REVIEW", "FAIL"]).to_numpy()
    real = decided[REAL_DSC].to_numpy(dtype=float)
    good, bad = real >= pass_dsc, real < fail_dsc
    return {"good_reviewed": float(flagged[good].mean()) if good.any() else np.nan,
            "failures_reviewed": float(flagged[bad].mean()) if bad.any() else np.nan}


def method_names(board: pd.DataFrame, subjects: pd.DataFrame) -> list[str]:
    """The methods of the report: those on the board, or (an empty board) those with a score in ``subjects``."""
    return list(dict.fromkeys(board["method"])) if len(board) else list(present_methods(subjects))


def board_metadata(board: pd.DataFrame, subjects: pd.DataFrame, fail_dsc: float) -> dict[str, object]:
    """The board's Parquet metadata: its methods, ``fail_dsc`` and, when it is empty, a note saying why."""
    return {"methods": method_names(board, subjects), "fail_dsc": fail_dsc,
            "note": None if len(board) else NO_LABELS_NOTE}


def leading_rows(board: pd.DataFrame, label: str, pool_names: Sequence[str] = (ALL_SOURCES, ALL_REAL, BEST_REAL)
                 ) -> pd.DataFrame:
    """The board's rows of ``label`` and ``pool_names`` (the one-glance view), by pool then method."""
    rows = board[(board["label"] == label) & board["pool"].isin(list(pool_names))]
    order = {p: i for i, p in enumerate(pool_names)}
    return rows.sort_values("pool", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
