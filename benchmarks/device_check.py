"""One prepared command that measures nnqc-pipe on a CUDA device (or on the CPU) in minutes and writes one JSON.

Sections, each with its share of the time budget (``--budget-s``); a failing section records its error in the JSON
and the others go on. Every network is built by the package's own functions (presets, ``models/autoencoder.py``,
``models/ldm.py``, ``models/qcnet.py``, ``models/pgt.py``) through the speed benchmarks' helpers.

1. ``environment``: host, device, CUDA / cuDNN / torch / MONAI versions, the autocast dtype (bf16 for the
   diffusion UNet on CUDA, nothing on CPU; the autoencoder and the QC network stay fp32) and the TF32 switches.
2. ``correctness``: per preset, the same randomly initialised VAE (encoder mean, then decoder), LDM (one denoising
   call) and QC network (error probabilities) on the CPU and on the device, same inputs: relative L2 error of the
   device's output against the CPU's, checked against ``TOLERANCES`` (fp32/TF32 for the VAE and QC network, bf16
   autocast for the UNet). A 20-step DDIM sample (``generate_pgt``, 2 draws) from one seed on both: finite, and the
   mean class Dice of the device's pGT against the CPU's.
3. ``training``: VAE-GAN and LDM training steps (``benchmarks/train_speed.py``) at each preset's batch size, on
   slices of the shared hippocampus preprocessed with the package's own fingerprint/plan/preprocessing (the
   ``paper`` preset with the paper's 256² patch) or, without the data, on synthetic slices of the same shapes
   (``data`` says which): samples/s, s per epoch of the cohort's training split and the paper's 204.5 s/epoch,
   peak GPU memory.
4. ``inference``: s/slice of ``generate_pgt`` at 20 and 1 DDIM steps, 2 draws, for doubling batch sizes (network
   inputs = slices x draws) until one does not fit in memory or the time is up, both presets (the paper: 0.404
   s/slice on an A100), with peak GPU memory.
5. ``pipeline`` (on by default on CUDA, ``--pipeline``/``--no-pipeline``): the whole workflow on 30 subjects of
   the shared hippocampus (the built-in demo cohort without it) with the cpu preset, ``device`` set to the checked
   device and shortened training caps (``PIPELINE_CAPS``); wall time per rule from snakemake's benchmark files
   and the accuracy figures beside the cpu preset's full CPU run (``CPU_REFERENCE``).
6. ``derived``: the figures the SLURM profile is sized from (README, "Sizing the SLURM profile"): s per
   candidate, candidates per GPU-hour, minutes per candidate for ``chunk_runtime``, subjects per 1-hour ``infer``
   job, the best inference batch size, training hours of the paper preset, peak GPU memory.

Usage:
    make device-check                                      # = python benchmarks/device_check.py
    srun --gres=gpu:1 --time=00:15:00 make device-check    # on a SLURM GPU node
    python benchmarks/device_check.py --device cpu --budget-s 3600        # the same keys on the CPU (slow)
    python benchmarks/device_check.py --smoke --out /tmp/device_check.json  # seconds on CPU, tiny sizes (tests)

Nothing is downloaded: the vision expert of the pipeline run is the tiny untrained fallback, perceptual weights
are off. The JSON is rewritten after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import train_speed  # noqa: E402
from bench_utils import E2_SIZES, sync, synthetic_labels  # noqa: E402
from inference_speed import PAPER_A100_S, build_models, sample, synthetic_inputs  # noqa: E402

from nnqc_pipe.dice import class_dice  # noqa: E402
from nnqc_pipe.models import presets  # noqa: E402
from nnqc_pipe.models.autoencoder import one_hot  # noqa: E402
from nnqc_pipe.models.device import resolve_device  # noqa: E402
from nnqc_pipe.models.pgt import PGTModels  # noqa: E402
from nnqc_pipe.models.qcnet import build_qcnet, network_input  # noqa: E402
from nnqc_pipe.models.training import load_slices  # noqa: E402

log = logging.getLogger("device_check")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NNQC_SHARED_DATA", REPO.parent / "shared" / "data"))
N_CLASSES = 3  # hippocampus: background, anterior, posterior
E2 = E2_SIZES["vit-b16"]
PAPER_S_PER_EPOCH = 204.5  # nnQC paper, training, A100
# Relative L2 error ||device - cpu|| / ||cpu|| allowed per network: fp32 (TF32 convolutions on CUDA) for the VAE and
# the QC network, bf16 autocast for the diffusion UNet.
TOLERANCES = {"vae": 1e-2, "ldm": 5e-2, "qcnet": 1e-2}
MIN_SAMPLE_DICE = 0.9  # mean class Dice of the device's 20-step pGT against the CPU's, same seed
# The cpu preset's whole pipeline on the shared hippocampus, 2 CPU cores, full training caps, 20 DDIM steps
# (README, docs/method.md): what the pipeline section's figures are read beside.
CPU_REFERENCE = {"source": "README: cpu preset, 2 CPU cores, full training caps, 20 DDIM steps",
                 "dsc_r": 0.988, "dsc_mae": 0.041, "wall_min": 31.5}
# Shortened training of the pipeline section (cpu preset): minutes instead of the preset's caps.
PIPELINE_CAPS = {
    "vae": {"epochs": 4, "max_minutes": 1},
    "ldm": {"epochs": 6, "max_minutes": 1, "val_every": 3},
    "segmenter": {"checkpoints": [1, 2], "max_minutes": 1},
    "qcnet": {"epochs": 3, "max_minutes": 1},
}
PIPELINE_SUBJECTS = 30  # the first hippocampus subjects (sorted): 6 test subjects x (gt + 5 levels) to infer
PLAN_PATCH = {"paper": 256}  # plan.patch_size per preset (the paper's fixed 256²; otherwise the plan decides)
TRAINING_RULES = ("train_vae", "train_ldm", "train_segmenter", "train_qcnet")
GPU_RULES = ("embed", *TRAINING_RULES, "infer")  # the rules the SLURM profile sends to the GPU partition
# Share of the budget per section (the pipeline gets what is left); the training split of a cohort.
SHARES = {"correctness": 0.12, "training": 0.2, "inference": 0.25}
TRAIN_SHARE = 0.8 * 0.9  # test_fraction 0.2, val_fraction 0.1 (the schema's defaults)
SLICES_PER_SUBJECT = 36  # hippocampus median, for synthetic data and the derived figures
CANDIDATES_PER_SUBJECT = (1, 3, 8)  # one source; a study's 3 sources; a test subject's gt + 5 levels + 2 sources


@dataclass(frozen=True)
class Sizes:
    """What the check runs: presets, patch per preset (the plan's with the shared data), batches and steps."""

    presets: tuple[str, ...] = ("cpu", "paper")
    patch: dict[str, int] = field(default_factory=lambda: {"cpu": 64, "paper": 256, "tiny": 32})
    check_slices: int = 4  # slices of the forward checks
    sample_slices: int = 2  # slices of the DDIM sample (x draws)
    sample_steps: int = 20
    train_iters: int = 20  # timed training steps per stage (fewer when the time is up)
    batches: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)  # inference batch sizes tried (network inputs)
    steps: tuple[int, ...] = (20, 1)
    draws: int = 2
    subjects: int = 16  # hippocampus subjects preprocessed for the training section
    # On the CPU there is no out-of-memory error to stop at, the kernel kills the process (measured: the paper
    # preset's VAE-GAN step at its own batch and 256² exceeded 24 GiB), so batches are capped there.
    cpu_train_batch: int = 4
    cpu_infer_batch: int = 64
    synthetic: bool = False  # never read the shared data


