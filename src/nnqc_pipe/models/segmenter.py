"""Rule ``train_segmenter``: k-fold cohort segmenters that make realistic training candidates for the learned QC.

QCResUNet (Qiu et al.) learns quality from candidates of segmenters sampled along their training, from poor to
converged. Here each fold's segmenter (a MONAI 2D residual UNet on the preprocessed slices) trains on the labelled
training subjects outside its fold and, at each epoch of ``segmenter.checkpoints``, predicts the subjects of its
fold, which it never saw: those predictions are the learned QC's "segmenter" candidates. The training loop is the
pipeline's one :func:`nnqc_pipe.models.training.fit` (resumable after every epoch; the predictions made so far are
part of the saved state).

Outputs in ``out_dir``: ``segmenter_fold{k}.pt`` (final state: weights, the held-out predictions under
``predictions`` keyed ``{subject}|{epoch}``), ``segmenter_fold{k}_curves.csv`` and the resumable state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from nnqc_pipe.models.device import resolve_device, seed_everything
from nnqc_pipe.models.presets import training_hash
from nnqc_pipe.models.training import SingleNetwork, batches_of, fit, progress, resume_run, seed_epoch

log = logging.getLogger(__name__)


def build_segmenter(n_classes: int, channels: Sequence[int], res_units: int) -> UNet:
    """A 2D MONAI UNet with residual units: image slice in, class logits out."""
    return UNet(spatial_dims=2, in_channels=1, out_channels=n_classes, channels=tuple(channels),
                strides=(2,) * (len(channels) - 1), num_res_units=res_units, norm="instance")


@torch.inference_mode()
def predict_stack(net: torch.nn.Module, image: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """Class indices [S, H, W] (uint8) of a segmenter on one preprocessed image stack [S, H, W] (eval mode)."""
    net.eval()
    out = []
    for start in range(0, len(image), batch_size):
        batch = torch.as_tensor(image[start:start + batch_size], dtype=torch.float32)[:, None]
        out.append(net(batch.to(device)).argmax(1).to(torch.uint8).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *image.shape[1:]), dtype=np.uint8)


def prediction_key(subject: str, epoch: int) -> str:
    """Key of one held-out prediction in the segmenter state."""
    return f"{subject}|{epoch}"


class SegmenterTrainer(SingleNetwork):
    """One fold's segmenter: trains on the other folds' slices, predicts its own fold at the checkpoint epochs (a
    :class:`nnqc_pipe.models.training.Trainer`)."""

    selection_key = "heldout_dice"

    def __init__(self, fold: int, cfg: dict[str, Any], n_classes: int, device: torch.device,
                 kind: str | None = None) -> None:
        self.kind = kind or f"segmenter_fold{fold}"
        self.cfg, self.n_classes, self.device = cfg, n_classes, device
        self.net = build_segmenter(n_classes, cfg["channels"], cfg["res_units"]).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg["lr"])
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.images = self.labels = np.zeros((0, 1, 1))
        self.heldout: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.predictions: dict[str, np.ndarray] = {}
        self.seed, self.n_slices = 0, 0

    def attach(self, images: np.ndarray, labels: np.ndarray, heldout: dict[str, tuple[np.ndarray, np.ndarray]],
               seed: int) -> None:
        """Training slices ([N, H, W] image and class indices), held-out subjects (name -> image, label stacks)."""
        self.images, self.labels, self.heldout, self.seed = images, labels, heldout, seed
        self.n_slices = len(labels)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training slices in a (seed, epoch)-determined order, with a random intensity gain."""
        rng = seed_epoch(self.seed, epoch, stream=2)
        self.net.train()
        batches = batches_of(rng.permutation(len(self.labels)), self.cfg["batch_size"])
        total = 0.0
        for index in progress(batches, len(batches), f"{self.kind} epoch {epoch + 1}"):
            gain = torch.as_tensor(rng.uniform(0.85, 1.2, (len(index), 1, 1, 1)), dtype=torch.float32)
            image = torch.as_tensor(self.images[index], dtype=torch.float32)[:, None] * gain
            label = torch.as_tensor(self.labels[index], dtype=torch.long)[:, None]
            loss = self.loss(self.net(image.to(self.device)), label.to(self.device))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.item()
        return {"loss": total / max(len(batches), 1), "steps": len(batches)}

    def validate(self, epoch: int, final: bool) -> dict[str, float]:
        """At a checkpoint epoch: predict every held-out subject and keep the masks; their mean foreground Dice."""
        if epoch not in self.cfg["checkpoints"]:
            return {}
        scores = []
        for subject, (image, label) in self.heldout.items():
            pred = self.predict(image)
            self.predictions[prediction_key(subject, epoch)] = pred
            inter = np.count_nonzero((pred > 0) & (label > 0))
            total = np.count_nonzero(pred > 0) + np.count_nonzero(label > 0)
            scores.append(1.0 if total == 0 else 2 * inter / total)
        return {"heldout_dice": float(np.mean(scores)) if scores else 0.0}

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class indices [S, H, W] of one preprocessed image stack."""
        return predict_stack(self.net, image, self.cfg["batch_size"], self.device)

    def load(self, state: dict[str, Any]) -> None:
        """Restore weights, optimiser and the predictions made before the interruption."""
        super().load(state)
        self.predictions = {k: v.numpy() for k, v in state["predictions"].items()}

    def state(self, **extra: Any) -> dict[str, Any]:
        """The full training state with the held-out predictions so far."""
        return {"kind": "segmenter", "model": self.net.state_dict(), "opt": self.opt.state_dict(),
                "predictions": {k: torch.from_numpy(v) for k, v in self.predictions.items()}, **extra}


def labelled_stacks(npz_paths: Sequence[str | os.PathLike]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Subject -> (image, label) stacks of preprocessed labelled subjects; a subject without a label is an error."""
    out = {}
    for path in npz_paths:
        with np.load(path) as data:
            if "label" not in data:
                raise ValueError(f"{path}: no 'label' array; segmenter subjects need ground truth")
            out[Path(path).stem] = (np.asarray(data["image"], dtype=np.float32), np.asarray(data["label"]))
    return out


