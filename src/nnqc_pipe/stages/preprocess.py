"""Stage of ``rules/preprocess.smk``: invertible preprocessing of a chunk of subjects into patch stacks."""

from __future__ import annotations

import logging
from typing import Any

from nnqc_pipe.chunks import fill, record_row, run_chunk, write_chunk_record
from nnqc_pipe.data.io import PathLike
from nnqc_pipe.data.plan import read_plan
from nnqc_pipe.data.preprocess import preprocess_subject, save_preprocessed

log = logging.getLogger(__name__)


def preprocess(subjects: list[str], image: str, label: str | None, plan_json: PathLike, out: str,
               record: PathLike) -> None:
    """Preprocess a chunk of subjects into the ``.npz`` files of the contract.

    Args:
        subjects: the chunk's subjects.
        image: image path pattern with {subject}.
        label: label path pattern with {subject} ('none': no ground truth; unlabelled subjects have no file).
        plan_json: the cohort's plan.json.
        out: .npz path pattern with {subject}.
        record: the chunk record to write.
    """
    plan_ = read_plan(plan_json).raw

    def work(subject: str) -> list[dict[str, Any]]:
        path = fill(out, subject=subject)
        pre = preprocess_subject(subject, fill(image, subject=subject),
                                 fill(label, subject=subject) if label else None, plan_)
        save_preprocessed(pre, path)
        log.info("%s: %d slices of %s", subject, pre.image.shape[0], list(pre.image.shape[1:]))
        return [record_row(subject, "npz", path)]

    rows = run_chunk(subjects, work, lambda s: f"subject {s!r} (image {fill(image, subject=s)})", "preprocess")
    write_chunk_record(rows, record)
