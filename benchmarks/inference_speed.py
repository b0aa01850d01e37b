"""Inference speed: seconds per slice of pGT generation (``nnqc_pipe.models.pgt.generate_pgt``) per preset and device.

For each case (preset, patch size) the networks are built exactly as training builds them, randomly initialised
(speed does not depend on the weights): ``presets.resolve`` for the config, the MONAI autoencoder from
``autoencoder_kwargs``, ``ConditionalLDM(unet_kwargs(cfg), toe_kwargs(cfg, **E2 sizes))``, put together in a
``PGTModels``. The inputs are synthetic: elliptic class-index candidates, normalised-image-like noise slices,
slice ratios in [0, 1] and random E2 embeddings of the right shapes (UniMedCLIP ViT-B/16 by default). One
warm-up batch, then ``--batches`` batches of the preset's inference batch size are timed, each a call of
``generate_pgt`` (DDIM ``--steps`` steps, candidate encoding, ToE context, UNet, decoder, softmax, uncertainty);
the decoder alone is timed on one batch for the breakdown.

Printed per (preset, patch, device): seconds per slice (mean over the timed batches and best batch), the
decoder's share, slices/s and the process's CPU share (CPU time / (wall x threads); well below 100 % means other
load took the cores and the figure is inflated), next to the anchors: ≈ 5 s/slice at 20 steps for the paper
architecture on this 2-core CPU (the design card's reference, docs/method.md), 0.404 s/slice for the paper on
an A100, and the target ≤ 0.5 s/slice for the ``cpu`` preset on CPU (PASS/MISS).

Usage:
    .venv/bin/python benchmarks/inference_speed.py                        # cpu:80 cpu:160 paper:256, cpu (+cuda)
    .venv/bin/python benchmarks/inference_speed.py --cases cpu:80 --batches 3 --threads 2
    .venv/bin/python benchmarks/inference_speed.py --cases paper:256 --batches 1 --warmup-slices 4 --device cpu
    .venv/bin/python benchmarks/inference_speed.py --device cuda --batches 5 --json /tmp/inference_speed.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np
import torch
from bench_utils import E2_SIZES, sync, synthetic_labels

from nnqc_pipe.models import presets
from nnqc_pipe.models.autoencoder import autoencoder_kwargs, build_autoencoder
from nnqc_pipe.models.ldm import ConditionalLDM, toe_kwargs, unet_kwargs
from nnqc_pipe.models.pgt import PGTModels, generate_pgt

REFERENCE_CPU_S = 5.0  # paper architecture, 20 DDIM steps, this 2-core CPU (design card reference)
PAPER_A100_S = 0.404  # nnQC paper, A100
TARGET_CPU_S = 0.5  # cpu preset on CPU


def build_models(preset: str, patch: tuple[int, int], n_classes: int, device: torch.device, e2: dict[str, int],
                 overrides: dict[str, Any] | None = None) -> PGTModels:
    """Randomly initialised sampling models for a preset, built through the same helpers as training."""
    cfg = presets.resolve(preset, overrides or {}, {"patch_size": list(patch), "n_classes": n_classes})
    vae = build_autoencoder(autoencoder_kwargs(cfg))
    ldm = ConditionalLDM(unet_kwargs(cfg), toe_kwargs(cfg, **e2))
    return PGTModels(vae=vae.to(device).eval(), ldm=ldm.to(device).eval(), scale_factor=1.0, cfg=cfg, device=device)


def synthetic_inputs(n: int, patch: tuple[int, int], n_classes: int, e2: dict[str, int],
                     rng: np.random.Generator) -> dict[str, Any]:
    """A fake subject of ``n`` slices: nested-ellipse candidates, image noise, ratios, E2 embeddings (float16)."""
    height, width = patch
    return {
        "candidate": synthetic_labels(n, patch, n_classes, rng),
        "slice_ratio": np.linspace(0, 1, n, dtype=np.float32),
        "image": rng.standard_normal((n, height, width)).astype(np.float32),
        "embeddings": {
            "pooled": rng.standard_normal((n, e2["pooled_dim"])).astype(np.float16),
            "tokens": rng.standard_normal((n, e2["n_tokens"], e2["token_dim"])).astype(np.float16),
        },
    }


def sample(models: PGTModels, inputs: dict[str, Any], steps: int, batch_size: int, n_samples: int = 1,
           seed: int = 0) -> Any:
    """One ``generate_pgt`` call on the inputs (``n_samples`` draws per slice); the only place that knows its
    signature.

    The image slices are passed when ``generate_pgt`` takes them (models with ``ldm.image_input``).
    """
    kwargs: dict[str, Any] = {"ddim_steps": steps, "n_samples": n_samples, "batch_size": batch_size, "seed": seed}
    if "image" in inspect.signature(generate_pgt).parameters:
        kwargs["image"] = inputs["image"]
    return generate_pgt(models, inputs["candidate"], inputs["slice_ratio"], inputs["embeddings"], **kwargs)


def subset(inputs: dict[str, Any], index: slice) -> dict[str, Any]:
    """The inputs of slices ``index``."""
    return {k: ({kk: vv[index] for kk, vv in v.items()} if isinstance(v, dict) else v[index])
            for k, v in inputs.items()}


@torch.inference_mode()
def decoder_seconds(models: PGTModels, batch_size: int, patch: tuple[int, int]) -> float:
    """Seconds of one decoder pass (latents -> class logits) over a batch, after a warm-up pass."""
    factor = models.latent_factor
    latents = torch.randn(batch_size, models.cfg["vae"]["latent_channels"], patch[0] // factor, patch[1] // factor,
                          device=models.device)
    models.vae.decode(latents[:2])
    sync(models.device)
    started = time.perf_counter()
    models.vae.decode(latents)
    sync(models.device)
    return time.perf_counter() - started


def time_case(preset: str, patch: tuple[int, int], device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up batch, then ``args.batches`` timed batches; seconds per slice and the decoder's share."""
    torch.manual_seed(0)
    e2 = E2_SIZES[args.e2]
    models = build_models(preset, patch, args.n_classes, device, e2)
    batch = args.batch_size or int(models.cfg["inference"]["batch_size"])
    rng = np.random.default_rng(0)
    warmup = synthetic_inputs(args.warmup_slices or batch, patch, args.n_classes, e2, rng)
    inputs = synthetic_inputs(batch * args.batches, patch, args.n_classes, e2, rng)
    sample(models, warmup, args.steps, batch)
    sync(device)
    per_batch = []
    cpu_started = time.process_time()
    for start in range(0, batch * args.batches, batch):
        started = time.perf_counter()
        sample(models, subset(inputs, slice(start, start + batch)), args.steps, batch)
        sync(device)
        per_batch.append(time.perf_counter() - started)
        print(f"  {preset} {patch[0]}x{patch[1]} {device.type}: batch {len(per_batch)}/{args.batches} "
              f"{per_batch[-1]:.1f} s", file=sys.stderr, flush=True)
    cpu_share = (time.process_time() - cpu_started) / float(np.sum(per_batch)) / torch.get_num_threads()
    decode = decoder_seconds(models, batch, patch) / batch if args.decoder else float("nan")
    mean = float(np.sum(per_batch) / (batch * args.batches))
    return {
        "preset": preset,
        "patch": f"{patch[0]}x{patch[1]}",
        "device": device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "batch_size": batch,
        "steps": args.steps,
        "batches": args.batches,
        "s_per_slice": mean,
        "best_s_per_slice": float(min(per_batch) / batch),
        "decoder_s_per_slice": decode,
        "slices_per_s": 1.0 / mean,
        # process CPU time / (wall time x threads) over the timed batches: well below 1 on CPU = other load
        "cpu_share": cpu_share if device.type == "cpu" else None,
        "ldm_parameters": sum(p.numel() for p in models.ldm.parameters()),
        "vae_parameters": sum(p.numel() for p in models.vae.parameters()),
        "candidate_encoding": models.cfg["ldm"].get("candidate_encoding"),
        "image_input": models.cfg["ldm"].get("image_input"),
    }


