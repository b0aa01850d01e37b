"""The methods board (nnqc_pipe.report.methods) on synthetic subject tables with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from nnqc_pipe.qc.decisions import VerdictThresholds
from nnqc_pipe.report.methods import (
    METHODS_SCHEMA,
    build_methods,
    is_user_source,
    left_out_columns,
    pairwise_accuracy,
    source_tau,
)
from nnqc_pipe.report.tables import verdict_shares

# source -> real foreground DSC of subject i (i = 0..5); the user's sources: unet_bad, unet_good, atlas
REAL = {
    "gt": lambda i: 1.0,
    "degraded_L1": lambda i: 0.08 + 0.01 * i,
    "degraded_L5": lambda i: 0.86 + 0.015 * i,
    "unet_bad": lambda i: 0.30 + 0.05 * i,
    "unet_good": lambda i: 0.74 + 0.02 * i,
    "atlas": lambda i: 0.60 + 0.02 * i,
}


def subjects_table(n_subjects: int = 6, labelled: bool = True) -> pd.DataFrame:
    """Foreground rows of every source: nnQC exact, the learned opinion reversed, agreement offset by +0.05,
    calibrated constant, the VAE-reconstruction baseline never computed."""
    rows = []
    for i in range(n_subjects):
        for source, real_of in REAL.items():
            real = real_of(i)
            rows.append({"cohort": "syn", "source": source, "subject": f"s{i}", "label": "foreground",
                         "real_dsc": real if labelled else np.nan, "predicted_dsc": real, "learned_dsc": 1 - real,
                         "baseline_agreement_dsc": real + 0.05, "calibrated_dsc": 0.5,
                         "baseline_vae_recon_dsc": np.nan})
    return pd.DataFrame(rows)


def board_row(board: pd.DataFrame, method: str, pool: str) -> pd.Series:
    found = board[(board["method"] == method) & (board["pool"] == pool)]
    assert len(found) == 1, (method, pool)
    return found.iloc[0]


def test_exact_predictor_is_perfect_on_every_figure():
    board = build_methods(subjects_table(), fail_dsc=0.7)
    row = board_row(board, "nnqc", "all")
    assert row["n"] == 36 and row["pearson_r"] == pytest.approx(1.0) and row["mae"] == 0.0 and row["bias"] == 0.0
    assert row["spearman_rho"] == pytest.approx(1.0) and row["failure_auc"] == 1.0
    assert row["sensitivity"] == 1.0 and row["specificity"] == 1.0 and row["accuracy"] == 1.0
    assert row["kendall_tau"] == pytest.approx(1.0) and row["n_sources"] == 6
    assert row["pairwise_accuracy"] == 1.0 and row["n_pairs"] == 6 * 15


def test_reversed_predictor_and_constant_offset():
    board = build_methods(subjects_table(), fail_dsc=0.7)
    reversed_ = board_row(board, "learned", "all")
    assert reversed_["pearson_r"] == pytest.approx(-1.0) and reversed_["kendall_tau"] == pytest.approx(-1.0)
    assert reversed_["failure_auc"] == 0.0 and reversed_["pairwise_accuracy"] == 0.0
    offset = board_row(board, "agreement", "all_real")
    assert offset["bias"] == pytest.approx(0.05) and offset["mae"] == pytest.approx(0.05)
    assert offset["pearson_r"] == pytest.approx(1.0)
    constant = board_row(board, "calibrated", "all")  # says nothing: no r, no rank, every pair a tie
    assert math.isnan(constant["pearson_r"]) and math.isnan(constant["kendall_tau"])
    assert constant["failure_auc"] == 0.5 and constant["pairwise_accuracy"] == 0.5


def test_pools_methods_and_order():
    board = build_methods(subjects_table(), fail_dsc=0.7)
    assert list(board.columns) == list(METHODS_SCHEMA)
    assert set(board["method"]) == {"nnqc", "learned", "agreement", "calibrated"}  # vae_recon has no value
    nnqc = board[board["method"] == "nnqc"]
    assert list(nnqc["pool"]) == ["all", "all_real", "all_degraded", "best_real", "atlas", "degraded_L1",
                                  "degraded_L5", "gt", "unet_bad", "unet_good"]
    rows = nnqc.set_index("pool")
    assert rows.loc["all_real", "n"] == 18 and rows.loc["all_real", "sources"] == "atlas,unet_bad,unet_good"
    assert rows.loc["all_degraded", "n"] == 12 and rows.loc["all_real", "n_sources"] == 3
    # the best of the user's sources (gt and degraded_L5 are better, but not the user's)
    assert rows.loc["best_real", "sources"] == "unet_good" and rows.loc["best_real", "n"] == 6
    for pool in ("best_real", "unet_good", "gt"):  # one source: no ranking of sources, no pairs
        assert math.isnan(rows.loc[pool, "kendall_tau"]) and rows.loc[pool, "n_pairs"] == 0
        assert math.isnan(rows.loc[pool, "pairwise_accuracy"])
    assert math.isnan(rows.loc["gt", "pearson_r"])  # constant real DSC
    assert is_user_source("unet_good") and not is_user_source("gt") and not is_user_source("degraded_L3")


def test_hand_built_three_sources_tau_and_ordering():
    # real: a > b > c on both subjects; the score swaps b and c on s1 (means: a 0.85, b 0.45, c 0.5)
    rows = pd.DataFrame({
        "cohort": "syn", "label": "foreground", "subject": ["s1", "s1", "s1", "s2", "s2", "s2"],
        "source": ["a", "b", "c", "a", "b", "c"],
        "real_dsc": [0.9, 0.6, 0.3, 0.8, 0.7, 0.5],
        "predicted_dsc": [0.9, 0.3, 0.6, 0.8, 0.6, 0.4],
    })
    tau, n_sources = source_tau(rows, "predicted_dsc")
    assert n_sources == 3 and tau == pytest.approx(1 / 3)  # 2 concordant, 1 discordant pair of sources
    accuracy, n_pairs = pairwise_accuracy(rows, "predicted_dsc")
    assert n_pairs == 6 and accuracy == pytest.approx(5 / 6)  # only (b, c) of s1 is ordered wrongly
    row = board_row(build_methods(rows), "nnqc", "all")
    assert row["kendall_tau"] == pytest.approx(1 / 3) and row["pairwise_accuracy"] == pytest.approx(5 / 6)


def test_pairwise_accuracy_skips_equal_real_and_halves_ties():
    rows = pd.DataFrame({
        "source": ["a", "b", "c", "a", "b"], "subject": ["s1", "s1", "s1", "s2", "s2"], "label": "foreground",
        "real_dsc": [0.9, 0.5, 0.5, 0.8, 0.6], "predicted_dsc": [0.8, 0.6, 0.6, 0.7, 0.7],
    })
    # s1: (a,b) right, (a,c) right, (b,c) equal real -> skipped; s2: (a,b) predicted tie -> one half
    assert pairwise_accuracy(rows, "predicted_dsc") == (pytest.approx(2.5 / 3), 3)
    accuracy, n_pairs = pairwise_accuracy(rows.iloc[:1], "predicted_dsc")
    assert n_pairs == 0 and math.isnan(accuracy)


def test_without_labels_the_board_is_empty_with_its_schema():
    board = build_methods(subjects_table(labelled=False))
    assert board.empty and list(board.columns) == list(METHODS_SCHEMA)
    assert board.dtypes["pearson_r"] == np.float64 and board.dtypes["n"] == np.int64


def test_left_out_columns_of_the_methods_switch():
    assert left_out_columns(["nnqc", "learned", "vae_recon", "agreement"]) == ["latent_search_dsc"]
    assert left_out_columns(["nnqc", "learned", "vae_recon", "agreement", "latent_search"]) == []
    assert left_out_columns(["nnqc"]) == ["learned_dsc", "learned_nsd", "baseline_vae_recon_dsc",
                                          "baseline_agreement_dsc", "latent_search_dsc", "combined_dsc"]
    assert left_out_columns(["nnqc", "agreement"]) == ["learned_dsc", "learned_nsd", "baseline_vae_recon_dsc",
                                                       "latent_search_dsc"]
    for wrong in (["learned"], ["nnqc", "wang"]):
        with pytest.raises(ValueError, match="must include nnqc"):
            left_out_columns(wrong)


@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "no-labels"])
def test_board_figure_and_html_table(tmp_path, labelled):
    from nnqc_pipe.report.figures import plot_methods, write_methods_table

    subjects = subjects_table(labelled=labelled)
    board = build_methods(subjects)
    plot_methods(board, subjects, tmp_path / "methods.png")
    write_methods_table(board, subjects, tmp_path / "methods.html")
    assert (tmp_path / "methods.png").stat().st_size > 1000
    html = (tmp_path / "methods.html").read_text()
    assert "nnqc" in html and "learned" in html and "vae_recon" not in html
    assert ("best_real" in html and "unet_good" in html) if labelled else "no labelled subject" in html
    assert not list(tmp_path.glob(".*"))


def test_latent_search_is_a_method_of_the_board():
    table = subjects_table().assign(latent_search_dsc=lambda t: t["real_dsc"] - 0.1)
    row = board_row(build_methods(table, fail_dsc=0.7), "latent_search", "all")
    assert row["score_column"] == "latent_search_dsc" and row["bias"] == pytest.approx(-0.1)
    assert row["pearson_r"] == pytest.approx(1.0) and row["kendall_tau"] == pytest.approx(1.0)


def test_the_board_says_how_many_good_masks_and_failures_each_verdict_score_sends_to_review():
    """nnQC exact, the learned opinion reversed: acting on nnQC reviews no good mask and every failure; acting on the
    learned opinion every good mask (scored 0.2 or less). Opinions the verdicts cannot act on have no shares."""
    table = subjects_table().assign(cand_voxels=100, pgt_voxels=100, uncertainty=0.0, n_slices=3,
                                    flag_hd95_undefined=False, flag_ravd_undefined=False)
    board = build_methods(table, 0.7, verdict_shares(table, 0.8, VerdictThresholds()))
    nnqc, learned = board_row(board, "nnqc", "all_real"), board_row(board, "learned", "all_real")
    assert nnqc["good_reviewed"] == 0.0 and nnqc["failures_reviewed"] == 1.0
    assert learned["good_reviewed"] == 1.0
    # unet_good reaches 0.8 in s3..s5 only; the gt pool has no failure
    assert math.isnan(board_row(board, "nnqc", "gt")["failures_reviewed"])
    assert board_row(board, "agreement", "all_real")[["good_reviewed", "failures_reviewed"]].isna().all()
