"""Stages of ``rules/learned.smk``: the learned QC opinion's k-fold segmenters, its training candidates and its
network (:mod:`nnqc_pipe.models.segmenter`, :mod:`nnqc_pipe.qc.learned`, :mod:`nnqc_pipe.models.qcnet`).

Torch is imported inside the functions, so that importing this module (the command line does) stays cheap.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from nnqc_pipe.chunks import fill, record_row, run_chunk, write_chunk_record
from nnqc_pipe.data.io import PathLike, write_npz
from nnqc_pipe.data.plan import read_plan
from nnqc_pipe.data.split import assign_folds, read_split

log = logging.getLogger(__name__)


def fold_subjects(split_tsv: PathLike, folds: int, seed: int) -> dict[int, list[str]]:
    """Fold -> its labelled training subjects (train and val roles), as the rules cut them."""
    roles = read_split(split_tsv)
    assignment = assign_folds(roles["train"] + roles["val"], folds, seed)
    return {k: sorted(s for s, f in assignment.items() if f == k) for k in range(folds)}


def train_segmenter(fold: int, folds: int, split_tsv: PathLike, npz: str, plan_json: PathLike,
                    settings: dict[str, Any], out_dir: PathLike, device: str = "auto", seed: int = 0) -> None:
    """Train (or resume) one fold's segmenter; it predicts its own fold's subjects at every checkpoint epoch.

    Args:
        fold: the fold (0-based).
        folds: the number of folds (config learned.folds).
        split_tsv: the split (train and val subjects are cut into folds).
        npz: preprocessed .npz path pattern with {subject}.
        plan_json: the cohort's plan.json.
        settings: JSON object of the config's model settings.
        out_dir: folder of the segmenters (segmenter_fold{k}.pt).
        device: auto, cpu or cuda.
        seed: training seed (also cuts the folds).
    """
    from nnqc_pipe.models.presets import model_settings, resolve
    from nnqc_pipe.models.segmenter import train_segmenter as train_fold

    plan_ = read_plan(plan_json).raw
    members = fold_subjects(split_tsv, folds, seed)
    train = [fill(npz, subject=s) for k, subjects in members.items() if k != fold for s in subjects]
    heldout = [fill(npz, subject=s) for s in members[fold]]
    cfg = resolve(settings["preset"], model_settings(settings, plan_), plan_)
    train_fold(fold, train, heldout, cfg, out_dir, device, seed)


def learned_candidates(fold: int, folds: int, split_tsv: PathLike, npz: str, labels: str, plan_json: PathLike,
                       segmenter: PathLike, sources: dict[str, str], n_seggen: int, n_degraded: int,
                       tolerance_mm: float, out: str, record: PathLike, seed: int = 0, fold_seed: int = 0) -> None:
    """The training candidates of one fold's subjects with their real DSC and NSD on the original grid.

    Args:
        fold: the fold (0-based).
        folds: the number of folds.
        split_tsv: the split.
        npz: preprocessed .npz path pattern with {subject}.
        labels: label path pattern with {subject}.
        plan_json: the cohort's plan.json.
        segmenter: the fold's segmenter_fold{k}.pt (its held-out predictions).
        sources: JSON object of user source name -> mask path pattern (used where a subject has a mask).
        n_seggen: SegGen candidates per subject.
        n_degraded: degraded candidates per subject.
        tolerance_mm: tolerance of the normalised surface Dice.
        out: candidates .npz path pattern with {subject}.
        record: the chunk record to write.
        seed: seed of the random candidates.
        fold_seed: the seed the folds were cut with (the segmenters' training seed).
    """
    from nnqc_pipe.data.io import load_mask_on_grid, load_volume
    from nnqc_pipe.data.preprocess import (
        invert_labels,
        load_candidate,
        load_preprocessed,
        spacing_from_record,
        to_patch_space,
        values_to_indices,
    )
    from nnqc_pipe.models.candidates import make_candidates
    from nnqc_pipe.models.training import read_checkpoint
    from nnqc_pipe.qc.learned import real_group_scores

    plan_ = read_plan(plan_json)
    predictions = read_checkpoint(segmenter)["predictions"]
    if not predictions:
        log.warning("%s stopped before its first checkpoint epoch: no segmenter candidates for fold %d",
                    segmenter, fold)

    def work(subject: str) -> list[dict[str, Any]]:
        pre = load_preprocessed(fill(npz, subject=subject))
        record_ = pre.record
        own = {int(key.split("|")[1]): mask.numpy() for key, mask in predictions.items()
               if key.split("|")[0] == subject}
        if predictions and not own:
            raise ValueError(f"{segmenter} holds predictions of other subjects but none of {subject}: the "
                             "segmenter was trained with other folds (rerun train_segmenter)")
        user = {name: to_patch_space(load_candidate(fill(pattern, subject=subject), record_), record_)
                for name, pattern in sources.items() if Path(fill(pattern, subject=subject)).is_file()}
        candidates = make_candidates(pre, own, user, n_seggen, n_degraded, seed)
        label_path = fill(labels, subject=subject)
        reference = load_volume(label_path, subject, "label")
        truth = values_to_indices(load_mask_on_grid(label_path, reference, subject, plan_.raw["label_values"],
                                                    "label"), plan_.raw["label_values"])
        spacing = spacing_from_record(record_)
        dsc, nsd = [], []
        for kind, stack in candidates:
            on_grid = truth if kind == "gt" else invert_labels(stack, record_)
            scores = real_group_scores(on_grid, truth, spacing, record_["n_classes"], tolerance_mm)
            dsc.append(scores[0])
            nsd.append(scores[1])
        path = fill(out, subject=subject)
        write_npz(path, candidates=np.stack([c for _, c in candidates]), kinds=np.array([k for k, _ in candidates]),
                  real_dsc=np.stack(dsc), real_nsd=np.stack(nsd))
        log.info("%s: %d candidates, real foreground DSC %s", subject, len(candidates),
                 " ".join(f"{k}={d[0]:.2f}" for (k, _), d in zip(candidates, dsc, strict=True)))
        return [record_row(subject, "learned_candidates", path)]

    subjects = fold_subjects(split_tsv, folds, fold_seed)[fold]
    write_chunk_record(run_chunk(subjects, work, lambda s: f"subject {s!r}", "learned_candidates"), record)


def train_qcnet(split_tsv: PathLike, candidates: str, npz: str, plan_json: PathLike, settings: dict[str, Any],
                out_dir: PathLike, device: str = "auto", seed: int = 0) -> None:
    """Train (or resume) the QC network on the train subjects' candidates, selected on the val subjects'.

    Args:
        split_tsv: the split.
        candidates: training candidates .npz path pattern with {subject}.
        npz: preprocessed .npz path pattern with {subject}.
        plan_json: the cohort's plan.json.
        settings: JSON object of the config's model settings.
        out_dir: models folder (qcnet.pt, qcnet_curves.csv).
        device: auto, cpu or cuda.
        seed: training seed.
    """
    from nnqc_pipe.models.presets import model_settings, resolve
    from nnqc_pipe.models.qcnet import load_candidate_set
    from nnqc_pipe.models.qcnet import train_qcnet as train_network

    plan_ = read_plan(plan_json).raw
    roles = read_split(split_tsv)
    cfg = resolve(settings["preset"], model_settings(settings, plan_), plan_)
    train_network(load_candidate_set(roles["train"], candidates, npz),
                  load_candidate_set(roles["val"], candidates, npz), cfg, out_dir, device, seed)
