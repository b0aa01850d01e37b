"""Shared fixtures: paths to the real cohorts (skipped when absent) and small phantom cohorts."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest

from nnqc_pipe.config import validate_config
from nnqc_pipe.data import demo

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NNQC_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny networks gain nothing from intra-op threads, and on a shared 2-core machine they stall."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shared_cohort(name: str) -> Path:
    """Folder of a shared real cohort, or skip the test when it is not on this machine."""
    path = SHARED_DATA / name
    if not (path / "imagesTr").is_dir():
        pytest.skip(f"shared cohort {name!r} not available at {path}")
    return path


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Six demo phantoms (RAS, LPS and slice-axis-first storage) written as NIfTI."""
    out = tmp_path_factory.mktemp("phantoms")
    demo.write_cohort(out, 6, seed=3)
    return out


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write a NIfTI file for a test."""
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def plan_defaults(**plan) -> dict:
    """The config's ``plan`` section with schema defaults and the given overrides."""
    config = validate_config({"cohort": "x", "images": "{subject}", "label_names": {"1": "a"}, "plan": plan})
    divisor = config["plan"]["divisor"]
    return {**config["plan"], "divisor": 8 if divisor == "auto" else divisor}
