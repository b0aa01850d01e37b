"""Helpers shared by the speed benchmarks (train_speed.py, inference_speed.py, device_check.py): synthetic
slices, the E2 embedding sizes, and timing that waits for the GPU; and by the offline scripts over a real-segmenter
run (learned_variants.py, latent_search_offline.py): the test candidates' mask files."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnqc_pipe.chunks import fill

CPU = torch.device("cpu")
DEGRADED_LEVELS = range(1, 6)

# E2 cache shapes: pooled projection, token width, tokens (4 x 4 grid = encoder.token_grid).
E2_SIZES = {
    "vit-b16": {"pooled_dim": 512, "token_dim": 768, "n_tokens": 16},  # UniMedCLIP ViT-B/16
    "tiny": {"pooled_dim": 64, "token_dim": 64, "n_tokens": 16},  # the untrained tiny fallback ViT
}


def synthetic_labels(n: int, patch: int | tuple[int, int], n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` class-index slices of nested ellipses, shaped like organ cross-sections ([n, H, W] uint8)."""
    height, width = (patch, patch) if isinstance(patch, int) else patch
    yy, xx = np.mgrid[:height, :width]
    yy, xx = yy / height, xx / width
    labels = np.zeros((n, height, width), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.35, 0.65, 2)
        a, b = rng.uniform(0.1, 0.3, 2)
        r = ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2
        for c in range(1, n_classes):
            labels[i][r < 1.0 - 0.6 * (c - 1) / max(n_classes - 1, 1)] = c
    return labels


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so wall times are the work's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], iters: int, device: torch.device = CPU,
          deadline: float | None = None) -> float:
    """Seconds per call of ``step`` after one warm-up call: ``iters`` calls, fewer (at least one) when the
    ``time.perf_counter()`` ``deadline`` comes first."""
    step()
    sync(device)
    started, done = time.perf_counter(), 0
    while done < iters and (done == 0 or deadline is None or time.perf_counter() < deadline):
        step()
        done += 1
    sync(device)
    return (time.perf_counter() - started) / done


def candidate_paths(config: dict[str, Any], run: Path, subject: str) -> dict[str, str]:
    """Source -> mask path of one test subject of a real-segmenter run (``config``: the run's cohort config):
    ``gt``, the degradation levels and the user sources, those whose file exists (the repair stage's masks are
    not listed: they depend on models trained after the run's QC models)."""
    patterns = {"gt": config["labels"],
                **{f"degraded_L{level}": str(run / "degraded" / "{subject}" / f"L{level}.nii.gz")
                   for level in DEGRADED_LEVELS},
                **config.get("sources", {})}
    paths = {source: fill(pattern, subject=subject) for source, pattern in patterns.items()}
    return {source: path for source, path in paths.items() if Path(path).is_file()}
