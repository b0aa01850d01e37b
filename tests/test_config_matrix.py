"""The config matrix (the Snakemake catalog's `.test/config_*` habit): the workflow end to end on phantoms with
settings the labelled demo does not exercise, checking the decisions the report writes.

- ``decisions``: a user source next to gt and the degraded levels, error maps off, the latent search on (with its
  surrogates saved); the report's verdicts, exclusions, selection (+ selected masks), review lists, baselines and
  latent search; a threshold change reruns only ``report``.
- ``no_expert``: conditioning mode ``none`` (no vision expert, no embed jobs) and ``methods: [nnqc]``.
- ``methods``: an opinion left out of ``methods`` defines no rule (``--list-rules``).
- ``labels: null`` without a QC model: refused at start, saying what to do (with one: tests/test_population.py).
"""

from __future__ import annotations

import re

import nibabel as nib
import pandas as pd
import pytest
from test_workflow import (
    base_config,
    check_flagged_candidates_have_review_items,
    check_predicted_quality_bites,
    constant_predicted_dsc,
    run_snakemake,
    shuffled_predicted_dsc,
)

from nnqc_pipe.data.io import read_parquet_metadata

pytestmark = pytest.mark.slow


def matrix_config(workdir, **extra) -> dict:
    data = workdir / "results" / "e2e" / "data"
    labels = f"{data}/labelsTr/{{subject}}.nii.gz"
    config = base_config(workdir, f"{data}/imagesTr/{{subject}}.nii.gz", labels,
                         demo={"enabled": True, "n_subjects": 6, "seed": 3}, **extra)
    config.setdefault("methods", ["nnqc", "vae_recon", "agreement"])  # the learned opinion: demo and population runs
    return config


@pytest.fixture(scope="module")
def decisions_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("decisions")
    config = matrix_config(workdir, inference={"ddim_steps": 3, "save_error_maps": False,
                                               "save_latent_surrogate": True},
                           methods=["nnqc", "vae_recon", "agreement", "latent_search"])
    config["sources"] = {"manual_copy": config["labels"]}  # a perfect "segmenter": the labels themselves
    proc = run_snakemake(config, workdir)
    assert proc.returncode == 0, "workflow failed"
    return workdir, config, workdir / "results" / "e2e"


def test_error_maps_off_writes_none(decisions_run):
    _, _, out = decisions_run
    assert not (out / "errors").exists()
    assert (out / "report" / "figures" / "worst_overlays.png").stat().st_size > 1000  # overlays need no error maps


def test_verdicts_exclusions_and_baselines(decisions_run):
    _, _, out = decisions_run
    subjects = pd.read_parquet(out / "report" / "subjects.parquet")
    assert set(subjects.verdict) <= {"PASS", "REVIEW", "FAIL"} and subjects.verdict_reason.str.len().gt(0).all()
    assert subjects.risk.between(0, 1).all()
    fg = subjects[subjects.label == "foreground"].set_index(["source", "subject"])
    # gt and the user's copy are compared with each other's consensus: identical masks agree perfectly
    assert (fg.loc["gt", "baseline_agreement_dsc"] == 1.0).all()
    assert fg.loc["degraded_L1", "baseline_agreement_dsc"].lt(0.5).all()
    # every candidate, gt included, has its VAE-reconstruction baseline
    assert subjects.baseline_vae_recon_dsc.between(0, 1).all()
    exclusions = pd.read_csv(out / "report" / "exclusions.tsv", sep="\t")
    assert list(exclusions.columns) == ["subject", "source", "label", "verdict", "risk", "reason"]
    flagged = subjects[subjects.verdict != "PASS"]
    assert len(exclusions) == len(flagged) and set(exclusions.verdict) <= {"REVIEW", "FAIL"}
    assert "degraded_L1" in set(exclusions.source)  # the worst level fails
    summary = pd.read_parquet(out / "report" / "summary.parquet")
    dsc = summary[(summary.metric == "dsc") & (summary.label == "foreground")].set_index("source")
    assert dsc.loc["all", "failure_auc"] >= DECISIONS_FLOORS["min_auc"] and dsc.loc["all", "n_fail"] > 0
    assert {"agreement_dsc", "vae_recon_dsc", "latent_search_dsc"} <= set(summary.metric)