def anchor(row: dict[str, Any]) -> tuple[str, str]:
    """(reference, verdict) for a result row."""
    if row["preset"] == "cpu" and row["device"] == "cpu":
        ok = row["s_per_slice"] <= TARGET_CPU_S
        return f"target <= {TARGET_CPU_S} s", "PASS" if ok else "MISS"
    if row["preset"] == "paper":
        ref = f"~{REFERENCE_CPU_S:g} s (this CPU)" if row["device"] == "cpu" else f"{PAPER_A100_S} s (A100)"
        return ref, ""
    return "", ""


def format_table(rows: list[dict[str, Any]]) -> str:
    """The printed figure table."""
    lines = [f"{'preset':7} {'patch':>8} {'device':6} {'thr':>4} {'batch':>5} {'steps':>5} {'s/slice':>8} "
             f"{'best':>7} {'decoder':>8} {'slices/s':>8} {'cpu%':>5}  {'reference':22} verdict"]
    for r in rows:
        ref, outcome = anchor(r)
        threads = "" if r["threads"] is None else r["threads"]
        share = "" if r["cpu_share"] is None else f"{100 * r['cpu_share']:.0f}"
        lines.append(
            f"{r['preset']:7} {r['patch']:>8} {r['device']:6} {threads:>4} {r['batch_size']:>5} {r['steps']:>5} "
            f"{r['s_per_slice']:>8.3f} {r['best_s_per_slice']:>7.3f} {r['decoder_s_per_slice']:>8.3f} "
            f"{r['slices_per_s']:>8.2f} {share:>5}  {ref:22} {outcome}"
        )
    return "\n".join(lines)


