"""Rule ``train_qcnet``: the learned QC opinion, a QCResUNet-family network that does not rest on the pGT.

The network (a MONAI UNet with residual units; 2D on each slice, or 3D on the whole stack with
``qcnet.spatial_dims: 3``) takes the image and the one-hot candidate mask and outputs,
for every error *group* (the foreground, and each class when there are several), two voxel maps: the probability
that a candidate voxel of the group is wrong ("extra") and that a voxel outside it belongs to the group
("missed"). The volume's quality is *counted* from those maps, SegQC-style, never averaged over slices:

    TP = Σ cand·(1 − p_extra),  FP = Σ cand·p_extra,  FN = Σ (1 − cand)·p_missed,  DSC = 2TP / (2TP + FP + FN)

over every voxel of the volume (:mod:`nnqc_pipe.models.error_counts`). Training (Qiu et al.'s loss) is
binary cross-entropy + Dice on the error maps plus the MAE between the counted DSC of each whole candidate volume
and its real DSC, on candidates drawn with a DSC-histogram-balanced sampler (:func:`balanced_draws`); the checkpoint
kept is the one with the smallest DSC error on the validation subjects' candidates. Outputs in ``out_dir``:
``qcnet.pt`` (final state, best weights under ``best_model``), ``qcnet_curves.csv``, the resumable state.
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
from monai.losses import DiceLoss
from monai.networks.nets import UNet

from nnqc_pipe.chunks import fill
from nnqc_pipe.models.device import resolve_device, seed_everything
from nnqc_pipe.models.error_counts import count_terms, dsc_from_terms, error_groups, group_mask
from nnqc_pipe.models.presets import SPATIAL_DIMS, training_hash
from nnqc_pipe.models.training import SingleNetwork, fit, progress, read_checkpoint, resume_run, seed_epoch

log = logging.getLogger(__name__)

DSC_BINS = 10
QCNET = "qcnet.pt"


def error_targets(candidate: torch.Tensor, label: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[B, 2G, H, W] float targets: per group, "extra" (candidate, not truth) then "missed" (truth, not candidate)."""
    maps = []
    for _, group in error_groups(n_classes):
        cand, truth = group_mask(candidate, group), group_mask(label, group)
        maps += [cand & ~truth, truth & ~cand]
    return torch.stack(maps, dim=1).float()


def build_qcnet(n_classes: int, channels: Sequence[int], res_units: int, pgt_channel: bool = False,
                spatial_dims: int = 2) -> UNet:
    """Image (1 channel) + one-hot candidate (``n_classes``) in, plus the one-hot pGT (``n_classes``) with
    ``pgt_channel``, two error logits per group out; ``spatial_dims`` 2 (per slice) or 3 (the whole stack). Both
    variants are measured in benchmarks/learned_variants.py."""
    if spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"qcnet.spatial_dims must be one of {SPATIAL_DIMS}, got {spatial_dims!r}")
    in_channels = 1 + n_classes * (2 if pgt_channel else 1)
    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2 * len(error_groups(n_classes)),
                channels=tuple(channels), strides=(2,) * (len(channels) - 1), num_res_units=res_units,
                norm="instance")