def test_latent_search_opinion(decisions_run):
    """methods lists latent_search: its VAE is trained, every candidate is searched (its surrogate saved), and
    latent_search_dsc reaches the tables and the methods board."""
    _, _, out = decisions_run
    assert (out / "models" / "latent_vae.pt").is_file() and (out / "models" / "latent_vae_curves.csv").is_file()
    subjects = pd.read_parquet(out / "report" / "subjects.parquet")
    assert subjects.latent_search_dsc.between(0, 1).all()
    assert pd.read_parquet(out / "report" / "slices.parquet").latent_search_dsc.notna().any()
    fg = subjects[subjects.label == "foreground"]
    assert len(list((out / "latent_search" / "surrogate").glob("*/*.nii.gz"))) == len(fg)
    board = pd.read_parquet(out / "report" / "methods.parquet")
    assert "latent_search" in set(board.method)


# Floors of this run (tiny preset, 2 epochs, 3 training subjects: a weaker model than the demo's; measured
# 0.72 / 0.89 / 0.94 at the time of writing).
DECISIONS_FLOORS = {"min_rho": 0.55, "min_order_rho": 0.7, "min_auc": 0.8}


def test_predicted_quality_bites(decisions_run):
    """The predicted DSC ranks the candidates like their real DSC and detects the failures; a constant or shuffled
    copy of it does not pass the same check."""
    _, _, out = decisions_run
    subjects = pd.read_parquet(out / "report" / "subjects.parquet")
    check_predicted_quality_bites(subjects, **DECISIONS_FLOORS)
    for mutated in (constant_predicted_dsc(subjects), shuffled_predicted_dsc(subjects)):
        with pytest.raises(AssertionError):
            check_predicted_quality_bites(mutated, **DECISIONS_FLOORS)
    check_flagged_candidates_have_review_items(out / "report")


def test_selection_and_review_lists(decisions_run):
    _, _, out = decisions_run
    split = pd.read_csv(out / "split.tsv", sep="\t")
    test_subjects = sorted(split[split.role == "test"].subject)
    selection = pd.read_parquet(out / "report" / "selection.parquet")
    assert sorted(selection.subject) == test_subjects and set(selection.selected_source) == {"manual_copy"}
    assert (selection.real_dsc == 1.0).all()
    for subject in test_subjects:
        selected = nib.load(out / "selected" / f"{subject}.nii.gz")
        assert selected.shape == nib.load(out / "data" / "imagesTr" / f"{subject}.nii.gz").shape
    meta = read_parquet_metadata(out / "report" / "selection.parquet")
    assert meta["selection_summary"]["selection_real_dsc"] == 1.0
    review = pd.read_parquet(out / "report" / "review.parquet")
    regions = pd.read_parquet(out / "report" / "error_regions.parquet")
    subjects = pd.read_parquet(out / "report" / "subjects.parquet")
    flagged = set(map(tuple, subjects.loc[subjects.verdict != "PASS", ["source", "subject"]].to_numpy()))
    assert set(map(tuple, review[["source", "subject"]].to_numpy())) <= flagged
    assert review["rank"].tolist() == list(range(1, len(review) + 1))
    assert set(regions.kind) <= {"missed", "extra", "class_confusion"} and (regions.volume_mm3 > 0).all()
    for figure in ("verdicts.png", "risk_coverage.png", "review_gallery.png", "predicted_distributions.png"):
        assert (out / "report" / "figures" / figure).stat().st_size > 1000


def test_threshold_change_reruns_only_the_report(decisions_run):
    workdir, config, _ = decisions_run
    changed = {**config, "report": {"fail_risk": 0.8, "review_risk": 0.3, "verdict_score": "calibrated"}}
    proc = run_snakemake(changed, workdir, "-n")
    assert proc.returncode == 0
    jobs = re.findall(r"^(\w+)\s+\d+$", proc.stdout, flags=re.MULTILINE)
    assert "report" in jobs and set(jobs) - {"report", "all", "total"} == set(), proc.stdout[-2000:]


