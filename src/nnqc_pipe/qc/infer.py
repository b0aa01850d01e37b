"""Per-subject inference: candidate mask -> pseudo ground truth on the subject's original grid.

The candidate is validated against the subject's grid and label set, mapped to the preprocessed patch stack
with the subject's inversion record, sampled with DDIM under the Team-of-Experts condition, decoded, and
mapped back to the original grid. An empty candidate (a missing segmentation) is a valid input: it is QC'd
like any other and comes out with a low predicted quality, not an error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from nnqc_pipe.data.io import write_nifti, write_parquet
from nnqc_pipe.data.preprocess import (
    Preprocessed,
    invert_probabilities,
    load_candidate,
    nifti_on_original_grid,
    original_slice_order,
    to_nifti,
    to_patch_space,
    values_to_indices,
)
from nnqc_pipe.models.embed import load_embeddings
from nnqc_pipe.models.latent_search import LatentSearch
from nnqc_pipe.models.pgt import PGTModels, generate_pgt, reconstruct
from nnqc_pipe.models.qcnet import QCNet
from nnqc_pipe.qc.baselines import LATENT_PREFIX, reconstruction_counts
from nnqc_pipe.qc.learned import estimated_truth, learned_slice_counts
from nnqc_pipe.qc.metrics import error_map

log = logging.getLogger(__name__)

@dataclass
class Inference:
    """The pGT (class indices, original grid) and per-slice facts in original slice order.

    ``slices`` has slice_index, slice_ratio, uncertainty and (when computed) the VAE-reconstruction counts of the
    candidate (:func:`nnqc_pipe.qc.baselines.reconstruction_counts`), and with the learned opinion its soft error counts
    (:func:`nnqc_pipe.qc.learned.learned_slice_counts`); ``estimated`` is then the learned opinion's estimated
    truth (class indices, original grid). With the latent search, ``slices`` has the counts of the candidate against
    its surrogate segmentation (``latent_*`` columns) and ``surrogate`` is that surrogate (class indices, original
    grid).
    """

    pgt: np.ndarray
    candidate: np.ndarray
    slices: pd.DataFrame
    estimated: np.ndarray | None = None
    surrogate: np.ndarray | None = None


def infer_subject(
    models: PGTModels,
    pre: Preprocessed,
    candidate_path: str | os.PathLike,
    embeddings_path: str | os.PathLike | None,
    inference_cfg: dict[str, Any],
    seed: int,
    learned: QCNet | None = None,
    latent: LatentSearch | None = None,
) -> Inference:
    """pGT for one candidate of one subject, back on the original grid (and the learned opinion and the latent
    search, when given: the search runs on the patch grid, its surrogate is mapped back like the pGT).

    The VAE-reconstruction baseline's counts are computed unless ``inference_cfg["vae_recon"]`` is false (the
    config's ``methods`` leaves ``vae_recon`` out)."""
    record = pre.record
    candidate_values = load_candidate(candidate_path, record)
    candidate_patch = to_patch_space(candidate_values, record)
    embeddings = load_embeddings(embeddings_path) if embeddings_path else None
    result = generate_pgt(
        models,
        candidate_patch,
        pre.slice_ratio,
        embeddings,
        image=pre.image,
        ddim_steps=int(inference_cfg["ddim_steps"]),
        n_samples=int(inference_cfg["samples"]),
        batch_size=int(inference_cfg["batch_size"]),
        seed=seed,
        start_strength=float(inference_cfg.get("start_strength", 1.0)),
        image_guidance=float(inference_cfg.get("image_guidance", 1.0)),
    )
    pgt_indices = invert_probabilities(result.probabilities, record)
    axis, original_index = original_slice_order(record)
    candidate_indices = values_to_indices(candidate_values, record["label_values"])
    counts: dict[str, np.ndarray] = {}
    if inference_cfg.get("vae_recon", True):
        recon = invert_probabilities(reconstruct(models, candidate_patch, int(inference_cfg["batch_size"])), record)
        counts = reconstruction_counts(candidate_indices, recon, axis, models.n_classes)
    estimated = None
    if learned is not None:
        probabilities = learned.probabilities(pre.image, candidate_patch, result.probabilities.argmax(1))
        counts.update(learned_slice_counts(probabilities, candidate_patch, record))
        estimated = estimated_truth(probabilities, candidate_indices, record)
    surrogate = None
    if latent is not None:
        surrogate = invert_probabilities(
            latent.probabilities(pre.image, candidate_patch, result.probabilities.argmax(1)), record)
        counts.update(reconstruction_counts(candidate_indices, surrogate, axis, latent.n_classes, LATENT_PREFIX))
    slices = pd.DataFrame({
        "slice_index": original_index.astype(np.int64),
        "slice_ratio": pre.slice_ratio.astype(np.float64),
        "uncertainty": result.uncertainty.astype(np.float64),
        **{column: values[original_index] for column, values in counts.items()},
    }).sort_values("slice_index", ignore_index=True)
    return Inference(pgt=pgt_indices, candidate=candidate_values, slices=slices, estimated=estimated,
                     surrogate=surrogate)


def save_inference(
    inference: Inference,
    record: dict[str, Any],
    pgt_path: str | os.PathLike,
    slices_path: str | os.PathLike,
    errors_path: str | os.PathLike | None,
    estimated_path: str | os.PathLike | None = None,
    surrogate_path: str | os.PathLike | None = None,
) -> None:
    """Write the pGT NIfTI (file label values, original affine), the per-slice table, the error map, the
    learned opinion's estimated truth and the latent search's surrogate segmentation."""
    pgt_img = to_nifti(inference.pgt, record)
    write_nifti(pgt_img, pgt_path)
    write_parquet(inference.slices, slices_path)
    if errors_path is not None:
        errors = error_map(values_to_indices(inference.candidate, record["label_values"]), inference.pgt)
        write_nifti(nifti_on_original_grid(errors, record), errors_path)
    if estimated_path is not None:
        if inference.estimated is None:
            raise ValueError(f"no learned estimate to write to {estimated_path}")
        write_nifti(to_nifti(inference.estimated, record), estimated_path)
    if surrogate_path is not None:
        if inference.surrogate is None:
            raise ValueError(f"no latent-search surrogate to write to {surrogate_path}")
        write_nifti(to_nifti(inference.surrogate, record), surrogate_path)
