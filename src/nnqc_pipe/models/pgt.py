"""Pseudo ground truth (pGT) generation: candidate + slice position + image features -> DDIM -> decoded mask.

Used by LDM validation during training and by the inference rule. All slices of a subject are processed in
batches (``n_samples`` noise draws per slice in the same batch) under ``torch.inference_mode``; noise is drawn
per slice from one seeded generator, so results do not depend on the batch size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from nnqc_pipe.models.autoencoder import build_autoencoder, latent_factor, one_hot
from nnqc_pipe.models.device import resolve_device
from nnqc_pipe.models.ldm import ConditionalLDM, ddim_scheduler, drop_image, spatial_condition
from nnqc_pipe.models.training import read_checkpoint


@dataclass
class PGTModels:
    """Everything sampling needs: the decoder side of the autoencoder, the (EMA) LDM and the latent scale."""

    vae: torch.nn.Module
    ldm: ConditionalLDM
    scale_factor: float
    cfg: dict[str, Any]
    device: torch.device

    @property
    def n_classes(self) -> int:
        """Number of classes including background."""
        return int(self.cfg["n_classes"])

    @property
    def latent_factor(self) -> int:
        """Down-sampling factor between slices and latents."""
        return latent_factor(self.cfg["vae"]["channels"])

    @property
    def needs_image(self) -> bool:
        """Whether the UNet takes the image slices as input channels (``ldm.image_input``)."""
        return bool(self.cfg["ldm"]["image_input"])

    def condition(self, candidate: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's spatial condition for class-index candidates [B, H, W] and image slices [B, H, W]."""
        return spatial_condition(candidate, image, self.cfg, self.vae, self.scale_factor)


class PGT(NamedTuple):
    """Mean class probabilities [S, C, H, W] over samples and a per-slice uncertainty [S] in [0, 1]."""

    probabilities: np.ndarray
    uncertainty: np.ndarray


def load_models(model_dir: str | os.PathLike, device: str = "auto") -> PGTModels:
    """Load ``vae.pt`` (best weights) and ``ldm.pt`` (best EMA weights + scale factor) in ``model_dir``."""
    dev = resolve_device(device)
    vae_ckpt = read_checkpoint(Path(model_dir) / "vae.pt")
    ldm_ckpt = read_checkpoint(Path(model_dir) / "ldm.pt")
    vae = build_autoencoder(vae_ckpt["ae_kwargs"])
    vae.load_state_dict(vae_ckpt["best_model"])
    ldm = ConditionalLDM(ldm_ckpt["unet_kwargs"], ldm_ckpt["toe_kwargs"])
    ldm.load_state_dict(ldm_ckpt["best_model"])
    return PGTModels(
        vae=vae.to(dev).eval(),
        ldm=ldm.to(dev).eval(),
        scale_factor=float(ldm_ckpt["scale_factor"]),
        cfg=ldm_ckpt["cfg"],
        device=dev,
    )


def _repeat(array: np.ndarray | None, index: slice, times: int, device: torch.device) -> torch.Tensor | None:
    if array is None:
        return None
    return torch.as_tensor(np.asarray(array[index]), dtype=torch.float32, device=device).repeat_interleave(times, 0)


