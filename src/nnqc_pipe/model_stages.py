"""One function per workflow rule that runs a network: embed, train_vae, train_ldm, infer."""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from typing import Any

from . import presets
from .config import deep_merge
from .embed import embed_subject
from .infer import infer_subject, save_inference
from .io import read_json
from .preprocess import load_preprocessed
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


def embed(npz: PathLike, plan_json: PathLike, settings: dict[str, Any], device: str, out: PathLike) -> None:
    """Cache the frozen vision expert's embeddings of every slice of one subject."""
    cfg = model_settings(settings, read_json(plan_json))
    embed_subject(npz, out, cfg["encoder"], device)


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


def infer(source: str, subject: str, npz: PathLike, embeddings: PathLike | None, candidate: PathLike,
          model_dir: PathLike, inference: dict[str, Any], device: str, seed: int, out_pgt: PathLike,
          out_slices: PathLike, out_errors: PathLike | None) -> None:
    """pGT of one candidate (source) of one subject on the original grid, with per-slice facts and error map."""
    models = load_models(model_dir, device)
    pre = load_preprocessed(npz)
    result = infer_subject(models, pre, candidate, embeddings, inference, subject_seed(seed, subject))
    save_inference(result, pre.record, out_pgt, out_slices, out_errors)
    log.info("%s/%s: pGT of %d slices written to %s", source, subject, len(result.slices), out_pgt)


