"""Stage 2: the conditional latent diffusion model (MONAI ``DiffusionModelUNet`` + Team of Experts).

The UNet predicts the noise ε of a noisy mask latent; its input is the noisy latent concatenated with the
*spatial condition* at latent size, and its cross-attention context is the Team of Experts output.

The spatial condition is the candidate, in one of three encodings (``ldm.candidate_encoding``): ``coverage`` —
per foreground class, the fraction of each latent cell the class covers (one channel for a binary task, as in
the paper); ``vae`` — the candidate's latent mean from the frozen stage-1 encoder, scaled like the targets;
``unshuffle`` — the one-hot foreground classes rearranged losslessly into latent-size channels
(``pixel_unshuffle``: f² channels per class for a down-sampling factor f), so no boundary detail is lost.
With ``ldm.image_input`` the normalised image slice is added the same lossless way. This is an nnqc-pipe
extension of the paper (where the image reaches the LDM only through E2's embedding): a pGT can only correct a
candidate where the network sees the anatomy, and a CLIP embedding carries no voxel-level position.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from nnqc_pipe.models.device import unet_autocast
from nnqc_pipe.models.experts import TeamOfExperts


def unet_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of the diffusion UNet for a resolved preset (saved in checkpoints)."""
    ldm, latent = cfg["ldm"], cfg["vae"]["latent_channels"]
    return {
        "spatial_dims": 2,
        "in_channels": latent + condition_channels(cfg),
        "out_channels": latent,
        "channels": list(ldm["channels"]),
        "attention_levels": list(ldm["attention_levels"]),
        "num_res_blocks": ldm["num_res_blocks"],
        "num_head_channels": ldm["num_head_channels"],
        "norm_num_groups": ldm["norm_num_groups"],
        "with_conditioning": True,
        "cross_attention_dim": cfg["experts"]["d_model"],
    }


def latent_factor_of(cfg: dict[str, Any]) -> int:
    """Down-sampling factor between slices and latents for a resolved preset."""
    return 2 ** (len(cfg["vae"]["channels"]) - 1)


def condition_channels(cfg: dict[str, Any]) -> int:
    """Number of UNet input channels that carry the spatial condition (candidate, and image if used)."""
    encoding, foreground = cfg["ldm"]["candidate_encoding"], int(cfg["n_classes"]) - 1
    if encoding == "vae":
        channels = int(cfg["vae"]["latent_channels"])
    elif encoding == "unshuffle":
        channels = foreground * latent_factor_of(cfg) ** 2
    else:
        channels = foreground
    return channels + image_channels(cfg)


def image_channels(cfg: dict[str, Any]) -> int:
    """Number of UNet input channels that carry the image slice (the last ones; 0 without ``ldm.image_input``)."""
    return latent_factor_of(cfg) ** 2 if cfg["ldm"]["image_input"] else 0


