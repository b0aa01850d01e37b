"""Rule ``train_ldm``: stage 2, the conditional latent diffusion model with the Team of Experts.

Training pairs are made on the fly: a ground-truth slice's latent (from the frozen stage-1 encoder, scaled by
a factor computed once from the training latents and saved) is noised at a random timestep, and the UNet,
given the noisy latent, a corrupted version of the same slice (``degrade.corrupt_slice`` over the whole
severity range, empty masks included) and the Team of Experts context, predicts the noise — or the clean
latent or the velocity, ``noise.prediction_type`` — (MSE with the weights of :meth:`LDMTrainer.loss_weight`).
EMA weights (with a warm-up), gradient clipping, bf16 autocast of the UNet on CUDA only.

Validation samples pGTs (DDIM, EMA weights) for whole validation subjects from candidates corrupted at fixed
severities, and the checkpoint with the best reconstruction Dice of those pGTs is kept, not the lowest loss.

Outputs in ``out_dir``: ``ldm.pt`` (final full training state; best EMA weights under ``best_model``),
``ldm_curves.csv``, ``model_card.json`` and the resumable ``ldm_state.pt``.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from nnqc_pipe import degrade
from nnqc_pipe.data.io import file_sha256, write_json
from nnqc_pipe.dice import class_dice
from nnqc_pipe.models.autoencoder import build_autoencoder, one_hot
from nnqc_pipe.models.device import resolve_device, seed_everything
from nnqc_pipe.models.embed import load_embeddings
from nnqc_pipe.models.ldm import ConditionalLDM, drop_image, noise_scheduler, toe_kwargs, unet_kwargs
from nnqc_pipe.models.pgt import PGTModels, generate_pgt
from nnqc_pipe.models.presets import training_hash
from nnqc_pipe.models.training import (
    RunState,
    SliceSet,
    batches_of,
    fit,
    load_slices,
    load_state,
    progress,
    read_checkpoint,
    seed_epoch,
)

log = logging.getLogger(__name__)

VALIDATION_SEED = 12345


def corrupt_batch(
    labels: np.ndarray, n_classes: int, severities: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """Corrupt each slice of ``labels`` [B, H, W] at its own severity."""
    return np.stack(
        [degrade.corrupt_slice(m, n_classes, float(s), rng) for m, s in zip(labels, severities, strict=True)]
    )


def load_embedding_set(paths: Sequence[str | os.PathLike], data: SliceSet) -> tuple[dict[str, np.ndarray], dict]:
    """Concatenate the subjects' E2 caches (float16) in slice order; also returns the encoder record."""
    caches = [load_embeddings(p, dtype=np.float16) for p in paths]
    counts = np.bincount(data.subject, minlength=len(data.names))
    for path, cache, count in zip(paths, caches, counts, strict=True):
        if cache["pooled"].shape[0] != count:
            raise ValueError(f"{path}: {cache['pooled'].shape[0]} embedded slices, the subject has {count}")
    encoder = caches[0]["encoder"]
    if any(c["encoder"]["weights_sha256"] != encoder["weights_sha256"] for c in caches):
        raise ValueError("embedding caches were made with different encoders; re-run the embed rule")
    arrays = {key: np.concatenate([c[key] for c in caches]) for key in ("pooled", "tokens")}
    return arrays, encoder


@torch.inference_mode()
def encode_latents(vae: torch.nn.Module, labels: np.ndarray, n_classes: int, device: torch.device) -> torch.Tensor:
    """Latent means of ground-truth slices (fp32, on CPU) from the frozen stage-1 encoder."""
    out = []
    for start in range(0, len(labels), 64):
        batch = torch.as_tensor(labels[start : start + 64], device=device)
        out.append(vae.encode(one_hot(batch, n_classes))[0].float().cpu())
    return torch.cat(out)


