"""Stages of ``rules/repair.smk``: the cohort segmenter and its QC-driven refinement (:mod:`nnqc_pipe.models.repair`,
:mod:`nnqc_pipe.qc.repair`), whose masks before and after refinement are then QC'd as two more sources.

Torch is imported inside the functions, so that importing this module (the command line does) stays cheap.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from nnqc_pipe.chunks import fill, record_row, write_chunk_record
from nnqc_pipe.config import config_hash
from nnqc_pipe.data.io import PathLike, file_sha256, write_nifti, write_parquet
from nnqc_pipe.data.plan import read_plan
from nnqc_pipe.data.split import read_split

log = logging.getLogger(__name__)

# The refinement loop's files next to the cohort segmenter.
REFINE_STATE = "refine_state.pt"
REFINE_CURVES = "refine_curves.csv"


def refined_source(source: str) -> str:
    """The source name of the cohort segmenter's masks after refinement."""
    return f"{source}_refined"


def train_repair_segmenter(split_tsv: PathLike, npz: str, plan_json: PathLike, settings: dict[str, Any],
                           out_dir: PathLike, device: str = "auto", seed: int = 0) -> None:
    """Train (or resume) the repair stage's cohort segmenter on the train subjects, selected on the val subjects.

    Args:
        split_tsv: the split.
        npz: preprocessed .npz path pattern with {subject}.
        plan_json: the cohort's plan.json.
        settings: JSON object of the config's model settings (the preset's segmenter section sizes it).
        out_dir: folder of the cohort segmenter (segmenter.pt, its state and curves).
        device: auto, cpu or cuda.
        seed: training seed.
    """
    from nnqc_pipe.models.presets import model_settings, resolve
    from nnqc_pipe.models.repair import train_cohort_segmenter

    plan_ = read_plan(plan_json).raw
    roles = read_split(split_tsv)
    cfg = resolve(settings["preset"], model_settings(settings, plan_), plan_)
    train_cohort_segmenter([fill(npz, subject=s) for s in roles["train"]], [fill(npz, subject=s) for s in roles["val"]],
                           cfg, out_dir, device, seed)


def repair(split_tsv: PathLike, npz: str, embeddings: str | None, plan_json: PathLike, settings: dict[str, Any],
           repair: dict[str, Any], report: dict[str, Any], inference: dict[str, Any], segmenter: PathLike,
           model_dir: PathLike, out_masks: str, out_rounds: PathLike, record: PathLike, qcnet: str | None = None,
           device: str = "auto", seed: int = 0) -> None:
    """The cohort segmenter's masks of every QC'd subject (test and unlabelled) before and after QC-driven
    refinement (:func:`nnqc_pipe.qc.repair.refine_loop`), on the subjects' original grids.

    Args:
        split_tsv: the split (train subjects: the supervised loss; test and unlabelled: the cohort).
        npz: preprocessed .npz path pattern with {subject}.
        embeddings: embeddings path pattern with {subject} ('none' when the LDM does not use the image).
        plan_json: the cohort's plan.json.
        settings: JSON object of the config's model settings.
        repair: JSON object of the config's repair section (epochs, tukey_k, score, reference, source, lr,
            max_minutes).
        report: JSON object of the config's report section (the verdict thresholds of the FAIL flag).
        inference: JSON object of the config's inference section (the pGT of each QC).
        segmenter: the cohort segmenter (segmenter.pt).
        model_dir: folder with vae.pt and ldm.pt; the refinement's state and curves are written next to segmenter.
        out_masks: mask path pattern with {source} and {subject}.
        out_rounds: the QC of every round (rounds.parquet).
        record: the record to write (every mask written).
        qcnet: the learned opinion's qcnet.pt ('none': off; needed by the learned score or reference).
        device: auto, cpu or cuda.
        seed: the refinement's seed and the pGT sampling seed (as in infer).
    """
    from nnqc_pipe.data.preprocess import invert_labels, load_preprocessed, to_nifti
    from nnqc_pipe.models.device import resolve_device, seed_everything
    from nnqc_pipe.models.pgt import load_models
    from nnqc_pipe.models.presets import model_settings, resolve
    from nnqc_pipe.models.repair import Refiner, load_cohort_segmenter
    from nnqc_pipe.models.segmenter import labelled_stacks
    from nnqc_pipe.models.training import write_curves
    from nnqc_pipe.qc.repair import RepairSettings, cohort_qc, refine_loop
    from nnqc_pipe.stages.infer import subject_seed
    from nnqc_pipe.stages.report import verdict_thresholds

    dev = resolve_device(device)
    seed_everything(seed)
    plan_ = read_plan(plan_json).raw
    cfg = resolve(settings["preset"], model_settings(settings, plan_), plan_)
    roles = read_split(split_tsv)
    cohort = sorted(roles["test"] + roles["unlabelled"])
    if not cohort:
        raise ValueError(f"{split_tsv}: no test or unlabelled subject for the repair stage to segment")
    labelled = labelled_stacks([fill(npz, subject=s) for s in roles["train"]])
    preprocessed = {s: load_preprocessed(fill(npz, subject=s)) for s in cohort}
    learned = None
    if qcnet:
        from nnqc_pipe.models.qcnet import load_qcnet

        learned = load_qcnet(qcnet, device, int(inference["batch_size"]))
    qc = cohort_qc(load_models(model_dir, device), preprocessed, embeddings, inference,
                   {s: subject_seed(seed, s) for s in cohort}, repair["score"], repair["reference"], learned)
    refiner = Refiner(load_cohort_segmenter(segmenter, cfg, dev),
                      np.concatenate([image for image, _ in labelled.values()]),
                      np.concatenate([label for _, label in labelled.values()]), repair["lr"],
                      cfg["segmenter"]["batch_size"], dev, seed)
    loop_settings = RepairSettings(epochs=repair["epochs"], tukey_k=repair["tukey_k"],
                                   thresholds=verdict_thresholds(report), max_minutes=repair["max_minutes"])
    folder = Path(segmenter).parent
    run_hash = config_hash({"segmenter": file_sha256(segmenter), "vae": file_sha256(Path(model_dir) / "vae.pt"),
                            "ldm": file_sha256(Path(model_dir) / "ldm.pt"),
                            "qcnet": file_sha256(qcnet) if qcnet else None, "repair": repair,
                            "thresholds": loop_settings.thresholds.__dict__, "inference": inference, "seed": seed,
                            "cohort": cohort, "train": sorted(labelled)})
    log.info("repair: %d cohort subjects, %d labelled training subjects, score %s, reference %s, at most %d epochs",
             len(cohort), len(labelled), repair["score"], repair["reference"], repair["epochs"])
    result = refine_loop(refiner, {s: preprocessed[s].image for s in cohort}, qc, loop_settings,
                         folder / REFINE_STATE, run_hash)
    write_curves(folder / REFINE_CURVES, result.curves)
    rows = []
    for source, masks in ((repair["source"], result.before), (refined_source(repair["source"]), result.after)):
        for subject in cohort:
            path = fill(out_masks, source=source, subject=subject)
            record_ = preprocessed[subject].record
            write_nifti(to_nifti(invert_labels(masks[subject], record_), record_), path)
            rows.append(record_row(subject, "mask", path, source))
    write_parquet(result.rounds, out_rounds, {"stopped": result.stopped, "repair": repair})
    write_chunk_record(rows, record)
