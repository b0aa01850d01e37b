"""Chunks of subjects: deterministic chunking, the per-chunk loop's failure handling, chunk records, chunk stages."""

from __future__ import annotations

import random
import re

import numpy as np
import pandas as pd
import pytest
from conftest import plan_defaults

from nnqc_pipe import chunks
from nnqc_pipe.data.fingerprint import compute_fingerprint
from nnqc_pipe.data.io import read_json, write_json
from nnqc_pipe.data.plan import make_plan
from nnqc_pipe.stages import ingest, preprocess

NAMES = [f"sub{i:03d}" for i in range(23)]


def test_chunk_subjects_covers_every_subject_once_in_sorted_consecutive_chunks():
    out = chunks.chunk_subjects(NAMES, 5)
    assert [len(c) for c in out] == [5, 5, 5, 5, 3]
    flat = [s for c in out for s in c]
    assert flat == sorted(NAMES) and len(set(flat)) == len(NAMES)


@pytest.mark.parametrize("size", [1, 2, 7, 23, 100])
def test_chunk_size_is_respected(size):
    out = chunks.chunk_subjects(NAMES, size)
    assert all(1 <= len(c) <= size for c in out)
    assert all(len(c) == size for c in out[:-1])  # only the last chunk may be shorter
    assert len(out) == -(-len(NAMES) // size)


def test_chunking_is_deterministic_and_stable_for_the_same_input():
    shuffled = NAMES[:]
    random.Random(0).shuffle(shuffled)
    assert chunks.chunk_subjects(shuffled, 4) == chunks.chunk_subjects(NAMES, 4)
    assert chunks.chunk_subjects(NAMES + NAMES[:3], 4) == chunks.chunk_subjects(NAMES, 4)  # duplicates once
    assert chunks.chunk_subjects(NAMES, 4) == chunks.chunk_subjects(list(NAMES), 4)


def test_chunk_edge_cases():
    assert chunks.chunk_subjects([], 3) == []
    with pytest.raises(ValueError, match="chunk size"):
        chunks.chunk_subjects(NAMES, 0)


def test_make_chunks_ids_per_group_and_index():
    groups = {"train": NAMES[:7], "test": NAMES[7:9], "unlabelled": []}
    out = chunks.make_chunks(groups, 3)
    assert list(out) == ["train-0000", "train-0001", "train-0002", "test-0000"]
    assert out["train-0002"] == [NAMES[6]] and out["test-0000"] == NAMES[7:9]
    where = chunks.chunk_of(out)
    assert where[NAMES[4]] == "train-0001" and len(where) == 9
    assert chunks.chunk_group("unlabelled-0012") == "unlabelled"
    assert all(re.fullmatch(chunks.CHUNK_ID_PATTERN, c) for c in out)


def test_fill_replaces_only_named_placeholders():
    assert chunks.fill("r/{source}/{subject}.nii.gz", subject="s1", source="gt") == "r/gt/s1.nii.gz"
    assert chunks.fill("d/{subject}/L{level}.nii.gz", subject="a", level=3) == "d/a/L3.nii.gz"
    assert chunks.fill("x/{other}/{subject}", subject="s") == "x/{other}/s"


def test_task_list_is_subject_major():
    tasks = {"gt": ["b", "a"], "degraded_L1": ["a"]}
    assert chunks.task_list(tasks) == [("a", "degraded_L1"), ("a", "gt"), ("b", "gt")]


def test_run_chunk_goes_on_after_a_failure_and_names_the_subject(caplog):
    done = []

    def work(subject):
        if subject == "bad":
            raise ValueError("cannot read /data/bad.nii.gz")
        done.append(subject)
        return [chunks.record_row(subject, "x", f"/out/{subject}")]

    with pytest.raises(chunks.ChunkError) as err:
        chunks.run_chunk(["a", "bad", "c"], work, lambda s: f"subject {s!r} (image /data/{s}.nii.gz)", "stage")
    assert done == ["a", "c"]  # the other subjects of the chunk were processed
    message = str(err.value)
    assert "1 of 3" in message and "subject 'bad' (image /data/bad.nii.gz)" in message
    assert "cannot read /data/bad.nii.gz" in message
    rows = chunks.run_chunk(["a"], work, str, "stage")
    assert rows == [{"subject": "a", "source": "", "kind": "x", "path": "/out/a"}]


def test_chunk_record_roundtrip(tmp_path):
    rows = [chunks.record_row("a", "pgt", "/p/gt/a.nii.gz", "gt"), chunks.record_row("a", "slices", "/p/a.pq", "gt")]
    chunks.write_chunk_record(rows, tmp_path / "c1.tsv")
    chunks.write_chunk_record([chunks.record_row("b", "pgt", "/p/gt/b.nii.gz", "gt")], tmp_path / "c2.tsv")
    chunks.write_chunk_record([], tmp_path / "empty.tsv")
    paths = [tmp_path / "c1.tsv", tmp_path / "empty.tsv", tmp_path / "c2.tsv"]
    assert chunks.recorded_files(paths, "pgt") == ["/p/gt/a.nii.gz", "/p/gt/b.nii.gz"]
    table = chunks.read_chunk_records(paths)
    assert list(table.columns) == chunks.RECORD_COLUMNS and len(table) == 3
    assert list(tmp_path.glob(".*")) == []  # written through temporary files, renamed


# ---- Chunk stages on phantoms ----


def test_inspect_chunk_records_bad_subjects_without_failing(phantom_dir, tmp_path):
    pattern_img = str(phantom_dir / "imagesTr/{subject}.nii.gz")
    pattern_lbl = str(phantom_dir / "labelsTr/{subject}.nii.gz")
    out, record = str(tmp_path / "inspect/{subject}.json"), tmp_path / "chunks/inspect/all-0000.tsv"
    ingest.inspect(["demo_000", "demo_001", "missing"], pattern_img, pattern_lbl, [1, 2], out, record)
    assert read_json(tmp_path / "inspect/demo_000.json")["status"] == "ok"
    bad = read_json(tmp_path / "inspect/missing.json")
    assert bad["status"] == "excluded" and "missing" in bad["reason"]
    assert chunks.recorded_files([record], "inspect") == [chunks.fill(out, subject=s)
                                                         for s in ("demo_000", "demo_001", "missing")]


def test_preprocess_chunk_names_a_failing_subject_and_keeps_the_others(phantom_dir, tmp_path):
    from nnqc_pipe.data.inspect import inspect_subject

    img, lbl = str(phantom_dir / "imagesTr/{subject}.nii.gz"), str(phantom_dir / "labelsTr/{subject}.nii.gz")
    recs = [inspect_subject(s, chunks.fill(img, subject=s), chunks.fill(lbl, subject=s), [1, 2])
            for s in ("demo_000", "demo_001")]
    write_json(make_plan(compute_fingerprint(recs, "MR", {1: "wall", 2: "cavity"}), plan_defaults()),
               tmp_path / "plan.json")
    out, record = str(tmp_path / "pre/{subject}.npz"), tmp_path / "chunks/preprocess/train-0000.tsv"
    with pytest.raises(chunks.ChunkError) as err:
        preprocess.preprocess(["demo_000", "gone", "demo_001"], img, lbl, tmp_path / "plan.json", out, record)
    assert "subject 'gone'" in str(err.value) and chunks.fill(img, subject="gone") in str(err.value)
    assert (tmp_path / "pre/demo_000.npz").exists() and (tmp_path / "pre/demo_001.npz").exists()
    assert not record.exists()  # the chunk is not complete: no record, Snakemake reruns it
    preprocess.preprocess(["demo_000", "demo_001"], img, lbl, tmp_path / "plan.json", out, record)
    table = pd.read_csv(record, sep="\t")
    assert list(table.subject) == ["demo_000", "demo_001"] and set(table.kind) == {"npz"}
    with np.load(tmp_path / "pre/demo_001.npz") as npz:
        assert npz["image"].ndim == 3
