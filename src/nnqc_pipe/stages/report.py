"""Stage of ``rules/report.smk``: the report tables with provenance metadata, and the figures."""

from __future__ import annotations

from pathlib import Path

from nnqc_pipe import __version__
from nnqc_pipe.chunks import recorded_files
from nnqc_pipe.data.io import PathLike, file_sha256, read_json
from nnqc_pipe.report.figures import plot_mae_per_level, plot_predicted_vs_real, plot_worst_overlays
from nnqc_pipe.report.tables import write_report


def report(score_chunks: list[PathLike], out_dir: PathLike, cohort: str, qc_pass_dsc: float, config_digest: str,
           model_dir: PathLike, figures_dir: PathLike, results_dir: PathLike, n_overlays: int = 6) -> None:
    """The report tables (with provenance metadata) and the figures of the HTML report.

    Args:
        score_chunks: the score chunk records (they list the scores files).
        out_dir: report folder.
        cohort: the cohort name.
        qc_pass_dsc: predicted DSC below which a candidate fails qc_pass.
        config_digest: hash of the config (provenance).
        model_dir: folder with vae.pt, ldm.pt and model_card.json.
        figures_dir: folder of the figures.
        results_dir: the cohort's results folder (overlays read pGTs and preprocessed stacks there).
        n_overlays: number of worst candidates shown as overlays.
    """
    models = Path(model_dir)
    metadata = {
        "pipeline_version": __version__,
        "config_hash": config_digest,
        "checkpoints": {name: file_sha256(models / name) for name in ("vae.pt", "ldm.pt")},
        "model_card": read_json(models / "model_card.json"),
    }
    tables = write_report(recorded_files(score_chunks, "scores"), out_dir, cohort, qc_pass_dsc, metadata)
    figures = Path(figures_dir)
    for metric in ("dsc", "hd95_mm"):
        plot_predicted_vs_real(tables["subjects"], metric, figures / f"predicted_vs_real_{metric}.png")
    plot_mae_per_level(tables["summary"], figures / "mae_per_level.png")
    plot_worst_overlays(tables["subjects"], results_dir, n_overlays, figures / "worst_overlays.png")
