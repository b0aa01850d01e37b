"""The file finding and the figures of benchmarks/latent_search_offline.py on tiny tables (no search)."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("latent_search_offline")


def test_candidates_lists_the_masks_that_exist(bench, tmp_path):
    run = tmp_path / "run"
    (run / "degraded" / "s1").mkdir(parents=True)
    (run / "degraded" / "s1" / "L5.nii.gz").touch()
    (tmp_path / "gt_s1.nii.gz").touch()
    config = {"labels": str(tmp_path / "gt_{subject}.nii.gz"),
              "sources": {"unet": str(tmp_path / "u_{subject}.nii.gz")}}
    assert list(bench.candidate_paths(config, run, "s1")) == ["gt", "degraded_L5"]


def test_figures_on_a_table_with_known_answers(bench):
    table = pd.DataFrame({"source": ["gt", "atlas", "atlas", "unet"], "real": [1.0, 0.2, 0.4, 0.7],
                          "offline": [0.9, 0.4, 0.6, 0.6]})
    line = bench.figures(table, "offline")
    assert "MAE 0.150" in line and "bias +0.050" in line and "atlas 0.500 (MAE 0.200)" in line