def test_conditioning_mode_none_runs_without_the_vision_expert(tmp_path):
    config = matrix_config(tmp_path, model={"vae": {"epochs": 1}, "ldm": {"epochs": 1, "val_every": 1},
                                            "experts": {"mode": "none"}}, methods=["nnqc"])
    proc = run_snakemake(config, tmp_path)
    assert proc.returncode == 0
    out = tmp_path / "results" / "e2e"
    assert not (out / "embeddings").exists() and not (out / "chunks" / "embed").exists()
    subjects = pd.read_parquet(out / "report" / "subjects.parquet")
    assert subjects.predicted_dsc.notna().all() and len(subjects) > 0
    # methods: [nnqc] leaves no learned rule or file, and no column of a left-out opinion in any table
    assert not (out / "learned").exists() and not (out / "models" / "qcnet.pt").exists()
    assert not (out / "logs" / "train_qcnet.log").exists()
    opinions = {"learned_dsc", "learned_nsd", "combined_dsc", "baseline_vae_recon_dsc", "baseline_agreement_dsc",
                "latent_search_dsc"}
    for table in ("subjects", "slices"):
        assert not opinions & set(pd.read_parquet(out / "report" / f"{table}.parquet").columns), table
    summary = pd.read_parquet(out / "report" / "summary.parquet")
    assert not {"learned_dsc", "combined_dsc", "vae_recon_dsc", "agreement_dsc", "latent_search_dsc"} & set(
        summary.metric)
    board = pd.read_parquet(out / "report" / "methods.parquet")
    assert set(board.method) <= {"nnqc", "calibrated"} and "nnqc" in set(board.method)


LEARNED_RULES = {"train_segmenter", "learned_candidates", "train_qcnet"}
LATENT_RULES = {"train_latent_vae"}


@pytest.mark.parametrize("switch", [{"methods": ["nnqc", "vae_recon"]},
                                    {"methods": ["nnqc", "learned"], "learned": {"enabled": False}}],
                         ids=["methods", "deprecated-learned-enabled"])
def test_a_method_left_out_defines_no_rule(tmp_path, switch):
    """The learned opinion and the latent search left out (by methods:, or the learned opinion by the older
    learned.enabled: false) define none of their rules; listed, they define them all. vae_recon and agreement have
    no rule of their own (infer and report)."""
    listed = run_snakemake(matrix_config(tmp_path, methods=["nnqc", "learned", "latent_search"]), tmp_path,
                           "--list-rules")
    assert listed.returncode == 0 and LEARNED_RULES | LATENT_RULES <= set(listed.stdout.split())
    left_out = run_snakemake({**matrix_config(tmp_path), **switch}, tmp_path, "--list-rules")
    assert left_out.returncode == 0 and not (LEARNED_RULES | LATENT_RULES) & set(left_out.stdout.split())
    assert {"infer", "report"} <= set(left_out.stdout.split())


def test_verdict_scores_without_their_opinions_stop_the_run(tmp_path):
    learned = run_snakemake(matrix_config(tmp_path, report={"verdict_score": "learned"}), tmp_path, "-n")
    assert learned.returncode != 0 and "report.verdict_score: learned needs the learned opinion" in (
        learned.stdout + learned.stderr)
    alone = matrix_config(tmp_path, methods=["nnqc"], report={"verdict_score": "combined"})
    proc = run_snakemake(alone, tmp_path, "-n")
    assert proc.returncode != 0 and "combined fuses the opinions in methods and needs at least two" in (
        proc.stdout + proc.stderr)


def test_labels_null_without_a_qc_model_stops_with_what_to_do(tmp_path):
    """A cohort without ground truth needs a QC model trained elsewhere; without one the run stops at start."""
    config = base_config(tmp_path, f"{tmp_path}/img/{{subject}}.nii.gz", None,
                         sources={"unet": f"{tmp_path}/unet/{{subject}}.nii.gz"})
    proc = run_snakemake(config, tmp_path, "-n")
    assert proc.returncode != 0 and "qc_model" in proc.stdout + proc.stderr
