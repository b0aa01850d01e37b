"""Cohort configuration: loading, schema validation (Snakemake's own), label maps and a stable hash."""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from snakemake.utils import validate

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schemas" / "config.schema.yaml"


def validate_config(config: dict[str, Any], schema: str | os.PathLike = SCHEMA_PATH) -> dict[str, Any]:
    """Validate ``config`` against the schema, filling defaults in place; raises with the offending key."""
    validate(config, str(schema), set_default=True)
    return config


def load_config(path: str | os.PathLike, schema: str | os.PathLike = SCHEMA_PATH) -> dict[str, Any]:
    """Read a YAML config file and validate it."""
    with open(path) as fh:
        config = yaml.safe_load(fh) or {}
    return validate_config(config, schema)


def label_map(config: dict[str, Any]) -> dict[int, str]:
    """Label value in the files -> class name, sorted by value."""
    return {int(k): v for k, v in sorted(config["label_names"].items(), key=lambda kv: int(kv[0]))}


def config_hash(config: dict[str, Any]) -> str:
    """Short stable hash of a config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def discover_subjects(pattern: str) -> list[str]:
    """Subject names whose files match a ``{subject}`` path pattern, sorted."""
    if pattern.count("{subject}") != 1:
        raise ValueError(f"path pattern must contain {{subject}} exactly once: {pattern!r}")
    prefix, suffix = pattern.split("{subject}")
    regex = re.compile(re.escape(prefix) + r"(?P<subject>[^/]+?)" + re.escape(suffix) + "$")
    subjects = []
    for path in glob.glob(glob.escape(prefix) + "*" + glob.escape(suffix)):
        match = regex.match(path)
        if match:
            subjects.append(match.group("subject"))
    return sorted(set(subjects))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in recursively (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# What the jobs' ``python`` must import (the rules run ``python -m nnqc_pipe``); checked when the workflow starts.
JOB_MODULES = ("numpy", "scipy", "pandas", "pyarrow", "nibabel", "SimpleITK", "sklearn", "matplotlib", "yaml",
               "torch", "monai", "open_clip")


def job_python_problem(python: str = "python") -> str | None:
    """Why the jobs' ``python`` cannot run the stages (not found, or modules missing), or None when it can.

    Without ``--use-conda`` the rules run whatever ``python`` is first on PATH; a newcomer who calls
    ``.venv/bin/snakemake`` without activating the environment would otherwise see every job fail deep in its
    log with "No module named ...".
    """
    code = ("import importlib.util as u, sys; "
            f"print(sys.executable); print(' '.join(m for m in {JOB_MODULES!r} if u.find_spec(m) is None))")
    try:
        result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        return f"no {python!r} on PATH for the jobs"
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) < 2:
        return f"the jobs' {python!r} does not run: {result.stderr.strip()[-300:]}"
    if lines[1].strip():
        return f"the jobs' {python!r} ({lines[0]}) cannot import {lines[1].replace(' ', ', ')}"
    return None


def job_device(device: str, gpu: Any = None, gres: Any = None) -> str:
    """The ``--device`` of a network rule's job: the config's ``device``, except that ``auto`` becomes ``cuda`` in a
    job given a GPU (resource ``gpu`` > 0, e.g. ``1`` or ``a100:1``, or a ``gres`` naming a GPU, as the SLURM
    profile does), so that such a job on a node without CUDA fails at once instead of running on its CPU.
    ``cpu`` and ``cuda`` are kept: ``device: cpu`` runs anywhere."""
    if device != "auto":
        return device
    count = str(gpu).rsplit(":", 1)[-1] if gpu not in (None, "") else "0"
    has_gpu = (count.isdigit() and int(count) > 0) or "gpu" in str(gres or "").lower()
    return "cuda" if has_gpu else "auto"