FULL = Sizes()
SMOKE = Sizes(presets=("tiny",), check_slices=2, sample_slices=2, sample_steps=3, train_iters=1, batches=(4, 8),
              synthetic=True)


# ---------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and precision settings."""
    import monai

    cuda = device.type == "cuda"
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "gpu_memory_mb": torch.cuda.get_device_properties(device).total_memory / 2**20 if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "monai": monai.__version__,
        "autocast": "bfloat16 (diffusion UNet only)" if cuda else "none",
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }


def rel_error(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Relative L2 error and largest absolute difference of ``other`` against ``reference`` (both moved to CPU)."""
    ref, out = reference.detach().float().cpu(), other.detach().float().cpu()
    return {"rel_l2": float((out - ref).norm() / ref.norm().clamp_min(1e-12)),
            "max_abs": float((out - ref).abs().max()), "finite": bool(torch.isfinite(out).all())}


def checked(name: str, errors: dict[str, float]) -> dict[str, Any]:
    """``errors`` with the tolerance of network ``name`` and whether it is met."""
    return {**errors, "tolerance": TOLERANCES[name], "ok": errors["finite"] and errors["rel_l2"] <= TOLERANCES[name]}


def moved(models: PGTModels, device: torch.device) -> PGTModels:
    """A copy of CPU sampling models on ``device`` (same weights)."""
    return PGTModels(vae=copy.deepcopy(models.vae).to(device).eval(), ldm=copy.deepcopy(models.ldm).to(device).eval(),
                     scale_factor=models.scale_factor, cfg=models.cfg, device=device)


@torch.inference_mode()
def correctness_preset(preset: str, patch: int, device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """CPU against ``device`` forward passes of the VAE, LDM and QC network, and a DDIM sample of one seed."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    ref = build_models(preset, (patch, patch), N_CLASSES, cpu, E2)
    dev = moved(ref, device)
    rng = np.random.default_rng(0)
    inputs = synthetic_inputs(sizes.check_slices, (patch, patch), N_CLASSES, E2, rng)
    out: dict[str, Any] = {"patch": patch}

    def both(fn: Callable[[PGTModels], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return fn(ref), fn(dev)

    def vae(m: PGTModels) -> torch.Tensor:
        target = one_hot(torch.as_tensor(inputs["candidate"], device=m.device), N_CLASSES)
        return m.vae.decode(m.vae.encode(target)[0])

    out["vae"] = checked("vae", rel_error(*both(vae)))

    size = patch // ref.latent_factor
    latents = torch.randn(sizes.check_slices, ref.cfg["vae"]["latent_channels"], size, size)
    timesteps = torch.linspace(0, ref.cfg["noise"]["n_train_timesteps"] - 1, sizes.check_slices).long()

    def ldm(m: PGTModels) -> torch.Tensor:
        cand = torch.as_tensor(inputs["candidate"], device=m.device)
        image = torch.as_tensor(inputs["image"], device=m.device) if m.needs_image else None
        ratio = torch.as_tensor(inputs["slice_ratio"], device=m.device)
        pooled, tokens = (torch.as_tensor(inputs["embeddings"][k], dtype=torch.float32, device=m.device)
                          for k in ("pooled", "tokens"))
        context = m.ldm.context(ratio, pooled, tokens)
        return m.ldm.denoise(latents.to(m.device), timesteps.to(m.device), m.condition(cand, image), context)

    out["ldm"] = checked("ldm", rel_error(*both(ldm)))

    qcfg = ref.cfg["qcnet"]
    net = build_qcnet(N_CLASSES, qcfg["channels"], qcfg["res_units"]).eval()
    net_dev = copy.deepcopy(net).to(device)
    image, cand = torch.as_tensor(inputs["image"]), torch.as_tensor(inputs["candidate"])
    qc_ref = torch.sigmoid(net(network_input(image, cand, N_CLASSES)))
    qc_dev = torch.sigmoid(net_dev(network_input(image.to(device), cand.to(device), N_CLASSES)))
    out["qcnet"] = checked("qcnet", rel_error(qc_ref, qc_dev))

    few = {k: ({kk: vv[:sizes.sample_slices] for kk, vv in v.items()} if isinstance(v, dict)
               else v[:sizes.sample_slices]) for k, v in inputs.items()}
    batch = sizes.sample_slices * sizes.draws
    pgt_ref = sample(ref, few, sizes.sample_steps, batch, sizes.draws, seed=7)
    pgt_dev = sample(dev, few, sizes.sample_steps, batch, sizes.draws, seed=7)
    mask_ref, mask_dev = pgt_ref.probabilities.argmax(1), pgt_dev.probabilities.argmax(1)
    dice = float(class_dice(mask_dev, mask_ref, N_CLASSES).mean())
    out["ddim_sample"] = {
        "steps": sizes.sample_steps, "draws": sizes.draws, "seed": 7,
        "finite": bool(np.isfinite(pgt_dev.probabilities).all() and np.isfinite(pgt_dev.uncertainty).all()),
        "dice_vs_cpu": dice, "min_dice": MIN_SAMPLE_DICE,
        "foreground_fraction": float((mask_dev > 0).mean()),
        "ok": bool(np.isfinite(pgt_dev.probabilities).all()) and dice >= MIN_SAMPLE_DICE,
    }
    out["ok"] = all(out[k]["ok"] for k in ("vae", "ldm", "qcnet", "ddim_sample"))
    return out


@dataclass
class TrainingData:
    """Slices for the training steps, and the size of an epoch of the cohort's training split."""

    labels: np.ndarray
    images: np.ndarray | None
    patch: int
    epoch_slices: int
    source: str


def training_data(preset: str, sizes: Sizes, data_dir: Path, work: Path) -> TrainingData:
    """Preprocessed hippocampus slices for ``preset`` (the paper preset at the paper's 256²), else synthetic ones."""
    images_dir = data_dir / "imagesTr"
    if not sizes.synthetic and images_dir.is_dir():
        n_total = len(list(images_dir.glob("*.nii.gz")))
        cfg = presets.resolve(preset, {}, {"patch_size": [64, 64], "n_classes": N_CLASSES})
        plan, train, _ = train_speed.prepare_hippocampus(
            data_dir, work / f"hippocampus_{preset}", sizes.subjects, 0, presets.required_divisor(cfg), n_val=0,
            plan_overrides={"patch_size": PLAN_PATCH[preset]} if preset in PLAN_PATCH else None)
        slices = load_slices(train, plan["patch_size"], plan["n_classes"], with_image=True)
        per_subject = len(slices) / len(train)
        return TrainingData(slices.label, slices.image.astype(np.float32), int(plan["patch_size"][0]),
                            round(per_subject * n_total * TRAIN_SHARE),
                            f"shared hippocampus: {len(train)} of {n_total} subjects preprocessed with nnqc_pipe.data "
                            f"(plan patch {plan['patch_size']}); epoch = {TRAIN_SHARE:.2f} x {n_total} subjects")
    patch = sizes.patch[preset]
    n = 64
    rng = np.random.default_rng(0)
    return TrainingData(synthetic_labels(n, patch, N_CLASSES, rng), rng.standard_normal((n, patch, patch), np.float32),
                        patch, round(60 * TRAIN_SHARE * SLICES_PER_SUBJECT),
                        f"synthetic slices ({data_dir} absent or --smoke); epoch = {TRAIN_SHARE:.2f} x 60 subjects x "
                        f"{SLICES_PER_SUBJECT} slices (the shared hippocampus' size)")


def batch_of(array: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` slices of ``array``, repeated when it has fewer."""
    return np.resize(array, (n, *array.shape[1:])) if len(array) < n else array[:n]


def peak_mb(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last reset (MB); None on CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def training_preset(preset: str, device: torch.device, sizes: Sizes, data: TrainingData,
                    deadline: float) -> dict[str, Any]:
    """samples/s, s/epoch and peak memory of the VAE-GAN and LDM training steps of ``preset``."""
    cfg = presets.resolve(preset, {}, {"patch_size": [data.patch, data.patch], "n_classes": N_CLASSES})
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"patch": data.patch, "epoch_slices": data.epoch_slices, "data": data.source,
                           "perceptual_loss": "off (no local weights; nothing is downloaded)"}
    stages = ("vae", "ldm")
    for i, stage in enumerate(stages):
        batch = int(cfg[stage]["batch_size"])
        if device.type == "cpu":
            batch = min(batch, sizes.cpu_train_batch)
        labels = batch_of(data.labels, batch)
        stage_deadline = time.perf_counter() + (deadline - time.perf_counter()) / (len(stages) - i)
        reset_peak(device)
        torch.manual_seed(0)
        if stage == "vae":
            rate = train_speed.vae_speed(cfg, labels, sizes.train_iters, device, stage_deadline)
        else:
            images = batch_of(data.images, batch) if data.images is not None else None
            rate = train_speed.ldm_speed(cfg, labels, sizes.train_iters, rng, device, images, stage_deadline)
        out[stage] = {"batch_size": batch, "preset_batch_size": int(cfg[stage]["batch_size"]),
                      "samples_per_s": rate, "s_per_epoch": data.epoch_slices / rate,
                      "peak_gpu_mb": peak_mb(device)}
    out["ldm"]["paper_s_per_epoch"] = PAPER_S_PER_EPOCH
    out["ldm"]["vs_paper"] = out["ldm"]["s_per_epoch"] / PAPER_S_PER_EPOCH
    return out


def inference_preset(preset: str, patch: int, device: torch.device, sizes: Sizes,
                     deadline: float) -> dict[str, Any]:
    """s/slice of ``generate_pgt`` for each step count and doubling batch sizes, until memory or time runs out."""
    torch.manual_seed(0)
    models = build_models(preset, (patch, patch), N_CLASSES, device, E2)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    stopped: dict[int, str] = {}
    for i, steps in enumerate(sizes.steps):
        steps_deadline = time.perf_counter() + (deadline - time.perf_counter()) / (len(sizes.steps) - i)
        started = time.perf_counter()  # warm-up on one slice: CUDA context, kernels, allocator
        sample(models, synthetic_inputs(1, (patch, patch), N_CLASSES, E2, rng), steps, sizes.draws, sizes.draws)
        sync(device)
        s_per_slice = time.perf_counter() - started
        stopped[steps] = "all batch sizes done"
        for batch in sizes.batches:
            if device.type == "cpu" and batch > sizes.cpu_infer_batch:
                stopped[steps] = f"CPU: batches above {sizes.cpu_infer_batch} not tried"
                break
            slices = batch // sizes.draws
            projected = s_per_slice * slices
            if time.perf_counter() + projected > steps_deadline:
                stopped[steps] = f"time: batch {batch} would take ~{projected:.0f} s"
                break
            inputs = synthetic_inputs(slices, (patch, patch), N_CLASSES, E2, rng)
            reset_peak(device)
            try:
                seconds = []
                for _ in range(2):
                    started = time.perf_counter()
                    sample(models, inputs, steps, batch, sizes.draws)
                    sync(device)
                    seconds.append(time.perf_counter() - started)
                    if seconds[-1] > 2.0 or time.perf_counter() > steps_deadline:
                        break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                stopped[steps] = f"out of GPU memory at batch {batch}"
                break
            best = min(seconds)
            s_per_slice = best / slices
            rows.append({"steps": steps, "draws": sizes.draws, "batch_size": batch, "slices": slices,
                         "s_per_slice": best / slices, "s_per_slice_draw": best / (slices * sizes.draws),
                         "peak_gpu_mb": peak_mb(device)})
    best_rows = {}
    for steps in sizes.steps:
        mine = [r for r in rows if r["steps"] == steps]
        if mine:
            best_rows[str(steps)] = min(mine, key=lambda r: r["s_per_slice"])
    return {"patch": patch, "default_steps": int(models.cfg["inference"]["ddim_steps"]), "rows": rows,
            "best": best_rows, "stopped": {str(k): v for k, v in stopped.items()},
            "largest_batch": max((r["batch_size"] for r in rows), default=None), "paper_a100_s_per_slice": PAPER_A100_S}


def pipeline(device: torch.device, data_dir: Path, work: Path, deadline: float) -> dict[str, Any]:
    """The whole workflow (cpu preset, shortened caps, ``device``) with wall time per rule and accuracy figures."""
    if (data_dir / "imagesTr").is_dir():
        cohort = yaml.safe_load((REPO / "config" / "cohorts" / "hippocampus.yaml").read_text())
        cohort["images"] = str(data_dir / "imagesTr" / "{subject}.nii.gz")
        cohort["labels"] = str(data_dir / "labelsTr" / "{subject}.nii.gz")
        names = sorted(p.name.removesuffix(".nii.gz") for p in (data_dir / "imagesTr").glob("*.nii.gz"))
        cohort["subjects"] = names[:PIPELINE_SUBJECTS]
        name = f"shared hippocampus ({data_dir}, {len(cohort['subjects'])} subjects)"
    else:
        cohort = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
        name = f"built-in demo phantoms ({data_dir} absent)"
    results = work / "pipeline"
    sets = {"device": device.type, "model": PIPELINE_CAPS}
    config = accuracy.derive_config(cohort, results, "cpu", float(cohort["split"].get("test_fraction", 0.2)), sets)
    config_path = work / "pipeline_config.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cores = os.cpu_count() or 1
    # The training rules take every core; a quarter each lets them share the one device as they would share nodes.
    threads = [f"{rule}={max(1, cores // 4)}" for rule in TRAINING_RULES]
    started = time.time()
    rc, wall = accuracy.run_snakemake(config_path, cores, work / "pipeline_snakemake.log",
                                      ["--set-threads", *threads], timeout=max(1.0, deadline - time.perf_counter()))
    out_dir = results / config["cohort"]
    stages = accuracy.stage_times(out_dir / "benchmarks", since=started)
    out: dict[str, Any] = {
        "cohort": name, "preset": "cpu", "device": device.type, "caps": PIPELINE_CAPS, "config": str(config_path),
        "log": str(work / "pipeline_snakemake.log"), "exit_code": rc, "wall_s": wall,
        "per_rule": stages.to_dict("records"), "cpu_reference": CPU_REFERENCE,
    }
    if rc != 0:
        why = "stopped at the section's time budget" if rc == 124 else "failed"
        out["error"] = f"snakemake {why} (exit {rc}); see {out['log']}"
        return out
    summary = accuracy.summarise(out_dir / "report", out_dir / "benchmarks", wall, since=started)
    out["accuracy"] = {"agreement": summary["agreement"][:3], "kendall_tau": summary["ranking"]["kendall_tau"],
                       "targets": summary["targets"]}
    return out


def derived(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the SLURM profile's GPU rules are sized from (README, "Sizing the SLURM profile")."""
    out: dict[str, Any] = {"slices_per_subject": SLICES_PER_SUBJECT}
    inference = result["sections"].get("inference", {}).get("presets", {})
    for preset, figures in inference.items():
        measured = [int(s) for s in figures.get("best", {})]
        if not measured:
            continue
        # the preset's own step count (cpu 1, paper 20), else the nearest one measured (tiny: 10 -> 20)
        steps = min(measured, key=lambda s: (abs(s - figures["default_steps"]), -s))
        best = figures["best"][str(steps)]
        s_candidate = best["s_per_slice"] * SLICES_PER_SUBJECT
        minutes = math.ceil(3 * s_candidate / 60 * 100) / 100  # x3: I/O, metrics and the learned opinion
        out[preset] = {
            "ddim_steps": best["steps"], "draws": best["draws"], "batch_size": best["batch_size"],
            "s_per_candidate": s_candidate, "candidates_per_gpu_hour": 3600 / s_candidate,
            "infer_minutes_per_candidate": minutes,
            "subjects_per_1h_infer_job": {str(k): max(1, int((60 - 10) / (minutes * k))) for k in
                                          CANDIDATES_PER_SUBJECT},
            "peak_gpu_mb_at_batch": best["peak_gpu_mb"],
        }
    per_rule = result["sections"].get("pipeline", {}).get("per_rule", [])
    out["pipeline_max_rss_mb"] = {r["rule"]: r["max_rss_mb"] for r in per_rule if r["rule"] in GPU_RULES}
    training = result["sections"].get("training", {}).get("presets", {})
    for preset, figures in training.items():
        if "ldm" not in figures:
            continue
        preset_cfg = presets.PRESETS[preset]
        per_1000 = {s: 1000 / figures[s]["samples_per_s"] for s in ("vae", "ldm")}
        out.setdefault(preset, {}).update({
            "train_s_per_1000_slices": per_1000,
            "train_hours_at_preset_epochs_per_1000_slices": {
                s: preset_cfg[s]["epochs"] * per_1000[s] / 3600 for s in ("vae", "ldm")},
            "train_peak_gpu_mb": max((figures[s]["peak_gpu_mb"] or 0) for s in ("vae", "ldm")) or None,
        })
    return out


# ---------------------------------------------------------------------------------------------------
# Running the sections
# ---------------------------------------------------------------------------------------------------


def run_section(result: dict[str, Any], name: str, seconds: float, body: Callable[[float], dict[str, Any]],
                out_path: Path) -> None:
    """Run one section with a deadline ``seconds`` from now; an exception (or an ``error`` it returns) is recorded
    and the check goes on. The JSON is rewritten afterwards."""
    started = time.perf_counter()
    log.info("section %s: up to %.0f s", name, seconds)
    try:
        out = body(started + seconds)
        out["status"] = "error" if out.get("error") else "ok"
    except Exception as exc:  # noqa: BLE001 - a failing section must not stop the others
        log.exception("section %s failed", name)
        out = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc(limit=6)}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out["seconds"] = time.perf_counter() - started
    out["budget_s"] = seconds
    result["sections"][name] = out
    write_json(result, out_path)


def per_preset(sizes: Sizes, body: Callable[[str, float], dict[str, Any]]) -> Callable[[float], dict[str, Any]]:
    """A section body running ``body(preset, deadline)`` for each preset, each with an equal share of the time;
    one preset's failure is recorded under its name and the next still runs."""

    def run(deadline: float) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for i, preset in enumerate(sizes.presets):
            share = (deadline - time.perf_counter()) / (len(sizes.presets) - i)
            try:
                results[preset] = body(preset, time.perf_counter() + share)
            except Exception as exc:  # noqa: BLE001
                log.exception("%s failed", preset)
                results[preset] = {"error": f"{type(exc).__name__}: {exc}"}
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        failed = [p for p, r in results.items() if "error" in r]
        out: dict[str, Any] = {"presets": results}
        if failed:
            out["error"] = f"failed for preset(s) {failed}"
        return out

    return run


def write_json(result: dict[str, Any], path: Path) -> None:
    """The result as JSON (NaN as null), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_clean(result), indent=2, default=str))
    tmp.replace(path)


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if not math.isfinite(value) else float(value)
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    return value


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted.key, value)`` of every leaf (what is printed)."""
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [item for i, v in enumerate(value) for item in flatten(v, f"{prefix}[{i}]")]
    return [(prefix, value)]


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Run every section within the budget; returns the result that was also written to ``args.out``."""
    sizes = SMOKE if args.smoke else FULL
    device = resolve_device(args.device)
    work, out_path = Path(args.work), Path(args.out)
    data_dir = Path(args.data)
    run_pipeline = (device.type == "cuda") if args.pipeline is None else args.pipeline
    if args.smoke:
        run_pipeline = False
    budget_end = time.perf_counter() + args.budget_s
    result: dict[str, Any] = {
        "nnqc_device_check": 1, "smoke": args.smoke, "budget_s": args.budget_s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tolerances": TOLERANCES,
        "sizes": asdict(sizes), "sections": {},
    }
    run_section(result, "environment", args.budget_s, lambda _: environment(device), out_path)

    def share(name: str) -> float:
        return max(1.0, SHARES[name] * args.budget_s)

    run_section(result, "correctness", share("correctness"), per_preset(
        sizes, lambda p, _: correctness_preset(p, sizes.patch[p], device, sizes)), out_path)
    data: dict[str, TrainingData] = {}

    def train_body(preset: str, deadline: float) -> dict[str, Any]:
        data[preset] = training_data(preset, sizes, data_dir, work)
        return training_preset(preset, device, sizes, data[preset], deadline)

    run_section(result, "training", share("training"), per_preset(sizes, train_body), out_path)
    run_section(result, "inference", share("inference"), per_preset(sizes, lambda p, d: inference_preset(
        p, data[p].patch if p in data else sizes.patch[p], device, sizes, d)), out_path)
    if run_pipeline:
        left = budget_end - time.perf_counter() - 10
        run_section(result, "pipeline", max(left, 60.0), lambda d: pipeline(device, data_dir, work, d), out_path)
    else:
        reason = "--smoke" if args.smoke else "off (--no-pipeline, or not on CUDA without --pipeline)"
        result["sections"]["pipeline"] = {"status": "skipped", "reason": reason}
    run_section(result, "derived", 60.0, lambda _: derived(result), out_path)
    result["ok"] = all(s["status"] in ("ok", "skipped") for s in result["sections"].values()) and all(
        r.get("ok", False) for r in result["sections"]["correctness"].get("presets", {}).values())
    result["seconds"] = args.budget_s - (budget_end - time.perf_counter())
    write_json(result, out_path)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    parser.add_argument("--out", default=str(REPO / "results" / "device_check.json"), help="the JSON to write")
    parser.add_argument("--work", default=str(REPO / "results" / "device_check"),
                        help="scratch folder: preprocessed slices, the pipeline run's results")
    parser.add_argument("--data", default=str(SHARED_DATA / "hippocampus"), help="the shared hippocampus cohort")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time budget of all sections (default 420 s; 240 s with --smoke, which takes about 15 s)")
    parser.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=None,
                        help="the whole pipeline run (default: on CUDA only; never with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="seconds on CPU: tiny preset and tensors, no pipeline")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 240.0 if args.smoke else 420.0
    if args.smoke and args.device == "auto":
        args.device = "cpu"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = check(args)
    for key, value in flatten(result):
        print(f"{key} = {value:.4g}" if isinstance(value, float) else f"{key} = {value}")
    print(f"device check {'OK' if result['ok'] else 'FAILED'}: {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
