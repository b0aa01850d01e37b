"""One function per workflow rule (CPU stages), named after the rule: read inputs, call the package, write outputs.

The stages that need torch live in :mod:`nnqc_pipe.model_stages`, so these start fast.

Rules in ``rules/*.smk`` call these through the ``nnqc-pipe`` command line; they hold no logic of their own.
The per-subject stages (inspect, preprocess, degrade, score) process a *chunk* of subjects per call
(:mod:`nnqc_pipe.chunks`): paths are given as patterns with ``{subject}`` (and ``{source}``, ``{level}``)
placeholders, the per-subject files of the contract are written one subject at a time, and a chunk record lists
them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from . import __version__
from . import demo as demo_mod
from .chunks import fill, record_row, recorded_files, run_chunk, task_list, write_chunk_record
from .degrade import degrade_subject
from .fingerprint import compute_fingerprint
from .inspect_subject import inspect_subject
from .io import (
    concat_parquet,
    file_sha256,
    load_mask_on_grid,
    load_volume,
    read_json,
    write_json,
    write_nifti,
    write_parquet,
)
from .overlays import plot_worst_overlays
from .plan import make_plan
from .preprocess import (
    indices_to_values,
    original_slice_axis,
    preprocess_subject,
    save_preprocessed,
    values_to_indices,
)
from .report import plot_mae_per_level, plot_predicted_vs_real, write_report
from .score import score_subject
from .split import read_split, write_split

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def demo_cohort(out_dir: PathLike, n_subjects: int, seed: int) -> None:
    """Generate the synthetic demo cohort (``imagesTr/``, ``labelsTr/``)."""
    names = demo_mod.write_cohort(out_dir, n_subjects, seed)
    log.info("wrote %d demo subjects to %s", len(names), out_dir)


def inspect(subjects: list[str], image: str, label: str | None, label_values: list[int], out: str,
            record: PathLike) -> None:
    """Validate a chunk of subjects and write each one's ingestion record (``out`` pattern with ``{subject}``).

    An invalid subject is not an error: its record says ``status: excluded`` and why (see
    :func:`nnqc_pipe.inspect_subject.inspect_subject`); the split stage lists it in ``subjects.tsv``.
    """

    def work(subject: str) -> list[dict[str, Any]]:
        path = fill(out, subject=subject)
        write_json(inspect_subject(subject, fill(image, subject=subject),
                                   fill(label, subject=subject) if label else None, label_values), path)
        return [record_row(subject, "inspect", path)]

    rows = run_chunk(subjects, work, lambda s: f"subject {s!r} (image {fill(image, subject=s)})", "inspect")
    write_chunk_record(rows, record)


def split(inspect_chunks: list[PathLike], subjects_tsv: PathLike, split_tsv: PathLike, test_fraction: float,
          val_fraction: float, seed: int, on_bad_subject: str) -> None:
    """Write ``subjects.tsv`` (all subjects, status, reason) and ``split.tsv`` (usable subjects, role)."""
    write_split(recorded_files(inspect_chunks, "inspect"), subjects_tsv, split_tsv, test_fraction, val_fraction,
                seed, on_bad_subject)


def fingerprint(split_tsv: PathLike, inspect_dir: PathLike, modality: str, label_names: dict[int, str],
                out: PathLike) -> None:
    """Fingerprint of the training (train + val) subjects."""
    roles = read_split(split_tsv)
    subjects = roles["train"] + roles["val"]
    records = [read_json(Path(inspect_dir) / f"{s}.json") for s in subjects]
    write_json(compute_fingerprint(records, modality, label_names), out)


def plan(fingerprint_json: PathLike, overrides: dict[str, Any], out: PathLike) -> None:
    """Derive ``plan.json`` from the fingerprint and the config's plan overrides."""
    write_json(make_plan(read_json(fingerprint_json), overrides), out)


def preprocess(subjects: list[str], image: str, label: str | None, plan_json: PathLike, out: str,
               record: PathLike) -> None:
    """Preprocess a chunk of subjects into the ``.npz`` files of the contract (``out`` pattern)."""
    plan_ = read_json(plan_json)

    def work(subject: str) -> list[dict[str, Any]]:
        path = fill(out, subject=subject)
        pre = preprocess_subject(subject, fill(image, subject=subject),
                                 fill(label, subject=subject) if label else None, plan_)
        save_preprocessed(pre, path)
        log.info("%s: %d slices of %s", subject, pre.image.shape[0], list(pre.image.shape[1:]))
        return [record_row(subject, "npz", path)]

    rows = run_chunk(subjects, work, lambda s: f"subject {s!r} (image {fill(image, subject=s)})", "preprocess")
    write_chunk_record(rows, record)


