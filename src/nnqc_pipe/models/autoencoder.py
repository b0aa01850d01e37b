"""Stage 1: the mask autoencoder (MONAI ``AutoencoderKL``), its patch discriminator and the perceptual loss.

Masks enter as one-hot images (one channel per class) and leave as per-class logits; every loss is computed on
the softmax of those logits so that each term has a gradient (the reference code applied its perceptual loss
to an argmax, which has none). The autoencoder is always kept in fp32.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import PerceptualLoss
from monai.networks.nets import AutoencoderKL, PatchDiscriminator
from torch import nn

log = logging.getLogger(__name__)


def autoencoder_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of the autoencoder for a resolved preset (saved in checkpoints to rebuild it)."""
    vae = cfg["vae"]
    return {
        "spatial_dims": 2,
        "in_channels": cfg["n_classes"],
        "out_channels": cfg["n_classes"],
        "channels": list(vae["channels"]),
        "num_res_blocks": vae["num_res_blocks"],
        "attention_levels": list(vae["attention_levels"]),
        "latent_channels": vae["latent_channels"],
        "norm_num_groups": vae["norm_num_groups"],
        "with_encoder_nonlocal_attn": vae["nonlocal_attn"],
        "with_decoder_nonlocal_attn": vae["nonlocal_attn"],
    }


def build_autoencoder(kwargs: dict[str, Any]) -> AutoencoderKL:
    """A MONAI ``AutoencoderKL`` from :func:`autoencoder_kwargs` output, in fp32."""
    return AutoencoderKL(**kwargs).float()


def build_discriminator(cfg: dict[str, Any]) -> PatchDiscriminator:
    """The patch discriminator that judges soft (softmax) mask reconstructions against one-hot masks."""
    vae = cfg["vae"]
    return PatchDiscriminator(
        spatial_dims=2,
        num_layers_d=vae["disc_layers"],
        channels=vae["disc_channels"],
        in_channels=cfg["n_classes"],
        out_channels=1,
    )


def latent_factor(channels: list[int]) -> int:
    """Spatial down-sampling factor of an autoencoder with these level channels."""
    return 2 ** (len(channels) - 1)


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Class-index masks [B, H, W] -> float one-hot [B, C, H, W]."""
    return F.one_hot(labels.long(), n_classes).permute(0, 3, 1, 2).float()


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1)
    return kl.flatten(1).sum(dim=1).mean()


class MaskPerceptualLoss(nn.Module):
    """MONAI ``PerceptualLoss`` applied to each foreground channel of soft masks (values in [0, 1])."""

    def __init__(self, loss: PerceptualLoss) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean perceptual distance over the foreground class channels."""
        fg_probs = probs[:, 1:].reshape(-1, 1, *probs.shape[2:])
        fg_target = target[:, 1:].reshape(-1, 1, *target.shape[2:])
        return self.loss(fg_probs, fg_target)


def find_perceptual_weights(pcfg: dict[str, Any]) -> Path | None:
    """Local ResNet-50 weights for the perceptual loss, or ``None``; nothing is ever downloaded.

    ``pcfg["weights"]`` may name the file itself or a folder in TORCH_HOME layout (``resnet50*.pth`` directly
    inside, or under ``checkpoints/`` or ``hub/checkpoints/``); without it torch's own hub cache is searched.
    """
    configured = pcfg.get("weights")
    if configured and Path(configured).expanduser().is_file():
        return Path(configured).expanduser()
    root = Path(configured).expanduser() if configured else Path(torch.hub.get_dir())
    for folder in (root, root / "checkpoints", root / "hub" / "checkpoints"):
        found = sorted(folder.glob("resnet50*.pth"))
        if found:
            return found[0]
    return None


def build_perceptual(pcfg: dict[str, Any], weight: float) -> tuple[MaskPerceptualLoss | None, dict[str, Any]]:
    """The perceptual loss when its weights exist locally, else ``None``; the second value records why.

    ``pcfg`` is the preset's ``vae.perceptual`` section: ``weights`` (a torchvision ResNet-50 state dict, e.g.
    RadImageNet or ImageNet weights) and optionally ``state_dict_key``. The record goes into the model card.
    """
    if weight <= 0:
        return None, {"enabled": False, "reason": "vae.loss_weights.perc is 0"}
    if pcfg.get("network_type", "resnet50") != "resnet50":
        reason = f"only network_type resnet50 loads from a local file (got {pcfg['network_type']!r})"
        log.warning("perceptual loss disabled: %s", reason)
        return None, {"enabled": False, "reason": reason}
    path = find_perceptual_weights(pcfg)
    if path is None:
        where = pcfg.get("weights") or f"{torch.hub.get_dir()}/checkpoints/resnet50-*.pth"
        reason = f"no local perceptual weights at {where} (set vae.perceptual.weights); nothing is downloaded"
        log.warning("perceptual loss disabled: %s", reason)
        return None, {"enabled": False, "reason": reason}
    loss = PerceptualLoss(
        spatial_dims=2,
        network_type="resnet50",
        pretrained=True,
        pretrained_path=str(path),
        pretrained_state_dict_key=pcfg.get("state_dict_key"),
    )
    log.info("perceptual loss: ResNet-50 weights from %s", path)
    return MaskPerceptualLoss(loss), {"enabled": True, "weights": str(path), "network_type": "resnet50"}
