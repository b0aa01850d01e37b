"""Stages of ``rules/ingest.smk``: the demo cohort, validation of every subject, the deterministic split."""

from __future__ import annotations

import logging
from typing import Any, Literal

from nnqc_pipe.chunks import fill, record_row, recorded_files, run_chunk, write_chunk_record
from nnqc_pipe.data import demo as demo_mod
from nnqc_pipe.data.inspect import inspect_subject
from nnqc_pipe.data.io import PathLike, write_json
from nnqc_pipe.data.split import write_split

log = logging.getLogger(__name__)


def demo_cohort(out_dir: PathLike, n_subjects: int, seed: int) -> None:
    """Generate the synthetic demo cohort (``imagesTr/``, ``labelsTr/``).

    Args:
        out_dir: folder that receives imagesTr/ and labelsTr/.
        n_subjects: number of phantoms.
        seed: random seed of the phantoms.
    """
    names = demo_mod.write_cohort(out_dir, n_subjects, seed)
    log.info("wrote %d demo subjects to %s", len(names), out_dir)


def inspect(subjects: list[str], image: str, label: str | None, label_values: list[int], out: str,
            record: PathLike, require_labels: bool = False) -> None:
    """Validate a chunk of subjects and write each one's ingestion record.

    An invalid subject is not an error: its record says ``status: excluded`` and why (see
    :func:`nnqc_pipe.data.inspect.inspect_subject`); the split stage lists it in ``subjects.tsv``.

    Args:
        subjects: the chunk's subjects.
        image: image path pattern with {subject}.
        label: label path pattern with {subject} ('none' for a cohort without ground truth).
        label_values: the label values allowed in label files (besides 0).
        out: ingestion record path pattern with {subject}.
        record: the chunk record to write.
        require_labels: a missing label file excludes the subject (else the subject is unlabelled).
    """

    def work(subject: str) -> list[dict[str, Any]]:
        path = fill(out, subject=subject)
        write_json(inspect_subject(subject, fill(image, subject=subject),
                                   fill(label, subject=subject) if label else None, label_values,
                                   require_labels), path)
        return [record_row(subject, "inspect", path)]

    rows = run_chunk(subjects, work, lambda s: f"subject {s!r} (image {fill(image, subject=s)})", "inspect")
    write_chunk_record(rows, record)


def split(inspect_chunks: list[PathLike], subjects_tsv: PathLike, split_tsv: PathLike, test_fraction: float,
          val_fraction: float, seed: int, on_bad_subject: Literal["exclude", "fail"] = "exclude",
          train_model: bool = True) -> None:
    """Write ``subjects.tsv`` (all subjects, status, reason) and ``split.tsv`` (usable subjects, role).

    Args:
        inspect_chunks: the inspect chunk records.
        subjects_tsv: output: every subject with its status and reason.
        split_tsv: output: usable subjects and their role (train, val, test, unlabelled).
        test_fraction: fraction of labelled subjects held out for testing.
        val_fraction: fraction of the training subjects used for validation.
        seed: seed of the split.
        on_bad_subject: exclude invalid subjects (listed with their reason) or fail the run.
        train_model: false when the cohort uses a trained QC model (config qc_model): every labelled subject is
            a test subject.
    """
    write_split(recorded_files(inspect_chunks, "inspect"), subjects_tsv, split_tsv, test_fraction, val_fraction,
                seed, on_bad_subject, train_model)
