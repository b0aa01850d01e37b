"""QC model bundles: export, MANIFEST check, compatibility with a cohort, import (nnqc_pipe.models.bundle)."""

from __future__ import annotations

import subprocess

import pandas as pd
import pytest

from nnqc_pipe.cli import build_parser, main
from nnqc_pipe.config import validate_config
from nnqc_pipe.data.io import file_sha256, read_json, write_json, write_parquet
from nnqc_pipe.models.bundle import (
    BUNDLE_FILES,
    MANIFEST,
    BundleError,
    check_bundle,
    compatibility_problems,
    export_model,
    import_bundle,
    manifest_problems,
    read_bundle,
)

TINY_EXPERT = {"architecture": "nnqc-tiny-vit", "checkpoint": "/nowhere/tiny_vision_expert.pt",
               "weights_sha256": "ab" * 32, "pretrained": False, "token_grid": 4}


def fake_results(root, encoder=None):
    """A cohort's results folder as training leaves it (networks are opaque bytes here)."""
    models = root / "models"
    models.mkdir(parents=True)
    (models / "vae.pt").write_bytes(b"vae weights")
    (models / "ldm.pt").write_bytes(b"ldm weights")
    card = {
        "preset": "tiny", "patch_size": [32, 32], "n_classes": 3, "conditioning_mode": "full",
        "encoder": encoder or TINY_EXPERT,
        "vae": {"best_val_dice": 0.97, "best_epoch": 2},
        "ldm": {"best_val_dice": 0.81, "best_epoch": 2, "best_scores": {"0.3": 0.8, "0.5": 0.82},
                "candidate_scores": {"0.3": 0.55, "0.5": 0.3}, "val_severities": [0.3, 0.5]},
        "checkpoints": {name: file_sha256(models / name) for name in ("vae.pt", "ldm.pt")},
    }
    write_json(card, models / "model_card.json")
    write_json({"n_subjects": 4, "modality": "MR", "label_values": [1, 2], "label_names": ["wall", "cavity"]},
               root / "fingerprint.json")
    write_json({"patch_size": [32, 32], "label_values": [1, 2]}, root / "plan.json")
    return root


def cohort_config(**extra):
    config = {"cohort": "reuse", "images": "{subject}", "labels": None, "label_names": {"1": "wall", "2": "cavity"},
              "expert": {"tiny_fallback": True}, **extra}
    return validate_config(config)


@pytest.fixture
def bundle(tmp_path):
    return export_model(fake_results(tmp_path / "results" / "heart"), tmp_path / "bundle")


def test_export_writes_a_self_describing_bundle(bundle):
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*BUNDLE_FILES, MANIFEST])
    description = read_bundle(bundle)
    assert description["training_cohort"] == "heart" and description["modality"] == "MR"
    assert description["label_names"] == {"1": "wall", "2": "cavity"}
    assert description["expert"] == {"used": True, **{k: v for k, v in TINY_EXPERT.items() if k != "checkpoint"},
                                     "checkpoint_sha256": None}
    assert description["validation"]["pgt_best_val_dice"] == 0.81
    assert manifest_problems(bundle) == []
    # the MANIFEST is in sha256sum format
    assert subprocess.run(["sha256sum", "--check", "--quiet", MANIFEST], cwd=bundle).returncode == 0
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".bundle")]  # no temporary folder left


def test_export_refuses_to_overwrite_unless_forced(tmp_path, bundle):
    with pytest.raises(BundleError, match="exists"):
        export_model(tmp_path / "results" / "heart", bundle)
    (bundle / "stale.txt").write_text("x")
    export_model(tmp_path / "results" / "heart", bundle, force=True)
    assert not (bundle / "stale.txt").exists() and manifest_problems(bundle) == []