def network_input(image: torch.Tensor, candidate: torch.Tensor, n_classes: int, pgt: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """[B, 1 + C, H, W]: the normalised image slice and the one-hot candidate; [B, 1 + 2C, H, W] with the one-hot
    ``pgt`` (class indices) after them."""
    masks = [candidate] if pgt is None else [candidate, pgt]
    one_hot = [F.one_hot(m.long(), n_classes).permute(0, 3, 1, 2).float() for m in masks]
    return torch.cat([image[:, None].float(), *one_hot], dim=1)


def stack_logits(net: torch.nn.Module, inputs: Sequence[torch.Tensor], spatial_dims: int) -> torch.Tensor:
    """[ΣS, 2G, H, W] error logits of the network inputs of whole candidate volumes ([S, C, H, W] each).

    2D: one batch of every slice. 3D: each volume on its own as [1, C, H, W, S] (the slices last: with them first,
    PyTorch ran most of the batch-of-one 3D convolutions on its slow native path, 1.5 s against 0.58 s per CPU
    training step of two hippocampus volumes), its slices zero-padded at the end to a multiple of the network's
    total stride (the padding's outputs dropped), so that the two variants give the same layout to the loss and
    the counts.
    """
    if spatial_dims == 2:
        return net(torch.cat(list(inputs)))
    out = []
    for volume in inputs:
        n_slices = len(volume)
        padded = F.pad(volume.permute(1, 2, 3, 0), (0, -n_slices % _total_stride(net))).contiguous()
        out.append(net(padded[None])[0, ..., :n_slices].permute(3, 0, 1, 2))
    return torch.cat(out)


def _total_stride(net: torch.nn.Module) -> int:
    """The product of a MONAI UNet's strides: what a 3D stack's depth must divide into."""
    return int(np.prod(getattr(net, "strides", (1,))))


def volume_dsc(probs: torch.Tensor, candidate: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[G] counted DSC of one whole candidate volume from its error probabilities [S, 2G, H, W]."""
    out = []
    for g, (_, group) in enumerate(error_groups(n_classes)):
        terms = count_terms(group_mask(candidate, group), probs[:, 2 * g], probs[:, 2 * g + 1])
        out.append(dsc_from_terms(*terms))
    return torch.stack(out)


def balanced_draws(dsc: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` candidate indices drawn so that every occupied 0.1 bin of the real foreground DSC is equally likely
    (QCResUNet's histogram balancing; within a bin, uniformly)."""
    if len(dsc) == 0:
        raise ValueError("no training candidates to draw from")
    bins = np.clip((np.asarray(dsc) * DSC_BINS).astype(int), 0, DSC_BINS - 1)
    counts = np.bincount(bins, minlength=DSC_BINS)
    weights = 1.0 / counts[bins]
    return rng.choice(len(dsc), size=n, replace=True, p=weights / weights.sum())


@dataclass
class CandidateSet:
    """Training candidates of a list of subjects: per subject its image and label stacks, and per candidate its
    subject, class-index stack and real DSC per error group (original grid); ``pgts``, where given, each
    candidate's pGT (class indices, patch grid) for a network with the pGT channel."""

    images: list[np.ndarray]
    labels: list[np.ndarray]
    subject: np.ndarray
    candidates: list[np.ndarray]
    real_dsc: np.ndarray
    names: list[str]
    pgts: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.candidates)


def load_candidate_set(subjects: Sequence[str], candidate_npz: str, preprocessed_npz: str,
                       pgt_npz: str | None = None) -> CandidateSet:
    """Read the candidates (``learned/candidates/{subject}.npz``) and preprocessed stacks of ``subjects``, and with
    ``pgt_npz`` (a pattern with {subject}; key ``pgts``, one stack per candidate, in order) their pGTs."""
    images, labels, owner, candidates, real = [], [], [], [], []
    pgts: list[np.ndarray] | None = [] if pgt_npz else None
    for i, subject in enumerate(subjects):
        with np.load(fill(preprocessed_npz, subject=subject)) as pre:
            images.append(np.asarray(pre["image"], dtype=np.float16))
            labels.append(np.asarray(pre["label"], dtype=np.uint8))
        with np.load(fill(candidate_npz, subject=subject)) as data:
            stack = np.asarray(data["candidates"], dtype=np.uint8)
            candidates += list(stack)
            real.append(np.asarray(data["real_dsc"], dtype=np.float32))
            owner += [i] * len(stack)
        if pgts is not None and pgt_npz is not None:
            with np.load(fill(pgt_npz, subject=subject)) as data:
                own = np.asarray(data["pgts"], dtype=np.uint8)
            if own.shape != stack.shape:
                raise ValueError(f"subject {subject!r}: pGTs {own.shape} do not match its candidates {stack.shape}")
            pgts += list(own)
    return CandidateSet(images=images, labels=labels, subject=np.asarray(owner, dtype=np.int64),
                        candidates=candidates, real_dsc=np.concatenate(real) if real else np.zeros((0, 1)),
                        names=list(subjects), pgts=pgts)


class QCNetTrainer(SingleNetwork):
    """The QC network's training run (a :class:`nnqc_pipe.models.training.Trainer`)."""

    kind = "qcnet"
    selection_key = "val_qc"

    def __init__(self, cfg: dict[str, Any], n_classes: int, device: torch.device, pgt_channel: bool = False) -> None:
        self.cfg, self.n_classes, self.device, self.pgt_channel = cfg, n_classes, device, pgt_channel
        self.spatial_dims = int(cfg.get("spatial_dims", 2))
        self.net = build_qcnet(n_classes, cfg["channels"], cfg["res_units"], pgt_channel,
                               self.spatial_dims).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg["lr"])
        self.dice = DiceLoss(sigmoid=True, batch=True)
        self.weights = cfg["loss_weights"]
        self.train_set: CandidateSet | None = None
        self.val_set: CandidateSet | None = None
        self.seed, self.n_slices = 0, 0

    def attach(self, train: CandidateSet, val: CandidateSet, seed: int) -> None:
        """Training and validation candidates (with their pGTs for a network with the pGT channel), and the
        run's seed."""
        if self.pgt_channel and (train.pgts is None or val.pgts is None):
            raise ValueError("a QC network with the pGT channel needs every candidate's pGT (load_candidate_set's "
                             "pgt_npz)")
        self.train_set, self.val_set, self.seed = train, val, seed
        mean_slices = np.mean([len(c) for c in train.candidates]) if len(train) else 0
        self.n_slices = int(self.cfg["volumes_per_epoch"] * mean_slices)

    def _volume(self, data: CandidateSet, index: int, gain: float = 1.0, offset: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Image, candidate, label and (with the pGT channel) pGT stacks of one candidate, on the device."""
        owner = int(data.subject[index])
        image = torch.as_tensor(data.images[owner], dtype=torch.float32) * gain + offset
        pgt = None
        if self.pgt_channel and data.pgts is not None:
            pgt = torch.as_tensor(data.pgts[index]).long().to(self.device)
        return (image.to(self.device), torch.as_tensor(data.candidates[index]).long().to(self.device),
                torch.as_tensor(data.labels[owner]).long().to(self.device), pgt)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """``volumes_per_epoch`` balanced draws, ``volumes_per_step`` whole candidate volumes per step."""
        assert self.train_set is not None
        rng = seed_epoch(self.seed, epoch, stream=3)
        draws = balanced_draws(self.train_set.real_dsc[:, 0], self.cfg["volumes_per_epoch"], rng)
        per_step = self.cfg["volumes_per_step"]
        steps = [draws[i:i + per_step] for i in range(0, len(draws), per_step)]
        self.net.train()
        sums: dict[str, float] = {}
        for step in progress(steps, len(steps), f"qcnet epoch {epoch + 1}"):
            terms = self.train_step(step, rng)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value
        return {key: value / len(steps) for key, value in sums.items()} | {"steps": len(steps)}

    def train_step(self, indices: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
        """One update on whole candidate volumes: error-map BCE + Dice, and the MAE of each volume's counted DSC."""
        assert self.train_set is not None
        volumes = [self._volume(self.train_set, int(i), rng.uniform(0.85, 1.2), rng.uniform(-0.1, 0.1))
                   for i in indices]
        candidate = torch.cat([v[1] for v in volumes])
        label = torch.cat([v[2] for v in volumes])
        logits = stack_logits(self.net, [network_input(image, cand, self.n_classes, pgt)
                                         for image, cand, _, pgt in volumes], self.spatial_dims)
        target = error_targets(candidate, label, self.n_classes)
        probs = torch.sigmoid(logits)
        start, dsc_errors = 0, []
        for (_, cand, _, _), i in zip(volumes, indices, strict=True):
            stop = start + len(cand)
            predicted = volume_dsc(probs[start:stop], cand, self.n_classes)
            real = torch.as_tensor(self.train_set.real_dsc[int(i)], device=self.device)
            dsc_errors.append((predicted - real).abs().mean())
            start = stop
        terms = {"bce": F.binary_cross_entropy_with_logits(logits, target), "dice": self.dice(logits, target),
                 "dsc": torch.stack(dsc_errors).mean()}
        loss = sum(self.weights[k] * v for k, v in terms.items())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.item()} | {k: v.item() for k, v in terms.items()}

    @torch.inference_mode()
    def predicted_dsc(self, data: CandidateSet) -> np.ndarray:
        """[N, G] counted DSC of every candidate volume of ``data``."""
        self.net.eval()
        out = []
        for i in range(len(data)):
            image, cand, _, pgt = self._volume(data, i)
            probs = error_probabilities(self.net, image, cand, self.n_classes, self.cfg["batch_size"], pgt,
                                        self.spatial_dims)
            out.append(volume_dsc(probs, cand, self.n_classes).cpu().numpy())
        return np.asarray(out, dtype=np.float64).reshape(len(data), -1)

    def validate(self, epoch: int, final: bool) -> dict[str, float]:
        """1 − MAE of the foreground DSC of the validation candidates (and r, for the curves)."""
        assert self.val_set is not None
        if not len(self.val_set):
            return {"val_qc": 0.0}
        predicted, real = self.predicted_dsc(self.val_set)[:, 0], self.val_set.real_dsc[:, 0]
        mae = float(np.abs(predicted - real).mean())
        r = float(np.corrcoef(predicted, real)[0, 1]) if np.ptp(predicted) > 0 and np.ptp(real) > 0 else 0.0
        return {"val_qc": 1 - mae, "val_mae": mae, "val_r": r}

    def state(self, **extra: Any) -> dict[str, Any]:
        """The full training state plus run bookkeeping in ``extra``."""
        return {"kind": "qcnet", "n_classes": self.n_classes,
                "net": {"channels": list(self.cfg["channels"]), "res_units": self.cfg["res_units"],
                        "pgt_channel": self.pgt_channel, "spatial_dims": self.spatial_dims},
                "model": self.net.state_dict(), "opt": self.opt.state_dict(), **extra}


