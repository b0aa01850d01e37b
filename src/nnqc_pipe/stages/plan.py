"""Stages of ``rules/plan.smk``: the fingerprint of the training subjects and the plan derived from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nnqc_pipe.data.fingerprint import compute_fingerprint
from nnqc_pipe.data.io import PathLike, read_json, write_json
from nnqc_pipe.data.plan import make_plan
from nnqc_pipe.data.split import read_split


def fingerprint(split_tsv: PathLike, inspect_dir: PathLike, modality: str, label_names: dict[int, str],
                out: PathLike) -> None:
    """Fingerprint of the training (train + val) subjects.

    Args:
        split_tsv: the split (subject -> role).
        inspect_dir: folder of the ingestion records ({subject}.json).
        modality: MR, CT or other.
        label_names: JSON object label value -> class name.
        out: fingerprint.json to write.
    """
    roles = read_split(split_tsv)
    subjects = roles["train"] + roles["val"]
    records = [read_json(Path(inspect_dir) / f"{s}.json") for s in subjects]
    write_json(compute_fingerprint(records, modality, label_names), out)


def plan(fingerprint_json: PathLike, overrides: dict[str, Any], out: PathLike) -> None:
    """Derive ``plan.json`` from the fingerprint and the config's plan overrides.

    Args:
        fingerprint_json: the cohort's fingerprint.json.
        overrides: JSON object of plan keys fixed by the config.
        out: plan.json to write.
    """
    write_json(make_plan(read_json(fingerprint_json), overrides), out)