@torch.inference_mode()
def generate_pgt(
    models: PGTModels,
    candidate: np.ndarray,
    slice_ratio: np.ndarray,
    embeddings: dict[str, np.ndarray] | None = None,
    image: np.ndarray | None = None,
    ddim_steps: int = 20,
    n_samples: int = 1,
    batch_size: int = 32,
    seed: int = 0,
    start_strength: float = 1.0,
    image_guidance: float = 1.0,
) -> PGT:
    """pGT for every slice of a subject.

    ``candidate`` [S, H, W] class indices on the preprocessed grid, ``slice_ratio`` [S], ``embeddings`` the
    subject's E2 cache (``pooled``, ``tokens``; needed for conditioning modes ``image`` and ``full``), ``image``
    [S, H, W] the preprocessed image slices (needed when the model was trained with ``ldm.image_input``).
    ``batch_size`` counts network inputs, i.e. slices x samples.

    ``start_strength`` in (0, 1]: 1 starts the reverse diffusion from pure noise (the paper); below 1 it starts
    from the candidate's own latent noised to that fraction of the schedule (an SDEdit start) and runs only the
    remaining DDIM steps, so an on-manifold candidate is kept and a broken one is pulled to the nearest plausible
    mask.

    ``image_guidance`` w: 1 uses the conditional prediction as it is; otherwise each step's prediction is
    ``free + w (conditional - free)``, where ``free`` leaves the image out (classifier-free guidance on the image;
    w > 1 pushes the pGT towards what the image supports). Needs a model trained with ``ldm.image_dropout``.
    """
    if not 0.0 < start_strength <= 1.0:
        raise ValueError(f"start_strength must lie in (0, 1], got {start_strength}")
    guided = image_guidance != 1.0
    if guided and not models.cfg["ldm"].get("image_dropout", 0.0):
        raise ValueError(f"inference.image_guidance {image_guidance} needs a model trained with ldm.image_dropout > 0 "
                         "(this one never learnt the image-free prediction)")
    dev, n_classes = models.device, models.n_classes
    if models.ldm.toe.uses_image and embeddings is None:
        raise ValueError(f"conditioning mode {models.ldm.toe.mode!r} needs the subject's image embeddings")
    if models.needs_image and image is None:
        raise ValueError("this model takes the image slices as input (ldm.image_input); pass the preprocessed image")
    n_slices, height, width = candidate.shape
    latent_shape = (
        models.cfg["vae"]["latent_channels"],
        height // models.latent_factor,
        width // models.latent_factor,
    )
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n_slices, n_samples, *latent_shape), generator=generator)
    scheduler = ddim_scheduler(models.cfg, ddim_steps)
    timesteps_run = start_timesteps(scheduler, start_strength)
    probabilities = np.empty((n_slices, n_classes, height, width), dtype=np.float32)
    uncertainty = np.empty(n_slices, dtype=np.float32)
    step = max(1, batch_size // n_samples)
    for start in range(0, n_slices, step):
        index = slice(start, min(start + step, n_slices))
        cand = torch.as_tensor(np.asarray(candidate[index]), device=dev).long()
        slices = torch.as_tensor(np.asarray(image[index]), device=dev) if models.needs_image else None
        cand_latent = models.condition(cand, slices).repeat_interleave(n_samples, 0)
        ratio = _repeat(slice_ratio, index, n_samples, dev)
        pooled = _repeat(embeddings["pooled"], index, n_samples, dev) if embeddings is not None else None
        tokens = _repeat(embeddings["tokens"], index, n_samples, dev) if embeddings is not None else None
        context = models.ldm.context(ratio, pooled, tokens)
        free = image_free_condition(models, cand_latent, ratio, pooled, tokens) if guided else None
        latents = noise[index].flatten(0, 1).to(dev)
        if start_strength < 1.0:
            latents = noised_candidate(models, cand, latents, scheduler, int(timesteps_run[0]), n_samples)
        for t in timesteps_run:
            timesteps = torch.full((latents.shape[0],), int(t), device=dev, dtype=torch.long)
            eps = models.ldm.denoise(latents, timesteps, cand_latent, context)
            if free is not None:
                eps_free = models.ldm.denoise(latents, timesteps, *free)
                eps = eps_free + image_guidance * (eps - eps_free)
            latents, _ = scheduler.step(eps, int(t), latents)
        samples = torch.softmax(models.vae.decode(latents / models.scale_factor), dim=1)
        samples = samples.view(-1, n_samples, n_classes, height, width)
        probabilities[index] = samples.mean(1).cpu().numpy()
        uncertainty[index] = slice_uncertainty(samples, cand).cpu().numpy()
    return PGT(probabilities, uncertainty)


@torch.inference_mode()
def reconstruct(models: PGTModels, candidate: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class probabilities [S, C, H, W] of the VAE's reconstruction (decoded encoder mean) of ``candidate`` [S, H, W].

    The input of the VAE-reconstruction baseline (:mod:`nnqc_pipe.qc.baselines`): how far the candidate lies from
    the shapes the autoencoder learnt.
    """
    out = np.empty((candidate.shape[0], models.n_classes, *candidate.shape[1:]), dtype=np.float32)
    for start in range(0, candidate.shape[0], batch_size):
        index = slice(start, start + batch_size)
        cand = torch.as_tensor(np.asarray(candidate[index]), device=models.device).long()
        logits = models.vae.reconstruct(one_hot(cand, models.n_classes))
        out[index] = torch.softmax(logits, dim=1).cpu().numpy()
    return out


def image_free_condition(models: PGTModels, cand_latent: torch.Tensor, ratio: torch.Tensor,
                         pooled: torch.Tensor | None, tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial condition and context of the same batch with the image left out (image guidance's free branch)."""
    keep = torch.zeros(cand_latent.shape[0], dtype=torch.bool, device=cand_latent.device)
    return drop_image(cand_latent, keep, models.cfg), models.ldm.context(ratio, pooled, tokens, keep)


def start_timesteps(scheduler: Any, strength: float) -> torch.Tensor:
    """The DDIM timesteps run from ``strength`` of the schedule down (all of them at strength 1)."""
    steps = scheduler.timesteps
    if strength >= 1.0:
        return steps
    keep = steps <= strength * scheduler.num_train_timesteps
    return steps[keep] if keep.any() else steps[-1:]


def noised_candidate(models: PGTModels, candidate: torch.Tensor, noise: torch.Tensor, scheduler: Any, t0: int,
                     n_samples: int) -> torch.Tensor:
    """The candidate's latent (encoder mean, scaled as in training) noised to timestep ``t0`` with ``noise``."""
    z0 = models.vae.encode(one_hot(candidate, models.n_classes))[0] * models.scale_factor
    z0 = z0.repeat_interleave(n_samples, 0)
    timesteps = torch.full((z0.shape[0],), t0, device=z0.device, dtype=torch.long)
    return scheduler.add_noise(original_samples=z0, noise=noise, timesteps=timesteps)


def slice_uncertainty(samples: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Mean normalised entropy of the sample-averaged probabilities inside the region of interest.

    ``samples`` [B, K, C, H, W] (K draws), ``candidate`` [B, H, W]. The region is every pixel that is
    foreground in any draw or in the candidate, so background far from the structure does not dilute the
    value; a slice with an empty region scores 0. Disagreement between draws and soft decoder outputs both
    raise it.
    """
    mean = samples.mean(1)
    entropy = -(mean * torch.log(mean.clamp_min(1e-8))).sum(1) / math.log(samples.shape[2])
    region = (samples.argmax(2) > 0).any(1) | (candidate > 0)
    return (entropy * region).sum((1, 2)) / region.sum((1, 2)).clamp_min(1)
