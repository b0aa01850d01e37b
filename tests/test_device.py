"""Device choice: `auto` falls back to the CPU with a warning, `cuda` without CUDA fails at once naming the host,
and the cluster profile's GPU jobs ask for CUDA (so they fail fast on a node without it) unless `device: cpu`."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import pytest
import torch
import yte

from nnqc_pipe import cli
from nnqc_pipe.config import job_device
from nnqc_pipe.models import device as device_module
from nnqc_pipe.models.device import DeviceUnavailableError, resolve_device

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device_module._warn_cpu_fallback.cache_clear()


def test_auto_falls_back_to_cpu_with_a_warning(no_cuda: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nnqc_pipe.models.device"):
        assert resolve_device("auto").type == "cpu"
        assert resolve_device("auto").type == "cpu"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and socket.gethostname() in warnings[0] and "CPU" in warnings[0]


def test_cuda_without_cuda_names_the_host(no_cuda: None) -> None:
    assert resolve_device("cpu").type == "cpu"
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceUnavailableError, match=re.escape(repr(socket.gethostname()))) as err:
            resolve_device(name)
        assert "device: cpu" in str(err.value)
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_network_command_fails_before_reading_its_inputs(no_cuda: None, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    record = tmp_path / "record.tsv"
    argv = ["embed", "--subjects", "s1", "--npz", str(tmp_path / "missing-{subject}.npz"), "--plan-json",
            str(tmp_path / "missing-plan.json"), "--settings", "{}", "--out", str(tmp_path / "{subject}.npz"),
            "--record", str(record), "--device", "cuda"]
    with caplog.at_level(logging.ERROR):
        assert cli.main(argv) == 2
    assert socket.gethostname() in caplog.text and "CUDA is not available" in caplog.text
    assert not record.exists()


@pytest.mark.parametrize(("device", "gpu", "gres", "expected"), [
    ("auto", None, None, "auto"),  # no GPU asked for (local runs, the local profile): auto stays auto
    ("auto", 0, None, "auto"),
    ("auto", 1, None, "cuda"),  # the SLURM profile's `gpu: 1`
    ("auto", "a100:1", None, "cuda"),
    ("auto", None, "gpu:a100:2", "cuda"),
    ("cpu", 1, None, "cpu"),  # device: cpu runs anywhere
    ("cuda", None, None, "cuda"),
])
def test_job_device(device: str, gpu: object, gres: object, expected: str) -> None:
    assert job_device(device, gpu, gres) == expected


def gpu_rules() -> set[str]:
    """The rules that declare ``gpu_job=1`` (the network rules)."""
    names = set()
    for path in (REPO / "rules").glob("*.smk"):
        for block in re.split(r"\n(?=\s*rule )", path.read_text()):
            match = re.match(r"\s*rule (\w+):", block)
            if match and "gpu_job=1" in block:
                assert "device=rule_device" in block, f"rule {match.group(1)} must pass --device from rule_device"
                names.add(match.group(1))
    return names


def test_slurm_profile_gives_every_gpu_rule_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNQC_SLURM_GPU_PARTITION", "gpu")
    with open(REPO / "profiles" / "slurm" / "config.yaml") as fh:
        profile = yte.process_yaml(fh)
    rules = gpu_rules()
    assert rules >= {"embed", "train_vae", "train_ldm", "train_segmenter", "train_qcnet", "infer"}
    for rule in rules:
        resources = profile["set-resources"][rule]
        assert job_device("auto", resources.get("gpu"), resources.get("gres")) == "cuda", rule
        assert job_device("cpu", resources.get("gpu"), resources.get("gres")) == "cpu", rule