def parse_case(text: str) -> tuple[str, tuple[int, int]]:
    """``cpu:80`` or ``paper:256x256`` -> (preset, (H, W))."""
    preset, _, size = text.partition(":")
    if preset not in presets.PRESETS or not size:
        raise argparse.ArgumentTypeError(f"case {text!r}: want PRESET:SIZE with PRESET in {sorted(presets.PRESETS)}")
    h, _, w = size.partition("x")
    return preset, (int(h), int(w or h))


def devices(names: list[str]) -> list[torch.device]:
    """The requested devices; ``cuda`` is skipped with a note when CUDA is not available."""
    out = []
    for name in names:
        if name.startswith("cuda") and not torch.cuda.is_available():
            print(f"note: {name} requested but CUDA is not available; skipped", file=sys.stderr)
            continue
        out.append(torch.device(name))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", type=parse_case, default=["cpu:80", "cpu:160", "paper:256"],
                        metavar="PRESET:SIZE", help="preset and patch (80: hippocampus, 160: ACDC, 256: paper)")
    parser.add_argument("--device", nargs="+", default=["cpu", "cuda"], help="devices (cuda skipped when absent)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--batches", type=int, default=3, help="timed batches per case, after one warm-up batch")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the preset's inference.batch_size")
    parser.add_argument("--warmup-slices", type=int, default=0, help="slices of the warm-up call (0: one batch)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")
    parser.add_argument("--n-classes", type=int, default=3, help="classes incl. background (hippocampus 3, ACDC 4)")
    parser.add_argument("--e2", choices=sorted(E2_SIZES), default="vit-b16", help="E2 embedding sizes")
    parser.add_argument("--no-decoder", dest="decoder", action="store_false", help="skip the decoder-only timing")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args()
    args.cases = [parse_case(c) if isinstance(c, str) else c for c in args.cases]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}, {platform.processor() or platform.machine()}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""), flush=True)
    rows = []
    for device in devices(args.device):
        for preset, patch in args.cases:
            rows.append(time_case(preset, patch, device, args))
    print(format_table(rows))
    if args.json:
        rows = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()} for r in rows]
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "args": {k: v for k, v in vars(args).items() if k != "cases"},
                       "cases": [f"{p}:{h}x{w}" for p, (h, w) in args.cases]}, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
