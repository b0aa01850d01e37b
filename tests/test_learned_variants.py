"""The summarising and file-finding code of benchmarks/learned_variants.py on tiny tables (no training)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("learned_variants")


def test_summary_figures_on_a_table_with_known_answers(bench):
    real = [1.0, 1.0, 0.9, 0.8, 0.85, 0.3, 0.5, 0.2, 0.6]
    table = pd.DataFrame({
        "source": ["gt", "gt", "good", "good", "good", "atlas", "atlas", "degraded_L1", "degraded_L4"],
        "real": real,
        "exact": real,
        "high": np.add(real, 0.1)})
    board = bench.summary(table, ["exact", "high"])
    assert board.loc["exact", "all_r"] == pytest.approx(1) and board.loc["exact", "all_mae"] == pytest.approx(0)
    assert board.loc["high", "all_mae"] == pytest.approx(0.1) and board.loc["high", "atlas_mae"] == pytest.approx(0.1)
    # the best real model is "good" (mean 0.85 against the atlas's 0.4); failures: the atlas's two masks
    assert board.loc["exact", "within_good_r"] == pytest.approx(1)
    assert board.loc["exact", "real_auc"] == pytest.approx(1)
    assert board.loc["high", "gt_mean"] == pytest.approx(1.1)


def test_dice_and_where_the_networks_lie(bench, tmp_path):
    a = np.zeros((2, 4, 4), bool)
    a[:, :2] = True
    assert bench.dice(a, a) == 1 and bench.dice(a, ~a) == 0 and bench.dice(~a & a, ~a & a) == 1
    run, work = tmp_path / "run", tmp_path / "work"
    assert bench.network_path(run, work, "control", 0, 0) == run / "models" / "qcnet.pt"
    assert bench.network_path(run, work, "control", 1, 0) == work / "models" / "control_seed1" / "qcnet.pt"
    assert bench.network_path(run, work, "pgt_channel", 0, 0) == work / "models" / "pgt_channel_seed0" / "qcnet.pt"


def test_test_candidates_lists_the_masks_that_exist(bench, tmp_path):
    run = tmp_path / "run"
    (run / "degraded" / "s1").mkdir(parents=True)
    (run / "degraded" / "s1" / "L3.nii.gz").touch()
    (tmp_path / "gt_s1.nii.gz").touch()
    (tmp_path / "unet_s2.nii.gz").touch()
    config = {"labels": str(tmp_path / "gt_{subject}.nii.gz"),
              "sources": {"unet": str(tmp_path / "unet_{subject}.nii.gz")}}
    found = bench.test_candidates(config, run, ["s1", "s2"])
    assert [(s, source) for s, source, _ in found] == [("s1", "gt"), ("s1", "degraded_L3"), ("s2", "unet")]


def test_each_variant_changes_only_its_own_setting(bench):
    cfg = {"n_classes": 3, "qcnet": {"spatial_dims": 2, "channels": [8, 16]}}
    assert bench.variant_config(cfg, "control") == cfg
    three = bench.variant_config(cfg, "3d")
    assert three["qcnet"] == {"spatial_dims": 3, "channels": [8, 16]} and cfg["qcnet"]["spatial_dims"] == 2