def test_export_refuses_an_untrained_or_inconsistent_cohort(tmp_path):
    with pytest.raises(BundleError, match="no trained QC model"):
        export_model(tmp_path, tmp_path / "out")
    results = fake_results(tmp_path / "r")
    (results / "models" / "ldm.pt").write_bytes(b"retrained")
    with pytest.raises(BundleError, match="ldm.pt is not the file model_card.json describes"):
        export_model(results, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_pretrained_expert_without_its_checkpoint(tmp_path):
    encoder = {**TINY_EXPERT, "architecture": "ViT-B-16-quickgelu", "pretrained": True}
    with pytest.raises(BundleError, match="--expert-checkpoint"):
        export_model(fake_results(tmp_path / "r", encoder), tmp_path / "out")


def test_tampered_or_missing_files_are_named(bundle):
    (bundle / "ldm.pt").write_bytes(b"tampered")
    (bundle / "plan.json").unlink()
    problems = manifest_problems(bundle)
    assert any("ldm.pt: SHA-256 differs from the MANIFEST (corrupted" in p for p in problems)
    assert any("plan.json: listed in the MANIFEST but missing" in p for p in problems)
    with pytest.raises(BundleError, match="ldm.pt"):
        check_bundle(bundle, cohort_config())


def test_compatible_cohort_passes(bundle):
    assert check_bundle(bundle, cohort_config())["training_cohort"] == "heart"


def test_every_incompatibility_is_named(bundle):
    config = cohort_config(label_names={"1": "wall", "2": "lumen"}, modality="CT",
                           model={"encoder": {"token_grid": 2}})
    problems = compatibility_problems(read_bundle(bundle), config)
    assert [p.split(":")[0] for p in problems] == ["label names", "modality", "vision expert token grid"]
    assert "'2': 'lumen'" in problems[0]
    with pytest.raises(BundleError, match="cannot be used for cohort reuse") as err:
        check_bundle(bundle, config)
    assert "label names" in str(err.value) and "modality: bundle MR, cohort CT" in str(err.value)


def test_vision_expert_must_be_the_same(tmp_path, bundle):
    checkpoint = tmp_path / "unimedclip.pt"
    checkpoint.write_bytes(b"some other expert")
    config = cohort_config(expert={"checkpoint": str(checkpoint)})
    (problem,) = compatibility_problems(read_bundle(bundle), config)
    assert "untrained tiny expert" in problem and str(checkpoint) in problem
    encoder = {**TINY_EXPERT, "architecture": "ViT-B-16-quickgelu", "pretrained": True}
    trained = tmp_path / "trained.pt"
    trained.write_bytes(b"the trained expert")
    pretrained = export_model(fake_results(tmp_path / "p", {**encoder, "checkpoint": str(trained)}),
                              tmp_path / "b2")
    assert read_bundle(pretrained)["expert"]["checkpoint_sha256"] == file_sha256(trained)
    (problem,) = compatibility_problems(read_bundle(pretrained), config)
    assert problem.startswith("vision expert checksum") and str(checkpoint) in problem
    assert compatibility_problems(read_bundle(pretrained), cohort_config(expert={"checkpoint": str(trained)})) == []


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="export-model"):
        read_bundle(tmp_path)


def test_import_copies_the_bundle_and_says_where_it_comes_from(tmp_path, bundle):
    out = tmp_path / "results" / "reuse"
    import_bundle(bundle, out / "models", out / "fingerprint.json", out / "plan.json")
    assert file_sha256(out / "models" / "ldm.pt") == file_sha256(bundle / "ldm.pt")
    assert read_json(out / "plan.json") == read_json(bundle / "plan.json")
    card = read_json(out / "models" / "model_card.json")
    assert card["qc_model"]["source"] == str(bundle.resolve()) and card["qc_model"]["training_cohort"] == "heart"
    assert card["qc_model"]["manifest_sha256"] == file_sha256(bundle / MANIFEST)
    (bundle / "vae.pt").write_bytes(b"corrupted")
    with pytest.raises(BundleError, match="vae.pt"):
        import_bundle(bundle, out / "models", out / "fingerprint.json", out / "plan.json")


