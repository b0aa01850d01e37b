"""The repair stage's cohort segmenter and its refinement step (rules ``train_repair_segmenter`` and ``repair``).

QC-driven refinement (``DESIGN.md``, "The peer methods"): a segmenter trained on the labelled training subjects
segments the cohort; on the subjects QC flags it is refined with a semi-supervised loss against QC's reference mask
of them (the pGT of its own mask, or the learned opinion's estimated truth), weighted α = 1/epoch, plus the
supervised loss on the labelled subjects. This module holds the networks' side: training the segmenter (the learned
opinion's :class:`~nnqc_pipe.models.segmenter.SegmenterTrainer` and :func:`~nnqc_pipe.models.training.fit`, so it is
resumable after every epoch) and one refinement epoch (:class:`Refiner`). The loop that alternates refinement and QC
is :func:`nnqc_pipe.qc.repair.refine_loop`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss, GeneralizedDiceLoss

from nnqc_pipe.models.device import resolve_device, seed_everything
from nnqc_pipe.models.presets import training_hash
from nnqc_pipe.models.segmenter import SegmenterTrainer, build_segmenter, labelled_stacks, predict_stack
from nnqc_pipe.models.training import batches_of, fit, read_checkpoint, resume_run, seed_epoch

log = logging.getLogger(__name__)

# The cohort segmenter's files in its folder: segmenter.pt (final state), segmenter_state.pt, segmenter_curves.csv.
SEGMENTER_KIND = "segmenter"
# Random stream of the refinement epochs (the segmenters' own training uses stream 2).
REFINE_STREAM = 3


def train_cohort_segmenter(train_npz: Sequence[str | os.PathLike], val_npz: Sequence[str | os.PathLike],
                           cfg: dict[str, Any], out_dir: str | os.PathLike, device: str, seed: int) -> Path:
    """Train (or resume) the cohort segmenter on the ``train_npz`` subjects, keeping the weights of the checkpoint
    epoch (``cfg["segmenter"]["checkpoints"]``) with the best Dice on the ``val_npz`` subjects (on the training
    subjects themselves when there are none, with a warning). ``cfg`` is the resolved preset; returns the path of
    ``segmenter.pt``."""
    dev = resolve_device(device)
    seed_everything(seed)
    train, val = labelled_stacks(train_npz), labelled_stacks(val_npz)
    if not train:
        raise ValueError("the repair stage's segmenter needs labelled training subjects; the split has none")
    if not val:
        log.warning("no validation subjects: the cohort segmenter's checkpoint is selected on its training subjects")
    heldout = val or train
    trainer = SegmenterTrainer(0, cfg["segmenter"], cfg["n_classes"], dev, kind=SEGMENTER_KIND)
    trainer.attach(np.concatenate([image for image, _ in train.values()]),
                   np.concatenate([label for _, label in train.values()]), heldout, seed)
    run_hash = training_hash(cfg, "segmenter", {"train": sorted(train), "heldout": sorted(heldout), "seed": seed,
                                                "cohort_segmenter": True})
    run = resume_run(trainer, Path(out_dir) / f"{SEGMENTER_KIND}_state.pt", run_hash)
    log.info("cohort segmenter: %d training slices of %d subjects, selected on %d subjects, device %s",
             trainer.n_slices, len(train), len(heldout), dev)
    section = {"epochs": max(cfg["segmenter"]["checkpoints"]), "patience": None,
               "max_minutes": cfg["segmenter"]["max_minutes"]}
    fit(trainer, section, run, out_dir, config_hash=run_hash)
    return Path(out_dir) / f"{SEGMENTER_KIND}.pt"


def load_cohort_segmenter(path: str | os.PathLike, cfg: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The cohort segmenter's selected (best validation) weights, on ``device``."""
    state = read_checkpoint(path)
    net = build_segmenter(cfg["n_classes"], cfg["segmenter"]["channels"], cfg["segmenter"]["res_units"])
    net.load_state_dict(state["best_model"])
    return net.to(device)


class Refiner:
    """One network refined epoch by epoch: on the flagged subjects' slices against their reference masks
    (generalised Dice, weighted α = 1/epoch) plus, batch for batch, the supervised Dice + cross-entropy on as many
    labelled slices drawn at random. The order and the draws come from (seed, epoch): a resumed loop follows the
    path an uninterrupted one would have taken."""

    def __init__(self, net: torch.nn.Module, images: np.ndarray, labels: np.ndarray, lr: float, batch_size: int,
                 device: torch.device, seed: int) -> None:
        if len(labels) == 0:
            raise ValueError("refinement needs labelled slices for its supervised loss")
        self.net, self.device, self.seed, self.batch_size = net, device, seed, batch_size
        self.images, self.labels = images, labels
        self.opt = torch.optim.Adam(net.parameters(), lr=lr)
        self.supervised = DiceCELoss(to_onehot_y=True, softmax=True)
        self.semi_supervised = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, batch=True)

    def _batch(self, images: np.ndarray, index: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(images[index], dtype=torch.float32)[:, None].to(self.device)

    def _target(self, labels: np.ndarray, index: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(labels[index], dtype=torch.long)[:, None].to(self.device)

    def refine_epoch(self, epoch: int, images: np.ndarray, references: np.ndarray) -> dict[str, float]:
        """Refinement epoch ``epoch`` (1-based) over the flagged slices ``images`` [N, H, W] and their reference
        class indices ``references`` [N, H, W]; the mean losses (``loss`` = supervised + α·semi-supervised)."""
        if epoch < 1:
            raise ValueError(f"refinement epochs count from 1 (α = 1/epoch), got {epoch}")
        alpha = 1.0 / epoch
        rng = seed_epoch(self.seed, epoch, stream=REFINE_STREAM)
        self.net.train()
        sums = {"loss": 0.0, "supervised": 0.0, "semi_supervised": 0.0}
        batches = batches_of(rng.permutation(len(references)), self.batch_size)
        for index in batches:
            drawn = rng.integers(0, len(self.labels), len(index))
            supervised = self.supervised(self.net(self._batch(self.images, drawn)), self._target(self.labels, drawn))
            semi = self.semi_supervised(self.net(self._batch(images, index)), self._target(references, index))
            loss = supervised + alpha * semi
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            for key, value in (("loss", loss), ("supervised", supervised), ("semi_supervised", semi)):
                sums[key] += float(value.item())
        return {"alpha": alpha, **{k: v / max(len(batches), 1) for k, v in sums.items()}}

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class indices [S, H, W] of one preprocessed image stack."""
        return predict_stack(self.net, image, self.batch_size, self.device)

    def state(self) -> dict[str, Any]:
        """Weights and optimiser (part of the loop's resumable state)."""
        return {"model": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        """Restore weights and optimiser from :meth:`state`."""
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
