"""The summarising and candidate-listing code of benchmarks/pgt_ablation.py on tiny tables (no sampling)."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from conftest import load_benchmark


@pytest.fixture(scope="module")
def ablation():
    return load_benchmark("pgt_ablation")


def test_summarise_pools_and_per_source_figures(ablation):
    table = pd.DataFrame({"source": ["gt"] * 3 + ["unet"] * 3, "real_dsc": [1, 1, 1, 0.6, 0.7, 0.8],
                          "predicted": [0.8, 0.85, 0.9, 0.62, 0.7, 0.81]})
    out = ablation.summarise(table)
    assert out["n"] == 6 and out["bias"] == pytest.approx((-0.45 + 0.03) / 6)
    assert out["per_source"]["gt"]["within_r"] is None  # constant real DSC: no correlation
    assert out["per_source"]["unet"]["within_r"] > 0.99
    assert out["per_source"]["gt"]["mean_predicted"] == pytest.approx(0.85)


def test_candidate_table_takes_test_subjects_and_chosen_sources(ablation, tmp_path):
    run = tmp_path / "cohort"
    run.mkdir()
    pd.DataFrame({"subject": ["a", "b", "c"], "role": ["test", "train", "test"]}).to_csv(
        run / "split.tsv", sep="\t", index=False)
    config = tmp_path / "cohort.yaml"
    config.write_text(yaml.safe_dump({"labels": "/gt/{subject}.nii.gz", "sources": {"unet": "/u/{subject}.nii.gz"}}))
    table = ablation.candidate_table(run, config, n_subjects=5, seed=0, sources=["gt", "unet", "degraded_L5"])
    assert sorted(table.subject.unique()) == ["a", "c"] and set(table.source) == {"gt", "unet", "degraded_L5"}
    row = table[(table.subject == "c") & (table.source == "degraded_L5")].iloc[0]
    assert row.candidate == str(run / "degraded" / "c" / "L5.nii.gz")


def test_setting_key_names_every_varied_setting(ablation):
    inference = {"start_strength": 0.5, "ddim_steps": 1, "samples": 8, "image_guidance": 2.0, "batch_size": 64}
    assert ablation.setting_key("best", inference) == "best/start_strength=0.5/ddim_steps=1/samples=8/image_guidance=2"
