"""QC-driven refinement of the cohort segmenter (rule ``repair``): flag, refine, re-QC, until nothing is flagged.

The loop (:func:`refine_loop`), after ``DESIGN.md`` ("The peer methods", QC-driven selection and refinement):

1. the segmenter (:class:`nnqc_pipe.models.repair.Refiner`) segments every subject of the cohort; QC scores each
   mask and gives its reference mask (:func:`cohort_qc`: the pGT of the mask, or the learned opinion's estimated
   truth);
2. flags (:func:`flag_table`): the score below the lower Tukey fence of the cohort (Q1 − k·IQR) or a FAIL verdict
   (:func:`nnqc_pipe.qc.decisions.assign_verdicts` with the report's thresholds);
3. stop (:func:`stop_reason`) when nothing is flagged, after ``epochs`` refinement epochs, or at the time cap;
   otherwise one refinement epoch on the flagged subjects (α = 1/epoch), then their masks are predicted and QC'd
   again, and the flags recomputed over the whole cohort (the others keep their last QC) — back to 3.

The masks before refinement are the first round's, those after it the final network's prediction of every subject.
The state after every round (network, optimiser, masks, QC results, the rounds so far) is saved atomically, so a
killed job resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nnqc_pipe.chunks import fill
from nnqc_pipe.data.io import write_nifti
from nnqc_pipe.data.preprocess import Preprocessed, indices_to_values, invert_labels, to_nifti, to_patch_space
from nnqc_pipe.dice import dice
from nnqc_pipe.models.pgt import PGTModels
from nnqc_pipe.models.qcnet import QCNet
from nnqc_pipe.models.repair import Refiner
from nnqc_pipe.models.training import StopRule, load_state, save_state
from nnqc_pipe.qc.decisions import VerdictThresholds, assign_verdicts
from nnqc_pipe.qc.infer import infer_subject
from nnqc_pipe.qc.learned import learned_dice
from nnqc_pipe.qc.metrics import FOREGROUND

log = logging.getLogger(__name__)

ROUNDS_COLUMNS = ["round", "subject", "score", "uncertainty", "verdict", "flag_low_outlier", "flagged", "requalified"]


@dataclass
class SubjectQC:
    """QC of one mask: its score (the loop's verdict score), the pGT uncertainty, and the reference mask the
    semi-supervised loss pulls it towards (class indices on the patch grid, [S, H, W])."""

    score: float
    uncertainty: float
    reference: np.ndarray


# subject, the mask on the patch grid (class indices [S, H, W]) -> its QC
QCFunction = Callable[[str, np.ndarray], SubjectQC]


@dataclass(frozen=True)
class RepairSettings:
    """The loop's stop and flag rules: at most ``epochs`` refinement epochs, the lower Tukey fence Q1 − ``tukey_k``·IQR,
    the verdict ``thresholds`` (FAIL), a wall-clock cap ``max_minutes`` (None: none)."""

    epochs: int
    tukey_k: float = 1.5
    thresholds: VerdictThresholds = field(default_factory=VerdictThresholds)
    max_minutes: float | None = None


@dataclass
class RepairResult:
    """Masks before and after refinement (subject -> class indices on the patch grid), the QC of every round
    (:data:`ROUNDS_COLUMNS`), the refinement curves (one row per epoch) and why the loop stopped."""

    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    rounds: pd.DataFrame
    curves: list[dict[str, Any]]
    stopped: str


def tukey_low(scores: np.ndarray, k: float = 1.5) -> np.ndarray:
    """True where a score lies below the lower Tukey fence Q1 − k·IQR of the finite scores; NaN never flags."""
    scores = np.asarray(scores, dtype=float)
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return np.zeros(scores.shape, dtype=bool)
    q1, q3 = np.quantile(finite, [0.25, 0.75])
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(scores < q1 - k * (q3 - q1), nan=False).astype(bool)


def flag_table(qc: pd.DataFrame, thresholds: VerdictThresholds, k: float = 1.5) -> pd.DataFrame:
    """``qc`` (columns subject, score, uncertainty) with ``flag_low_outlier`` (Tukey, :func:`tukey_low`), the
    ``verdict`` of each row (:func:`nnqc_pipe.qc.decisions.assign_verdicts` on the score, the uncertainty and the
    outlier flag) and ``flagged`` = a low outlier or a FAIL verdict."""
    table = qc.assign(flag_low_dsc_outlier=tukey_low(qc["score"].to_numpy(), k), source="cohort segmenter")
    table = assign_verdicts(table, thresholds, score_column="score")
    out = qc.copy()
    out["flag_low_outlier"] = table["flag_low_dsc_outlier"].to_numpy(dtype=bool)
    out["verdict"] = table["verdict"].to_numpy()
    out["flagged"] = out["flag_low_outlier"] | (out["verdict"] == "FAIL")
    return out


def stop_reason(n_flagged: int, epoch: int, max_epochs: int, time_up: bool = False) -> str | None:
    """Why the loop stops before refinement epoch ``epoch + 1`` (``epoch`` epochs done), or None to go on."""
    if n_flagged == 0:
        return "nothing flagged"
    if epoch >= max_epochs:
        return f"{max_epochs} refinement epochs done, {n_flagged} subject(s) still flagged"
    if time_up:
        return f"time cap reached, {n_flagged} subject(s) still flagged"
    return None


@dataclass
class _LoopState:
    masks: dict[str, np.ndarray]
    before: dict[str, np.ndarray]
    qc: dict[str, SubjectQC]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    seconds: float = 0.0

    def as_state(self, refiner: Refiner, run_hash: str) -> dict[str, Any]:
        tensors = {name: {s: torch.from_numpy(np.ascontiguousarray(a)) for s, a in arrays.items()}
                   for name, arrays in (("masks", self.masks), ("before", self.before),
                                        ("references", {s: q.reference for s, q in self.qc.items()}))}
        return {**refiner.state(), **tensors, "config_hash": run_hash, "epoch": self.epoch, "step": self.epoch,
                "seconds": self.seconds, "rounds": self.rounds, "curves": self.curves,
                "scores": {s: [q.score, q.uncertainty] for s, q in self.qc.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _LoopState:
        qc = {s: SubjectQC(float(v[0]), float(v[1]), state["references"][s].numpy())
              for s, v in state["scores"].items()}
        return cls(masks={s: t.numpy() for s, t in state["masks"].items()},
                   before={s: t.numpy() for s, t in state["before"].items()}, qc=qc, rounds=state["rounds"],
                   curves=state["curves"], epoch=state["epoch"], seconds=state["seconds"])


def _flags(loop: _LoopState, settings: RepairSettings, requalified: set[str]) -> pd.DataFrame:
    qc = pd.DataFrame([{"subject": s, "score": q.score, "uncertainty": q.uncertainty} for s, q in
                       sorted(loop.qc.items())])
    table = flag_table(qc, settings.thresholds, settings.tukey_k)
    # plain Python values: the rounds are part of the saved state, which is loaded with weights_only
    loop.rounds += [{"round": loop.epoch, "subject": str(row.subject), "score": float(row.score),
                     "uncertainty": float(row.uncertainty), "verdict": str(row.verdict),
                     "flag_low_outlier": bool(row.flag_low_outlier), "flagged": bool(row.flagged),
                     "requalified": row.subject in requalified} for row in table.itertuples(index=False)]
    log.info("repair round %d: %d of %d subjects flagged (%d low outliers, %d FAIL)", loop.epoch,
             int(table["flagged"].sum()), len(table), int(table["flag_low_outlier"].sum()),
             int((table["verdict"] == "FAIL").sum()))
    return table


def refine_loop(refiner: Refiner, images: Mapping[str, np.ndarray], qc: QCFunction, settings: RepairSettings,
                state_path: str | os.PathLike | None = None, run_hash: str = "") -> RepairResult:
    """QC-driven refinement of ``refiner``'s network on the cohort ``images`` (subject -> preprocessed image stack),
    see the module docstring. With ``state_path``, the state after every round is saved there and a saved state of
    the same ``run_hash`` is resumed."""
    subjects = sorted(images)
    saved = load_state(state_path, run_hash) if state_path else None
    if saved is not None:
        refiner.load(saved)
        loop = _LoopState.from_state(saved)
    else:
        masks = {s: refiner.predict(images[s]) for s in subjects}
        loop = _LoopState(masks=masks, before=dict(masks), qc={s: qc(s, masks[s]) for s in subjects})
        _flags(loop, settings, set(subjects))
    timer = StopRule(None, settings.max_minutes, loop.seconds)
    while True:
        last = pd.DataFrame(loop.rounds)
        last = last[last["round"] == loop.epoch]
        flagged = sorted(last.loc[last["flagged"], "subject"])
        stopped = stop_reason(len(flagged), loop.epoch, settings.epochs, timer.time_up)
        if state_path:
            loop.seconds = timer.seconds
            save_state(state_path, loop.as_state(refiner, run_hash))
        if stopped:
            break
        loop.epoch += 1
        losses = refiner.refine_epoch(loop.epoch, np.concatenate([images[s] for s in flagged]),
                                      np.concatenate([loop.qc[s].reference for s in flagged]))
        for s in flagged:
            loop.masks[s] = refiner.predict(images[s])
            loop.qc[s] = qc(s, loop.masks[s])
        table = _flags(loop, settings, set(flagged))
        loop.curves.append({"epoch": loop.epoch, **losses, "n_refined_on": len(flagged),
                            "n_flagged_after": int(table["flagged"].sum()), "seconds": timer.seconds})
        log.info("repair epoch %d: α %.3f, loss %.4f (supervised %.4f, semi-supervised %.4f) on %d subjects",
                 loop.epoch, losses["alpha"], losses["loss"], losses["supervised"], losses["semi_supervised"],
                 len(flagged))
    log.info("repair: stopped after %d refinement epoch(s): %s", loop.epoch, stopped)
    after = {s: refiner.predict(images[s]) for s in subjects} if loop.epoch else dict(loop.before)
    return RepairResult(before=loop.before, after=after, rounds=pd.DataFrame(loop.rounds, columns=ROUNDS_COLUMNS),
                        curves=loop.curves, stopped=stopped)


def cohort_qc(models: PGTModels, preprocessed: Mapping[str, Preprocessed], embeddings: str | None,
              inference: dict[str, Any], seeds: Mapping[str, int], score: str = "nnqc", reference: str = "pgt",
              learned: QCNet | None = None) -> QCFunction:
    """The loop's QC of a mask, as the infer and score stages would make it: the mask goes back to the subject's
    original grid, gets its pGT (:func:`nnqc_pipe.qc.infer.infer_subject`, the subject's ``seeds`` noise) and, with
    ``learned``, the learned opinion's error maps. ``score``: ``nnqc`` (foreground DSC of the mask against its pGT,
    the report's ``predicted_dsc``) or ``learned`` (the counted ``learned_dsc``); ``reference``: ``pgt`` or
    ``learned`` (the estimated truth), mapped to the patch grid. ``embeddings``: path pattern with {subject}, or
    None when the LDM does not use the image."""
    if (score == "learned" or reference == "learned") and learned is None:
        raise ValueError("the learned score or reference needs the learned opinion's QC network")
    settings = {**inference, "vae_recon": False}

    def run(subject: str, mask: np.ndarray) -> SubjectQC:
        pre = preprocessed[subject]
        record = pre.record
        on_grid = invert_labels(mask, record)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{subject}.nii.gz"
            write_nifti(to_nifti(on_grid, record), path)
            result = infer_subject(models, pre, path, fill(embeddings, subject=subject) if embeddings else None,
                                   settings, seeds[subject], learned)
        if score == "learned":
            names = {v: str(v) for v in record["label_values"]}
            value = learned_dice(result.slices, names, record["label_values"])[(FOREGROUND, None)]
        else:
            value = dice(on_grid > 0, result.pgt > 0)
        truth = result.estimated if reference == "learned" else result.pgt
        patch = to_patch_space(indices_to_values(truth, record["label_values"]), record)
        return SubjectQC(float(value), float(result.slices["uncertainty"].mean()), patch)

    return run