def validation_cases(val: SliceSet, cfg: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Fixed validation candidates: whole subjects, each corrupted at every ``ldm.val_severities`` value."""
    subjects = np.unique(val.subject)
    keep = subjects[np.linspace(0, len(subjects) - 1, min(len(subjects), cfg["ldm"]["val_max_subjects"])).astype(int)]
    cases = []
    for severity_index, severity in enumerate(cfg["ldm"]["val_severities"]):
        for subject in np.unique(keep):
            rows = np.flatnonzero(val.subject == subject)
            rng = np.random.default_rng([seed, VALIDATION_SEED, severity_index, int(subject)])
            label = val.label[rows]
            candidate = corrupt_batch(label, int(cfg["n_classes"]), [severity] * len(rows), rng)
            cases.append({"severity": float(severity), "rows": rows, "label": label, "candidate": candidate})
    return cases


def validate(
    models: PGTModels,
    cases: list[dict[str, Any]],
    val: SliceSet,
    embeddings: dict | None,
    cfg: dict[str, Any],
) -> dict[str, float]:
    """Validation scores of the pGTs of the validation cases, per severity and overall.

    ``val_dice``: mean per-subject pGT Dice against the GT. ``val_qc``: 1 − the QC error, the mean absolute
    difference between the predicted DSC (candidate vs pGT) and the real DSC (candidate vs GT) — what the tool is
    judged by; with clean and lightly corrupted severities among ``ldm.val_severities`` it covers the
    high-quality regime. ``ldm.select_on`` names the score whose best epoch is kept.
    """
    by_severity: dict[float, list[float]] = {}
    errors: dict[float, list[float]] = {}
    for case in cases:
        emb = {k: v[case["rows"]] for k, v in embeddings.items()} if embeddings is not None else None
        pgt = generate_pgt(
            models,
            case["candidate"],
            val.slice_ratio[case["rows"]],
            emb,
            image=val.image[case["rows"]] if val.image is not None else None,
            ddim_steps=cfg["ldm"]["val_ddim_steps"],
            n_samples=1,
            batch_size=cfg["inference"]["batch_size"],
            seed=VALIDATION_SEED,
            start_strength=cfg["ldm"]["val_start_strength"],
        )
        pgt_mask = pgt.probabilities.argmax(1)
        dice = class_dice(pgt_mask, case["label"], models.n_classes).mean()
        by_severity.setdefault(case["severity"], []).append(float(dice))
        predicted = class_dice(case["candidate"], pgt_mask, models.n_classes).mean()
        real = class_dice(case["candidate"], case["label"], models.n_classes).mean()
        errors.setdefault(case["severity"], []).append(abs(float(predicted - real)))
    scores = {f"val_dice_s{s:g}": float(np.mean(v)) for s, v in by_severity.items()}
    qc = {f"val_qc_mae_s{s:g}": float(np.mean(v)) for s, v in errors.items()}
    summary = {"val_dice": float(np.mean(list(scores.values()))),
               "val_qc": 1.0 - float(np.mean(list(qc.values())))}
    return summary | scores | qc


def candidate_scores(cases: list[dict[str, Any]], n_classes: int) -> dict[str, float]:
    """Dice of the validation candidates themselves (what the pGT must beat), per severity."""
    by_severity: dict[float, list[float]] = {}
    for case in cases:
        dice = class_dice(case["candidate"], case["label"], n_classes).mean()
        by_severity.setdefault(case["severity"], []).append(float(dice))
    return {f"candidate_dice_s{s:g}": float(np.mean(v)) for s, v in by_severity.items()}


def ema_update(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor | int], None]:
    """EMA update for ``AveragedModel`` whose decay warms up as ``min(decay, (1 + n) / (10 + n))``.

    With a fixed decay, short runs keep a large share of the random initial weights in the average (0.995 after
    150 steps still weighs them ~0.47); the warm-up lets the average follow the model early on.
    """

    @torch.no_grad()
    def update(ema: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor | int) -> None:
        weight = 1.0 - min(decay, (1 + int(n_averaged)) / (10 + int(n_averaged)))
        for average, value in zip(ema, current, strict=True):
            average.lerp_(value, weight)

    return update


def augment_intensity(image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Normalised image slices [B, H, W] with a random gain in [0.8, 1.25] and offset in [-0.2, 0.2] per slice."""
    gain = np.exp(rng.uniform(np.log(0.8), np.log(1.25), (len(image), 1, 1)))
    offset = rng.uniform(-0.2, 0.2, (len(image), 1, 1))
    return torch.as_tensor((image.astype(np.float32) * gain + offset).astype(np.float32))


@dataclass
class LDMData:
    """What an LDM run trains and validates on: the training slices with their scaled latents and embeddings, the
    spatial condition of the pGT models, the validation cases and slices, the seed."""

    train: SliceSet
    latents: torch.Tensor
    embeddings: dict | None
    models: PGTModels
    cases: list[dict[str, Any]]
    val: SliceSet
    val_embeddings: dict | None
    seed: int


class LDMTrainer:
    """One LDM training run: the conditional UNet + ToE, its EMA copy, optimiser and warm-up schedule (a
    :class:`nnqc_pipe.models.training.Trainer` once :meth:`attach` has given it its :class:`LDMData`)."""

    kind = "ldm"

    def __init__(self, cfg: dict[str, Any], toe_args: dict[str, Any], device: torch.device) -> None:
        self.cfg, self.lcfg, self.device = cfg, cfg["ldm"], device
        self.selection_key = self.lcfg["select_on"]
        self.unet_args, self.toe_args = unet_kwargs(cfg), toe_args
        self.model = ConditionalLDM(self.unet_args, toe_args).to(device)
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_update(self.lcfg["ema_decay"]), use_buffers=True)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lcfg["lr"])
        warmup = max(1, int(self.lcfg["warmup_steps"]))
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / warmup))
        self.noise = noise_scheduler(cfg)
        self.data: LDMData | None = None
        self.n_slices = 0

    def attach(self, data: LDMData) -> None:
        """The data of the run."""
        self.data, self.n_slices = data, len(data.train)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch over the attached training slices."""
        d = self.data
        return self.train_epoch(d.train, d.latents, d.embeddings, d.models.condition, epoch, d.seed)

    def validate(self, epoch: int, final: bool) -> dict[str, float]:
        """pGT Dice of the validation cases every ``ldm.val_every`` epochs and at the end; ``{}`` otherwise."""
        if epoch % self.lcfg["val_every"] and not final:
            return {}
        self.data.models.ldm.eval()
        return validate(self.data.models, self.data.cases, self.data.val, self.data.val_embeddings, self.cfg)

    def selected_weights(self) -> dict[str, torch.Tensor]:
        """The EMA weights (what inference uses)."""
        return self.ema.module.state_dict()

    def load(self, state: dict[str, Any]) -> None:
        """Restore model, EMA, optimiser and LR schedule from a saved state."""
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])

    def train_epoch(
        self,
        data: SliceSet,
        latents: torch.Tensor,
        embeddings: dict | None,
        condition: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
        epoch: int,
        seed: int,
    ) -> dict[str, float]:
        """One pass over the training slices with fresh corruptions, noise and timesteps.

        ``condition`` turns class-index candidates (and image slices) into the UNet's spatial condition; the
        image slices get a random intensity scale and shift per slice, so the network learns shapes and
        contrast edges rather than one cohort's exact intensities.
        """
        rng = seed_epoch(seed, epoch, stream=1)
        mix = self.lcfg["severity_mix"]
        self.model.train()
        batches = batches_of(rng.permutation(len(data)), self.lcfg["batch_size"])
        total = 0.0
        for index in progress(batches, len(batches), f"ldm epoch {epoch + 1}"):
            labels = data.label[index]
            severities = [degrade.sample_severity(rng, **mix) for _ in index]
            candidates = corrupt_batch(labels, self.cfg["n_classes"], severities, rng)
            emb = (
                {k: torch.as_tensor(v[index], device=self.device) for k, v in embeddings.items()} if embeddings else {}
            )
            image = augment_intensity(data.image[index], rng) if data.image is not None else None
            cand = condition(torch.as_tensor(candidates, device=self.device), image)
            keep = self.image_kept(rng, len(index))
            if keep is not None:
                cand = drop_image(cand, keep, self.cfg)
            total += self.train_step(latents[index].to(self.device), cand, data.slice_ratio[index], emb, keep)
        return {"loss": total / len(batches), "steps": len(batches), "lr": self.lr_schedule.get_last_lr()[0]}

    def image_kept(self, rng: np.random.Generator, n: int) -> torch.Tensor | None:
        """Per sample, whether the image condition is kept (``ldm.image_dropout``); None when nothing is dropped.

        Training some samples without the image teaches the image-free prediction that image guidance
        (``inference.image_guidance``) extrapolates away from.
        """
        rate = float(self.lcfg["image_dropout"])
        if rate <= 0:
            return None
        return torch.as_tensor(rng.random(n) >= rate, device=self.device)

    def train_step(self, z0: torch.Tensor, cand: torch.Tensor, ratio: np.ndarray, emb: dict,
                   keep_image: torch.Tensor | None = None) -> float:
        """Weighted MSE of the prediction (ε, x0 or v) on one batch; clipped gradient step; EMA update."""
        noise = torch.randn_like(z0)
        timesteps = torch.randint(0, self.noise.num_train_timesteps, (z0.shape[0],), device=self.device)
        noisy = self.noise.add_noise(original_samples=z0, noise=noise, timesteps=timesteps)
        ratio_t = torch.as_tensor(ratio, device=self.device)
        pred = self.model(noisy, timesteps, cand, ratio_t, emb.get("pooled"), emb.get("tokens"), keep_image)
        per_sample = F.mse_loss(pred, self.target(z0, noise, timesteps), reduction="none").flatten(1).mean(1)
        loss = (per_sample * self.loss_weight(timesteps)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.lcfg["grad_clip"])
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.update_parameters(self.model)
        return loss.item()

    def target(self, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network predicts (``noise.prediction_type``): the noise, the clean latent or the velocity."""
        kind = self.noise.prediction_type
        if kind == "sample":
            return z0
        if kind == "v_prediction":
            return self.noise.get_velocity(z0, noise, timesteps)
        return noise

    def loss_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights: Min-SNR-γ (Hang et al. 2023) for ε and v, uniform for x0 prediction.

        Low-noise steps dominate a plain ε loss; capping their weight (``min(SNR, γ) / SNR`` for ε,
        ``min(SNR, γ) / (SNR + 1)`` for v) lets the network learn early what the high-noise steps need — using
        the candidate and the context — which decides the layout of a sample. An unweighted x0 loss already
        gives the high-noise steps, where the pGT is read off the condition alone, their full weight.
        """
        gamma, kind = self.lcfg["min_snr_gamma"], self.noise.prediction_type
        if not gamma or kind == "sample":
            return torch.ones_like(timesteps, dtype=torch.float32)
        alpha_bar = self.noise.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alpha_bar / (1 - alpha_bar)
        return snr.clamp(max=gamma) / (snr + 1 if kind == "v_prediction" else snr)

    def state(self, **extra: Any) -> dict[str, Any]:
        """The full training state plus run bookkeeping in ``extra``."""
        return {
            "kind": "ldm",
            "unet_kwargs": self.unet_args,
            "toe_kwargs": self.toe_args,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            **extra,
        }


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_card(
    cfg: dict[str, Any],
    vae_ckpt: dict[str, Any],
    ldm_state: dict[str, Any],
    encoder: dict[str, Any],
    checkpoints: dict[str, Path],
    device: torch.device,
    params: dict[str, int],
) -> dict[str, Any]:
    """What was trained, with what, how well and how long; checkpoint hashes for the report metadata."""
    return {
        "preset": cfg["preset"],
        "patch_size": cfg["patch_size"],
        "n_classes": cfg["n_classes"],
        "conditioning_mode": cfg["experts"]["mode"],
        "encoder": encoder,
        "perceptual_loss": vae_ckpt["perceptual"],
        "scale_factor": ldm_state["scale_factor"],
        "vae": {
            "channels": cfg["vae"]["channels"],
            "latent_channels": cfg["vae"]["latent_channels"],
            "parameters": params["vae"],
            "best_val_dice": vae_ckpt["best_score"],
            "best_epoch": vae_ckpt["best_epoch"],
            "epochs": vae_ckpt["epoch"],
            "seconds": vae_ckpt["seconds"],
            "config_hash": vae_ckpt["config_hash"],
        },
        "ldm": {
            "channels": cfg["ldm"]["channels"],
            "parameters": params["ldm"],
            "best_val_dice": ldm_state["best_scores"].get("val_dice"),
            "best_val_qc": ldm_state["best_scores"].get("val_qc"),
            "selected_on": cfg["ldm"]["select_on"],
            "best_epoch": ldm_state["best_epoch"],
            "best_scores": ldm_state["best_scores"],
            "candidate_scores": ldm_state["candidate_scores"],
            "val_severities": cfg["ldm"]["val_severities"],
            "val_ddim_steps": cfg["ldm"]["val_ddim_steps"],
            "epochs": ldm_state["epoch"],
            "seconds": ldm_state["seconds"],
            "stopped": ldm_state.get("stopped"),
            "config_hash": ldm_state["config_hash"],
        },
        "checkpoints": {name: file_sha256(path) for name, path in checkpoints.items()},
        "device": str(device),
        "versions": {
            "torch": torch.__version__,
            "monai": monai.__version__,
            "python": platform.python_version(),
        },
    }


def train_ldm(
    train_npz: Sequence[str | os.PathLike],
    val_npz: Sequence[str | os.PathLike],
    train_emb: Sequence[str | os.PathLike] | None,
    val_emb: Sequence[str | os.PathLike] | None,
    plan: dict[str, Any],
    cfg: dict[str, Any],
    vae_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: str,
    seed: int,
) -> None:
    """Train (or resume) the LDM; write ``ldm.pt``, ``ldm_curves.csv``, ``model_card.json``, ``ldm_state.pt``.

    ``train_emb``/``val_emb`` list the subjects' embedding caches in the order of ``train_npz``/``val_npz``;
    they are read only for conditioning modes that use the image (``image``, ``full``).
    """
    out_dir, dev = Path(out_dir), resolve_device(device)
    seed_everything(seed)
    n_classes = cfg["n_classes"]
    with_image = bool(cfg["ldm"]["image_input"])
    train = load_slices(train_npz, plan["patch_size"], n_classes, with_image)
    val = load_slices(val_npz, plan["patch_size"], n_classes, with_image)
    uses_image = cfg["experts"]["mode"] in ("image", "full")
    train_e = val_e = None
    encoder: dict[str, Any] = {"used": False, "reason": f"conditioning mode {cfg['experts']['mode']!r}"}
    dims = {"pooled_dim": 1, "token_dim": 1, "n_tokens": 1}
    if uses_image:
        train_e, encoder = load_embedding_set(train_emb or [], train)
        val_e, _ = load_embedding_set(val_emb or [], val)
        dims = {
            "pooled_dim": train_e["pooled"].shape[1],
            "token_dim": train_e["tokens"].shape[2],
            "n_tokens": train_e["tokens"].shape[1],
        }

    vae_ckpt = read_checkpoint(vae_path)
    vae = build_autoencoder(vae_ckpt["ae_kwargs"])
    vae.load_state_dict(vae_ckpt["best_model"])
    vae.to(dev).eval().requires_grad_(False)
    run_hash = training_hash(
        cfg,
        "ldm",
        {
            "train": train.names,
            "val": val.names,
            "seed": seed,
            "vae": vae_ckpt["config_hash"],
            "encoder": encoder.get("weights_sha256"),
        },
    )
    trainer = LDMTrainer(cfg, toe_kwargs(cfg, **dims), dev)
    latents = encode_latents(vae, train.label, n_classes, dev)
    run = RunState(extra={"scale_factor": float(1.0 / latents.std())})
    state = load_state(out_dir / "ldm_state.pt", run_hash)
    if state is not None:
        trainer.load(state)
        run = RunState.from_state(state, extra_keys=("scale_factor",))
    scale = run.extra["scale_factor"]
    cases = validation_cases(val, cfg, seed)
    run.extra["candidate_scores"] = candidate_scores(cases, n_classes)
    models = PGTModels(vae=vae, ldm=trainer.ema.module, scale_factor=scale, cfg=cfg, device=dev)
    trainer.attach(LDMData(train, latents * scale, train_e, models, cases, val, val_e, seed))
    log.info("ldm: %d training slices, %d validation cases, scale factor %.4f, mode %s, encoder %s, device %s",
             len(train), len(cases), scale, cfg["experts"]["mode"], encoder.get("architecture", "unused"), dev)
    log.info("ldm: validation candidates' own Dice %s", run.extra["candidate_scores"])
    final = fit(trainer, cfg["ldm"], run, out_dir, config_hash=run_hash, cfg=cfg, encoder=encoder)
    params = {"vae": _count(vae), "ldm": _count(trainer.model)}
    checkpoints = {"vae.pt": Path(vae_path), "ldm.pt": out_dir / "ldm.pt"}
    write_json(model_card(cfg, vae_ckpt, final, encoder, checkpoints, dev, params), out_dir / "model_card.json")