def error_probabilities(net: torch.nn.Module, image: torch.Tensor, candidate: torch.Tensor, n_classes: int,
                        batch_size: int, pgt: torch.Tensor | None = None, spatial_dims: int = 2) -> torch.Tensor:
    """[S, 2G, H, W] error probabilities of a candidate stack (and its pGT, for a network with the pGT channel):
    in batches of slices (2D), or the whole stack at once (3D)."""
    if spatial_dims == 3:
        return torch.sigmoid(stack_logits(net, [network_input(image, candidate, n_classes, pgt)], spatial_dims))
    out = []
    for start in range(0, len(candidate), batch_size):
        part = slice(start, start + batch_size)
        extra = None if pgt is None else pgt[part]
        out.append(torch.sigmoid(net(network_input(image[part], candidate[part], n_classes, extra))))
    return torch.cat(out)


def train_qcnet(train: CandidateSet, val: CandidateSet, cfg: dict[str, Any], out_dir: str | os.PathLike,
                device: str, seed: int) -> None:
    """Train (or resume) the QC network (``cfg``: the resolved preset) and write ``qcnet.pt``."""
    dev = resolve_device(device)
    seed_everything(seed)
    trainer = QCNetTrainer(cfg["qcnet"], cfg["n_classes"], dev, pgt_channel=train.pgts is not None)
    trainer.attach(train, val, seed)
    identity = {"train": train.names, "val": val.names, "seed": seed, "n_train": len(train), "n_val": len(val)}
    if trainer.pgt_channel:
        identity["pgt_channel"] = True
    run_hash = training_hash(cfg, "qcnet", identity)
    run = resume_run(trainer, Path(out_dir) / "qcnet_state.pt", run_hash)
    log.info("qcnet: %d training candidates of %d subjects, %d validation candidates of %d subjects, device %s",
             len(train), len(train.names), len(val), len(val.names), dev)
    fit(trainer, cfg["qcnet"], run, out_dir, config_hash=run_hash)


