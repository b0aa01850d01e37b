"""The summarising functions of benchmarks/accuracy.py on a small synthetic report (no snakemake run)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
from conftest import load_benchmark

from nnqc_pipe.data.io import write_parquet

REPO = Path(__file__).resolve().parents[1]


acc = load_benchmark("accuracy")


def summary_rows() -> pd.DataFrame:
    rows = []
    values = {  # (source, label) -> dsc r, dsc mae, hd95 r, hd95 mae
        ("all_degraded", "foreground"): (0.90, 0.08, 0.80, 3.0),
        ("all_degraded", "wall"): (0.84, 0.12, 0.86, 4.0),
        ("all", "foreground"): (0.92, 0.07, 0.88, 2.5),
        ("degraded_L1", "foreground"): (0.30, 0.05, float("nan"), 6.0),
        ("gt", "foreground"): (float("nan"), 0.02, float("nan"), 1.0),
    }
    for (source, label), (dr, dm, hr, hm) in values.items():
        for metric, r, mae in (("dsc", dr, dm), ("hd95_mm", hr, hm), ("nsd", 0.5, 0.1)):
            rows.append({"cohort": "syn", "source": source, "label": label, "metric": metric, "n": 10,
                         "pearson_r": r, "mae": mae, "mae_std": 0.01})
    return pd.DataFrame(rows)


def ranking_rows(tau: float = 1.0) -> pd.DataFrame:
    return pd.DataFrame({
        "cohort": "syn",
        "source": ["degraded_L1", "degraded_L5", "gt", "model_a"],
        "n_subjects": [4, 4, 4, 4],
        "n_real": [4, 4, 4, 0],
        "mean_predicted_dsc": [0.1, 0.8, 0.95, 0.7],
        "mean_real_dsc": [0.07, 0.85, 1.0, float("nan")],
        "predicted_rank": pd.array([4, 2, 1, 3], dtype="Int64"),
        "real_rank": pd.array([3, 2, 1, None], dtype="Int64"),
        "kendall_tau": tau,
    })


def write_tsv(path: Path, seconds: float, cpu: float = 1.0, mtime: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"s\th:m:s\tmax_rss\tcpu_time\n{seconds}\t0:00:00\t10\t{cpu}\n")
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def test_agreement_table_pivots_and_orders_pools_first():
    table = acc.agreement_table(summary_rows())
    assert list(table["source"][:3]) == ["all_degraded", "all_degraded", "all"]
    assert list(table["label"][:2]) == ["foreground", "wall"]
    head = table.iloc[0]
    assert (head["dsc_r"], head["dsc_mae"], head["hd95_r"], head["hd95_mae"], head["n"]) == (0.90, 0.08, 0.80, 3.0, 10)
    assert bool(head["pooled"]) and not bool(table.set_index("source").loc["gt", "pooled"])
    assert math.isnan(table.set_index("source").loc["degraded_L1", "hd95_r"])


def test_ranking_summary_orders_and_tau():
    rank = acc.ranking_summary(ranking_rows(tau=1.0))
    assert rank["kendall_tau"] == 1.0 and rank["metric"] == "dsc" and rank["n_sources"] == 3
    assert rank["predicted_order"] == ["gt", "degraded_L5", "degraded_L1"]
    assert rank["real_order"] == ["gt", "degraded_L5", "degraded_L1"]
    model_a = next(s for s in rank["sources"] if s["source"] == "model_a")
    assert model_a["real_rank"] is None and model_a["mean_real"] is None


def test_stage_times_sum_flat_and_nested_files(tmp_path):
    bench = tmp_path / "benchmarks"
    write_tsv(bench / "train_vae.tsv", 100.0, cpu=90.0)
    write_tsv(bench / "infer" / "gt" / "s1.tsv", 10.0)
    write_tsv(bench / "infer" / "gt" / "s2.tsv", 12.0)
    write_tsv(bench / "infer" / "chunk_0.tsv", 30.0)  # another naming below the rule folder counts too
    write_tsv(bench / "score" / "degraded_L1" / "deep" / "x.tsv", 5.0)
    stages = acc.stage_times(bench).set_index("rule")
    assert stages.loc["infer", "jobs"] == 3 and stages.loc["infer", "wall_s"] == pytest.approx(52.0)
    assert stages.loc["infer", "max_job_s"] == pytest.approx(30.0)
    assert stages.loc["train_vae", "cpu_s"] == pytest.approx(90.0)
    assert stages.loc["score", "wall_s"] == pytest.approx(5.0)
    assert list(stages.index) == ["train_vae", "infer", "score"]  # longest first


def test_stage_times_since_leaves_out_older_files_and_spans(tmp_path):
    bench = tmp_path / "benchmarks"
    write_tsv(bench / "plan.tsv", 4.0, mtime=1_000.0)
    write_tsv(bench / "report.tsv", 10.0, mtime=2_000.0)
    write_tsv(bench / "infer" / "a.tsv", 50.0, mtime=1_990.0)
    stages = acc.stage_times(bench, since=1_500.0)
    assert set(stages["rule"]) == {"report", "infer"}
    assert stages.attrs["skipped_older"] == 1
    assert stages.attrs["span_s"] == pytest.approx(2_000.0 - 1_940.0)
    assert acc.stage_times(tmp_path / "missing").empty


def test_target_checks_headline_pool_and_verdicts():
    agreement = acc.agreement_table(summary_rows())
    checks = {c["name"]: c for c in acc.target_checks(agreement, acc.ranking_summary(ranking_rows(1.0)),
                                                      44 * 60.0, "snakemake call")}
    assert checks["dsc_r"]["value"] == 0.90 and checks["dsc_r"]["verdict"] == "PASS"
    assert checks["dsc_mae"]["verdict"] == "PASS"
    assert checks["hd95_r"]["verdict"] == "MISS"  # 0.80 < 0.85
    assert checks["kendall_tau"]["verdict"] == "PASS"
    assert checks["total_wall_min"]["value"] == pytest.approx(44.0) and checks["total_wall_min"]["verdict"] == "PASS"
    missing = {c["name"]: c for c in acc.target_checks(agreement, acc.ranking_summary(ranking_rows(0.6)),
                                                       None, "none")}
    assert missing["kendall_tau"]["verdict"] == "MISS" and missing["total_wall_min"]["verdict"] == "n/a"


def test_summarise_reads_report_and_formats(tmp_path):
    report = tmp_path / "syn" / "report"
    meta = {"pipeline_version": "0.1.0", "config_hash": "abc", "model_card": {"preset": "cpu", "patch_size": [80, 80]}}
    write_parquet(summary_rows(), report / "summary.parquet", meta)
    write_parquet(ranking_rows(), report / "ranking.parquet", meta)
    subjects = pd.DataFrame({"cohort": "syn", "source": ["gt", "gt", "degraded_L1"], "subject": ["a", "b", "a"],
                             "label": "foreground"})
    write_parquet(subjects, report / "subjects.parquet", meta)
    write_tsv(tmp_path / "syn" / "benchmarks" / "report.tsv", 3.0)
    result = acc.summarise(report, tmp_path / "syn" / "benchmarks", total_wall_s=120.0)
    assert result["config_hash"] == "abc" and result["model"]["preset"] == "cpu"
    assert result["n_subjects"] == {"degraded_L1": 1, "gt": 2}
    assert result["total_wall_source"] == "snakemake call"
    text = acc.format_report(result)
    assert "all_degraded *" in text and "Kendall tau = 1.000" in text and "PASS" in text
    json.dumps(result, allow_nan=False)  # JSON-safe


def test_derive_config_paths_split_preset_and_sets(tmp_path):
    cohort = {"cohort": "c", "images": "../data/img/{subject}.nii.gz", "labels": None, "label_names": {"1": "a"},
              "split": {"test_fraction": 0.3, "seed": 1}, "preset": "paper"}
    sets = acc.parse_sets(["inference.ddim_steps=5", "split.val_fraction=0.2", "device=cpu"])
    config = acc.derive_config(cohort, tmp_path, "cpu", 0.2, sets)
    assert config["images"] == str((acc.REPO / "../data/img/{subject}.nii.gz").resolve())
    assert config["labels"] is None and config["results"] == str(tmp_path)
    assert config["split"] == {"test_fraction": 0.2, "seed": 1, "val_fraction": 0.2}
    assert config["preset"] == "cpu" and config["inference"] == {"ddim_steps": 5} and config["device"] == "cpu"
    demo = {"cohort": "demo", "images": "results/demo/data/imagesTr/{subject}.nii.gz", "label_names": {"1": "a"},
            "labels": "results/demo/data/labelsTr/{subject}.nii.gz", "demo": {"enabled": True}}
    config = acc.derive_config(demo, tmp_path, None, 0.2, {})
    assert config["images"] == str(tmp_path / "demo/data/imagesTr/{subject}.nii.gz")
    with pytest.raises(ValueError):
        acc.parse_sets(["novalue"])


def test_partial_run_has_no_wall_verdict(tmp_path):
    bench = tmp_path / "benchmarks"
    write_tsv(bench / "plan.tsv", 4.0, mtime=1_000.0)
    write_tsv(bench / "report.tsv", 10.0)
    report = tmp_path / "report"
    write_parquet(summary_rows(), report / "summary.parquet", {"config_hash": "abc"})
    write_parquet(ranking_rows(), report / "ranking.parquet")
    write_parquet(pd.DataFrame({"cohort": ["syn"], "source": ["gt"], "subject": ["a"], "label": ["foreground"]}),
                  report / "subjects.parquet")
    result = acc.summarise(report, bench, total_wall_s=60.0, since=1_500.0)
    wall = next(c for c in result["targets"] if c["name"] == "total_wall_min")
    assert wall["verdict"] == "n/a (partial run)" and "1 jobs done before" in result["total_wall_source"]


def test_measured_wall_only_from_a_full_run(tmp_path):
    path = tmp_path / "benchmark_accuracy.json"
    assert acc.measured_wall(path) is None
    path.write_text(json.dumps({"total_wall_s": 2000.0, "total_wall_source": "snakemake call"}))
    assert acc.measured_wall(path) == 2000.0
    path.write_text(json.dumps({"total_wall_s": 2000.0, "total_wall_source": "approx.: span of the benchmark files"}))
    assert acc.measured_wall(path) is None
