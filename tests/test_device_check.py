"""benchmarks/device_check.py --smoke: seconds on CPU, tiny sizes; the JSON has every section and sane figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "correctness", "training", "inference", "pipeline", "derived")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("device_check")
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_check.py"), "--smoke", "--threads", "1",
                           "--out", str(out / "check.json"), "--work", str(out / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "check.json").read_text())
    result["_stdout"] = proc.stdout
    return result


def test_every_section_ran_or_was_skipped(smoke: dict) -> None:
    assert smoke["ok"] is True and smoke["smoke"] is True
    assert tuple(smoke["sections"]) == SECTIONS
    for name, section in smoke["sections"].items():
        expected = "skipped" if name == "pipeline" else "ok"
        assert section["status"] == expected, (name, section)
    assert smoke["seconds"] < smoke["budget_s"]


def test_environment_names_versions_and_precision(smoke: dict) -> None:
    env = smoke["sections"]["environment"]
    assert env["device"] == "cpu" and env["autocast"] == "none"
    assert env["torch"] and env["monai"] and env["host"]


def test_cpu_against_itself_agrees_exactly(smoke: dict) -> None:
    tiny = smoke["sections"]["correctness"]["presets"]["tiny"]
    for net in ("vae", "ldm", "qcnet"):
        assert tiny[net]["ok"] and tiny[net]["rel_l2"] == 0.0 and tiny[net]["tolerance"] == smoke["tolerances"][net]
    assert tiny["ddim_sample"]["finite"] and tiny["ddim_sample"]["dice_vs_cpu"] == 1.0


def test_training_and_inference_figures_are_positive(smoke: dict) -> None:
    train = smoke["sections"]["training"]["presets"]["tiny"]
    for stage in ("vae", "ldm"):
        assert train[stage]["samples_per_s"] > 0
        assert math.isclose(train[stage]["s_per_epoch"], train["epoch_slices"] / train[stage]["samples_per_s"])
    assert train["ldm"]["paper_s_per_epoch"] == 204.5 and train["data"].startswith("synthetic")
    inference = smoke["sections"]["inference"]["presets"]["tiny"]
    assert {r["steps"] for r in inference["rows"]} == {20, 1}
    assert all(r["s_per_slice"] > 0 and r["draws"] == 2 for r in inference["rows"])
    assert inference["paper_a100_s_per_slice"] == 0.404


def test_derived_sizing_figures(smoke: dict) -> None:
    derived = smoke["sections"]["derived"]["tiny"]
    assert derived["candidates_per_gpu_hour"] == pytest.approx(3600 / derived["s_per_candidate"])
    assert set(derived["subjects_per_1h_infer_job"]) == {"1", "3", "8"}
    assert derived["train_s_per_1000_slices"]["ldm"] > 0


def test_every_figure_is_printed(smoke: dict) -> None:
    assert "sections.inference.presets.tiny.rows[0].s_per_slice = " in smoke["_stdout"]
    assert "device check OK" in smoke["_stdout"]
