"""Rule ``train_vae``: stage 1, the VAE-GAN on ground-truth mask slices.

Loss = λ_KL·KL + λ_Dice·generalised Dice + λ_adv·adversarial (after ``adv_warmup_epochs``) +
λ_perc·perceptual, all on the softmax of the decoder output. Validation: reconstruction Dice (through the
latent mean) of validation slices; the best epoch's weights are what stage 2 and inference use.

Outputs in ``out_dir``: ``vae.pt`` (final full training state with the best weights under ``best_model``),
``vae_curves.csv``, and the resumable ``vae_state.pt``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import GeneralizedDiceLoss, PatchAdversarialLoss

from nnqc_pipe.dice import class_dice
from nnqc_pipe.models.autoencoder import (
    autoencoder_kwargs,
    build_autoencoder,
    build_discriminator,
    build_perceptual,
    kl_divergence,
    one_hot,
)
from nnqc_pipe.models.device import resolve_device, seed_everything
from nnqc_pipe.models.presets import training_hash
from nnqc_pipe.models.training import SliceSet, batches_of, fit, load_slices, progress, resume_run, seed_epoch

log = logging.getLogger(__name__)


class VAETrainer:
    """One VAE-GAN training run: networks, optimisers and losses, with a resumable state (a
    :class:`nnqc_pipe.models.training.Trainer` once :meth:`attach` has given it its data)."""

    kind = "vae"
    selection_key = "val_dice"

    def __init__(self, cfg: dict[str, Any], device: torch.device) -> None:
        self.cfg, self.vcfg, self.device = cfg, cfg["vae"], device
        self.train_set: SliceSet | None = None
        self.val_labels: np.ndarray | None = None
        self.seed, self.n_slices = 0, 0
        self.ae_kwargs = autoencoder_kwargs(cfg)
        self.ae = build_autoencoder(self.ae_kwargs).to(device)
        self.disc = build_discriminator(cfg).to(device)
        self.opt_g = torch.optim.Adam(self.ae.parameters(), lr=self.vcfg["lr"])
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=self.vcfg["disc_lr"])
        self.weights = self.vcfg["loss_weights"]
        self.dice_loss = GeneralizedDiceLoss(include_background=True, to_onehot_y=False, softmax=False)
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        self.perceptual, self.perceptual_info = build_perceptual(
            self.vcfg["perceptual"], self.weights["perc"]
        )
        if self.perceptual is not None:
            self.perceptual.to(device)

    def attach(self, train: SliceSet, val_labels: np.ndarray, seed: int) -> None:
        """The training slices, the validation labels and the seed of the run."""
        self.train_set, self.val_labels, self.seed, self.n_slices = train, val_labels, seed, len(train)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch over the attached training slices."""
        return self.train_epoch(self.train_set, epoch, self.seed)

    def validate(self, epoch: int, final: bool) -> dict[str, float]:
        """Reconstruction Dice of the attached validation labels, after every epoch."""
        return {"val_dice": self.reconstruction_dice(self.val_labels)}

    def selected_weights(self) -> dict[str, torch.Tensor]:
        """The autoencoder's weights."""
        return self.ae.state_dict()

    def load(self, state: dict[str, Any]) -> None:
        """Restore networks and optimisers from a saved state."""
        self.ae.load_state_dict(state["model"])
        self.disc.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])

    def train_epoch(self, data: SliceSet, epoch: int, seed: int) -> dict[str, float]:
        """One pass over the training slices in a (seed, epoch)-determined order; returns mean losses."""
        rng = seed_epoch(seed, epoch, stream=0)
        adversarial = epoch >= self.vcfg["adv_warmup_epochs"] and self.weights["adv"] > 0
        self.ae.train()
        self.disc.train()
        batches = batches_of(rng.permutation(len(data)), self.vcfg["batch_size"])
        sums: dict[str, float] = {}
        for index in progress(batches, len(batches), f"vae epoch {epoch + 1}"):
            labels = torch.as_tensor(data.label[index], device=self.device)
            for key, value in self.train_step(one_hot(labels, self.cfg["n_classes"]), adversarial).items():
                sums[key] = sums.get(key, 0.0) + value
        return {key: value / len(batches) for key, value in sums.items()} | {"steps": len(batches)}

    def train_step(self, target: torch.Tensor, adversarial: bool) -> dict[str, float]:
        """Generator (autoencoder) update, then the discriminator update when the adversarial term is on."""
        logits, z_mu, z_sigma = self.ae(target)
        probs = torch.softmax(logits, dim=1)
        terms = {"dice": self.dice_loss(probs, target), "kl": kl_divergence(z_mu, z_sigma)}
        if self.weights["ce"] > 0:
            terms["ce"] = F.cross_entropy(logits, target.argmax(1))
        if self.perceptual is not None:
            terms["perc"] = self.perceptual(probs, target)
        if adversarial:
            fake = self.disc(probs.contiguous())[-1]
            terms["adv_g"] = self.adv_loss(fake, target_is_real=True, for_discriminator=False)
        weight_of = {"dice": "dice", "ce": "ce", "kl": "kl", "perc": "perc", "adv_g": "adv"}
        loss = sum(self.weights[weight_of[k]] * v for k, v in terms.items())
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        out = {"loss": loss.item()} | {k: v.item() for k, v in terms.items()}
        if adversarial:
            out["adv_d"] = self.discriminator_step(probs.detach(), target)
        return out

    def discriminator_step(self, fake: torch.Tensor, real: torch.Tensor) -> float:
        """Least-squares patch-GAN update: soft reconstructions are fake, one-hot masks real."""
        self.opt_d.zero_grad(set_to_none=True)
        loss = 0.5 * (
            self.adv_loss(self.disc(fake.contiguous())[-1], target_is_real=False, for_discriminator=True)
            + self.adv_loss(self.disc(real.contiguous())[-1], target_is_real=True, for_discriminator=True)
        )
        loss.backward()
        self.opt_d.step()
        return loss.item()

    @torch.inference_mode()
    def reconstruction_dice(self, labels: np.ndarray) -> float:
        """Mean foreground-class Dice of the reconstructions (decoded latent means) of ``labels``."""
        self.ae.eval()
        recon = []
        for start in range(0, len(labels), self.vcfg["batch_size"]):
            batch = torch.as_tensor(labels[start : start + self.vcfg["batch_size"]], device=self.device)
            recon.append(self.ae.reconstruct(one_hot(batch, self.cfg["n_classes"])).argmax(1).cpu().numpy())
        return float(class_dice(np.concatenate(recon), labels, self.cfg["n_classes"]).mean())

    def state(self, **extra: Any) -> dict[str, Any]:
        """The full training state (networks, optimisers) plus run bookkeeping in ``extra``."""
        return {
            "kind": "vae",
            "ae_kwargs": self.ae_kwargs,
            "model": self.ae.state_dict(),
            "discriminator": self.disc.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "perceptual": self.perceptual_info,
            **extra,
        }