@dataclass
class QCNet:
    """A trained QC network ready for inference."""

    net: torch.nn.Module
    n_classes: int
    batch_size: int
    device: torch.device
    pgt_channel: bool = False
    spatial_dims: int = 2

    @property
    def groups(self) -> list[tuple[str, int | None]]:
        """The error groups of the network's outputs."""
        return error_groups(self.n_classes)

    @torch.inference_mode()
    def probabilities(self, image: np.ndarray, candidate: np.ndarray, pgt: np.ndarray | None = None) -> np.ndarray:
        """[S, 2G, H, W] float32 error probabilities of a preprocessed image and class-index candidate stack;
        a network with the pGT channel needs the candidate's ``pgt`` (class indices, the same grid)."""
        if self.pgt_channel and pgt is None:
            raise ValueError("this QC network was trained with the pGT channel: pass the candidate's pGT")
        extra = None if not self.pgt_channel else torch.as_tensor(pgt, device=self.device).long()
        probs = error_probabilities(self.net, torch.as_tensor(image, dtype=torch.float32, device=self.device),
                                    torch.as_tensor(candidate, device=self.device).long(), self.n_classes,
                                    self.batch_size, extra, self.spatial_dims)
        return probs.float().cpu().numpy()


def load_qcnet(path: str | os.PathLike, device: str = "auto", batch_size: int = 64) -> QCNet:
    """The best weights of a trained ``qcnet.pt`` on ``device``."""
    state = read_checkpoint(path)
    dev = resolve_device(device)
    pgt_channel = bool(state["net"].get("pgt_channel", False))
    spatial_dims = int(state["net"].get("spatial_dims", 2))
    net = build_qcnet(state["n_classes"], state["net"]["channels"], state["net"]["res_units"], pgt_channel,
                      spatial_dims)
    net.load_state_dict(state["best_model"])
    return QCNet(net=net.to(dev).eval(), n_classes=int(state["n_classes"]), batch_size=batch_size, device=dev,
                 pgt_channel=pgt_channel, spatial_dims=spatial_dims)
