"""Stage of ``rules/report.smk``: the report tables with provenance metadata, the decisions, and the figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from nnqc_pipe import __version__
from nnqc_pipe.chunks import fill, read_chunk_records
from nnqc_pipe.data.io import PathLike, file_sha256, read_json, write_parquet
from nnqc_pipe.data.plan import read_plan
from nnqc_pipe.qc.baselines import agreement_table
from nnqc_pipe.qc.decisions import VerdictThresholds
from nnqc_pipe.report import figures
from nnqc_pipe.report.review import error_region_table, write_selected_masks
from nnqc_pipe.report.tables import write_report


def verdict_thresholds(report_cfg: dict[str, Any]) -> VerdictThresholds:
    """The verdict thresholds of the config's ``report`` section."""
    return VerdictThresholds(fail_dsc=report_cfg["fail_dsc"], pass_dsc=report_cfg["qc_pass_dsc"],
                             review_uncertainty=report_cfg["review_uncertainty"],
                             fail_risk=report_cfg["fail_risk"], review_risk=report_cfg["review_risk"])


def max_missed_failures(report_cfg: dict[str, Any]) -> float | None:
    """The share of labelled failures the learned pass threshold may let pass (``report.pass_threshold:
    learned``), or None: the configured ``qc_pass_dsc`` as it is (``fixed``)."""
    return report_cfg["max_missed_failures"] if report_cfg["pass_threshold"] == "learned" else None


def report(score_chunks: list[PathLike], out_dir: PathLike, cohort: str, settings: dict[str, Any],
           config_digest: str, model_dir: PathLike, plan_json: PathLike, fingerprint_json: PathLike, inspect: str,
           candidates: dict[str, str], pgt: str, selected: str, figures_dir: PathLike, results_dir: PathLike,
           learned: str | None = None) -> None:
    """The report tables and decisions (with provenance metadata) and the figures of the HTML report.

    Args:
        score_chunks: the score chunk records (they list the scores files).
        out_dir: report folder.
        cohort: the cohort name.
        settings: JSON object of the config's report section (thresholds, n_overlays, ...) with the selection
            section under "selection", the QC opinions computed (the config's methods) under "methods" and, with
            the repair stage, its two source names under "repair_sources".
        config_digest: hash of the config (provenance).
        model_dir: folder with vae.pt, ldm.pt, model_card.json (and qcnet.pt, latent_vae.pt when their opinions
            are on).
        plan_json: the cohort's plan.json (slicing axis of the review regions).
        fingerprint_json: the training fingerprint (ranges of the domain-shift flags).
        inspect: ingestion record path pattern with {subject}.
        candidates: JSON object source -> candidate mask path pattern with {subject}.
        pgt: pGT path pattern with {source} and {subject}.
        selected: path pattern with {subject} of the selected mask per subject.
        figures_dir: folder of the figures.
        results_dir: the cohort's results folder (overlays read pGTs and preprocessed stacks there).
        learned: the learned opinion's estimated-truth path pattern with {source} and {subject} ('none': off).
    """
    models = Path(model_dir)
    card = read_json(models / "model_card.json")
    metadata = {
        "pipeline_version": __version__,
        "config_hash": config_digest,
        "checkpoints": {name: file_sha256(models / name)
                        for name, used in (("vae.pt", True), ("ldm.pt", True), ("qcnet.pt", bool(learned)),
                                           ("latent_vae.pt", "latent_search" in settings["methods"])) if used},
        "model_card": card,
        "qc_model_from": card.get("qc_model"),
    }
    thresholds = verdict_thresholds(settings)
    plan_ = read_plan(plan_json)
    chunk_rows = read_chunk_records(score_chunks)
    scores = chunk_rows.loc[chunk_rows["kind"] == "scores"]
    inspect_records = {s: read_json(fill(inspect, subject=s)) for s in sorted(set(scores["subject"]))}
    methods = settings["methods"]
    agreement = (agreement_table(scores[["subject", "source"]], candidates, plan_.label_map)
                 if "agreement" in methods else None)
    tables = write_report(scores["path"].tolist(), out_dir, cohort, settings["qc_pass_dsc"], metadata,
                          thresholds=thresholds,
                          use_pgt_when_all_fail=settings["selection"]["use_pgt_when_all_fail"],
                          review_slices_per_subject=settings["review_slices_per_subject"], agreement=agreement,
                          ood_inputs=(inspect_records, read_json(fingerprint_json)),
                          verdict_score=settings["verdict_score"], methods=methods,
                          repair_sources=settings.get("repair_sources", []),
                          repair_mode=settings["selection"]["repair_sources"],
                          selection_score=settings["selection"]["score"],
                          prior_fits=(card.get("qc_model") or {}).get("fits"),
                          max_missed_failures=max_missed_failures(settings))
    regions = error_region_table(tables["subjects"], candidates, pgt, plan_.slicing_axis)
    if learned:
        regions = pd.concat([regions, error_region_table(tables["subjects"], candidates, learned, plan_.slicing_axis,
                                                         opinion="learned")], ignore_index=True)
    write_parquet(regions, Path(out_dir) / "error_regions.parquet", metadata)
    write_selected_masks(tables["selection"], candidates, pgt, selected)
    write_figures(tables, Path(figures_dir), Path(results_dir), candidates, settings, thresholds)


def write_figures(tables: dict, folder: Path, results_dir: Path, candidates: dict[str, str],
                  settings: dict[str, Any], thresholds: VerdictThresholds) -> None:
    """Every figure of the HTML report."""
    subjects = tables["subjects"]
    for metric in ("dsc", "hd95_mm"):
        figures.plot_predicted_vs_real(subjects, metric, folder / f"predicted_vs_real_{metric}.png")
    figures.plot_mae_per_level(tables["summary"], folder / "mae_per_level.png")
    figures.plot_predicted_distributions(subjects, folder / "predicted_distributions.png")
    figures.plot_verdicts(subjects, folder / "verdicts.png")
    figures.plot_risk_coverage(subjects, folder / "risk_coverage.png", thresholds.fail_dsc)
    figures.plot_methods(tables["methods"], subjects, folder / "methods.png")
    figures.write_methods_table(tables["methods"], subjects, folder / "methods.html")
    figures.plot_worst_overlays(subjects, results_dir, candidates, settings["n_overlays"],
                                folder / "worst_overlays.png")
    figures.plot_review_gallery(subjects, results_dir, candidates, settings["n_overlays"],
                                folder / "review_gallery.png")
