"""Does nnQC judge the masks of REAL segmentation models as well as the synthetic degraded ones?

The cohort's patients are split (seeded, disjoint) into a *segmenter-training* part and a *QC* part. Real models
are trained on the first part only, on CPU:

- ``unet_e<N>``: one MONAI 3D UNet (small channels, Dice+CE loss, no augmentation), its masks written after N
  epochs for each N of a few training lengths (poor, fair, good models from one seeded run);
- ``atlas``: SimpleITK multi-atlas segmentation: the first few training images are registered (affine, Mattes
  mutual information) to each QC image, their labels warped (nearest neighbour) and fused by majority vote.

Each model's mask of every QC subject is written as NIfTI on the subject's original grid (its affine and shape,
the cohort's label values) under ``<results>/segmenters/<cohort>/<model>/``; a ``manifest.json`` there caches them
(a rerun with the same settings trains nothing). For ACDC the segmenters also train on the other (end-systolic)
frame of their patients (``acdc_es``), never on a QC patient's.

Then the REAL pipeline runs with snakemake on a derived cohort config (``<results>/benchmark_real_<cohort>.yaml``,
written by ``accuracy.derive_config``: absolute paths, ``results``, preset, ``--set`` overrides) whose
``subjects`` are the QC part and whose ``sources`` are the real models' mask folders. The pipeline splits the QC
part itself (``split.test_fraction``, default 0.5): nnQC trains on its train/val subjects and every test subject's
``gt``, ``degraded_L1..L5`` and real models' masks are scored.

Read from the report (``<results>/<cohort>/report/``), foreground label, failure = real DSC < ``report.fail_dsc``
(0.7); the predictors' figures are the report's methods board (``methods.parquet``,
``nnqc_pipe.report.methods``; built with the same function for a report written before it existed):

- per source and pooled (``all``; ``all_real``: the real models; ``all_degraded``): n, Pearson r, MAE, bias (mean
  predicted - real), failure-detection ROC AUC and accuracy of "predicted < 0.7", side by side for nnQC's
  ``predicted_dsc``, its cross-validated ``calibrated_dsc`` and each baseline (``baseline_agreement_dsc``,
  ``baseline_vae_recon_dsc``); nnQC's HD95 on the degraded pool from ``summary.parquet``;
- the ranking of all sources by mean predicted vs mean real DSC and Kendall tau (``ranking.parquet``), and the
  board's tau of the sources ranked by each score;
- per-subject pairwise ordering accuracy: over the pairs of sources of one subject whose real DSC differ, the share
  ordered the same way by the predictor (ties in the prediction count one half);
- within the best real model (highest mean real DSC, the board's ``best_real`` pool): Pearson r of nnQC and of the
  baselines;
- ``gt``: mean predicted DSC and the share of subjects where it is predicted above every source with real DSC < 0.95;
- the verdicts (PASS/REVIEW/FAIL) against the real DSC classes >= 0.8 / 0.7-0.8 / < 0.7;
- the per-subject source selection (``selection.parquet`` metadata) vs the best single source and the oracle;
- every figure against the issue's targets (PASS/MISS); all of it also as JSON,
  ``<results>/<cohort>/report/benchmark_real_segmenters.json``.

Usage (2 CPU cores; the segmenters take a few minutes, the pipeline 40+ min on hippocampus):
    .venv/bin/python benchmarks/real_segmenters.py                        # hippocampus, cpu preset
    .venv/bin/python benchmarks/real_segmenters.py --cohort acdc
    .venv/bin/python benchmarks/real_segmenters.py --quick                # smoke test, a few minutes
    .venv/bin/python benchmarks/real_segmenters.py --skip-run             # only summarise an existing run
    .venv/bin/python benchmarks/real_segmenters.py --fresh --set inference.ddim_steps=10

``--quick``: 6 segmenter-training and 8 QC subjects, UNet snapshots after 1 and 2 epochs, 2 atlases, the tiny
preset with 1-epoch networks, 32-pixel patches and 2 DDIM steps, results in ``results/bench_real_quick``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import yaml
from scipy import ndimage, stats

from nnqc_pipe.chunks import fill
from nnqc_pipe.config import discover_subjects, label_map
from nnqc_pipe.data.io import read_json, read_parquet_metadata, write_json, write_nifti
from nnqc_pipe.dice import dice
from nnqc_pipe.qc.metrics import FOREGROUND
from nnqc_pipe.report.methods import ALL_DEGRADED, ALL_REAL, ALL_SOURCES, BEST_REAL, build_methods, is_user_source
from nnqc_pipe.report.tables import EXTRA_PREDICTORS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import _fmt, _num, derive_config, merge, parse_sets, ranking_summary, run_snakemake  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GT = "gt"
PREDICTED, REAL = "predicted_dsc", "real_dsc"
# The predictors of the real DSC shown side by side: summary metric name -> subjects column.
PREDICTORS = {"dsc": PREDICTED, **EXTRA_PREDICTORS}
# The learned opinion and its fusion with nnQC (issue 17's targets apply to them).
OPINIONS = ("learned_dsc", "combined_dsc")
PREDICTOR_TITLES = {"dsc": "nnQC", "calibrated_dsc": "calibrated", "agreement_dsc": "agreement",
                    "vae_recon_dsc": "VAE reconstruction", "learned_dsc": "learned", "combined_dsc": "combined",
                    "latent_search_dsc": "latent search", "hd95_mm": "nnQC"}
STATS = ("pearson_r", "mae", "bias", "failure_auc", "accuracy")
VERDICTS = ("PASS", "REVIEW", "FAIL")
REAL_CLASSES = (">=0.8", "0.7-0.8", "<0.7")
UNSEEN_FAMILY = "atlas"  # never a training candidate of the learned opinion
ERROR_REGION_MIN_VOXELS = 10  # error regions counted for detection: at least this many voxels (hippocampus: mm³)
WORSE_THAN = 0.95  # gt must be predicted above every source whose real DSC is below this
TARGETS = {  # name -> (comparison, target, what)
    "gt_mean_predicted": (">=", 0.95, "gt mean predicted DSC"),
    "gt_above_worse": (">=", 0.95, f"subjects with gt predicted above every source with real DSC < {WORSE_THAN}"),
    "kendall_tau": (">=", 1.0, "Kendall tau of the ranking of all sources"),
    "pairwise": (">=", 0.95, "per-subject pairwise ordering accuracy"),
    "real_mae": ("<=", 0.03, "real models: MAE"),
    "real_failure_auc": (">=", 0.98, "real models: failure AUC (real DSC < 0.7)"),
    "within_best_r": (">=", 0.80, "best real model: within-source Pearson r"),
    "within_best_over_baselines": (">", 0.0, "best real model: r minus the best baseline's r"),
    "within_best_over_next_best": (">", 0.0, "best real model: r minus r of the DSC against the next-best model"),
    "unseen_family_mae": ("<=", 0.05, f"unseen segmenter family ({UNSEEN_FAMILY}): MAE"),
    "good_masks_flagged": ("<=", 0.05, "real models, real DSC >= 0.8: share sent to REVIEW or FAIL"),
    "failures_flagged": (">=", 0.95, "real models, real DSC < 0.7: share sent to REVIEW or FAIL"),
    "gt_mean_predicted_learned": (">=", 0.93, "gt mean score (issue 17 target)"),
    "gt_above_worse_learned": (">=", 0.90, "gt above every source with real DSC < 0.95 (issue 17 target)"),
    "source_tau": (">=", 0.95, "Kendall tau of the sources ranked by the score's mean"),
    "error_region_recall": (">=", 0.8, "error regions: recall"),
    "error_region_precision": (">=", 0.6, "error regions: precision"),
    "degraded_dsc_r": (">=", 0.98, "degraded: DSC Pearson r"),
    "degraded_dsc_mae": ("<=", 0.05, "degraded: DSC MAE"),
    "degraded_hd95_r": (">=", 0.98, "degraded: HD95 Pearson r"),
}


# ---------------------------------------------------------------------------------------------------
# Cohorts, the split and the segmenter settings
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cohort:
    """A shared cohort: its config, how many patients train the segmenters, the UNet's grid, the registration.

    ``extra_images``/``extra_labels``: patterns (relative to the repository) of other frames of the same patients,
    used for segmenter training only. ``downsample``: integer factors per axis from the padded grid to the UNet's
    grid; ``strides``: the UNet's strides per level (per axis). ``shrink_factors`` (one per resolution level) and
    ``sampling`` (share of the voxels the metric samples) of the atlas registration.
    """

    config: str
    segmenter_patients: int
    downsample: tuple[int, int, int] = (1, 1, 1)
    strides: tuple[tuple[int, int, int], ...] = ((2, 2, 2), (2, 2, 2), (2, 2, 2))
    shrink_factors: tuple[int, ...] = (2, 1)
    sampling: float = 0.25
    extra_images: str | None = None
    extra_labels: str | None = None


COHORTS = {
    "hippocampus": Cohort("config/cohorts/hippocampus.yaml", segmenter_patients=20),
    # thick slices (6-13 per volume): in-plane halved, no striding along the slices at the first level; the whole
    # 256 mm field of view is registered coarse to fine on 5 % of the voxels
    "acdc": Cohort("config/cohorts/acdc.yaml", segmenter_patients=10, downsample=(2, 2, 1),
                   strides=((2, 2, 1), (2, 2, 2), (2, 2, 2)), shrink_factors=(4, 2, 1), sampling=0.05,
                   extra_images="../shared/data/acdc_es/imagesTr/{subject}.nii.gz",
                   extra_labels="../shared/data/acdc_es/labelsTr/{subject}.nii.gz"),
}


@dataclass(frozen=True)
class Segmenters:
    """What the real models are: UNet snapshot epochs and training settings, number of atlases, seed."""

    unet_epochs: tuple[int, ...] = (1, 5, 40)
    channels: tuple[int, ...] = (8, 16, 32, 64)
    batch_size: int = 2
    learning_rate: float = 3e-3
    atlases: int = 5
    seed: int = 0

    def names(self) -> list[str]:
        """The source names of the models."""
        return [f"unet_e{e}" for e in self.unet_epochs] + ["atlas"]


QUICK_SEGMENTERS = Segmenters(unet_epochs=(1, 2), atlases=2)
QUICK_PATIENTS = (6, 12)  # segmenter-training, QC (6 test subjects: enough to calibrate)
QUICK_CONFIG = {
    "inference": {"ddim_steps": 2, "samples": 1},
    "plan": {"max_patch_size": 32},
    "device": "cpu",
}


def patient_of(subject: str) -> str:
    """The patient of a subject name: ACDC's ``patient004_frame01`` -> ``patient004``; others unchanged."""
    return re.sub(r"_frame\d+$", "", subject)