def test_the_optional_networks_travel_with_the_bundle(tmp_path):
    """A cohort that trained the learned opinion and the latent search exports and imports their networks too."""
    results = fake_results(tmp_path / "results" / "heart")
    for name in ("qcnet.pt", "latent_vae.pt"):
        (results / "models" / name).write_bytes(name.encode())
    bundle = export_model(results, tmp_path / "bundle")
    assert {"qcnet.pt", "latent_vae.pt"} <= {p.name for p in bundle.iterdir()} and manifest_problems(bundle) == []
    out = tmp_path / "results" / "reuse"
    import_bundle(bundle, out / "models", out / "fingerprint.json", out / "plan.json")
    assert (out / "models" / "latent_vae.pt").read_bytes() == b"latent_vae.pt"


def test_export_model_command(tmp_path, capsys):
    results = fake_results(tmp_path / "results" / "heart")
    assert main(["export-model", str(results), str(tmp_path / "b")]) == 0
    assert manifest_problems(tmp_path / "b") == []
    assert main(["export-model", str(results), str(tmp_path / "b")]) == 2  # exists: refused with a message
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["export-model"]
    assert all(action.help for action in sub._actions)


def fake_report(results, checkpoints):
    """The report's subjects table of a labelled cohort: its metadata holds the fitted calibration and fusion."""
    fits = {"calibration": {"foreground": {"fitted": True, "map": {"x": [0.1, 0.9], "y": [0.2, 0.95]},
                                           "per_source": {"unet": {"fitted": True}}},
                            "wall": {"fitted": False, "reason": "3 labelled subjects (< 5)"}},
            "combined": {"foreground": {"fitted": True, "coefficients": {"predicted_dsc+learned_dsc": {
                "predicted_dsc": 0.7, "learned_dsc": 0.3, "intercept": 0.01, "rows": 40}}}},
            "pass_threshold": {"foreground": {"fitted": True, "score": "predicted_dsc", "threshold": 0.77,
                                              "failures": 25, "folds": {"0": 0.8, "1": 0.78}},
                               "wall": {"fitted": False, "score": "predicted_dsc", "threshold": 0.8}}}
    (results / "report").mkdir()
    write_parquet(pd.DataFrame({"subject": ["s1"]}), results / "report" / "subjects.parquet",
                  {"checkpoints": checkpoints, **fits})


def test_the_training_cohorts_fits_travel_with_the_bundle(tmp_path, caplog):
    """export-model carries the report's calibration map, fusion and learned pass threshold (the fitted labels
    only) when the report was written with the exported networks; a cohort importing the bundle finds them in its
    model card."""
    results = fake_results(tmp_path / "results" / "heart")
    fake_report(results, read_json(results / "models" / "model_card.json")["checkpoints"])
    assert main(["export-model", str(results), str(tmp_path / "b")]) == 0
    fits = read_bundle(tmp_path / "b")["fits"]
    assert fits == {"calibration": {"foreground": {"x": [0.1, 0.9], "y": [0.2, 0.95]}},
                    "combined": {"foreground": {"coefficients": {"predicted_dsc+learned_dsc": {
                        "predicted_dsc": 0.7, "learned_dsc": 0.3, "intercept": 0.01, "rows": 40}}}},
                    "pass_threshold": {"foreground": {"score": "predicted_dsc", "threshold": 0.77}}}
    out = tmp_path / "results" / "reuse"
    import_bundle(tmp_path / "b", out / "models", out / "fingerprint.json", out / "plan.json")
    assert read_json(out / "models" / "model_card.json")["qc_model"]["fits"] == fits
    # a report written with other networks is stale: nothing is carried, and the log says why
    stale = fake_results(tmp_path / "results" / "other")
    fake_report(stale, {"vae.pt": "0" * 64})
    assert main(["export-model", str(stale), str(tmp_path / "c")]) == 0
    assert "fits" not in read_bundle(tmp_path / "c") and "written with other networks (vae.pt)" in caplog.text