def degrade_one(subject: str, image: PathLike, label: PathLike, plan_: dict[str, Any], seed: int,
                levels: list[int], out_masks: list[PathLike], manifest: PathLike) -> None:
    """Write the degraded masks of one test subject (original grid) and its manifest rows."""
    img = load_volume(image, subject, "image")
    values = load_mask_on_grid(label, img, subject, plan_["label_values"], "label")
    indices = values_to_indices(values, plan_["label_values"])
    spacing = tuple(float(v) for v in np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0)))
    axis = original_slice_axis(img.affine, plan_["slicing_axis"])
    results = {r["level"]: r for r in degrade_subject(indices, spacing, plan_["n_classes"], seed, subject, axis)}
    rows = []
    for level, path in zip(levels, out_masks, strict=True):
        res = results[level]
        out = nib.Nifti1Image(indices_to_values(res["mask"], plan_["label_values"]), img.affine, img.header)
        out.set_data_dtype(np.uint8)
        write_nifti(out, path)
        row = {"subject": subject, "level": level, "source": f"degraded_L{level}", "path": str(path),
               "dsc_foreground": res["dsc_foreground"], "in_bin": bool(res["in_bin"])}
        for c, name in enumerate(plan_["label_names"], start=1):
            row[f"dsc_{name}"] = res["dsc_per_class"].get(c, float("nan"))
        rows.append(row)
    write_parquet(pd.DataFrame(rows), manifest)


def degrade(subjects: list[str], image: str, label: str, plan_json: PathLike, seed: int, levels: list[int],
            out_masks: str, manifest: str, record: PathLike) -> None:
    """Degraded masks of a chunk of test subjects: ``out_masks`` pattern with ``{subject}`` and ``{level}``,
    per-subject ``manifest`` pattern."""
    plan_ = read_json(plan_json)

    def work(subject: str) -> list[dict[str, Any]]:
        masks = [fill(out_masks, subject=subject, level=level) for level in levels]
        path = fill(manifest, subject=subject)
        degrade_one(subject, fill(image, subject=subject), fill(label, subject=subject), plan_, seed, levels,
                    masks, path)
        return ([record_row(subject, "mask", m, f"degraded_L{lv}") for lv, m in zip(levels, masks, strict=True)]
                + [record_row(subject, "manifest", path)])

    rows = run_chunk(subjects, work, lambda s: f"subject {s!r} (label {fill(label, subject=s)})", "degrade")
    write_chunk_record(rows, record)


def degrade_manifest(chunks: list[PathLike], out: PathLike) -> None:
    """Concatenate the per-subject degradation manifests (listed in the degrade chunk records); log the in-bin
    rate."""
    df = concat_parquet(recorded_files(chunks, "manifest"))
    if len(df):
        log.info("degraded masks in their DSC bin: %.1f%% of %d", 100 * df.in_bin.mean(), len(df))
    write_parquet(df, out)


# ---------------------------------------------------------------------------------------------------
# Scores and report
# ---------------------------------------------------------------------------------------------------


def score_one(cohort: str, source: str, subject: str, npz: PathLike, label_names: list[str], candidate: PathLike,
              pgt: PathLike, gt: PathLike | None, slices: PathLike, tolerance_mm: float, out: PathLike) -> None:
    """Predicted (vs pGT) and real (vs GT) metrics of one candidate, per volume and slice."""
    with np.load(npz) as data:
        record = json.loads(str(data["record"]))
    names = dict(zip(record["label_values"], label_names, strict=True))
    table = score_subject(cohort, source, subject, candidate, pgt, gt, pd.read_parquet(slices), record, names,
                          tolerance_mm)
    write_parquet(table, out)


def score(cohort: str, tasks: dict[str, list[str]], npz: str, plan_json: PathLike, candidates: dict[str, str],
          pgt: str, gt: str | None, slices: str, tolerance_mm: float, out: str, record: PathLike) -> None:
    """Scores of a chunk's candidates. ``tasks``: source -> subjects; ``candidates``: source -> path pattern;
    ``pgt``/``slices``/``out``: patterns with ``{source}`` and ``{subject}``; ``gt`` (pattern or None): labels
    for real metrics."""
    label_names = read_json(plan_json)["label_names"]

    def work(task: tuple[str, str]) -> list[dict[str, Any]]:
        subject, source = task
        path = fill(out, source=source, subject=subject)
        score_one(cohort, source, subject, fill(npz, subject=subject), label_names,
                  fill(candidates[source], subject=subject), fill(pgt, source=source, subject=subject),
                  fill(gt, subject=subject) if gt else None, fill(slices, source=source, subject=subject),
                  tolerance_mm, path)
        return [record_row(subject, "scores", path, source)]

    def describe(task: tuple[str, str]) -> str:
        subject, source = task
        return f"subject {subject!r} source {source} (candidate {fill(candidates[source], subject=subject)})"

    write_chunk_record(run_chunk(task_list(tasks), work, describe, "score"), record)


def report(score_chunks: list[PathLike], out_dir: PathLike, cohort: str, qc_pass_dsc: float, config_digest: str,
           model_dir: PathLike, figures_dir: PathLike, results_dir: PathLike, n_overlays: int) -> None:
    """The four report tables (with provenance metadata) and the figures of the HTML report, from the score files
    listed in the score chunk records."""
    models = Path(model_dir)
    metadata = {
        "pipeline_version": __version__,
        "config_hash": config_digest,
        "checkpoints": {name: file_sha256(models / name) for name in ("vae.pt", "ldm.pt")},
        "model_card": read_json(models / "model_card.json"),
    }
    tables = write_report(recorded_files(score_chunks, "scores"), out_dir, cohort, qc_pass_dsc, metadata)
    figures = Path(figures_dir)
    for metric in ("dsc", "hd95_mm"):
        plot_predicted_vs_real(tables["subjects"], metric, figures / f"predicted_vs_real_{metric}.png")
    plot_mae_per_level(tables["summary"], figures / "mae_per_level.png")
    plot_worst_overlays(tables["subjects"], results_dir, n_overlays, figures / "worst_overlays.png")