def split_patients(patients: Sequence[str], n_train: int, n_qc: int | None, seed: int) -> tuple[list[str], list[str]]:
    """Seeded disjoint split of the patients: ``n_train`` to train segmenters, the next ``n_qc`` (all: None) to QC."""
    names = sorted(set(patients))
    if not 0 < n_train < len(names):
        raise ValueError(f"cannot take {n_train} of {len(names)} patients to train segmenters and keep some to QC")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    qc = order[n_train:] if n_qc is None else order[n_train:n_train + n_qc]
    return sorted(order[:n_train]), sorted(qc)


def unet_grid(shapes: Sequence[Sequence[int]], downsample: Sequence[int], strides: Sequence[Sequence[int]]
              ) -> tuple[int, int, int]:
    """The padded grid every volume fits in: the largest shape per axis, rounded up so that the downsampled grid
    divides by the UNet's total stride."""
    grid = []
    for axis in range(3):
        multiple = downsample[axis] * math.prod(s[axis] for s in strides)
        grid.append(math.ceil(max(s[axis] for s in shapes) / multiple) * multiple)
    return tuple(grid)


# ---------------------------------------------------------------------------------------------------
# The real segmenters (CPU, seeded); masks written on each QC subject's original grid
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Volume:
    """One subject's image and label files."""

    subject: str
    image: str
    label: str


