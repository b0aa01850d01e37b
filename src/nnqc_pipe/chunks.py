"""Chunks: the per-subject stages run as one job per chunk of subjects, not one job per subject.

A population cohort has thousands of subjects; one Snakemake job per subject and stage makes tens of thousands of
jobs (slow to plan, a flood of sbatch submissions, and a model load per subject in the network stages). Each
per-subject stage instead cuts its subjects into deterministic chunks (:func:`chunk_subjects`: sorted names,
consecutive runs of at most ``size``) and runs one job per chunk, which loads its models once and loops over the
chunk's subjects (:func:`run_chunk`). The per-subject files of the file contract are unchanged; each chunk job also
writes a small *chunk record* (:func:`write_chunk_record`), its Snakemake output, listing the files it wrote.

Chunk ids are ``<group>-<index>`` (e.g. ``test-0003``): the group is a role of ``split.tsv`` for the stages after
the split, ``all`` for ingestion. Path patterns carry ``{subject}`` (and ``{source}``, ``{level}``) placeholders,
filled by :func:`fill`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import pandas as pd

from nnqc_pipe.data.io import atomic_path

log = logging.getLogger(__name__)

T = TypeVar("T")
PathLike = str | os.PathLike

# Columns of a chunk record: one row per file written (``source`` is empty for per-subject stages).
RECORD_COLUMNS = ["subject", "source", "kind", "path"]
CHUNK_ID_PATTERN = r"[a-z]+-[0-9]+"


class ChunkError(ValueError):
    """Some items of a chunk failed; the message names each failed subject (and source) and its file."""


def chunk_subjects(subjects: Iterable[str], size: int) -> list[list[str]]:
    """Sorted, de-duplicated ``subjects`` cut into consecutive chunks of ``size`` (the last one may be shorter).

    Deterministic: the same set of names gives the same chunks whatever their input order.
    """
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    names = sorted(set(subjects))
    return [names[i : i + size] for i in range(0, len(names), size)]


def chunk_id(group: str, index: int) -> str:
    """The id of chunk ``index`` of ``group``: ``<group>-<index, 4 digits>``."""
    return f"{group}-{index:04d}"


def chunk_group(chunk: str) -> str:
    """The group (a role of ``split.tsv``, or ``all``) of a chunk id."""
    return chunk.rsplit("-", 1)[0]


def make_chunks(groups: Mapping[str, Iterable[str]], size: int) -> dict[str, list[str]]:
    """Chunk id -> subjects, for every group (e.g. role -> subjects) cut into chunks of ``size``, in group order."""
    out: dict[str, list[str]] = {}
    for group, subjects in groups.items():
        for index, members in enumerate(chunk_subjects(subjects, size)):
            out[chunk_id(group, index)] = members
    return out


def chunk_of(chunks: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Subject -> the id of the chunk that holds it."""
    return {subject: cid for cid, members in chunks.items() for subject in members}


def fill(pattern: str, **values: str | int) -> str:
    """``pattern`` with each ``{name}`` placeholder replaced by ``values[name]`` (other braces are left alone)."""
    for name, value in values.items():
        pattern = pattern.replace("{" + name + "}", str(value))
    return pattern


def task_list(tasks: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(subject, source) pairs of a source -> subjects mapping, subject-major (a subject's sources together)."""
    return sorted((subject, source) for source, subjects in tasks.items() for subject in subjects)


def describe_task(candidates: Mapping[str, str]) -> Callable[[tuple[str, str]], str]:
    """How a (subject, source) task of an infer/score chunk is named in logs and errors: subject, source, file."""

    def describe(task: tuple[str, str]) -> str:
        subject, source = task
        return f"subject {subject!r} source {source} (candidate {fill(candidates[source], subject=subject)})"

    return describe


def run_chunk(items: Sequence[T], work: Callable[[T], list[dict[str, Any]]], describe: Callable[[T], str],
              stage: str) -> list[dict[str, Any]]:
    """Run ``work`` on every item of a chunk, one after the other, and return the record rows they produce.

    Progress and time per item are logged. An item that raises does not stop the others: its error is logged
    (with the traceback), the remaining items run, and then a :class:`ChunkError` names every failed item with
    ``describe(item)`` (subject, source and input file) and its error, so the job fails visibly and the subject
    is never silently skipped.
    """
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    t_chunk = time.perf_counter()
    for i, item in enumerate(items, start=1):
        t0 = time.perf_counter()
        try:
            rows += work(item)
        except Exception as exc:  # every failure is reported, then raised together as a ChunkError
            log.exception("%s %d/%d %s: FAILED: %s", stage, i, len(items), describe(item), exc)
            failures.append(f"{describe(item)}: {type(exc).__name__}: {exc}")
            continue
        log.info("%s %d/%d %s: done in %.1f s", stage, i, len(items), describe(item), time.perf_counter() - t0)
    log.info("%s: %d item(s) in %.1f s, %d failed", stage, len(items), time.perf_counter() - t_chunk, len(failures))
    if failures:
        raise ChunkError(f"{stage}: {len(failures)} of {len(items)} item(s) of the chunk failed:\n  "
                         + "\n  ".join(failures))
    return rows


def record_row(subject: str, kind: str, path: PathLike, source: str = "") -> dict[str, Any]:
    """One row of a chunk record: a file of ``kind`` written for (``subject``, ``source``)."""
    return {"subject": subject, "source": source, "kind": kind, "path": str(path)}


def write_chunk_record(rows: list[dict[str, Any]], path: PathLike) -> None:
    """Write a chunk record (TSV with :data:`RECORD_COLUMNS`) atomically."""
    table = pd.DataFrame(rows, columns=RECORD_COLUMNS)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False)


def read_chunk_records(paths: Iterable[PathLike]) -> pd.DataFrame:
    """The rows of several chunk records, in the order given."""
    tables = [pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False) for p in paths]
    if not tables:
        return pd.DataFrame(columns=RECORD_COLUMNS)
    return pd.concat(tables, ignore_index=True)


def recorded_files(paths: Iterable[PathLike], kind: str) -> list[str]:
    """The files of ``kind`` listed in the chunk records ``paths`` (in record order)."""
    table = read_chunk_records(paths)
    return table.loc[table.kind == kind, "path"].tolist()