def validation_labels(val: SliceSet, max_slices: int, seed: int) -> np.ndarray:
    """A fixed subset (at most ``max_slices``, kept in order) of the validation slices."""
    if len(val) <= max_slices:
        return val.label
    keep = np.sort(np.random.default_rng([seed, 99]).choice(len(val), max_slices, replace=False))
    return val.label[keep]


def train_vae(
    train_npz: Sequence[str | os.PathLike],
    val_npz: Sequence[str | os.PathLike],
    plan: dict[str, Any],
    cfg: dict[str, Any],
    out_dir: str | os.PathLike,
    device: str,
    seed: int,
) -> None:
    """Train (or resume) the VAE-GAN and write ``vae.pt``, ``vae_curves.csv`` and ``vae_state.pt``."""
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    seed_everything(seed)
    train = load_slices(train_npz, plan["patch_size"], cfg["n_classes"])
    val = load_slices(val_npz, plan["patch_size"], cfg["n_classes"])
    val_labels = validation_labels(val, cfg["vae"]["val_max_slices"], seed)
    run_hash = training_hash(cfg, "vae", {"train": train.names, "val": val.names, "seed": seed})
    trainer = VAETrainer(cfg, dev)
    trainer.attach(train, val_labels, seed)
    run = resume_run(trainer, out_dir / "vae_state.pt", run_hash)
    log.info("vae: %d training / %d validation slices, %s, device %s", len(train), len(val_labels), cfg["preset"],
             dev)
    fit(trainer, cfg["vae"], run, out_dir, config_hash=run_hash, cfg=cfg)