def padded(array: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """``array`` zero-padded at the end of each axis to ``grid``."""
    return np.pad(array, [(0, g - s) for s, g in zip(array.shape, grid, strict=True)])


def normalised(path: str) -> np.ndarray:
    """The image as float32, z-scored over the whole volume."""
    image = nib.load(path).get_fdata(dtype=np.float32)
    return (image - image.mean()) / (image.std() + 1e-6)


def train_unet(train: Sequence[Volume], qc: Sequence[Volume], values: Sequence[int], cohort: Cohort,
               settings: Segmenters, out: Path, threads: int) -> None:
    """Train one 3D UNet on ``train`` and write its masks of ``qc`` after each of ``settings.unet_epochs``."""
    import torch
    import torch.nn.functional as F
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    from nnqc_pipe.models.device import seed_everything

    torch.set_num_threads(threads)
    seed_everything(settings.seed)
    grid = unet_grid([nib.load(v.image).shape for v in (*train, *qc)], cohort.downsample, cohort.strides)
    net_grid = [g // d for g, d in zip(grid, cohort.downsample, strict=True)]
    classes = np.zeros(max(values) + 1, np.int64)
    classes[list(values)] = np.arange(1, len(values) + 1)  # label value -> class index

    def tensor(array: np.ndarray, mode: str) -> torch.Tensor:
        return F.interpolate(torch.from_numpy(padded(array, grid))[None, None].float(), size=net_grid, mode=mode)[0]

    images = torch.stack([tensor(normalised(v.image), "area") for v in train])
    targets = torch.stack([tensor(classes[np.asarray(nib.load(v.label).dataobj, np.int64)], "nearest")
                           for v in train]).long()
    net = UNet(3, 1, len(values) + 1, channels=settings.channels, strides=cohort.strides, num_res_units=1)
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    generator = torch.Generator().manual_seed(settings.seed)
    label_of_class = np.array([0, *values], np.uint8)
    for epoch in range(1, max(settings.unet_epochs) + 1):
        net.train()
        for batch in torch.randperm(len(train), generator=generator).split(settings.batch_size):
            optimiser.zero_grad()
            loss(net(images[batch]), targets[batch]).backward()
            optimiser.step()
        if epoch not in settings.unet_epochs:
            continue
        net.eval()
        with torch.no_grad():
            for v in qc:
                img = nib.load(v.image)
                logits = F.interpolate(net(tensor(normalised(v.image), "area")[None]), size=grid, mode="trilinear")
                crop = tuple(slice(0, s) for s in img.shape)
                mask = label_of_class[logits[0].argmax(0).numpy()[crop]]
                write_nifti(nib.Nifti1Image(mask, img.affine), out / f"unet_e{epoch}" / f"{v.subject}.nii.gz")
        print(f"  unet: epoch {epoch} masks written", flush=True)


def atlas_mask(target: str, atlases: Sequence[tuple[str, str]], values: Sequence[int], cohort: Cohort
               ) -> np.ndarray:
    """Multi-atlas segmentation of the image ``target``: each (image, label) atlas registered to it (affine, Mattes
    MI, coarse to fine as ``cohort`` says), its label warped by nearest neighbour; voxel-wise majority vote (ties:
    the lower value, background first). An atlas whose registration fails does not vote (every one failing gives an
    empty mask). Returned in the array order of nibabel (x, y, z)."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one thread per registration: repeatable
    fixed = sitk.Cast(sitk.ReadImage(target), sitk.sitkFloat32)
    votes = np.zeros((len(values) + 1, *reversed(fixed.GetSize())), np.int16)
    for image, label in atlases:
        moving = sitk.Cast(sitk.ReadImage(image), sitk.sitkFloat32)
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(32)
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(cohort.sampling)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(list(cohort.shrink_factors))
        reg.SetSmoothingSigmasPerLevel([1] * (len(cohort.shrink_factors) - 1) + [0])
        reg.SetInitialTransform(sitk.CenteredTransformInitializer(
            fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS), inPlace=False)
        try:
            transform = reg.Execute(fixed, moving)
        except RuntimeError as exc:  # e.g. the images no longer overlap
            print(f"  atlas: {Path(image).name} -> {Path(target).name} failed, left out: {exc}".splitlines()[0],
                  flush=True)
            continue
        warped = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(label), fixed, transform,
                                                      sitk.sitkNearestNeighbor, 0))
        for index, value in enumerate((0, *values)):
            votes[index] += warped == value
    return np.array([0, *values], np.uint8)[votes.argmax(0)].transpose(2, 1, 0)


def write_atlas_mask(target: Volume, atlases: Sequence[tuple[str, str]], values: Sequence[int], cohort: Cohort,
                     out: Path) -> None:
    """:func:`atlas_mask` of ``target`` written on its grid (a process-pool task)."""
    img = nib.load(target.image)
    write_nifti(nib.Nifti1Image(atlas_mask(target.image, atlases, values, cohort), img.affine),
                out / "atlas" / f"{target.subject}.nii.gz")


def run_segmenters(train: Sequence[Volume], qc: Sequence[Volume], values: Sequence[int], cohort: Cohort,
                   settings: Segmenters, out: Path, cores: int) -> dict[str, float]:
    """Train and apply every real model; returns the seconds each kind took."""
    seconds = {}
    started = time.perf_counter()
    atlases = [(v.image, v.label) for v in train[: settings.atlases]]
    with ProcessPoolExecutor(max_workers=cores) as pool:  # before torch starts its threads (fork)
        n = len(qc)
        list(pool.map(write_atlas_mask, qc, [atlases] * n, [values] * n, [cohort] * n, [out] * n))
    seconds["atlas"] = time.perf_counter() - started
    print(f"  atlas: {len(qc)} masks from {len(atlases)} atlases written", flush=True)
    started = time.perf_counter()
    train_unet(train, qc, values, cohort, settings, out, cores)
    seconds["unet"] = time.perf_counter() - started
    return seconds


def real_dsc_of_models(qc: Sequence[Volume], names: Sequence[str], out: Path) -> dict[str, float]:
    """Mean foreground DSC of each model's masks against the ground truth (a check before the pipeline runs)."""
    means = {}
    for name in names:
        scores = [dice(np.asarray(nib.load(out / name / f"{v.subject}.nii.gz").dataobj) > 0,
                       np.asarray(nib.load(v.label).dataobj) > 0) for v in qc]
        means[name] = float(np.mean(scores))
    return means


def segmenter_masks(train: Sequence[Volume], qc: Sequence[Volume], values: Sequence[int], cohort: Cohort,
                    settings: Segmenters, out: Path, cores: int) -> dict[str, Any]:
    """The real models' masks of ``qc`` under ``out/<model>/``, from the cache when ``out/manifest.json`` was
    written for the same subjects and settings and every mask exists; else trained and written anew."""
    key = {"train": [asdict(v) for v in train], "qc": [asdict(v) for v in qc], "values": list(values),
           "cohort": asdict(cohort), "settings": asdict(settings)}
    manifest_path = out / "manifest.json"
    names = settings.names()
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        complete = all((out / n / f"{v.subject}.nii.gz").is_file() for n in names for v in qc)
        if manifest.get("key") == json.loads(json.dumps(key)) and complete:
            print(f"segmenters: cached masks in {out}", flush=True)
            return manifest
        print(f"segmenters: {out} was made with other subjects or settings; training anew", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    print(f"segmenters: training on {len(train)} volumes, {len(qc)} QC subjects -> {out}", flush=True)
    seconds = run_segmenters(train, qc, values, cohort, settings, out, cores)
    manifest = {"key": key, "models": names, "seconds": seconds, "real_dsc": real_dsc_of_models(qc, names, out)}
    write_json(manifest, manifest_path)
    return manifest


def volumes(subjects: Sequence[str], images: str, labels: str) -> list[Volume]:
    """The image and label files of ``subjects`` (path patterns with ``{subject}``)."""
    return [Volume(s, fill(images, subject=s), fill(labels, subject=s)) for s in subjects]


def cohort_parts(config: dict[str, Any], cohort: Cohort, n_train: int, n_qc: int | None, seed: int
                 ) -> tuple[list[Volume], list[Volume]]:
    """Segmenter-training volumes (the cohort's and the extra frames of the training patients) and QC volumes
    (the cohort's subjects of the QC patients)."""
    subjects = discover_subjects(config["images"])
    train_patients, qc_patients = split_patients([patient_of(s) for s in subjects], n_train, n_qc, seed)
    train = volumes([s for s in subjects if patient_of(s) in train_patients], config["images"], config["labels"])
    if cohort.extra_images and cohort.extra_labels:
        images, labels = (str((REPO / p).resolve()) for p in (cohort.extra_images, cohort.extra_labels))
        extra = [s for s in discover_subjects(images) if patient_of(s) in train_patients]
        train += volumes(extra, images, labels)
    qc = volumes([s for s in subjects if patient_of(s) in qc_patients], config["images"], config["labels"])
    return train, qc


# ---------------------------------------------------------------------------------------------------
# Summaries of the report (small functions over DataFrames, unit-tested)
# ---------------------------------------------------------------------------------------------------


def foreground(subjects: pd.DataFrame) -> pd.DataFrame:
    """The foreground rows with a real DSC (the labelled candidates)."""
    return subjects[(subjects["label"] == FOREGROUND) & subjects[REAL].notna()]


def read_board(report_dir: Path, subjects: pd.DataFrame, fail_dsc: float) -> pd.DataFrame:
    """The report's methods board (``methods.parquet``); built from ``subjects`` by the report's own function for a
    report written before the board existed."""
    path = report_dir / "methods.parquet"
    return pd.read_parquet(path) if path.is_file() else build_methods(subjects, fail_dsc)


def predictor_table(board: pd.DataFrame, summary: pd.DataFrame | None) -> pd.DataFrame:
    """The board's foreground figures of :data:`PREDICTORS` in the summary's layout (``source``: the pool or
    source, ``metric``: the predictor), pools (``all``, ``all_real``, ``all_degraded``) first, then the sources;
    with the report ``summary``'s foreground HD95 rows (nnQC's predicted against real HD95)."""
    metric_of = {column: metric for metric, column in PREDICTORS.items()}
    rows = board[(board["label"] == FOREGROUND) & (board["pool"] != BEST_REAL)
                 & board["score_column"].isin(list(metric_of))]
    table = rows.rename(columns={"pool": "source"}).assign(metric=rows["score_column"].map(metric_of))
    if summary is not None:
        hd95 = summary[(summary["label"] == FOREGROUND) & (summary["metric"] == "hd95_mm") & (summary["n"] > 0)]
        table = pd.concat([table, hd95], ignore_index=True)
    return table.reset_index(drop=True)


def _figure(rows: dict[str, pd.Series], metric: str, stat: str, missing: float = math.nan) -> float:
    """``rows[metric][stat]`` as a float (``missing`` without the predictor)."""
    return float(rows[metric][stat]) if metric in rows else missing


def pool_figures(board: pd.DataFrame, pool: str) -> dict[str, pd.Series]:
    """Predictor (:data:`PREDICTORS` name) -> the board's foreground row of ``pool``."""
    metric_of = {column: metric for metric, column in PREDICTORS.items()}
    rows = board[(board["label"] == FOREGROUND) & (board["pool"] == pool)]
    return {metric_of[row["score_column"]]: row for _, row in rows.iterrows() if row["score_column"] in metric_of}


def side_by_side(table: pd.DataFrame) -> pd.DataFrame:
    """One row per source/pool: n and :data:`STATS` of each predictor of :data:`PREDICTORS`, as columns
    ``<metric>_<stat>`` (e.g. ``dsc_mae``, ``agreement_dsc_failure_auc``)."""
    rows = table[table["metric"].isin(list(PREDICTORS))]
    wide = rows.pivot(index="source", columns="metric", values=["n", *STATS])
    out = pd.DataFrame(index=pd.Index(rows["source"].unique(), name="source"))
    out["n"] = wide[("n", "dsc")].reindex(out.index).fillna(0).astype(int) if ("n", "dsc") in wide else 0
    for metric in PREDICTORS:
        for stat in STATS:
            column = wide[(stat, metric)] if (stat, metric) in wide else pd.Series(dtype=float)
            out[f"{metric}_{stat}"] = column.reindex(out.index).astype(float)
    return out.reset_index()


def gt_separation(subjects: pd.DataFrame, column: str = PREDICTED, worse_than: float = WORSE_THAN
                  ) -> dict[str, float | int]:
    """``gt``'s mean ``column`` and, over the subjects with a source of real DSC < ``worse_than``, the share where
    ``gt`` is scored above every such source."""
    rows = foreground(subjects)
    gt = rows[rows["source"] == GT].set_index("subject")[column]
    worse = rows[(rows["source"] != GT) & (rows[REAL] < worse_than)]
    best_worse = worse.groupby("subject")[column].max()
    both = best_worse.index.intersection(gt.index)
    above = (gt[both] > best_worse[both]).to_numpy()
    return {"mean": float(gt.mean()) if len(gt) else math.nan, "n_subjects": int(len(both)),
            "above_worse": float(above.mean()) if len(both) else math.nan}


def real_class(real: pd.Series) -> pd.Series:
    """The real DSC's class of :data:`REAL_CLASSES`: ``>=0.8``, ``0.7-0.8`` or ``<0.7``."""
    classes = np.where(real >= 0.8, REAL_CLASSES[0], np.where(real >= 0.7, REAL_CLASSES[1], REAL_CLASSES[2]))
    return pd.Series(classes, index=real.index)


def verdict_confusion(subjects: pd.DataFrame) -> dict[str, Any]:
    """Verdicts (rows) against real DSC classes (columns), counts, and the share on the diagonal (PASS where
    real >= 0.8, REVIEW where 0.7-0.8, FAIL where < 0.7)."""
    rows = foreground(subjects)
    table = pd.crosstab(rows["verdict"], real_class(rows[REAL])).reindex(
        index=list(VERDICTS), columns=list(REAL_CLASSES), fill_value=0)
    n = int(table.to_numpy().sum())
    agree = int(np.trace(table.to_numpy()))
    return {"counts": {v: {c: int(table.loc[v, c]) for c in REAL_CLASSES} for v in VERDICTS}, "n": n,
            "agreement": agree / n if n else math.nan}


def baselines() -> list[str]:
    """The summary metric names of the baselines (predictors read from a ``baseline_*`` column)."""
    return [m for m, col in PREDICTORS.items() if col.startswith("baseline_")]


def judge(name: str, value: float | None) -> str:
    """PASS/MISS of ``value`` against ``TARGETS[name]``; ``n/a`` when it is missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    op, target, _ = TARGETS[name]
    ok = {">=": value >= target - 1e-9, "<=": value <= target + 1e-9, ">": value > target}[op]
    return "PASS" if ok else "MISS"


def _cell(table: pd.DataFrame, source: str, metric: str, stat: str) -> float:
    found = table[(table["source"] == source) & (table["metric"] == metric)]
    return float(found[stat].iloc[0]) if not found.empty else math.nan


def target_checks(table: pd.DataFrame, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure with a target, for nnQC's ``predicted_dsc`` and (where it applies) ``calibrated_dsc``."""
    best = result["within_best_model"]
    values: list[tuple[str, str, float | None]] = [
        ("gt_mean_predicted", "dsc", result["gt"]["dsc"]["mean"]),
        ("gt_above_worse", "dsc", result["gt"]["dsc"]["above_worse"]),
        ("kendall_tau", "dsc", result["ranking"]["kendall_tau"]),
    ]
    for metric in (m for m in ("dsc", "calibrated_dsc", *OPINIONS) if m in result["pairwise"]):
        values += [
            ("pairwise", metric, result["pairwise"][metric]["accuracy"]),
            ("real_mae", metric, _cell(table, ALL_REAL, metric, "mae")),
            ("real_failure_auc", metric, _cell(table, ALL_REAL, metric, "failure_auc")),
            ("within_best_r", metric, best["r"].get(metric)),
            ("unseen_family_mae", metric, _cell(table, UNSEEN_FAMILY, metric, "mae")),
            ("source_tau", metric, result["source_tau"].get(metric)),
        ]
        if metric in result["review_shares"]:
            shares = result["review_shares"][metric]
            values += [("good_masks_flagged", metric, shares["good_flagged"]),
                       ("failures_flagged", metric, shares["failures_flagged"])]
        if metric in OPINIONS and metric in result["gt"]:
            values += [("gt_mean_predicted_learned", metric, result["gt"][metric]["mean"]),
                       ("gt_above_worse_learned", metric, result["gt"][metric]["above_worse"])]
        next_best = best.get("next_best_r")
        if next_best is not None and best["r"].get(metric) is not None:
            values.append(("within_best_over_next_best", metric, best["r"][metric] - next_best))
    for opinion, regions in (result.get("error_maps") or {}).items():
        values += [("error_region_recall", opinion, regions["region_recall"]),
                   ("error_region_precision", opinion, regions["region_precision"])]
    base = [best["r"].get(b) for b in baselines()]
    base = [r for r in base if r is not None and not math.isnan(r)]
    nnqc_r = best["r"].get("dsc")
    margin = nnqc_r - max(base) if base and nnqc_r is not None and not math.isnan(nnqc_r) else math.nan
    values += [
        ("within_best_over_baselines", "dsc", margin),
        ("degraded_dsc_r", "dsc", _cell(table, ALL_DEGRADED, "dsc", "pearson_r")),
        ("degraded_dsc_mae", "dsc", _cell(table, ALL_DEGRADED, "dsc", "mae")),
        ("degraded_hd95_r", "hd95_mm", _cell(table, ALL_DEGRADED, "hd95_mm", "pearson_r")),
    ]
    checks = []
    for name, metric, value in values:
        op, target, what = TARGETS[name]
        value = None if value is None or math.isnan(value) else float(value)
        checks.append({"name": name, "predictor": PREDICTOR_TITLES.get(metric, metric), "figure": what,
                       "value": value, "target": f"{op} {target:g}", "verdict": judge(name, value)})
    return checks


def review_shares(board: pd.DataFrame, subjects: pd.DataFrame, pass_dsc: float, fail_dsc: float
                  ) -> dict[str, dict[str, float]]:
    """Per verdict score the report can act on (the board's ``all_real`` foreground row with verdict shares): the
    share of real models' masks of real DSC >= ``pass_dsc`` sent to REVIEW or FAIL, and of those of real DSC <
    ``fail_dsc``, when the verdicts act on that score with its own pass thresholds (the report's computation)."""
    fg = foreground(subjects[subjects["source"].map(is_user_source)])
    counts = {"n_good": int((fg[REAL] >= pass_dsc).sum()), "n_failures": int((fg[REAL] < fail_dsc).sum())}
    rows = board[(board["label"] == FOREGROUND) & (board["pool"] == ALL_REAL)
                 & board[["good_reviewed", "failures_reviewed"]].notna().any(axis=1)]
    metric_of = {c: m for m, c in PREDICTORS.items()}
    return {metric_of[row.score_column]: {"good_flagged": float(row.good_reviewed),
                                          "failures_flagged": float(row.failures_reviewed), **counts}
            for row in rows.itertuples() if row.score_column in metric_of}


def next_best_agreement(subjects: pd.DataFrame, candidates: dict[str, str], best: str) -> dict[str, Any]:
    """Within the best real model: Pearson r of the real DSC with the DSC of its mask against the next-best real
    model's mask of the same subject (the single-source agreement baseline, the stronger one on held-out data); the
    models are the configured sources with a mask path in ``candidates``."""
    rows = foreground(subjects)
    rows = rows[rows["source"].isin(candidates)]  # the benchmark's models (not the repair stage's segmenter)
    means = rows.groupby("source")[REAL].mean().sort_values(ascending=False)
    if best not in means.index or len(means) < 2:
        return {"next_best": None, "r": math.nan}
    other = next(s for s in means.index if s != best)
    own = rows[rows["source"] == best]
    agreement = [dice(nib.load(fill(candidates[best], subject=s)).get_fdata() > 0,
                      nib.load(fill(candidates[other], subject=s)).get_fdata() > 0) for s in own["subject"]]
    r = stats.pearsonr(agreement, own[REAL]).statistic if len(own) > 2 else math.nan
    return {"next_best": other, "r": float(r)}


def error_map_scores(subjects: pd.DataFrame, candidates: dict[str, str], gt: str, references: dict[str, str],
                     min_voxels: int) -> dict[str, dict[str, float]]:
    """Per opinion (reference path pattern with {source} and {subject}: the pGT, the learned estimated truth), over
    the real models' masks of the labelled subjects: the voxel Dice of the predicted error map (candidate XOR
    reference, foreground) with the real one (candidate XOR truth), and the detection of real error regions
    (connected components of at least ``min_voxels``): recall = real regions touched by a predicted error voxel,
    precision = predicted regions (same size rule) touching a real error voxel."""
    rows = foreground(subjects)
    rows = rows[rows["source"].isin(candidates)]  # the benchmark's models (not the repair stage's segmenter)
    structure = ndimage.generate_binary_structure(3, 3)
    out = {}
    for opinion, pattern in references.items():
        dices, hit, n_real, true_pred, n_pred = [], 0, 0, 0, 0
        for row in rows.itertuples(index=False):
            reference = fill(fill(pattern, source=row.source), subject=row.subject)
            if not Path(reference).is_file():
                continue
            cand = nib.load(fill(candidates[row.source], subject=row.subject)).get_fdata() > 0
            truth = nib.load(fill(gt, subject=row.subject)).get_fdata() > 0
            real_err, pred_err = cand ^ truth, cand ^ (nib.load(reference).get_fdata() > 0)
            dices.append(dice(pred_err, real_err))
            for errors, other, is_real_side in ((real_err, pred_err, True), (pred_err, real_err, False)):
                labels, n = ndimage.label(errors, structure=structure)
                sizes = np.bincount(labels.ravel(), minlength=n + 1)
                touched = np.bincount(labels[other].ravel(), minlength=n + 1) > 0
                big = np.flatnonzero(sizes[1:] >= min_voxels) + 1
                if is_real_side:
                    n_real, hit = n_real + big.size, hit + int(touched[big].sum())
                else:
                    n_pred, true_pred = n_pred + big.size, true_pred + int(touched[big].sum())
        if dices:
            out[opinion] = {"voxel_dice": float(np.mean(dices)), "n_candidates": len(dices),
                            "min_voxels": min_voxels, "n_real_regions": n_real, "n_predicted_regions": n_pred,
                            "region_recall": hit / n_real if n_real else math.nan,
                            "region_precision": true_pred / n_pred if n_pred else math.nan}
    return out


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-safe records (NaN -> None)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in df.astype(object).where(df.notna(), None).to_dict("records")]


def summarise(report_dir: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the benchmark prints, from the report tables, as one JSON-safe dict; with the run's ``config``
    also the next-best-model agreement baseline and the error maps against the real ones (they read masks)."""
    subjects = pd.read_parquet(report_dir / "subjects.parquet")
    meta = read_parquet_metadata(report_dir / "subjects.parquet")
    fail_dsc = float((meta.get("verdict_thresholds") or {}).get("fail_dsc", 0.7))
    board = read_board(report_dir, subjects, fail_dsc)
    summary_path = report_dir / "summary.parquet"
    table = predictor_table(board, pd.read_parquet(summary_path) if summary_path.is_file() else None)
    on_all, on_best = pool_figures(board, ALL_SOURCES), pool_figures(board, BEST_REAL)
    best = str(next(iter(on_best.values()))["sources"]) if on_best else None
    card = meta.get("model_card") or {}
    columns = {m: c for m, c in PREDICTORS.items() if c in subjects}
    result = {
        "report_dir": str(report_dir),
        "config_hash": meta.get("config_hash"),
        "model": {k: card.get(k) for k in ("preset", "patch_size", "n_classes", "conditioning_mode")},
        "fail_dsc": fail_dsc,
        "n_subjects": {s: int(g["subject"].nunique()) for s, g in foreground(subjects).groupby("source")},
        "predictors": _records(side_by_side(table)),
        "ranking": ranking_summary(pd.read_parquet(report_dir / "ranking.parquet")),
        "pairwise": {m: {"n_pairs": int(_figure(on_all, m, "n_pairs", 0)),
                         "accuracy": _figure(on_all, m, "pairwise_accuracy")} for m in columns},
        "within_best_model": {"source": best, "r": {m: _num(_figure(on_best, m, "pearson_r")) for m in PREDICTORS}},
        "gt": {m: gt_separation(subjects, c) for m, c in columns.items()
               if m in ("dsc", "calibrated_dsc", *OPINIONS)},
        "source_tau": {m: _figure(on_all, m, "kendall_tau") for m in columns},
        "review_shares": review_shares(board, subjects, float((meta.get("verdict_thresholds") or {}).get(
            "pass_dsc", 0.8)), fail_dsc),
        "verdicts": {"all": verdict_confusion(subjects),
                     ALL_REAL: verdict_confusion(subjects[subjects["source"].map(is_user_source)])},
        "selection": read_parquet_metadata(report_dir / "selection.parquet").get("selection_summary"),
        "degraded_hd95": {k: _num(_cell(table, ALL_DEGRADED, "hd95_mm", k)) for k in ("pearson_r", "mae")},
    }
    if config is not None and best:
        out = report_dir.parent
        next_best = next_best_agreement(subjects, config["sources"], best)
        result["within_best_model"].update(next_best=next_best["next_best"], next_best_r=_num(next_best["r"]))
        references = {"nnqc": str(out / "pgt" / "{source}" / "{subject}.nii.gz"),
                      "learned": str(out / "learned" / "estimated" / "{source}" / "{subject}.nii.gz")}
        result["error_maps"] = error_map_scores(subjects, config["sources"], config["labels"], references,
                                                ERROR_REGION_MIN_VOXELS)
    result["targets"] = target_checks(table, result)
    return result


# ---------------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------------


def format_report(result: dict[str, Any], segmenters: dict[str, Any] | None) -> str:
    """The printed tables."""
    model = result["model"]
    lines = [f"report {result['report_dir']}  config {result['config_hash']}",
             f"nnQC model: preset {model.get('preset')}, patch {model.get('patch_size')}; failure = real DSC < "
             f"{result['fail_dsc']:g}; foreground",
             "subjects per source: " + ", ".join(f"{s} {n}" for s, n in result["n_subjects"].items())]
    if segmenters:
        lines.append("segmenters (mean real DSC on all QC subjects): " + ", ".join(
            f"{n} {v:.3f}" for n, v in segmenters["real_dsc"].items()) + "; "
            + ", ".join(f"{k} {v:.0f} s" for k, v in segmenters["seconds"].items()))
    head = "".join(f" | {PREDICTOR_TITLES.get(m, m):^34}" for m in PREDICTORS)
    sub = "".join(" | " + " ".join(f"{s:>6}" for s in ("r", "MAE", "bias", "AUC", "acc")) for _ in PREDICTORS)
    lines += ["", "Predicted vs real DSC (AUC/acc: failure detection at real DSC < fail_dsc)",
              f"  {'source':14} {'n':>4}{head}", f"  {'':14} {'':>4}{sub}"]
    for row in result["predictors"]:
        cells = "".join(" | " + " ".join(f"{_fmt(row[f'{m}_{s}']):>6}" for s in STATS) for m in PREDICTORS)
        lines.append(f"  {row['source']:14} {row['n']:>4}{cells}")
    rank = result["ranking"]
    lines += ["", f"Ranking by mean DSC ({rank['n_sources']} sources), Kendall tau = {_fmt(rank['kendall_tau'])}",
              "  predicted: " + " > ".join(rank["predicted_order"]),
              "  real:      " + " > ".join(rank["real_order"])]
    for s in rank["sources"]:
        lines.append(f"  {s['source']:14} predicted {_fmt(s['mean_predicted'])}  real {_fmt(s['mean_real'])}")
    lines += ["", "Per-subject pairwise ordering accuracy: " + ", ".join(
        f"{PREDICTOR_TITLES.get(m, m)} {_fmt(p['accuracy'])} ({p['n_pairs']} pairs)"
        for m, p in result["pairwise"].items())]
    best = result["within_best_model"]
    lines.append(f"Within the best real model ({best['source']}), Pearson r: " + ", ".join(
        f"{PREDICTOR_TITLES.get(m, m)} {_fmt(r)}" for m, r in best["r"].items())
        + (f", DSC against the next-best model ({best['next_best']}) {_fmt(best['next_best_r'])}"
           if best.get("next_best") else ""))
    lines.append("Kendall tau of the sources ranked by each score: " + ", ".join(
        f"{PREDICTOR_TITLES.get(m, m)} {_fmt(t)}" for m, t in result["source_tau"].items()))
    for m, share in result["review_shares"].items():
        lines.append(f"verdicts on {PREDICTOR_TITLES.get(m, m)}: real-model masks sent to REVIEW/FAIL: "
                     f"{_fmt(share['good_flagged'])} of {share['n_good']} with real DSC >= pass, "
                     f"{_fmt(share['failures_flagged'])} of {share['n_failures']} with real DSC < fail")
    for opinion, e in (result.get("error_maps") or {}).items():
        lines.append(f"error maps ({opinion}) vs real, real models' masks: voxel Dice {_fmt(e['voxel_dice'])}; "
                     f"regions >= {e['min_voxels']} voxels: recall {_fmt(e['region_recall'])} "
                     f"({e['n_real_regions']} real), precision {_fmt(e['region_precision'])} "
                     f"({e['n_predicted_regions']} predicted)")
    for m, g in result["gt"].items():
        lines.append(f"gt ({PREDICTOR_TITLES.get(m, m)}): mean {_fmt(g['mean'])}; above every source with real DSC "
                     f"< {WORSE_THAN} in {_fmt(g['above_worse'])} of {g['n_subjects']} subjects")
    for pool, conf in result["verdicts"].items():
        lines += ["", f"Verdicts vs real DSC ({pool}, {conf['n']} candidates; agreement {_fmt(conf['agreement'])})",
                  f"  {'':8}" + "".join(f"{c:>9}" for c in REAL_CLASSES)]
        lines += [f"  {v:8}" + "".join(f"{conf['counts'][v][c]:>9}" for c in REAL_CLASSES) for v in VERDICTS]
    sel = result["selection"] or {}
    lines += ["", f"Selection (per subject, among the real models): real DSC {_fmt(sel.get('selection_real_dsc'))}; "
              f"best single source {sel.get('best_single_source')} {_fmt(sel.get('best_single_real_dsc'))}; "
              f"oracle {_fmt(sel.get('oracle_real_dsc'))} ({sel.get('n_evaluated')} subjects)"]
    lines += ["", "Targets", f"  {'figure':72} {'predictor':>10} {'value':>7} {'target':>7}  verdict"]
    for c in result["targets"]:
        lines.append(f"  {c['figure']:72} {c['predictor']:>10} {_fmt(c['value']):>7} {c['target']:>7}  "
                     f"{c['verdict']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", choices=sorted(COHORTS), default="hippocampus")
    parser.add_argument("--results", type=Path,
                        help="results folder (default results/bench_real, with --quick results/bench_real_quick)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--test-fraction", type=float, default=0.5,
                        help="split.test_fraction of the QC part (its test subjects are the ones scored)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split and the segmenters")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, dotted key and YAML value (repeatable)")
    parser.add_argument("--quick", action="store_true", help="smoke mode: few subjects, short training everywhere")
    parser.add_argument("--fresh", action="store_true", help="delete this cohort's segmenters and results first")
    parser.add_argument("--skip-run", action="store_true", help="only summarise an existing report")
    args = parser.parse_args()

    cohort = COHORTS[args.cohort]
    cohort_cfg = yaml.safe_load((REPO / cohort.config).read_text())
    results = (args.results or REPO / "results" / ("bench_real_quick" if args.quick else "bench_real")).resolve()
    name = cohort_cfg["cohort"]
    out, seg_dir = results / name, results / "segmenters" / name
    settings = replace(QUICK_SEGMENTERS if args.quick else Segmenters(), seed=args.seed)
    sets = merge(QUICK_CONFIG, parse_sets(args.sets)) if args.quick else parse_sets(args.sets)
    config = derive_config(cohort_cfg, results, "tiny" if args.quick else "cpu", args.test_fraction, sets)
    segmenters, timing = None, {}
    if not args.skip_run:
        if args.fresh:
            for folder in (out, seg_dir):
                print(f"--fresh: removing {folder}", flush=True)
                shutil.rmtree(folder, ignore_errors=True)
        n_train, n_qc = QUICK_PATIENTS if args.quick else (cohort.segmenter_patients, None)
        train, qc = cohort_parts(config, cohort, n_train, n_qc, args.seed)
        started = time.perf_counter()
        segmenters = segmenter_masks(train, qc, sorted(label_map(config)), cohort, settings, seg_dir, args.cores)
        timing["segmenters_s"] = time.perf_counter() - started
        print("segmenters, mean real DSC: " + ", ".join(f"{n} {v:.3f}" for n, v in segmenters["real_dsc"].items()),
              flush=True)
        config["subjects"] = [v.subject for v in qc]
        config["sources"] = {n: str(seg_dir / n / "{subject}.nii.gz") for n in settings.names()}
        # The atlas is the segmenter family the learned opinion never sees in training (reported apart).
        config["learned"] = merge({"exclude_sources": [UNSEEN_FAMILY]}, config.get("learned") or {})
        config_path = results / f"benchmark_real_{name}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        rc, timing["snakemake_s"] = run_snakemake(config_path, args.cores, out / "benchmark_snakemake.log")
        print(f"snakemake finished with exit code {rc} after {timing['snakemake_s']:.1f} s", flush=True)
        if rc != 0:
            print("\n".join((out / "benchmark_snakemake.log").read_text().splitlines()[-40:]), file=sys.stderr)
            return rc
    elif (seg_dir / "manifest.json").is_file():
        segmenters = read_json(seg_dir / "manifest.json")
    report_dir = out / "report"
    if not (report_dir / "subjects.parquet").is_file():
        print(f"no report at {report_dir}", file=sys.stderr)
        return 1
    config_path = results / f"benchmark_real_{name}.yaml"
    result = summarise(report_dir, yaml.safe_load(config_path.read_text()) if config_path.is_file() else None)
    result["run"] = {"cohort": args.cohort, "quick": args.quick, "skip_run": args.skip_run, "cores": args.cores,
                     "test_fraction": args.test_fraction, "seed": args.seed, "sets": args.sets, **timing,
                     "load_average": os.getloadavg()[0]}
    if segmenters:
        result["segmenters"] = {"models": segmenters["models"], "real_dsc": segmenters["real_dsc"],
                                "seconds": segmenters["seconds"], "settings": segmenters["key"]["settings"],
                                "train_subjects": [v["subject"] for v in segmenters["key"]["train"]],
                                "qc_subjects": [v["subject"] for v in segmenters["key"]["qc"]]}
    print(format_report(result, segmenters))
    json_path = report_dir / "benchmark_real_segmenters.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
