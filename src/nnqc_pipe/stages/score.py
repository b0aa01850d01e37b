"""Stage of ``rules/score.smk``: predicted (vs pGT) and real (vs GT) metrics of every candidate of a chunk."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from nnqc_pipe.chunks import describe_task, fill, record_row, run_chunk, task_list, write_chunk_record
from nnqc_pipe.data.io import PathLike, write_parquet
from nnqc_pipe.data.plan import read_plan
from nnqc_pipe.qc.score import score_subject


def score_one(cohort: str, source: str, subject: str, npz: PathLike, label_names: list[str], candidate: PathLike,
              pgt: PathLike, gt: PathLike | None, slices: PathLike, tolerance_mm: float, out: PathLike,
              learned: PathLike | None = None) -> None:
    """Predicted (vs pGT), learned and real (vs GT) metrics of one candidate, per volume and slice."""
    with np.load(npz) as data:
        record = json.loads(str(data["record"]))
    names = dict(zip(record["label_values"], label_names, strict=True))
    table = score_subject(cohort, source, subject, candidate, pgt, gt, pd.read_parquet(slices), record, names,
                          tolerance_mm, learned)
    write_parquet(table, out)


def score(cohort: str, tasks: dict[str, list[str]], npz: str, plan_json: PathLike, candidates: dict[str, str],
          pgt: str, gt: str | None, slices: str, tolerance_mm: float, out: str, record: PathLike,
          learned: str | None = None) -> None:
    """Scores of a chunk's candidates on their original grids, in mm.

    Args:
        cohort: the cohort name (a column of the tables).
        tasks: JSON object source -> subjects of the chunk.
        npz: preprocessed .npz path pattern with {subject}.
        plan_json: the cohort's plan.json (label names).
        candidates: JSON object source -> candidate mask path pattern with {subject}.
        pgt: pGT path pattern with {source} and {subject}.
        gt: label path pattern with {subject} for the real metrics ('none': no ground truth).
        slices: per-slice facts path pattern with {source} and {subject}.
        tolerance_mm: tolerance of the normalised surface Dice.
        out: scores path pattern with {source} and {subject}.
        record: the chunk record to write.
        learned: the learned opinion's estimated-truth path pattern with {source} and {subject} ('none': off).
    """
    label_names = list(read_plan(plan_json).label_names)

    def work(task: tuple[str, str]) -> list[dict[str, Any]]:
        subject, source = task
        path = fill(out, source=source, subject=subject)
        score_one(cohort, source, subject, fill(npz, subject=subject), label_names,
                  fill(candidates[source], subject=subject), fill(pgt, source=source, subject=subject),
                  fill(gt, subject=subject) if gt else None, fill(slices, source=source, subject=subject),
                  tolerance_mm, path, fill(learned, source=source, subject=subject) if learned else None)
        return [record_row(subject, "scores", path, source)]

    write_chunk_record(run_chunk(task_list(tasks), work, describe_task(candidates), "score"), record)
