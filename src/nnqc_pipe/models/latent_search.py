"""Wang et al.'s QC by latent search (MICCAI 2020): the manifold of good image–segmentation pairs, and the pair on
it closest to a test pair.

- **The manifold**: a joint VAE over slices of (image, one-hot ground truth), MONAI's ``VarAutoEncoder`` with one
  output channel for the image and one per class for the mask logits, trained on the labelled training subjects
  with image MSE + mask cross-entropy + β·KL (:func:`vae_loss`, :func:`train_joint_vae`).
- **The search** (:func:`latent_search`): for each slice of (image, candidate), the latent code starts at the
  encoder's mean of the pair and descends (Adam, a fixed number of steps) on the decoded pair's distance to it,
  ``w_image·MSE(image) + w_mask·CE(candidate) + w_prior·|z|²/2``; the decoded mask is the **surrogate
  segmentation**, the reference the candidate is scored against (``latent_search_dsc``). A good candidate lies on
  the manifold and comes back nearly unchanged; a broken one cannot be decoded, and the image term pulls the
  surrogate towards the anatomy the image shows.

The loss of every slice depends on its own code only and Adam's update is element-wise, so the search of a slice
does not depend on the other slices of its batch: slices are searched together, in batches, for speed only.

Not yet a stage of the workflow: the network, its loss, a plain training loop and the search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import VarAutoEncoder
from torch import nn

from nnqc_pipe.models.autoencoder import kl_divergence, one_hot
from nnqc_pipe.models.device import seed_everything


class JointVAE(nn.Module):
    """A VAE over (image, mask) slices: ``encode`` gives the posterior mean and log-variance of the latent vector,
    ``decode`` the image and the mask logits."""

    def __init__(self, n_classes: int, patch_size: tuple[int, int], latent_size: int = 64,
                 channels: tuple[int, ...] = (16, 32, 64), strides: tuple[int, ...] = (2, 2, 2)) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.net = VarAutoEncoder(spatial_dims=2, in_shape=(1 + n_classes, *patch_size), out_channels=1 + n_classes,
                                  latent_size=latent_size, channels=channels, strides=strides, use_sigmoid=False)

    def encode(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance [B, latent] of image slices [B, H, W] and class-index masks [B, H, W]."""
        return self.net.encode_forward(torch.cat([image[:, None], one_hot(mask, self.n_classes)], dim=1))

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image [B, H, W] and the mask logits [B, C, H, W] of latent vectors [B, latent]."""
        out = self.net.decode_forward(z, use_sigmoid=False)
        return out[:, 0], out[:, 1:]


def vae_loss(model: JointVAE, image: torch.Tensor, mask: torch.Tensor, beta: float) -> tuple[torch.Tensor,
                                                                                           dict[str, float]]:
    """Training loss of a batch: image MSE + mask cross-entropy + ``beta``·KL (per latent vector, batch mean), and
    its parts."""
    mu, logvar = model.encode(image, mask)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    image_hat, logits = model.decode(z)
    parts = {"image_mse": F.mse_loss(image_hat, image), "mask_ce": F.cross_entropy(logits, mask.long()),
             "kl": kl_divergence(mu, torch.exp(0.5 * logvar))}
    loss = parts["image_mse"] + parts["mask_ce"] + beta * parts["kl"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}


@dataclass(frozen=True)
class VAESettings:
    """Training of the joint VAE: epochs over the slices, batch size, Adam learning rate, KL weight, seed."""

    epochs: int = 50
    batch_size: int = 32
    learning_rate: float = 2e-3
    beta: float = 1e-3
    seed: int = 0


def train_joint_vae(model: JointVAE, images: np.ndarray, masks: np.ndarray, settings: VAESettings
                    ) -> list[dict[str, float]]:
    """Train ``model`` in place on slices ``images`` [N, H, W] (float) and ``masks`` [N, H, W] (class indices), on
    the model's device; returns the mean loss parts per epoch."""
    seed_everything(settings.seed)
    device = next(model.parameters()).device
    x = torch.as_tensor(images, dtype=torch.float32, device=device)
    y = torch.as_tensor(masks, dtype=torch.long, device=device)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    generator = torch.Generator().manual_seed(settings.seed)
    history = []
    model.train()
    for _ in range(settings.epochs):
        sums: dict[str, float] = {}
        batches = torch.randperm(len(x), generator=generator).split(settings.batch_size)
        for batch in batches:
            optimiser.zero_grad()
            loss, parts = vae_loss(model, x[batch], y[batch], settings.beta)
            loss.backward()
            optimiser.step()
            for key, value in {"loss": float(loss.detach()), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value / len(batches)
        history.append(sums)
    model.eval()
    return history


@dataclass(frozen=True)
class SearchSettings:
    """The latent search: Adam ``steps`` at ``learning_rate`` on ``image_weight``·MSE + ``mask_weight``·CE +
    ``prior_weight``·|z|²/2, ``batch_size`` slices at a time.

    The image weight 10 is the phantoms' (tests/test_latent_search.py: at 1 the mask term keeps half-erased disks
    half-erased, at 10 the surrogate recovers most of the disk while true pairs stay put); not yet measured on a
    cohort."""

    steps: int = 50
    learning_rate: float = 0.05
    image_weight: float = 10.0
    mask_weight: float = 1.0
    prior_weight: float = 1e-3
    batch_size: int = 64


@dataclass
class SearchResult:
    """The surrogate segmentation [S, H, W] (class indices), its probabilities [S, C, H, W], the search loss of
    every slice before each step and after the last [steps + 1, S], and the final latent codes [S, latent]."""

    surrogate: np.ndarray
    probabilities: np.ndarray
    losses: np.ndarray
    z: np.ndarray


def search_loss(model: JointVAE, z: torch.Tensor, image: torch.Tensor, candidate: torch.Tensor,
                settings: SearchSettings) -> torch.Tensor:
    """Per slice [B]: the decoded pair's distance to (image, candidate) plus the prior term."""
    image_hat, logits = model.decode(z)
    mse = (image_hat - image).pow(2).flatten(1).mean(dim=1)
    ce = F.cross_entropy(logits, candidate.long(), reduction="none").flatten(1).mean(dim=1)
    return settings.image_weight * mse + settings.mask_weight * ce + settings.prior_weight * 0.5 * z.pow(2).sum(1)


def latent_search(model: JointVAE, image: np.ndarray, candidate: np.ndarray,
                  settings: SearchSettings | None = None) -> SearchResult:
    """The surrogate of every slice of (``image`` [S, H, W], ``candidate`` [S, H, W] class indices): gradient descent
    in the latent space from the encoder's mean of the pair (see the module docstring), batched over slices."""
    settings = settings or SearchSettings()
    device = next(model.parameters()).device
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # only the codes are searched: no gradients of the weights
        p.requires_grad_(False)
    try:
        return _search(model, image, candidate, settings, device)
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _search(model: JointVAE, image: np.ndarray, candidate: np.ndarray, settings: SearchSettings,
            device: torch.device) -> SearchResult:
    """:func:`latent_search` with the weights frozen."""
    surrogate, probabilities, losses, codes = [], [], [], []
    for start in range(0, len(image), settings.batch_size):
        x = torch.as_tensor(image[start:start + settings.batch_size], dtype=torch.float32, device=device)
        y = torch.as_tensor(candidate[start:start + settings.batch_size], dtype=torch.long, device=device)
        with torch.no_grad():
            z0, _ = model.encode(x, y)
        z = z0.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([z], lr=settings.learning_rate)
        trace = []
        for _ in range(settings.steps):
            optimiser.zero_grad()
            loss = search_loss(model, z, x, y, settings)
            trace.append(loss.detach())
            loss.sum().backward()
            optimiser.step()
        with torch.no_grad():
            trace.append(search_loss(model, z, x, y, settings))
            prob = torch.softmax(model.decode(z)[1], dim=1)
        surrogate.append(prob.argmax(1).cpu().numpy())
        probabilities.append(prob.cpu().numpy())
        losses.append(torch.stack(trace).cpu().numpy())
        codes.append(z.detach().cpu().numpy())
    return SearchResult(np.concatenate(surrogate).astype(np.int64), np.concatenate(probabilities),
                        np.concatenate(losses, axis=1), np.concatenate(codes))
