"""Stages of ``rules/degrade.smk``: degraded masks at controlled quality levels for every test subject."""

from __future__ import annotations

import logging
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from nnqc_pipe.chunks import fill, record_row, recorded_files, run_chunk, write_chunk_record
from nnqc_pipe.data.io import (
    PathLike,
    concat_parquet,
    load_mask_on_grid,
    load_volume,
    spacing_of,
    write_nifti,
    write_parquet,
)
from nnqc_pipe.data.plan import Plan, read_plan
from nnqc_pipe.data.preprocess import indices_to_values, original_slice_axis, values_to_indices
from nnqc_pipe.degrade import degrade_subject

log = logging.getLogger(__name__)


def degrade_one(subject: str, image: PathLike, label: PathLike, plan_: Plan, seed: int,
                levels: list[int], out_masks: list[PathLike], manifest: PathLike) -> None:
    """Write the degraded masks of one test subject (original grid) and its manifest rows."""
    img = load_volume(image, subject, "image")
    values = load_mask_on_grid(label, img, subject, plan_.label_values, "label")
    indices = values_to_indices(values, plan_.label_values)
    axis = original_slice_axis(img.affine, plan_.slicing_axis)
    results = {r["level"]: r for r in degrade_subject(indices, spacing_of(img), plan_.n_classes, seed, subject,
                                                       axis)}
    rows = []
    for level, path in zip(levels, out_masks, strict=True):
        res = results[level]
        out = nib.Nifti1Image(indices_to_values(res["mask"], plan_.label_values), img.affine, img.header)
        out.set_data_dtype(np.uint8)
        write_nifti(out, path)
        row = {"subject": subject, "level": level, "source": f"degraded_L{level}", "path": str(path),
               "dsc_foreground": res["dsc_foreground"], "in_bin": bool(res["in_bin"])}
        for c, name in enumerate(plan_.label_names, start=1):
            row[f"dsc_{name}"] = res["dsc_per_class"].get(c, float("nan"))
        rows.append(row)
    write_parquet(pd.DataFrame(rows), manifest)


def degrade(subjects: list[str], image: str, label: str, plan_json: PathLike, seed: int, levels: list[int],
            out_masks: str, manifest: str, record: PathLike) -> None:
    """Degraded masks of a chunk of test subjects, on their original grids.

    Args:
        subjects: the chunk's (test) subjects.
        image: image path pattern with {subject}.
        label: label path pattern with {subject}.
        plan_json: the cohort's plan.json (slicing axis, label values).
        seed: degradation seed (same seed, same masks).
        levels: the quality levels to write (1-5).
        out_masks: mask path pattern with {subject} and {level}.
        manifest: per-subject manifest pattern with {subject}.
        record: the chunk record to write.
    """
    plan_ = read_plan(plan_json)

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
    """Concatenate the per-subject degradation manifests; log the in-bin rate.

    Args:
        chunks: the degrade chunk records.
        out: degraded/manifest.parquet to write.
    """
    df = concat_parquet(recorded_files(chunks, "manifest"))
    if len(df):
        log.info("degraded masks in their DSC bin: %.1f%% of %d", 100 * df.in_bin.mean(), len(df))
    write_parquet(df, out)
