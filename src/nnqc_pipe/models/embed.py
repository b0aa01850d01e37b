"""Rule ``embed``: cache the frozen vision expert's (E2) features of every slice of one subject.

E2 is frozen, so its features are computed once per slice here and read by training and inference; they are
never recomputed per training step. Cache file ``embeddings/{subject}.npz``:

- ``pooled``  float16 [S, D]        the encoder's pooled (projected) image embedding per slice
- ``tokens``  float16 [S, G*G, W]   its patch tokens averaged to a G x G grid (``encoder.token_grid``)
- ``encoder`` 0-d str: JSON with architecture, checkpoint path and sha256, ``pretrained`` flag, token grid
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from nnqc_pipe.data.io import write_npz
from nnqc_pipe.models.device import resolve_device
from nnqc_pipe.models.experts import VisionExpert, load_vision_expert

log = logging.getLogger(__name__)


def embed_subject(
    npz_path: str | os.PathLike, out_path: str | os.PathLike, expert_cfg: dict[str, Any], device: str
) -> None:
    """Embed all slices of a preprocessed subject with E2 and write the cache file ``out_path``.

    ``expert_cfg`` is the resolved preset's ``encoder`` section. The tiny fallback encoder (when allowed) is
    saved next to ``out_path`` unless ``encoder.tiny_checkpoint`` names a location. To embed many subjects, load
    the encoder once (:func:`load_vision_expert`) and call :func:`embed_with` per subject.
    """
    expert = load_vision_expert(expert_cfg, resolve_device(device), fallback_dir=Path(out_path).parent)
    embed_with(expert, npz_path, out_path, int(expert_cfg.get("batch_size", 32)))


def embed_with(
    expert: VisionExpert, npz_path: str | os.PathLike, out_path: str | os.PathLike, batch_size: int
) -> int:
    """Embed all slices of a preprocessed subject with an already loaded E2 ``expert``; write the cache file
    ``out_path`` and return the number of slices."""
    with np.load(npz_path) as data:
        image = np.asarray(data["image"], dtype=np.float32)
    pooled, tokens = expert.embed(image, batch_size=batch_size)
    write_npz(
        out_path,
        pooled=pooled.astype(np.float16),
        tokens=tokens.astype(np.float16),
        encoder=np.array(json.dumps(expert.info)),
    )
    log.info(
        "embedded %d slices of %s with %s -> %s",
        image.shape[0],
        npz_path,
        expert.info["architecture"],
        out_path,
    )
    return int(image.shape[0])


def load_embeddings(path: str | os.PathLike, dtype: type = np.float32) -> dict[str, Any]:
    """Read a cache file: ``pooled``/``tokens`` as ``dtype`` arrays and the ``encoder`` record as a dict."""
    with np.load(path) as data:
        return {
            "pooled": data["pooled"].astype(dtype),
            "tokens": data["tokens"].astype(dtype),
            "encoder": json.loads(str(data["encoder"])),
        }
