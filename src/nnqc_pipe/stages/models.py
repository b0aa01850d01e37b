"""Stages of ``rules/models.smk``: the vision expert's embeddings (cached once), the VAE-GAN and the LDM.

Torch is imported inside the functions, so that importing this module (the command line does) stays cheap.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from nnqc_pipe.chunks import fill, record_row, run_chunk, write_chunk_record
from nnqc_pipe.data.io import PathLike, read_json
from nnqc_pipe.data.plan import read_plan
from nnqc_pipe.data.split import read_split
from nnqc_pipe.models import bundle
from nnqc_pipe.models.bundle import import_bundle, require_expert
from nnqc_pipe.qc.calibration import report_fits

log = logging.getLogger(__name__)


def _role_files(split_tsv: PathLike, folder: PathLike, suffix: str, role: str) -> list[str]:
    return [str(Path(folder) / f"{s}{suffix}") for s in read_split(split_tsv)[role]]


def embed(subjects: list[str], npz: str, plan_json: PathLike, settings: dict[str, Any], out: str,
          record: PathLike, device: str = "auto", expert_sha256: str | None = None) -> None:
    """Cache the frozen vision expert's embeddings of every slice of a chunk of subjects (expert loaded once).

    Args:
        subjects: the chunk's subjects.
        npz: preprocessed .npz path pattern with {subject}.
        plan_json: the cohort's plan.json.
        settings: JSON object of the config's model settings (preset, model, expert, perceptual_weights).
        out: embeddings path pattern with {subject}.
        record: the chunk record to write.
        device: auto (CUDA when present), cpu or cuda.
        expert_sha256: weights SHA-256 of the expert a QC model from elsewhere (qc_model) was trained with; another
            expert fails the job ('none': not checked).
    """
    from nnqc_pipe.models.device import resolve_device
    from nnqc_pipe.models.embed import embed_with
    from nnqc_pipe.models.experts import load_vision_expert
    from nnqc_pipe.models.presets import model_settings

    cfg = model_settings(settings, read_plan(plan_json).raw)["encoder"]
    expert = load_vision_expert(cfg, resolve_device(device), fallback_dir=Path(fill(out, subject="_")).parent)
    if expert_sha256:
        require_expert(expert.info, expert_sha256)
    batch_size = int(cfg.get("batch_size", 32))

    def work(subject: str) -> list[dict[str, Any]]:
        path = fill(out, subject=subject)
        embed_with(expert, fill(npz, subject=subject), path, batch_size)
        return [record_row(subject, "embeddings", path)]

    rows = run_chunk(subjects, work, lambda s: f"subject {s!r} ({fill(npz, subject=s)})", "embed")
    write_chunk_record(rows, record)


def import_model(bundle: PathLike, models_dir: PathLike, fingerprint_out: PathLike, plan_out: PathLike) -> None:
    """Use a QC model trained elsewhere (config qc_model): copy its verified bundle into the cohort's results.

    The model card copy gets ``qc_model`` (the bundle's path, training cohort, export date, MANIFEST checksum).

    Args:
        bundle: the bundle folder (written by nnqc-pipe export-model).
        models_dir: the cohort's models folder (vae.pt, ldm.pt, model_card.json).
        fingerprint_out: the cohort's fingerprint.json: the training cohort's fingerprint.
        plan_out: the cohort's plan.json: the plan the model was trained with.
    """
    import_bundle(bundle, models_dir, fingerprint_out, plan_out)


def export_model(results_dir: PathLike, out: PathLike, force: bool = False,
                 expert_checkpoint: PathLike | None = None) -> Path:
    """``nnqc-pipe export-model``: the bundle of a cohort's trained model (:func:`nnqc_pipe.models.bundle.
    export_model`) with its report's calibration map and opinion fusion, when the report was written with these
    networks and fitted them (:func:`nnqc_pipe.qc.calibration.report_fits`), for cohorts without labels."""
    results = Path(results_dir)
    card = results / "models" / "model_card.json"
    checkpoints = read_json(card).get("checkpoints", {}) if card.is_file() else {}
    fits = report_fits(results / "report" / "subjects.parquet", checkpoints)
    return bundle.export_model(results, out, force=force, expert_checkpoint=expert_checkpoint, fits=fits)


def train_vae(split_tsv: PathLike, preprocessed_dir: PathLike, plan_json: PathLike, settings: dict[str, Any],
              out_dir: PathLike, device: str = "auto", seed: int = 0) -> None:
    """Train (or resume) the VAE-GAN on the training subjects' GT slices.

    Args:
        split_tsv: the split (train and val subjects).
        preprocessed_dir: folder of the preprocessed {subject}.npz files.
        plan_json: the cohort's plan.json.
        settings: JSON object of the config's model settings.
        out_dir: models folder (vae.pt, vae_curves.csv).
        device: auto, cpu or cuda.
        seed: training seed.
    """
    from nnqc_pipe.models.presets import model_settings
    from nnqc_pipe.models.train_vae import train_vae as train_vae_model

    plan_ = read_plan(plan_json).raw
    train_vae_model(_role_files(split_tsv, preprocessed_dir, ".npz", "train"),
                    _role_files(split_tsv, preprocessed_dir, ".npz", "val"),
                    plan_, model_settings(settings, plan_), out_dir, device, seed)


def train_ldm(split_tsv: PathLike, preprocessed_dir: PathLike, embeddings_dir: PathLike, plan_json: PathLike,
              settings: dict[str, Any], vae: PathLike, out_dir: PathLike, device: str = "auto",
              seed: int = 0) -> None:
    """Train (or resume) the conditioned latent diffusion model.

    Args:
        split_tsv: the split (train and val subjects).
        preprocessed_dir: folder of the preprocessed {subject}.npz files.
        embeddings_dir: folder of the cached {subject}.npz embeddings.
        plan_json: the cohort's plan.json.
        settings: JSON object of the config's model settings.
        vae: the trained vae.pt.
        out_dir: models folder (ldm.pt, ldm_curves.csv, model_card.json).
        device: auto, cpu or cuda.
        seed: training seed.
    """
    from nnqc_pipe.models.presets import model_settings
    from nnqc_pipe.models.train_ldm import train_ldm as train_ldm_model

    plan_ = read_plan(plan_json).raw
    train_ldm_model(
        _role_files(split_tsv, preprocessed_dir, ".npz", "train"),
        _role_files(split_tsv, preprocessed_dir, ".npz", "val"),
        _role_files(split_tsv, embeddings_dir, ".npz", "train"),
        _role_files(split_tsv, embeddings_dir, ".npz", "val"),
        plan_, model_settings(settings, plan_), vae, out_dir, device, seed,
    )
