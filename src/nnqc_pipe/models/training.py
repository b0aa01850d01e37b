"""The one training loop of both stages (:func:`fit`) and what it needs: slice loading, the run's bookkeeping
(:class:`RunState`), resumable state, curves, progress, stopping.

:func:`fit` runs epochs of any :class:`Trainer` (the VAE-GAN of ``train_vae``, the LDM of ``train_ldm``): train an
epoch, validate when the trainer says so, keep the weights of the best validation score, log, save the state and
the curves, stop on patience, the epoch budget or the wall-clock cap.

Resumability: the full training state is written atomically after every epoch to ``{stage}_state.pt`` next to
the final checkpoint (that file is not a rule output, so Snakemake leaves it in place when a job is killed).
A new run with the same training hash continues from it. Randomness is derived from ``(seed, epoch)`` at the
start of every epoch, so a resumed run follows exactly the path an uninterrupted one would have taken.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from nnqc_pipe.data.io import atomic_path

log = logging.getLogger(__name__)


@dataclass
class SliceSet:
    """All slices of a list of preprocessed subjects, concatenated along the first axis.

    ``image`` (float16, to halve the memory of large cohorts) is loaded only when the model takes it as input.
    """

    label: np.ndarray
    slice_ratio: np.ndarray
    subject: np.ndarray
    names: list[str]
    image: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.label.shape[0])


def load_slices(
    npz_paths: Sequence[str | os.PathLike], patch_size: Sequence[int], n_classes: int, with_image: bool = False
) -> SliceSet:
    """Read ``label`` and ``slice_ratio`` (and ``image``) of every subject, checking them against the plan."""
    labels, ratios, subjects, images = [], [], [], []
    for i, path in enumerate(npz_paths):
        with np.load(path) as data:
            if "label" not in data:
                raise ValueError(f"{path}: no 'label' array; training subjects need ground truth")
            label, ratio = np.asarray(data["label"]), np.asarray(data["slice_ratio"], dtype=np.float32)
            if with_image:
                images.append(np.asarray(data["image"], dtype=np.float16))
        if tuple(label.shape[1:]) != tuple(patch_size) or ratio.shape != label.shape[:1]:
            raise ValueError(f"{path}: label {label.shape} / slice_ratio {ratio.shape} do not fit patch {patch_size}")
        if label.size and int(label.max()) >= n_classes:
            raise ValueError(f"{path}: class index {int(label.max())} >= n_classes {n_classes}")
        labels.append(label.astype(np.uint8))
        ratios.append(ratio)
        subjects.append(np.full(label.shape[0], i, dtype=np.int32))
    return SliceSet(
        label=np.concatenate(labels),
        slice_ratio=np.concatenate(ratios),
        subject=np.concatenate(subjects),
        names=[Path(p).stem for p in npz_paths],
        image=np.concatenate(images) if with_image else None,
    )


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a training state atomically (a killed job never leaves a truncated file)."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load one of our own checkpoints (``vae.pt``, ``ldm.pt``: tensors and plain data only) on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state(path: str | os.PathLike, expected_hash: str) -> dict[str, Any] | None:
    """The saved state when it exists and belongs to the same training setup, else ``None``."""
    path = Path(path)
    if not path.is_file():
        return None
    state = read_checkpoint(path)
    if state.get("config_hash") != expected_hash:
        log.warning(
            "%s belongs to another configuration (%s != %s); starting afresh",
            path,
            state.get("config_hash"),
            expected_hash,
        )
        return None
    log.info("resuming from %s after epoch %d (step %d)", path, state["epoch"], state["step"])
    return state


def write_curves(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write the per-epoch curves as CSV, atomically."""
    with atomic_path(path, suffix=".csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def progress(batches: Iterable[Any], total: int, desc: str) -> Iterator[Any]:
    """A tqdm bar over ``batches`` when stderr is a terminal; the plain iterable in batch jobs and logs."""
    if sys.stderr.isatty():
        yield from tqdm(batches, total=total, desc=desc, leave=False)
    else:
        yield from batches


def seed_epoch(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """Reseed torch for (seed, epoch, stream) and return the NumPy generator of the same triple."""
    torch.manual_seed(seed * 1_000_003 + epoch * 101 + stream)
    return np.random.default_rng([seed, epoch, stream])


def batches_of(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split a permutation into batches, dropping a last batch of one slice (BatchNorm/GroupNorm-safe)."""
    out = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [b for b in out if len(b) > 1] or out


class StopRule:
    """Early stopping on the validation score and a wall-clock cap over all (resumed) runs."""

    def __init__(self, patience: int | None, max_minutes: float | None, seconds_before: float) -> None:
        self.patience, self.max_minutes = patience, max_minutes
        self.started = time.monotonic() - seconds_before

    @property
    def seconds(self) -> float:
        """Training seconds so far, earlier runs of the same state included."""
        return time.monotonic() - self.started

    @property
    def time_up(self) -> bool:
        """Whether the wall-clock cap has been reached."""
        return bool(self.max_minutes) and self.seconds >= 60 * self.max_minutes

    def reason(self, epoch: int, best_epoch: int) -> str | None:
        """Why training should stop after ``epoch`` (1-based), or ``None`` to go on."""
        if self.patience and epoch - best_epoch >= self.patience:
            return f"no validation improvement for {self.patience} epochs"
        if self.time_up:
            return f"time cap of {self.max_minutes} min reached"
        return None


@dataclass
class RunState:
    """The bookkeeping of a training run, saved with its state: epochs and steps done, the best validation score
    (``best_score``: the trainer's selection score; ``best_scores``: every score of that epoch) and its epoch, the
    per-epoch curves, training seconds over all resumed runs, the weights of the best epoch, and stage-specific
    facts (``extra``, e.g. the LDM's latent scale)."""

    epoch: int = 0
    step: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    best_scores: dict[str, float] = field(default_factory=dict)
    curves: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    best_model: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_state(self) -> dict[str, Any]:
        """The keys saved in the checkpoint (``extra`` flattened in)."""
        out = asdict(self)
        out["best_model"] = self.best_model
        return {**out, **out.pop("extra")}

    @classmethod
    def from_state(cls, state: dict[str, Any], extra_keys: Sequence[str] = ()) -> RunState:
        """The bookkeeping of a saved state."""
        run = cls(**{k: state[k] for k in ("epoch", "step", "best_score", "best_epoch", "curves", "seconds")})
        run.best_scores = state.get("best_scores", {})
        run.best_model = state["best_model"]
        run.extra = {k: state[k] for k in extra_keys}
        return run


class Trainer(Protocol):
    """What :func:`fit` drives: one stage's networks, optimisers and data."""

    kind: str  # "vae" or "ldm": names the state, curves and log lines
    selection_key: str  # the validation score whose best epoch is kept (higher is better)
    n_slices: int  # training slices per epoch (throughput in the curves)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch (0-based); the mean losses plus ``steps``."""

    def validate(self, epoch: int, final: bool) -> dict[str, float]:
        """Validation scores after ``epoch`` (1-based), the selection score under ``selection_key``; ``{}`` when
        this epoch is not validated. ``final``: the last epoch of the run."""

    def selected_weights(self) -> dict[str, torch.Tensor]:
        """The weights a better validation score keeps (e.g. the EMA copy)."""

    def state(self, **extra: Any) -> dict[str, Any]:
        """The full training state plus ``extra``."""


class SingleNetwork:
    """``selected_weights`` and ``load`` of a trainer with one network ``net`` and one optimiser ``opt``."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer

    def selected_weights(self) -> dict[str, torch.Tensor]:
        """The network's weights."""
        return self.net.state_dict()

    def load(self, state: dict[str, Any]) -> None:
        """Restore the network and optimiser from a saved state."""
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])


def resume_run(trainer: Any, path: str | os.PathLike, run_hash: str, extra_keys: Sequence[str] = ()) -> RunState:
    """The bookkeeping of the saved state at ``path`` (restored into ``trainer``) when it belongs to ``run_hash``,
    else a fresh :class:`RunState`."""
    state = load_state(path, run_hash)
    if state is None:
        return RunState()
    trainer.load(state)
    return RunState.from_state(state, extra_keys=extra_keys)


def snapshot(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached copy of a state dict."""
    return {k: v.detach().clone() for k, v in weights.items()}


def fit(trainer: Trainer, section: dict[str, Any], run: RunState, out_dir: str | os.PathLike,
        **saved: Any) -> dict[str, Any]:
    """Train ``trainer`` from ``run`` until ``section['epochs']``, patience or ``section['max_minutes']``.

    After every epoch the full state (with ``saved``: config hash, config, ...) goes to ``<kind>_state.pt`` and
    the curves to ``<kind>_curves.csv``; at the end the final state is also written to ``<kind>.pt`` and returned.
    """
    out_dir, kind = Path(out_dir), trainer.kind
    if run.best_model is None:
        run.best_model = snapshot(trainer.selected_weights())
    stop = StopRule(section["patience"], section["max_minutes"], run.seconds)
    stopped = None
    while run.epoch < section["epochs"] and stopped is None:
        started = stop.seconds
        losses = trainer.run_epoch(run.epoch)
        train_seconds = stop.seconds - started
        run.epoch += 1
        run.step += losses.pop("steps")
        scores = trainer.validate(run.epoch, final=run.epoch == section["epochs"] or stop.time_up)
        if scores and scores[trainer.selection_key] > run.best_score:
            run.best_score, run.best_epoch, run.best_scores = scores[trainer.selection_key], run.epoch, scores
            run.best_model = snapshot(trainer.selected_weights())
        row = {"epoch": run.epoch, "step": run.step, **losses, **scores, "seconds": stop.seconds - started,
               "slices_per_s": trainer.n_slices / max(train_seconds, 1e-9)}
        run.curves.append(row)
        run.seconds = stop.seconds
        log.info("%s epoch %d/%d: %s |%s | %.1f s, %.1f slices/s", kind, run.epoch, section["epochs"],
                 " ".join(f"{k} {v:.4g}" for k, v in losses.items()),
                 "".join(f" {k} {v:.4f}" for k, v in scores.items()), row["seconds"], row["slices_per_s"])
        stopped = stop.reason(run.epoch, run.best_epoch)
        save_state(out_dir / f"{kind}_state.pt", trainer.state(**saved, **run.as_state()))
        write_curves(out_dir / f"{kind}_curves.csv", run.curves)
    if stopped:
        log.info("%s: stopped after epoch %d: %s", kind, run.epoch, stopped)
    final = trainer.state(**saved, **run.as_state(), stopped=stopped)
    save_state(out_dir / f"{kind}_state.pt", final)
    save_state(out_dir / f"{kind}.pt", final)
    write_curves(out_dir / f"{kind}_curves.csv", run.curves)
    log.info("%s: best validation %s %.4f at epoch %d; %.0f s in total", kind, trainer.selection_key, run.best_score,
             run.best_epoch, run.seconds)
    return final