def train_segmenter(fold: int, train_npz: Sequence[str | os.PathLike], heldout_npz: Sequence[str | os.PathLike],
                    cfg: dict[str, Any], out_dir: str | os.PathLike, device: str, seed: int) -> dict[str, np.ndarray]:
    """Train (or resume) fold ``fold``'s segmenter (``cfg``: the resolved preset); returns its held-out predictions
    keyed ``{subject}|{epoch}``."""
    dev = resolve_device(device)
    seed_everything(seed + fold)
    train, heldout = labelled_stacks(train_npz), labelled_stacks(heldout_npz)
    if not train or not heldout:
        raise ValueError(f"segmenter fold {fold}: {len(train)} training and {len(heldout)} held-out subjects; "
                         "the learned QC needs labelled training subjects in every fold")
    images = np.concatenate([image for image, _ in train.values()])
    labels = np.concatenate([label for _, label in train.values()])
    trainer = SegmenterTrainer(fold, cfg["segmenter"], cfg["n_classes"], dev)
    trainer.attach(images, labels, heldout, seed + fold)
    run_hash = training_hash(cfg, "segmenter", {"train": sorted(train), "heldout": sorted(heldout), "seed": seed,
                                                "fold": fold})
    run = resume_run(trainer, Path(out_dir) / f"{trainer.kind}_state.pt", run_hash)
    log.info("%s: %d training slices of %d subjects, %d held-out subjects, checkpoints %s, device %s",
             trainer.kind, len(labels), len(train), len(heldout), cfg["segmenter"]["checkpoints"], dev)
    section = {"epochs": max(cfg["segmenter"]["checkpoints"]), "patience": None,
               "max_minutes": cfg["segmenter"]["max_minutes"]}
    fit(trainer, section, run, out_dir, config_hash=run_hash)
    return trainer.predictions
