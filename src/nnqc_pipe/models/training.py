"""Machinery shared by the two training stages: slice loading, resumable state, curves, progress, stopping.

Resumability: the full training state is written atomically after every epoch to ``{stage}_state.pt`` next to
the final checkpoint (that file is not a rule output, so Snakemake leaves it in place when a job is killed).
A new run with the same training hash continues from it. Randomness is derived from ``(seed, epoch)`` at the
start of every epoch, so a resumed run follows exactly the path an uninterrupted one would have taken.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from nnqc_pipe.io import atomic_path

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


def load_state(path: str | os.PathLike, expected_hash: str) -> dict[str, Any] | None:
    """The saved state when it exists and belongs to the same training setup, else ``None``."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
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
