"""QC throughput of unlabelled subjects: candidates per hour, per stage of what the workflow does to each of them.

For an unlabelled subject with K candidate masks the workflow runs, per subject, ``preprocess`` (the plan's
invertible preprocessing) and ``embed`` (the frozen vision expert E2 on every slice), and per candidate ``infer``
(DDIM sampling of the pGT, ``--draws`` noise draws per slice, mapped back to the original grid, written) and
``score`` (metrics of the candidate against the pGT on the original grid). This script times exactly those
package functions on a few subjects, in one process (the networks loaded once, as a chunk job does), and prints
seconds per subject / per candidate and the throughput

    candidates per hour = 3600 / ((preprocess + embed) / K + infer + score)

Networks: ``--model-dir`` (a trained model folder, e.g. results/<cohort>/models or an exported bundle: vae.pt,
ldm.pt, plan.json next to or above it, its own vision expert) or, without it, networks of ``--preset`` randomly
initialised (speed does not depend on the weights) with a plan derived from the subjects, and an E2 of the
architecture the preset would use (UniMedCLIP's ViT-B/16 for cpu/paper, randomly initialised; the tiny ViT for
tiny). Subjects: ``--data DIR`` (imagesTr/ with labelsTr/ whose masks, dilated by a voxel, serve as the
candidates; never as ground truth) or generated demo phantoms.

Usage:
    .venv/bin/python benchmarks/qc_throughput.py                         # cpu preset, 20 steps, 2 draws, 2 threads
    .venv/bin/python benchmarks/qc_throughput.py --quick                 # tiny preset, 2 phantoms: a smoke check
    .venv/bin/python benchmarks/qc_throughput.py --model-dir results/hippocampus/models \\
        --data ../shared/data/hippocampus --subjects 6 --json /tmp/qc_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from inference_speed import build_models
from scipy import ndimage

from nnqc_pipe.config import validate_config
from nnqc_pipe.data import demo
from nnqc_pipe.data.fingerprint import compute_fingerprint
from nnqc_pipe.data.inspect import inspect_subject
from nnqc_pipe.data.plan import make_plan
from nnqc_pipe.data.preprocess import (
    Preprocessed,
    indices_to_values,
    preprocess_subject,
    save_preprocessed,
    spacing_from_record,
)
from nnqc_pipe.models.embed import embed_with
from nnqc_pipe.models.experts import TINY_ARCHITECTURE, VisionExpert, build_vision_tower, load_vision_expert
from nnqc_pipe.models.pgt import PGTModels, load_models
from nnqc_pipe.models.presets import PRESETS, plan_overrides
from nnqc_pipe.qc.check import find_plan
from nnqc_pipe.qc.infer import Inference, infer_subject, save_inference
from nnqc_pipe.qc.metrics import compute_metrics

STAGES = ("preprocess", "embed", "infer", "score")


def cohort_files(data: Path | None, n: int, work: Path) -> list[tuple[str, Path, Path, Path]]:
    """(subject, image, label, candidate) for ``n`` subjects of ``data`` (or generated phantoms); the candidates
    are the label masks dilated by one voxel."""
    if data is None:
        data = work / "phantoms"
        demo.write_cohort(data, n, seed=11)
    images = sorted((data / "imagesTr").glob("*.nii.gz"))[:n]
    if not images:
        sys.exit(f"no image in {data}/imagesTr")
    out = []
    for image in images:
        label = data / "labelsTr" / image.name
        candidate = work / "candidates" / image.name
        candidate.parent.mkdir(parents=True, exist_ok=True)
        img = nib.load(label)
        mask = ndimage.grey_dilation(np.asarray(img.dataobj), size=3).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, img.affine), candidate)
        out.append((image.name.removesuffix(".nii.gz"), image, label, candidate))
    return out


def derived_plan(files: list[tuple[str, Path, Path, Path]], preset: str) -> dict[str, Any]:
    """The plan the workflow would derive with these subjects (their labels) as the training set."""
    values = sorted({int(v) for _, _, label, _ in files for v in np.unique(np.asarray(nib.load(label).dataobj))} - {0})
    names = {v: f"class{v}" for v in values}
    records = [inspect_subject(subject, image, label, values) for subject, image, label, _ in files]
    config = validate_config({"cohort": "x", "images": "{subject}", "preset": preset,
                              "label_names": {str(v): n for v, n in names.items()}})
    return make_plan(compute_fingerprint(records, "MR", names), plan_overrides(config))


def random_expert(architecture: str, token_grid: int, device: torch.device) -> VisionExpert:
    """A randomly initialised E2 of ``architecture`` (its speed is the trained one's)."""
    model = build_vision_tower(architecture).eval().requires_grad_(False).to(device)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    info = {"architecture": architecture, "checkpoint": None, "weights_sha256": "random", "pretrained": False,
            "token_grid": token_grid}
    return VisionExpert(model=model, image_size=tuple(model.image_size), mean=mean, std=std, token_grid=token_grid,
                        info=info)


def random_networks(preset: str, plan: dict[str, Any], expert: VisionExpert, device: torch.device) -> PGTModels:
    """Randomly initialised VAE and LDM of ``preset`` for the plan's patch size, sized for ``expert``'s features."""
    pooled, tokens = expert.embed(np.zeros((1, *plan["patch_size"]), np.float32))
    e2 = {"pooled_dim": pooled.shape[1], "token_dim": tokens.shape[2], "n_tokens": tokens.shape[1]}
    return build_models(preset, tuple(plan["patch_size"]), plan["n_classes"], device, e2)


def timed(times: dict[str, list[float]], stage: str, func: Any, *args: Any) -> Any:
    """Call ``func(*args)`` and append its wall time to ``times[stage]``."""
    started = time.perf_counter()
    result = func(*args)
    times[stage].append(time.perf_counter() - started)
    return result


def preprocess_step(subject: str, image: Path, plan: dict[str, Any], npz: Path) -> Preprocessed:
    """Rule preprocess for one subject: the patch stack, written."""
    pre = preprocess_subject(subject, image, None, plan)
    save_preprocessed(pre, npz)
    return pre


def infer_step(models: PGTModels, pre: Preprocessed, candidate: Path, embeddings: Path | None,
               inference: dict[str, Any], out: Path) -> Inference:
    """Rule infer for one candidate: the pGT on the original grid and its per-slice facts, written."""
    result = infer_subject(models, pre, candidate, embeddings, inference, 0)
    save_inference(result, pre.record, out.with_suffix(".nii.gz"), out.with_suffix(".slices.parquet"), None)
    return result


def qc_subject(subject: str, image: Path, candidate: Path, models: PGTModels, expert: VisionExpert | None,
               plan: dict[str, Any], inference: dict[str, Any], work: Path, times: dict[str, list[float]]) -> int:
    """What the workflow does to one unlabelled subject with one candidate, stage by stage; returns its slices."""
    npz, embeddings = work / f"{subject}.npz", work / f"{subject}.emb.npz"
    pre = timed(times, "preprocess", preprocess_step, subject, image, plan, npz)
    if expert is not None:
        timed(times, "embed", embed_with, expert, npz, embeddings, 32)
    result = timed(times, "infer", infer_step, models, pre, candidate, embeddings if expert else None, inference,
                   work / f"{subject}_pgt")
    names = dict(zip(plan["label_values"], plan["label_names"], strict=True))
    pgt = indices_to_values(result.pgt, plan["label_values"])
    timed(times, "score", compute_metrics, result.candidate, pgt, spacing_from_record(pre.record), names, 2.0)
    return int(pre.image.shape[0])


def throughput(seconds: dict[str, float], sources: int) -> float:
    """Candidates per hour with ``sources`` candidates per subject (preprocess and embed shared by them)."""
    per_candidate = (seconds["preprocess"] + seconds["embed"]) / sources + seconds["infer"] + seconds["score"]
    return 3600.0 / per_candidate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="trained model folder (vae.pt, ldm.pt; plan.json next to or above it); default: random "
                         "networks of --preset")
    ap.add_argument("--data", type=Path, default=None,
                    help="cohort folder with imagesTr/ and labelsTr/ (default: generated demo phantoms)")
    ap.add_argument("--subjects", type=int, default=4, help="subjects to time (default: 4)")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="preset without --model-dir")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    ap.add_argument("--draws", type=int, default=2, help="noise draws per slice (inference.samples, default: 2)")
    ap.add_argument("--sources", type=int, default=3, help="candidates per subject for the throughput (default: 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default: cpu)")
    ap.add_argument("--quick", action="store_true", help="smoke check: tiny preset, 2 phantoms, 5 steps")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.subjects, args.steps = "tiny", 2, 5
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    inference = {"ddim_steps": args.steps, "samples": args.draws, "batch_size": 64}
    times: dict[str, list[float]] = {stage: [] for stage in STAGES}
    with tempfile.TemporaryDirectory(prefix="nnqc-qc-throughput-") as tmp:
        work = Path(tmp)
        files = cohort_files(args.data, args.subjects, work)
        if args.model_dir:
            plan, models = find_plan(args.model_dir, None), load_models(args.model_dir, args.device)
            expert = load_vision_expert(models.cfg["encoder"], device, work) if models.ldm.toe.uses_image else None
        else:
            plan = derived_plan(files, args.preset)
            encoder = PRESETS[args.preset]["encoder"]
            architecture = TINY_ARCHITECTURE if args.preset == "tiny" else encoder["architecture"]
            expert = random_expert(architecture, encoder["token_grid"], device)
            models = random_networks(args.preset, plan, expert, device)
        warmup = {stage: [] for stage in STAGES}
        subject, image, _, candidate = files[0]
        qc_subject(subject, image, candidate, models, expert, plan, inference, work, warmup)
        slices = [qc_subject(subject, image, candidate, models, expert, plan, inference, work, times)
                  for subject, image, _, candidate in files]
    seconds = {stage: float(np.mean(v)) if v else 0.0 for stage, v in times.items()}
    result = {
        "model": str(args.model_dir) if args.model_dir else f"random {args.preset}",
        "patch_size": plan["patch_size"], "device": args.device, "threads": args.threads,
        "ddim_steps": args.steps, "draws": args.draws, "subjects": len(files),
        "mean_slices_per_subject": float(np.mean(slices)), "seconds": seconds,
        "infer_s_per_slice": seconds["infer"] / float(np.mean(slices)),
        "sources": args.sources, "candidates_per_hour": throughput(seconds, args.sources),
        "candidates_per_hour_one_source": throughput(seconds, 1),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0],
    }
    print(f"QC throughput, {result['model']}, patch {plan['patch_size']}, {args.device} ({args.threads} threads), "
          f"{args.steps} DDIM steps, {args.draws} draws, {len(files)} subjects of "
          f"{result['mean_slices_per_subject']:.0f} slices (load average {result['load_average']:.1f})")
    print("  per subject: " + ", ".join(f"{s} {seconds[s]:.2f} s" for s in ("preprocess", "embed")))
    print("  per candidate: " + ", ".join(f"{s} {seconds[s]:.2f} s" for s in ("infer", "score"))
          + f" (infer {result['infer_s_per_slice']:.3f} s/slice)")
    print(f"  candidates per hour: {result['candidates_per_hour']:.0f} with {args.sources} sources per subject, "
          f"{result['candidates_per_hour_one_source']:.0f} with one")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
