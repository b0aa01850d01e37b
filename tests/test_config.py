"""Config loading and schema validation (nnqc_pipe.config, config/schemas)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nnqc_pipe import config as cfg
from nnqc_pipe.models.presets import resolve_inference

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["config/config.yaml", "config/cohorts/hippocampus.yaml", "config/cohorts/acdc.yaml"])
def test_shipped_configs_validate_and_get_defaults(name):
    c = cfg.load_config(REPO / name)
    assert c["split"]["seed"] == 42
    steps = resolve_inference(c["inference"], c["model"], c["preset"])["ddim_steps"]
    assert steps == {"cpu": 1, "paper": 20}.get(c["preset"], c["inference"]["ddim_steps"])
    assert c["plan"]["divisor"] == "auto"


def _minimal(**extra):
    return {"cohort": "x", "images": "img/{subject}.nii.gz", "label_names": {"1": "organ"}, **extra}


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(Exception, match="'patch_sise' was unexpected"):
        cfg.validate_config(_minimal(plan={"patch_sise": 64}))


def test_wrong_type_is_named():
    with pytest.raises(Exception, match="test_fraction"):
        cfg.validate_config(_minimal(split={"test_fraction": "a lot"}))


def test_pattern_needs_subject_placeholder():
    with pytest.raises(Exception, match="subject"):
        cfg.validate_config(_minimal(images="img/fixed.nii.gz"))


def test_source_named_gt_is_reserved():
    with pytest.raises(Exception, match="sources"):
        cfg.validate_config(_minimal(sources={"gt": "x/{subject}.nii.gz"}))


def test_methods_default_to_every_opinion_and_must_keep_nnqc():
    assert cfg.validate_config(_minimal())["methods"] == ["nnqc", "learned", "vae_recon", "agreement"]
    assert cfg.validate_config(_minimal(methods=["nnqc"]))["methods"] == ["nnqc"]
    for wrong in (["learned", "agreement"], ["nnqc", "wang"], ["nnqc", "nnqc"]):
        with pytest.raises(Exception, match="methods"):
            cfg.validate_config(_minimal(methods=wrong))


def test_labels_optional_and_label_map_sorted(tmp_path):
    c = cfg.validate_config(_minimal(label_names={"2": "b", "1": "a"}))
    assert c["labels"] is None
    assert cfg.label_map(c) == {1: "a", 2: "b"}


def test_config_hash_ignores_key_order():
    assert cfg.config_hash({"a": 1, "b": {"c": 2}}) == cfg.config_hash({"b": {"c": 2}, "a": 1})
    assert cfg.config_hash({"a": 1}) != cfg.config_hash({"a": 2})


def test_discover_subjects(tmp_path):
    for name in ["s2", "s1", "s3.x"]:
        (tmp_path / f"{name}_img.nii.gz").write_bytes(b"")
    (tmp_path / "other.txt").write_bytes(b"")
    assert cfg.discover_subjects(str(tmp_path / "{subject}_img.nii.gz")) == ["s1", "s2", "s3.x"]


def test_deep_merge_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}}
    merged = cfg.deep_merge(base, {"a": {"c": 3}})
    assert merged == {"a": {"b": 1, "c": 3}} and base["a"]["c"] == 2


def test_schema_is_yaml():
    assert yaml.safe_load(cfg.SCHEMA_PATH.read_text())["required"] == ["cohort", "images", "label_names"]