def drop_image(condition: torch.Tensor, keep: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """The spatial condition with the image channels zeroed where ``keep`` [B] is False (image dropout/guidance)."""
    n = image_channels(cfg)
    if not n:
        return condition
    mask = torch.ones_like(condition)
    mask[:, -n:] = keep.to(condition.dtype)[:, None, None, None]
    return condition * mask


def toe_kwargs(cfg: dict[str, Any], pooled_dim: int, token_dim: int, n_tokens: int) -> dict[str, Any]:
    """Constructor arguments of the Team of Experts (E2 sizes come from the embedding cache)."""
    experts = cfg["experts"]
    return {
        "mode": experts["mode"],
        "d_model": experts["d_model"],
        "n_queries": experts["n_queries"],
        "n_heads": experts["n_heads"],
        "n_fourier": experts["n_fourier"],
        "pooled_dim": pooled_dim,
        "token_dim": token_dim,
        "n_tokens": n_tokens,
    }


def schedule_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Arguments shared by the training (DDPM) and sampling (DDIM) schedulers: one noise schedule for both."""
    noise = cfg["noise"]
    return {
        "num_train_timesteps": noise["n_train_timesteps"],
        "schedule": noise["schedule"],
        "beta_start": noise["beta_start"],
        "beta_end": noise["beta_end"],
        "prediction_type": noise["prediction_type"],
        "clip_sample": False,
    }


def noise_scheduler(cfg: dict[str, Any]) -> DDPMScheduler:
    """The training noise schedule (T = ``noise.n_train_timesteps``; the network predicts ``noise.prediction_type``:
    ``epsilon`` as in the paper, ``sample`` (the clean latent x0) or ``v_prediction``)."""
    return DDPMScheduler(**schedule_kwargs(cfg))


def ddim_scheduler(cfg: dict[str, Any], steps: int) -> DDIMScheduler:
    """A deterministic DDIM sampler over ``steps`` steps of the training schedule (no x0 clipping)."""
    scheduler = DDIMScheduler(**schedule_kwargs(cfg))
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def encode_candidate(candidate: torch.Tensor, cfg: dict[str, Any], vae: nn.Module, scale_factor: float) -> torch.Tensor:
    """Class-index candidates [B, H, W] -> the UNet's candidate channels (see ``ldm.candidate_encoding``)."""
    n_classes, encoding = int(cfg["n_classes"]), cfg["ldm"]["candidate_encoding"]
    onehot = F.one_hot(candidate.long(), n_classes).permute(0, 3, 1, 2).float()
    if encoding == "vae":
        return vae.encode(onehot)[0] * scale_factor
    if encoding == "unshuffle":
        return F.pixel_unshuffle(onehot[:, 1:], latent_factor_of(cfg))
    return F.avg_pool2d(onehot[:, 1:], latent_factor_of(cfg))


@torch.no_grad()
def spatial_condition(
    candidate: torch.Tensor,
    image: torch.Tensor | None,
    cfg: dict[str, Any],
    vae: nn.Module,
    scale_factor: float,
) -> torch.Tensor:
    """The UNet's condition channels: the encoded candidate, then the image slices [B, H, W] if ``image_input``."""
    encoded = encode_candidate(candidate, cfg, vae, scale_factor)
    if not cfg["ldm"]["image_input"]:
        return encoded
    if image is None:
        raise ValueError("ldm.image_input is on: the preprocessed image slices are needed")
    image_channels = F.pixel_unshuffle(image.float()[:, None].to(encoded.device), latent_factor_of(cfg))
    return torch.cat([encoded, image_channels], dim=1)


class ConditionalLDM(nn.Module):
    """ε-predictor: DiffusionModelUNet conditioned on the candidate (input channels) and on ``c`` (context).

    Latents whose size the UNet cannot halve ``len(channels) - 1`` times are zero-padded and cropped back.
    """

    def __init__(self, unet_args: dict[str, Any], toe_args: dict[str, Any]) -> None:
        super().__init__()
        self.unet = DiffusionModelUNet(**unet_args)
        self.toe = TeamOfExperts(**toe_args)
        self.multiple = 2 ** (len(unet_args["channels"]) - 1)

    def context(
        self,
        ratio: torch.Tensor,
        pooled: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        keep_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The Team of Experts context ``c`` for a batch (image left out where ``keep_image`` is False)."""
        return self.toe(ratio, pooled, tokens, keep_image)

    def denoise(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, candidate: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's prediction (ε, x0 or v) for noisy latents [B, L, h, w], spatial condition and context."""
        x = torch.cat([noisy, candidate], dim=1)
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.multiple, (-w) % self.multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        with unet_autocast(x.device):
            eps = self.unet(x, timesteps, context=context)
        return eps[..., :h, :w].float()

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        candidate: torch.Tensor,
        ratio: torch.Tensor,
        pooled: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        keep_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Context then denoising, in one call (the training step); ``candidate`` already has its image channels
        zeroed where ``keep_image`` is False (:func:`drop_image`)."""
        return self.denoise(noisy, timesteps, candidate, self.context(ratio, pooled, tokens, keep_image))
