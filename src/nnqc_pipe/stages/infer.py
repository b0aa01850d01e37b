"""Stage of ``rules/infer.smk``: a pseudo ground truth for every candidate of a chunk, on the original grids."""

from __future__ import annotations

import logging
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from nnqc_pipe.chunks import describe_task, fill, record_row, run_chunk, task_list, write_chunk_record
from nnqc_pipe.data.io import PathLike

log = logging.getLogger(__name__)


def subject_seed(seed: int, subject: str) -> int:
    """Sampling seed of a subject: the same noise for every source, so sources are compared fairly."""
    return (seed * 1_000_003 + zlib.crc32(subject.encode())) % 2**31


def infer(tasks: dict[str, list[str]], npz: str, embeddings: str | None, candidates: dict[str, str],
          model_dir: PathLike, inference: dict[str, Any], out_pgt: str, out_slices: str, out_errors: str | None,
          record: PathLike, device: str = "auto", seed: int = 0, qcnet: str | None = None,
          out_learned: str | None = None) -> None:
    """pGTs of a chunk's candidates on their original grids, with per-slice facts and error maps.

    The VAE and LDM are loaded once; the subjects run one after the other, each subject's sources together (its
    preprocessed stack read once), each with :func:`nnqc_pipe.qc.infer.infer_subject`.

    Args:
        tasks: JSON object source -> subjects of the chunk.
        npz: preprocessed .npz path pattern with {subject}.
        embeddings: embeddings path pattern with {subject} ('none' when the LDM does not use the image).
        candidates: JSON object source -> candidate mask path pattern with {subject}.
        model_dir: folder with vae.pt and ldm.pt.
        inference: JSON object of the config's inference section (ddim_steps, samples, batch_size, ...; with
            "vae_recon": false the VAE-reconstruction baseline is not computed; with "latent_search": {"search":
            the search settings, "surrogate": surrogate path pattern with {source} and {subject} or null} every
            candidate is also searched with model_dir's latent_vae.pt).
        out_pgt: pGT path pattern with {source} and {subject}.
        out_slices: per-slice facts path pattern with {source} and {subject}.
        out_errors: error map path pattern with {source} and {subject} ('none': not saved).
        record: the chunk record to write.
        device: auto, cpu or cuda.
        seed: sampling seed.
        qcnet: the learned opinion's qcnet.pt ('none': off).
        out_learned: the learned estimated-truth path pattern with {source} and {subject} ('none': off).
    """
    from nnqc_pipe.data.preprocess import Preprocessed, load_preprocessed
    from nnqc_pipe.models.pgt import load_models
    from nnqc_pipe.qc.infer import infer_subject, save_inference

    models = load_models(model_dir, device)
    learned = None
    if qcnet:
        from nnqc_pipe.models.qcnet import load_qcnet

        learned = load_qcnet(qcnet, device, int(inference["batch_size"]))
    latent, out_surrogate = None, None
    if inference.get("latent_search"):
        from nnqc_pipe.models.latent_search import LATENT_VAE, load_latent_search

        latent = load_latent_search(Path(model_dir) / LATENT_VAE, device, inference["latent_search"]["search"])
        out_surrogate = inference["latent_search"].get("surrogate")

    @lru_cache(maxsize=1)
    def preprocessed(subject: str) -> Preprocessed:
        return load_preprocessed(fill(npz, subject=subject))

    def work(task: tuple[str, str]) -> list[dict[str, Any]]:
        subject, source = task
        pgt, slices = fill(out_pgt, source=source, subject=subject), fill(out_slices, source=source, subject=subject)
        errors = fill(out_errors, source=source, subject=subject) if out_errors else None
        pre = preprocessed(subject)
        estimated = fill(out_learned, source=source, subject=subject) if learned and out_learned else None
        surrogate = fill(out_surrogate, source=source, subject=subject) if out_surrogate else None
        result = infer_subject(models, pre, fill(candidates[source], subject=subject),
                               fill(embeddings, subject=subject) if embeddings else None, inference,
                               subject_seed(seed, subject), learned, latent)
        save_inference(result, pre.record, pgt, slices, errors, estimated, surrogate)
        log.info("%s/%s: pGT of %d slices written to %s", source, subject, len(result.slices), pgt)
        rows = [record_row(subject, "pgt", pgt, source), record_row(subject, "slices", slices, source)]
        rows += [record_row(subject, "learned", estimated, source)] if estimated else []
        rows += [record_row(subject, "latent_surrogate", surrogate, source)] if surrogate else []
        return rows + ([record_row(subject, "errors", errors, source)] if errors else [])

    write_chunk_record(run_chunk(task_list(tasks), work, describe_task(candidates), "infer"), record)
