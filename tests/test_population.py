"""Population QC end to end: partial labels, a QC model exported and reused by a cohort without labels, and a
bundle refused at start (tiny phantoms, tiny preset)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from test_workflow import base_config, run_snakemake

from nnqc_pipe.data import demo
from nnqc_pipe.data.io import read_json, read_parquet_metadata

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
UNLABELLED = ("demo_006", "demo_007")


def dilated_copy(label: Path, out: Path) -> None:
    """A candidate mask: the label dilated by one voxel (classes kept)."""
    img = nib.load(label)
    mask = ndimage.grey_dilation(np.asarray(img.dataobj), size=3).astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask, img.affine), out)


def population_config(workdir: Path, data: Path, **extra) -> dict:
    """Few subjects, one degradation level, one user source 'model'."""
    config = base_config(workdir, f"{data}/imagesTr/{{subject}}.nii.gz", f"{data}/labelsTr/{{subject}}.nii.gz",
                         sources={"model": f"{data}/model/{{subject}}.nii.gz"}, degradation={"levels": [3]},
                         chunks={"subjects_per_job": 4}, **extra)
    # 3 training subjects make 3 LDM steps per epoch: with the preset's 20 warm-up steps the learning rate stays so
    # low that the pGT comes out empty for every candidate (predicted DSC 0 throughout); 2 warm-up steps learn
    config["model"]["ldm"]["warmup_steps"] = 2
    return config


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory):
    """8 phantoms, 2 of them without a label file; every subject has a 'model' candidate (a dilated label)."""
    workdir = tmp_path_factory.mktemp("partial")
    data = workdir / "data"
    demo.write_cohort(data, 8, seed=4)
    for subject in demo.subject_names(8):
        dilated_copy(data / "labelsTr" / f"{subject}.nii.gz", data / "model" / f"{subject}.nii.gz")
    for subject in UNLABELLED:
        (data / "labelsTr" / f"{subject}.nii.gz").unlink()
    proc = run_snakemake(population_config(workdir, data), workdir)
    assert proc.returncode == 0, "workflow failed"
    return workdir / "results" / "e2e"


@pytest.fixture(scope="module")
def bundle(partial_run):
    out = partial_run.parents[1] / "bundle"
    proc = subprocess.run([sys.executable, "-m", "nnqc_pipe", "export-model", str(partial_run), str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def test_partial_labels_subjects_and_split(partial_run):
    subjects = pd.read_csv(partial_run / "subjects.tsv", sep="\t").set_index("subject")
    assert (subjects.status == "ok").all()
    assert sorted(subjects.index[~subjects.labelled]) == list(UNLABELLED)
    split = pd.read_csv(partial_run / "split.tsv", sep="\t").set_index("subject").role
    assert set(split[list(UNLABELLED)]) == {"unlabelled"}
    assert "2 usable subject(s) without a label file" in (partial_run / "logs/split.log").read_text()
    assert set(read_json(partial_run / "fingerprint.json")["subjects"]).isdisjoint(UNLABELLED)


def test_partial_labels_report_rows_of_unlabelled_subjects(partial_run):
    subjects = pd.read_parquet(partial_run / "report/subjects.parquet")
    unlabelled = subjects[subjects.subject.isin(UNLABELLED)]
    assert set(unlabelled.source) == {"model"} and set(unlabelled.subject) == set(UNLABELLED)
    assert unlabelled.predicted_dsc.notna().all() and unlabelled.real_dsc.isna().all()
    labelled = subjects[~subjects.subject.isin(UNLABELLED)]
    assert set(labelled.source) == {"gt", "degraded_L3", "model"} and labelled.real_dsc.notna().all()
    fg = subjects[subjects.label == "foreground"]
    assert fg.predicted_dsc.std() >= 0.05  # the model says something (an empty pGT everywhere gives 0 throughout)


def test_reuse_exported_model_without_training(partial_run, bundle, tmp_path):
    """A second cohort (labels: null) QC'd with the bundle: nothing is trained or degraded, the bundle's plan is
    used, the model card copy says where the model comes from, the report has rows."""
    data = partial_run.parents[1] / "data"
    images, cands = tmp_path / "images", tmp_path / "model"
    images.mkdir()
    cands.mkdir()
    for subject in ("demo_001", *UNLABELLED):  # same names: same sampling seeds as in the training cohort
        shutil.copy(data / "imagesTr" / f"{subject}.nii.gz", images / f"{subject}.nii.gz")
        shutil.copy(data / "model" / f"{subject}.nii.gz", cands / f"{subject}.nii.gz")
    config = base_config(tmp_path, f"{images}/{{subject}}.nii.gz", None, cohort="site2", qc_model=str(bundle),
                         sources={"model": f"{cands}/{{subject}}.nii.gz"})
    proc = run_snakemake(config, tmp_path)
    assert proc.returncode == 0, "workflow with qc_model failed"
    out = tmp_path / "results" / "site2"
    assert not (out / "benchmarks" / "train_vae.tsv").exists() and not (out / "benchmarks" / "train_ldm.tsv").exists()
    assert not (out / "degraded").exists()
    assert read_json(out / "plan.json") == read_json(bundle / "plan.json")
    card = read_json(out / "models/model_card.json")
    assert card["qc_model"]["source"] == str(bundle.resolve()) and card["qc_model"]["training_cohort"] == "e2e"
    assert read_parquet_metadata(out / "report/subjects.parquet")["model_card"]["qc_model"]["source"]
    subjects = pd.read_parquet(out / "report/subjects.parquet")
    assert len(subjects) and set(subjects.source) == {"model"} and len(set(subjects.subject)) == 3
    assert subjects.real_dsc.isna().all()
    # the exported model predicts for the unlabelled subjects what it predicted in its training cohort
    keys = ["subject", "source", "label"]
    here = subjects.set_index(keys).predicted_dsc
    there = pd.read_parquet(partial_run / "report/subjects.parquet").set_index(keys).predicted_dsc
    common = here.index.intersection(there.index)
    assert set(common.get_level_values("subject")) == set(UNLABELLED)
    np.testing.assert_allclose(here[common], there[common], atol=0.02)
    # the bundle carries the learned opinion: same network, same candidates, same learned DSC; without labels the
    # combined score cannot be fitted and is the plain mean of the opinions (the agreement has no other source here)
    assert (bundle / "qcnet.pt").is_file() and (out / "models" / "qcnet.pt").is_file()
    learned_here = subjects.set_index(keys).learned_dsc
    learned_there = pd.read_parquet(partial_run / "report/subjects.parquet").set_index(keys).learned_dsc
    np.testing.assert_allclose(learned_here[common], learned_there[common], atol=1e-6)
    opinions = subjects[["predicted_dsc", "learned_dsc", "baseline_vae_recon_dsc"]]
    assert opinions.notna().all().all() and subjects.baseline_agreement_dsc.isna().all()
    np.testing.assert_allclose(subjects.combined_dsc, opinions.mean(axis=1))
    # no labels: the methods board is empty and says so; the report shows each method's predicted distribution
    board = pd.read_parquet(out / "report/methods.parquet")
    assert board.empty and "no labelled subject" in read_parquet_metadata(out / "report/methods.parquet")["note"]
    assert "no labelled subject" in (out / "report/figures/methods.html").read_text()
    assert (out / "report/figures/methods.png").stat().st_size > 1000


@pytest.mark.parametrize(("damage", "message"), [
    ("labels", "label names: bundle {'1': 'wall', '2': 'cavity'}, cohort {'1': 'wall', '2': 'lumen'}"),
    ("tamper", "ldm.pt: SHA-256 differs from the MANIFEST (corrupted or modified file)"),
])
def test_incompatible_or_corrupted_bundle_is_refused_at_start(bundle, tmp_path, damage, message):
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    names = {"1": "wall", "2": "cavity"}
    if damage == "labels":
        names = {"1": "wall", "2": "lumen"}
    else:
        with open(copy / "ldm.pt", "ab") as fh:
            fh.write(b"\0")
    config = base_config(tmp_path, f"{tmp_path}/{{subject}}.nii.gz", None, qc_model=str(copy), label_names=names,
                         subjects=["a"])
    proc = run_snakemake(config, tmp_path, "-n")
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr
