"""Wang et al.'s QC by latent search (MICCAI 2020): the manifold of good image–segmentation pairs, and the pair on
it closest to a test pair.

- **The window**: the VAE sees a square window of every slice, resampled to a fixed ``grid`` (64² in the cpu
  preset): centred on the bounding box of the mask's foreground over the whole volume, its side that box's larger
  extent times ``margin`` (:func:`crop_box`). The window normalises position and size the way Wang et al.'s
  heart-centred crops do, and keeps the search cheap at any patch size. Measured on shared ACDC (192² patches,
  ``docs/method.md``): on the whole patch at 192² the VAE diverged, at 64² it reconstructed the validation masks at
  Dice 0.90 and the ground truth's surrogate at 0.73–0.82; the volume window raised them to 0.95 and 0.87–0.93.
- **The manifold**: a joint VAE over windows of (image, one-hot ground truth), MONAI's ``VarAutoEncoder`` with one
  output channel for the image and one per class for the mask logits, trained on the labelled training subjects
  with image MSE + mask cross-entropy + β·KL (:func:`vae_loss`, :class:`LatentVAETrainer`), the windows jittered
  in position, size, angle and intensity (:func:`augment_windows`): 18 labelled subjects are few for a manifold.
- **The search** (:func:`latent_search`): for each slice of (image, candidate), the latent code starts at the
  encoder's mean of the pair and descends (Adam, a fixed number of steps) on the decoded pair's distance to it,
  ``w_image·MSE(image) + w_mask·CE(candidate) + w_prior·|z|²/2``; the decoded mask is the **surrogate
  segmentation**, the reference the candidate is scored against (``latent_search_dsc``). A good candidate lies on
  the manifold and comes back nearly unchanged; a broken one cannot be decoded, and the image term pulls the
  surrogate towards the anatomy the image shows. The search's window (:func:`search_box`) is placed by nnQC's
  pseudo ground truth of the same candidate (``window: pgt``, the presets'), or by the candidate itself
  (``window: candidate``); the surrogate's probabilities are resampled back to the patch, background outside.
  Placed by the candidate, a mask with islands far from the organ stretched the window and a misplaced one moved it
  onto the wrong anatomy, where the surrogate followed the mask (shared ACDC: all candidates r 0.78, MAE 0.14;
  ``docs/method.md``).

The loss of every slice depends on its own code only and Adam's update is element-wise, so the search of a slice
does not depend on the other slices of its batch: slices are searched together, in batches, for speed only.

Rule ``train_latent_vae`` trains the VAE (:class:`LatentVAETrainer` on :func:`nnqc_pipe.models.training.fit`:
resumable, time-capped, best weights on the validation slices' reconstruction Dice) and writes ``latent_vae.pt``;
the infer stage searches every candidate (:func:`load_latent_search`, :func:`latent_search`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import VarAutoEncoder
from torch import nn

from nnqc_pipe.dice import dice_from_counts
from nnqc_pipe.models.autoencoder import kl_divergence, one_hot
from nnqc_pipe.models.device import resolve_device, seed_everything
from nnqc_pipe.models.presets import SEARCH_WINDOWS, training_hash
from nnqc_pipe.models.training import (
    SingleNetwork,
    SliceSet,
    batches_of,
    fit,
    progress,
    read_checkpoint,
    resume_run,
    seed_epoch,
)

log = logging.getLogger(__name__)

LATENT_VAE = "latent_vae.pt"


# Bound of the posterior log-variance: the encoder's last layer flattens the whole slice (36,864 inputs at 192²
# with three levels), and unbounded, its first outputs gave exp(logvar) overflows, a KL of 1.8e7 and NaN losses from
# the second epoch on shared ACDC.
LOGVAR_LIMIT = 10.0
GRAD_CLIP = 1.0


# Training-time jitter of the windows (:func:`augment_windows`): centre shift as a share of the side, relative side
# change, rotation (radians, ±15°), and the image's relative gain and offset.
JITTER_SHIFT, JITTER_SCALE, JITTER_ANGLE, JITTER_INTENSITY = 0.08, 0.1, 0.26, 0.1


@dataclass(frozen=True)
class CropBox:
    """A square window on the patch grid (pixels): its centre (row, column) and side."""

    center: tuple[float, float]
    size: float


def crop_box(mask: np.ndarray, margin: float, grid: int) -> CropBox:
    """The window of a volume's class-index mask stack [S, H, W]: centred on the foreground's bounding box over all
    slices, its side the box's larger extent times ``margin`` and at least ``grid`` / 2 (no more than twice
    upsampled); the whole patch when the mask is empty."""
    height, width = mask.shape[1:]
    foreground = np.argwhere(mask > 0)
    if not len(foreground):
        return CropBox(((height - 1) / 2, (width - 1) / 2), float(max(height, width)))
    low, high = foreground[:, 1:].min(axis=0), foreground[:, 1:].max(axis=0)
    center = (low + high) / 2
    side = max(float((high - low + 1).max()) * margin, grid / 2)
    return CropBox((float(center[0]), float(center[1])), side)


def window_theta(center: np.ndarray, size: np.ndarray, patch_size: Sequence[int],
                 angle: np.ndarray | None = None) -> torch.Tensor:
    """Affine matrices [N, 2, 3] (``F.affine_grid``, ``align_corners=False``) that map a window's normalised grid to
    the patch: centres [N, 2] (row, column) and sides [N] in pixels, optionally rotated by ``angle`` [N]."""
    height, width = patch_size
    center, size = np.asarray(center, np.float64).reshape(-1, 2), np.asarray(size, np.float64).reshape(-1)
    cos, sin = (np.cos(angle), np.sin(angle)) if angle is not None else (np.ones_like(size), np.zeros_like(size))
    theta = np.zeros((len(size), 2, 3))
    theta[:, 0, 0], theta[:, 0, 1] = size / width * cos, -size / width * sin
    theta[:, 1, 0], theta[:, 1, 1] = size / height * sin, size / height * cos
    theta[:, 0, 2] = (2 * center[:, 1] + 1) / width - 1
    theta[:, 1, 2] = (2 * center[:, 0] + 1) / height - 1
    return torch.as_tensor(theta, dtype=torch.float32)


def sample_window(x: torch.Tensor, theta: torch.Tensor, grid: int) -> torch.Tensor:
    """Bilinear samples [N, C, grid, grid] of patches ``x`` [N, C, H, W] in the windows ``theta``; zero outside."""
    points = F.affine_grid(theta.to(x.device), [x.shape[0], x.shape[1], grid, grid], align_corners=False)
    return F.grid_sample(x, points, mode="bilinear", padding_mode="zeros", align_corners=False)


def mask_window(mask: torch.Tensor, theta: torch.Tensor, n_classes: int, grid: int) -> torch.Tensor:
    """Soft one-hot [N, C, grid, grid] of class-index masks [N, H, W] in the windows: background outside."""
    soft = sample_window(one_hot(mask, n_classes), theta, grid)
    soft[:, 0] += 1 - soft.sum(dim=1)
    return soft


def paste_window(probabilities: torch.Tensor, box: CropBox, patch_size: Sequence[int]) -> torch.Tensor:
    """Class probabilities [N, C, grid, grid] of a window mapped back to the patch [N, C, H, W]: bilinear inside
    the window, background outside."""
    height, width = patch_size
    # the patch's pixel centres in the window's normalised coordinates (the inverse of window_theta)
    rows = (np.arange(height) - box.center[0]) * 2 / box.size
    cols = (np.arange(width) - box.center[1]) * 2 / box.size
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    points = torch.as_tensor(np.stack([xx, yy], axis=-1), dtype=probabilities.dtype, device=probabilities.device)
    points = points.expand(probabilities.shape[0], height, width, 2)
    foreground = F.grid_sample(probabilities[:, 1:], points, mode="bilinear", padding_mode="zeros",
                               align_corners=False)
    return torch.cat([1 - foreground.sum(dim=1, keepdim=True), foreground], dim=1)


def augment_windows(center: np.ndarray, size: np.ndarray, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Jittered centres, sides and rotation angles of training windows (the ``JITTER_*`` ranges)."""
    n = len(size)
    shifted = center + rng.uniform(-JITTER_SHIFT, JITTER_SHIFT, (n, 2)) * size[:, None]
    return shifted, size * rng.uniform(1 - JITTER_SCALE, 1 + JITTER_SCALE, n), rng.uniform(-JITTER_ANGLE,
                                                                                            JITTER_ANGLE, n)


