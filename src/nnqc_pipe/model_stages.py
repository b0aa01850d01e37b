"""One function per workflow rule that runs a network: embed, train_vae, train_ldm, infer.

``embed`` and ``infer`` process a chunk of subjects per call (:mod:`nnqc_pipe.chunks`): the networks are loaded
once per chunk and the chunk's subjects run one after the other with them.
"""

from __future__ import annotations

import logging
import os
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import presets
from .chunks import fill, record_row, run_chunk, task_list, write_chunk_record
from .config import deep_merge
from .device import resolve_device
from .embed import embed_with
from .infer import infer_subject, save_inference
from .io import read_json
from .models.experts import load_vision_expert
from .preprocess import Preprocessed, load_preprocessed
from .sampling import load_models
from .split import read_split
from .train_ldm import train_ldm as train_ldm_model
from .train_vae import train_vae as train_vae_model

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def model_settings(settings: dict[str, Any], plan_: dict[str, Any]) -> dict[str, Any]:
    """The resolved model preset from the config's ``preset``, ``model``, ``expert`` and ``perceptual_weights``."""
    encoder = {**settings["expert"], "tiny_checkpoint": settings.get("tiny_checkpoint")}
    overrides = deep_merge(settings["model"], {"encoder": encoder})
    if settings.get("perceptual_weights"):
        overrides = deep_merge(overrides, {"vae": {"perceptual": {"weights": settings["perceptual_weights"]}}})
    return presets.resolve(settings["preset"], overrides, plan_)


def _role_files(split_tsv: PathLike, folder: PathLike, suffix: str, role: str) -> list[str]:
    return [str(Path(folder) / f"{s}{suffix}") for s in read_split(split_tsv)[role]]


def embed(subjects: list[str], npz: str, plan_json: PathLike, settings: dict[str, Any], device: str,
          out: str, record: PathLike) -> None:
    """Cache the frozen vision expert's embeddings of every slice of a chunk of subjects (``npz`` and ``out``:
    patterns with ``{subject}``); the expert is loaded once for the chunk."""
    cfg = model_settings(settings, read_json(plan_json))["encoder"]
    fallback_dir = Path(fill(out, subject="_")).parent
    expert = load_vision_expert(cfg, resolve_device(device), fallback_dir=fallback_dir)
    batch_size = int(cfg.get("batch_size", 32))

    def work(subject: str) -> list[dict[str, Any]]:
        path = fill(out, subject=subject)
        embed_with(expert, fill(npz, subject=subject), path, batch_size)
        return [record_row(subject, "embeddings", path)]

    rows = run_chunk(subjects, work, lambda s: f"subject {s!r} ({fill(npz, subject=s)})", "embed")
    write_chunk_record(rows, record)


def train_vae(split_tsv: PathLike, preprocessed_dir: PathLike, plan_json: PathLike, settings: dict[str, Any],
              out_dir: PathLike, device: str, seed: int) -> None:
    """Train (or resume) the VAE-GAN on the training subjects' GT slices."""
    plan_ = read_json(plan_json)
    train_vae_model(_role_files(split_tsv, preprocessed_dir, ".npz", "train"),
                    _role_files(split_tsv, preprocessed_dir, ".npz", "val"),
                    plan_, model_settings(settings, plan_), out_dir, device, seed)


def train_ldm(split_tsv: PathLike, preprocessed_dir: PathLike, embeddings_dir: PathLike, plan_json: PathLike,
              settings: dict[str, Any], vae: PathLike, out_dir: PathLike, device: str, seed: int) -> None:
    """Train (or resume) the conditioned latent diffusion model."""
    plan_ = read_json(plan_json)
    train_ldm_model(
        _role_files(split_tsv, preprocessed_dir, ".npz", "train"),
        _role_files(split_tsv, preprocessed_dir, ".npz", "val"),
        _role_files(split_tsv, embeddings_dir, ".npz", "train"),
        _role_files(split_tsv, embeddings_dir, ".npz", "val"),
        plan_, model_settings(settings, plan_), vae, out_dir, device, seed,
    )


def subject_seed(seed: int, subject: str) -> int:
    """Sampling seed of a subject: the same noise for every source, so sources are compared fairly."""
    return (seed * 1_000_003 + zlib.crc32(subject.encode())) % 2**31


def infer(tasks: dict[str, list[str]], npz: str, embeddings: str | None, candidates: dict[str, str],
          model_dir: PathLike, inference: dict[str, Any], device: str, seed: int, out_pgt: str, out_slices: str,
          out_errors: str | None, record: PathLike) -> None:
    """pGTs of a chunk's candidates on their original grids, with per-slice facts and error maps.

    ``tasks``: source -> subjects; ``candidates``: source -> path pattern with ``{subject}``; ``npz`` and
    ``embeddings``: patterns with ``{subject}``; ``out_*``: patterns with ``{source}`` and ``{subject}``. The VAE and
    LDM are loaded once; the subjects run one after the other, each subject's sources together (its preprocessed
    stack read once), each with :func:`nnqc_pipe.infer.infer_subject`.
    """
    models = load_models(model_dir, device)

    @lru_cache(maxsize=1)
    def preprocessed(subject: str) -> Preprocessed:
        return load_preprocessed(fill(npz, subject=subject))

    def work(task: tuple[str, str]) -> list[dict[str, Any]]:
        subject, source = task
        pgt, slices = fill(out_pgt, source=source, subject=subject), fill(out_slices, source=source, subject=subject)
        errors = fill(out_errors, source=source, subject=subject) if out_errors else None
        pre = preprocessed(subject)
        result = infer_subject(models, pre, fill(candidates[source], subject=subject),
                               fill(embeddings, subject=subject) if embeddings else None, inference,
                               subject_seed(seed, subject))
        save_inference(result, pre.record, pgt, slices, errors)
        log.info("%s/%s: pGT of %d slices written to %s", source, subject, len(result.slices), pgt)
        rows = [record_row(subject, "pgt", pgt, source), record_row(subject, "slices", slices, source)]
        return rows + ([record_row(subject, "errors", errors, source)] if errors else [])

    def describe(task: tuple[str, str]) -> str:
        subject, source = task
        return f"subject {subject!r} source {source} (candidate {fill(candidates[source], subject=subject)})"

    write_chunk_record(run_chunk(task_list(tasks), work, describe, "infer"), record)