class JointVAE(nn.Module):
    """A VAE over (image, mask) windows of ``grid``² pixels: ``encode`` gives the posterior mean and log-variance of
    the latent vector, ``decode`` the image and the mask logits. Each of ``channels`` halves the window (stride 2).
    ``margin`` sets the window's side (:func:`crop_box`)."""

    def __init__(self, n_classes: int, grid: int, latent_size: int = 64, channels: tuple[int, ...] = (16, 32, 64),
                 margin: float = 1.3) -> None:
        super().__init__()
        factor = 2 ** len(channels)
        if grid % factor:
            raise ValueError(f"latent_search.grid {grid} is not a multiple of {factor}, the joint VAE's "
                             f"downsampling with latent_search.channels {list(channels)}")
        self.n_classes, self.grid, self.margin = n_classes, grid, margin
        self.net = VarAutoEncoder(spatial_dims=2, in_shape=(1 + n_classes, grid, grid), out_channels=1 + n_classes,
                                  latent_size=latent_size, channels=channels, strides=(2,) * len(channels),
                                  use_sigmoid=False)

    def encode(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance [B, latent] of image windows [B, g, g] and soft masks [B, C, g, g]."""
        mu, logvar = self.net.encode_forward(torch.cat([image[:, None], mask], dim=1))
        return mu, logvar.clamp(-LOGVAR_LIMIT, LOGVAR_LIMIT)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image [B, H, W] and the mask logits [B, C, H, W] of latent vectors [B, latent]."""
        out = self.net.decode_forward(z, use_sigmoid=False)
        return out[:, 0], out[:, 1:]


def vae_loss(model: JointVAE, image: torch.Tensor, mask: torch.Tensor, beta: float) -> tuple[torch.Tensor,
                                                                                           dict[str, float]]:
    """Training loss of a batch of windows (image [B, g, g], soft mask [B, C, g, g]): image MSE + mask
    cross-entropy + ``beta``·KL (per latent vector, batch mean), and its parts."""
    mu, logvar = model.encode(image, mask)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    image_hat, logits = model.decode(z)
    parts = {"image_mse": F.mse_loss(image_hat, image), "mask_ce": F.cross_entropy(logits, mask),
             "kl": kl_divergence(mu, torch.exp(0.5 * logvar))}
    loss = parts["image_mse"] + parts["mask_ce"] + beta * parts["kl"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}


class LatentVAETrainer(SingleNetwork):
    """The joint VAE's training run (a :class:`nnqc_pipe.models.training.Trainer`): epochs over the training slices
    (image + class-index label) in their volume's window, jittered when ``augment``, selected on the validation
    slices' reconstruction Dice.

    ``cfg`` is the preset's ``latent_search`` section (grid, margin, augment, channels, latent_size, lr, beta,
    batch_size, val_max_slices). The validation score ``val_dice`` is the foreground Dice of the decoded mask of the
    encoder's mean against the label's window, counted over every validation slice (at most ``val_max_slices``,
    evenly spaced, unjittered).
    """

    kind = "latent_vae"
    selection_key = "val_dice"

    def __init__(self, cfg: dict[str, Any], n_classes: int, patch_size: Sequence[int], device: torch.device) -> None:
        self.cfg, self.n_classes, self.device = cfg, n_classes, device
        self.patch_size = tuple(int(s) for s in patch_size)
        self.net = JointVAE(n_classes, int(cfg["grid"]), cfg["latent_size"], tuple(cfg["channels"]),
                            float(cfg["margin"])).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg["lr"])
        self.train_set: SliceSet | None = None
        self.val_set: SliceSet | None = None
        self.boxes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.seed, self.n_slices = 0, 0

    def attach(self, train: SliceSet, val: SliceSet, seed: int) -> None:
        """Training and validation slices (with images), and the run's seed."""
        if train.image is None or val.image is None:
            raise ValueError("the joint VAE needs the image slices (load_slices(..., with_image=True))")
        self.train_set, self.val_set, self.seed, self.n_slices = train, val, seed, len(train)
        self.boxes = {"train": self._slice_boxes(train), "val": self._slice_boxes(val)}

    def _slice_boxes(self, data: SliceSet) -> tuple[np.ndarray, np.ndarray]:
        """Every slice's window (centres [N, 2], sides [N]): its volume's label window (:func:`crop_box`)."""
        center, size = np.zeros((len(data), 2)), np.zeros(len(data))
        for subject in np.unique(data.subject):
            rows = data.subject == subject
            box = crop_box(data.label[rows], self.net.margin, self.net.grid)
            center[rows], size[rows] = box.center, box.size
        return center, size

    def _batch(self, data: SliceSet, part: str, index: np.ndarray, rng: np.random.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image windows [B, g, g] and soft mask windows [B, C, g, g] of the ``part`` slices ``index``, jittered
        (:func:`augment_windows`, image gain and offset) when ``rng`` is given."""
        assert data.image is not None
        center, size = (values[index] for values in self.boxes[part])
        angle = None
        if rng is not None:
            center, size, angle = augment_windows(center, size, rng)
        theta = window_theta(center, size, self.patch_size, angle).to(self.device)
        image = torch.as_tensor(data.image[index], dtype=torch.float32, device=self.device)[:, None]
        image = sample_window(image, theta, self.net.grid)[:, 0]
        label = torch.as_tensor(data.label[index], dtype=torch.long, device=self.device)
        mask = mask_window(label, theta, self.n_classes, self.net.grid)
        if rng is not None:
            gain = rng.uniform(1 - JITTER_INTENSITY, 1 + JITTER_INTENSITY, (len(index), 1, 1))
            offset = rng.uniform(-JITTER_INTENSITY, JITTER_INTENSITY, (len(index), 1, 1))
            image = image * torch.as_tensor(gain, dtype=torch.float32, device=self.device) + torch.as_tensor(
                offset, dtype=torch.float32, device=self.device)
        return image, mask

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training slices in random batches: the mean loss and its parts, and ``steps``."""
        assert self.train_set is not None
        rng = seed_epoch(self.seed, epoch, stream=5)
        batches = batches_of(rng.permutation(len(self.train_set)), self.cfg["batch_size"])
        self.net.train()
        sums: dict[str, float] = {}
        for index in progress(batches, len(batches), f"latent_vae epoch {epoch + 1}"):
            jitter = rng if self.cfg["augment"] else None
            loss, parts = vae_loss(self.net, *self._batch(self.train_set, "train", index, jitter), self.cfg["beta"])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"latent_vae: non-finite loss at epoch {epoch + 1} ({parts}); lower "
                                         "model.latent_search.lr or beta")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), GRAD_CLIP)
            self.opt.step()
            for key, value in {"loss": float(loss.detach()), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value / len(batches)
        return sums | {"steps": len(batches)}

    @torch.inference_mode()
    def validate(self, epoch: int, final: bool) -> dict[str, float]:
        """Foreground Dice of the validation slices' reconstructions (encoder mean, decoded), counted over them."""
        assert self.val_set is not None
        n = len(self.val_set)
        if not n:
            return {"val_dice": 0.0}
        index = np.unique(np.linspace(0, n - 1, min(n, self.cfg["val_max_slices"])).astype(np.int64))
        self.net.eval()
        overlap = total = 0
        for start in range(0, len(index), self.cfg["batch_size"]):
            image, mask = self._batch(self.val_set, "val", index[start:start + self.cfg["batch_size"]])
            predicted = self.net.decode(self.net.encode(image, mask)[0])[1].argmax(1) > 0
            truth = mask.argmax(1) > 0
            overlap += int((predicted & truth).sum())
            total += int(predicted.sum() + truth.sum())
        return {"val_dice": float(dice_from_counts(overlap, total, 0))}

    def state(self, **extra: Any) -> dict[str, Any]:
        """The full training state (with the network's shape and the search settings) plus ``extra``."""
        return {"kind": self.kind, "n_classes": self.n_classes, "patch_size": list(self.patch_size),
                "net": {"channels": list(self.cfg["channels"]), "latent_size": self.cfg["latent_size"],
                        "grid": self.net.grid, "margin": self.net.margin},
                "search": dict(self.cfg["search"]), "model": self.net.state_dict(), "opt": self.opt.state_dict(),
                **extra}


def train_latent_vae(train: SliceSet, val: SliceSet, cfg: dict[str, Any], out_dir: str | os.PathLike, device: str,
                     seed: int) -> None:
    """Train (or resume) the joint VAE (``cfg``: the resolved preset) and write ``latent_vae.pt`` and its curves."""
    dev = resolve_device(device)
    seed_everything(seed)
    trainer = LatentVAETrainer(cfg["latent_search"], cfg["n_classes"], cfg["patch_size"], dev)
    trainer.attach(train, val, seed)
    run_hash = training_hash(cfg, "latent_search", {"train": train.names, "val": val.names, "seed": seed})
    run = resume_run(trainer, Path(out_dir) / f"{trainer.kind}_state.pt", run_hash)
    log.info("latent_vae: %d training slices of %d subjects, %d validation slices of %d subjects, device %s",
             len(train), len(train.names), len(val), len(val.names), dev)
    fit(trainer, cfg["latent_search"], run, out_dir, config_hash=run_hash)


@dataclass(frozen=True)
class SearchSettings:
    """The latent search (the preset's ``latent_search.search``): Adam ``steps`` at ``lr`` on
    ``image_weight``·MSE + ``mask_weight``·CE + ``prior_weight``·|z|²/2, ``batch_size`` slices at a time.

    The image weight 10 is the phantoms' (tests/test_latent_search.py: at 1 the mask term keeps half-erased disks
    half-erased, at 10 the surrogate recovers most of the disk while true pairs stay put); on shared ACDC 3 and 30
    moved r by −0.015 / +0.004 (docs/method.md).

    ``window`` (one of ``presets.SEARCH_WINDOWS``) places the search's window: on the ``candidate``'s own foreground
    box, or on the box of a ``locator`` mask the caller gives (``pgt``: the pipeline passes nnQC's pseudo ground
    truth of the same candidate), so that a misplaced or island-scattered candidate cannot move or stretch it."""

    steps: int = 50
    lr: float = 0.05
    image_weight: float = 10.0
    mask_weight: float = 1.0
    prior_weight: float = 1e-3
    batch_size: int = 64
    window: str = "candidate"

    def __post_init__(self) -> None:
        if self.window not in SEARCH_WINDOWS:
            raise ValueError(f"latent_search.search.window {self.window!r} is not one of {SEARCH_WINDOWS}")


@dataclass
class SearchResult:
    """The surrogate segmentation [S, H, W] (class indices, patch grid), its probabilities [S, C, H, W], the search
    loss of every slice before each step and after the last [steps + 1, S], and the final latent codes
    [S, latent]."""

    surrogate: np.ndarray
    probabilities: np.ndarray
    losses: np.ndarray
    z: np.ndarray


def search_loss(model: JointVAE, z: torch.Tensor, image: torch.Tensor, candidate: torch.Tensor,
                settings: SearchSettings) -> torch.Tensor:
    """Per slice [B]: the decoded pair's distance to the (image, soft candidate) windows plus the prior term."""
    image_hat, logits = model.decode(z)
    mse = (image_hat - image).pow(2).flatten(1).mean(dim=1)
    ce = F.cross_entropy(logits, candidate, reduction="none").flatten(1).mean(dim=1)
    return settings.image_weight * mse + settings.mask_weight * ce + settings.prior_weight * 0.5 * z.pow(2).sum(1)


def search_box(model: JointVAE, candidate: np.ndarray, settings: SearchSettings,
               locator: np.ndarray | None = None) -> CropBox:
    """The window of a volume's search (:func:`crop_box`): the ``locator``'s [S, H, W] with ``window`` ``pgt``, the
    candidate's otherwise and where the locator is empty (nothing located: the candidate is all there is)."""
    if settings.window == "pgt":
        if locator is None:
            raise ValueError("latent_search.search.window 'pgt' needs the pseudo ground truth as the locator")
        if locator.shape != candidate.shape:
            raise ValueError(f"locator {locator.shape} and candidate {candidate.shape} differ in shape")
        if np.any(locator > 0):
            return crop_box(locator, model.margin, model.grid)
    return crop_box(candidate, model.margin, model.grid)


def latent_search(model: JointVAE, image: np.ndarray, candidate: np.ndarray,
                  settings: SearchSettings | None = None, locator: np.ndarray | None = None) -> SearchResult:
    """The surrogate of every slice of a volume's (``image`` [S, H, W], ``candidate`` [S, H, W] class indices):
    gradient descent in the latent space from the encoder's mean of the pair in the window :func:`search_box`
    places (see the module docstring), batched over slices; the surrogate is mapped back to the patch."""
    settings = settings or SearchSettings()
    box = search_box(model, candidate, settings, locator)
    device = next(model.parameters()).device
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # only the codes are searched: no gradients of the weights
        p.requires_grad_(False)
    try:
        return _search(model, image, candidate, box, settings, device)
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _search(model: JointVAE, image: np.ndarray, candidate: np.ndarray, box: CropBox, settings: SearchSettings,
            device: torch.device) -> SearchResult:
    """:func:`latent_search` with the weights frozen, in the window ``box``."""
    surrogate, probabilities, losses, codes = [], [], [], []
    patch_size = image.shape[1:]
    for start in range(0, len(image), settings.batch_size):
        stop = min(start + settings.batch_size, len(image))
        theta = window_theta(np.tile(box.center, (stop - start, 1)), np.full(stop - start, box.size), patch_size)
        x = sample_window(torch.as_tensor(image[start:stop], dtype=torch.float32, device=device)[:, None], theta,
                          model.grid)[:, 0]
        y = mask_window(torch.as_tensor(candidate[start:stop], dtype=torch.long, device=device), theta,
                        model.n_classes, model.grid)
        with torch.no_grad():
            z0, _ = model.encode(x, y)
        z = z0.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([z], lr=settings.lr)
        trace = []
        for _ in range(settings.steps):
            optimiser.zero_grad()
            loss = search_loss(model, z, x, y, settings)
            trace.append(loss.detach())
            loss.sum().backward()
            optimiser.step()
        with torch.no_grad():
            trace.append(search_loss(model, z, x, y, settings))
            prob = paste_window(torch.softmax(model.decode(z)[1], dim=1), box, patch_size)
        surrogate.append(prob.argmax(1).cpu().numpy())
        probabilities.append(prob.cpu().numpy())
        losses.append(torch.stack(trace).cpu().numpy())
        codes.append(z.detach().cpu().numpy())
    return SearchResult(np.concatenate(surrogate).astype(np.int64), np.concatenate(probabilities),
                        np.concatenate(losses, axis=1), np.concatenate(codes))


@dataclass
class LatentSearch:
    """A trained joint VAE ready for the search, with its search settings."""

    model: JointVAE
    settings: SearchSettings

    @property
    def n_classes(self) -> int:
        """Classes of the masks, background included."""
        return self.model.n_classes

    def probabilities(self, image: np.ndarray, candidate: np.ndarray, locator: np.ndarray | None = None
                      ) -> np.ndarray:
        """[S, C, H, W] class probabilities of the surrogate of a preprocessed image and class-index candidate
        stack; ``locator`` (class indices, the same grid) places the window where the settings say so."""
        return latent_search(self.model, image, candidate, self.settings, locator).probabilities


def load_latent_search(path: str | os.PathLike, device: str = "auto", search: dict[str, Any] | None = None
                       ) -> LatentSearch:
    """The best weights of a trained ``latent_vae.pt`` on ``device``; ``search`` (the ``latent_search.search``
    settings) replaces the ones it was trained with."""
    state = read_checkpoint(path)
    net = state["net"]
    model = JointVAE(int(state["n_classes"]), int(net["grid"]), int(net["latent_size"]), tuple(net["channels"]),
                     float(net["margin"]))
    model.load_state_dict(state["best_model"])
    settings = SearchSettings(**(search if search is not None else state["search"]))
    return LatentSearch(model=model.to(resolve_device(device)).eval(), settings=settings)
