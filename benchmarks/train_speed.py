"""Training speed of both stages per preset, and optionally a full cpu-preset training run on the hippocampus.

Speed: a few training steps of the VAE-GAN and of the LDM (corruption sampling included) on synthetic slices of
the preset's size, timed after one warm-up step; prints slices/s per stage.

    python benchmarks/train_speed.py                  # cpu (64², the preset's batches) and paper (256², batch 4)
    python benchmarks/train_speed.py --presets cpu --iters 20 --threads 1

Real run (``--hippocampus``): fingerprint, plan and preprocessing of the shared MSD hippocampus cohort with the
package's own modules, 48 training / 12 validation subjects, tiny-fallback embeddings, then ``train_vae`` and
``train_ldm`` with the cpu preset; prints wall time per stage and the validation pGT Dice per severity.

    python benchmarks/train_speed.py --hippocampus --out /tmp/hippo
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_utils import CPU, E2_SIZES, synthetic_labels, timed

from nnqc_pipe.models import presets
from nnqc_pipe.models.autoencoder import autoencoder_kwargs, build_autoencoder, one_hot
from nnqc_pipe.models.ldm import toe_kwargs
from nnqc_pipe.models.pgt import PGTModels
from nnqc_pipe.models.train_ldm import LDMTrainer, corrupt_batch
from nnqc_pipe.models.train_vae import VAETrainer

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "hippocampus"
VIT_B16 = E2_SIZES["vit-b16"]


def vae_speed(cfg: dict, labels: np.ndarray, iters: int, device: torch.device = CPU,
              deadline: float | None = None) -> float:
    """VAE-GAN training slices/s (generator and discriminator updates, adversarial term on)."""
    trainer = VAETrainer(cfg, device)
    target = one_hot(torch.as_tensor(labels, device=device), cfg["n_classes"])
    return len(labels) / timed(lambda: trainer.train_step(target, adversarial=True), iters, device, deadline)


def ldm_speed(cfg: dict, labels: np.ndarray, iters: int, rng: np.random.Generator,
              device: torch.device = CPU, images: np.ndarray | None = None,
              deadline: float | None = None) -> float:
    """LDM training slices/s: on-the-fly corruption and its encoding, noising, UNet + ToE step, EMA.

    ``images`` [B, H, W] are the image slices of the batch (random noise when None and the model takes them).
    """
    trainer = LDMTrainer(cfg, toe_kwargs(cfg, **VIT_B16), device)
    vae = build_autoencoder(autoencoder_kwargs(cfg)).to(device).eval()
    models = PGTModels(vae=vae, ldm=trainer.ema.module, scale_factor=1.0, cfg=cfg, device=device)
    n, factor = len(labels), 2 ** (len(cfg["vae"]["channels"]) - 1)
    size = labels.shape[-1] // factor
    z0 = torch.randn(n, cfg["vae"]["latent_channels"], size, size, device=device)
    emb: dict[str, Any] = {
        "pooled": torch.randn(n, VIT_B16["pooled_dim"], device=device),
        "tokens": torch.randn(n, VIT_B16["n_tokens"], VIT_B16["token_dim"], device=device),
    }
    image = None
    if models.needs_image:
        image = torch.as_tensor(images, dtype=torch.float32, device=device) if images is not None else torch.randn(
            labels.shape, device=device)

    def step() -> None:
        candidates = corrupt_batch(labels, cfg["n_classes"], rng.uniform(0, 1, n), rng)
        cand = models.condition(torch.as_tensor(candidates, device=device), image)
        trainer.train_step(z0, cand, rng.uniform(0, 1, n).astype(np.float32), emb)

    return n / timed(step, iters, device, deadline)


def speed(args: argparse.Namespace) -> None:
    """Print slices/s of both stages for each requested preset."""
    rng = np.random.default_rng(0)
    sizes = {"paper": 256, "cpu": args.cpu_patch, "tiny": args.cpu_patch}
    print(f"torch threads: {torch.get_num_threads()}, classes: {args.n_classes}")
    print(f"{'preset':8} {'patch':>7} {'batch':>11} {'vae slices/s':>13} {'ldm slices/s':>13}")
    for name in args.presets:
        size = sizes[name]
        batch = {"vae": {"batch_size": args.paper_batch}, "ldm": {"batch_size": args.paper_batch}}
        overrides = batch if name == "paper" else {}
        cfg = presets.resolve(name, overrides, {"patch_size": [size, size], "n_classes": args.n_classes})
        vae_batch, ldm_batch = cfg["vae"]["batch_size"], cfg["ldm"]["batch_size"]
        torch.manual_seed(0)
        vae = vae_speed(cfg, synthetic_labels(vae_batch, size, args.n_classes, rng), args.iters)
        ldm = ldm_speed(cfg, synthetic_labels(ldm_batch, size, args.n_classes, rng), args.iters, rng)
        print(f"{name:8} {size:>4}x{size:<3}{vae_batch:>5}/{ldm_batch:<5} {vae:>13.2f} {ldm:>13.2f}", flush=True)


def prepare_hippocampus(
    data: Path, out: Path, n_train: int, seed: int, divisor: int, n_val: int | None = None,
    plan_overrides: dict[str, Any] | None = None,
) -> tuple[dict, list[str], list[str]]:
    """Fingerprint, plan (patch a multiple of ``divisor``, then ``plan_overrides``) and preprocess ``n_train``
    training and ``n_val`` validation subjects (default: all the others) with the package's modules."""
    from nnqc_pipe.config import validate_config
    from nnqc_pipe.data.fingerprint import compute_fingerprint
    from nnqc_pipe.data.inspect import inspect_subject
    from nnqc_pipe.data.plan import make_plan
    from nnqc_pipe.data.preprocess import preprocess_subject, save_preprocessed

    subjects = sorted(p.name.removesuffix(".nii.gz") for p in (data / "imagesTr").glob("*.nii.gz"))
    order = np.random.default_rng(seed).permutation(len(subjects))
    train = [subjects[i] for i in order[:n_train]]
    val = [subjects[i] for i in order[n_train : None if n_val is None else n_train + n_val]]
    config = validate_config(
        {
            "cohort": "hippocampus",
            "images": "{subject}",
            "modality": "MR",
            "label_names": {"1": "anterior", "2": "posterior"},
        }
    )
    images = {s: data / "imagesTr" / f"{s}.nii.gz" for s in subjects}
    labels = {s: data / "labelsTr" / f"{s}.nii.gz" for s in subjects}
    records = [inspect_subject(s, images[s], labels[s], [1, 2]) for s in train + val]
    plan_cfg = config["plan"] | {"divisor": divisor} | (plan_overrides or {})
    plan = make_plan(compute_fingerprint(records, "MR", {1: "anterior", 2: "posterior"}), plan_cfg)
    (out / "preprocessed").mkdir(parents=True, exist_ok=True)
    for s in train + val:
        save_preprocessed(preprocess_subject(s, images[s], labels[s], plan), out / "preprocessed" / f"{s}.npz")
    npz = {s: str(out / "preprocessed" / f"{s}.npz") for s in train + val}
    return plan, [npz[s] for s in train], [npz[s] for s in val]


def hippocampus(args: argparse.Namespace) -> None:
    """Train the cpu preset on the hippocampus cohort and report time and validation pGT Dice."""
    from nnqc_pipe.models.embed import embed_subject
    from nnqc_pipe.models.train_ldm import train_ldm
    from nnqc_pipe.models.train_vae import train_vae

    out = Path(args.out)
    started = time.perf_counter()
    overrides = json.loads(args.overrides) | {"encoder": {"tiny_fallback": True}}
    divisor = presets.required_divisor(presets.resolve("cpu", overrides, {"patch_size": [64, 64], "n_classes": 3}))
    plan, train, val = prepare_hippocampus(Path(args.data), out, args.n_train, args.seed, divisor)
    print(
        f"preprocessing: {time.perf_counter() - started:.0f} s, patch {plan['patch_size']}, "
        f"{len(train)} train / {len(val)} val subjects",
        flush=True,
    )
    cfg = presets.resolve("cpu", overrides, plan)
    emb_dir = out / "embeddings"
    started = time.perf_counter()
    emb = {}
    for path in train + val:
        emb[path] = str(emb_dir / Path(path).name)
        embed_subject(path, emb[path], cfg["encoder"], "cpu")
    print(f"embedding: {time.perf_counter() - started:.0f} s", flush=True)
    models = out / "models"
    stages = {
        "vae": lambda: train_vae(train, val, plan, cfg, models, "cpu", args.seed),
        "ldm": lambda: train_ldm(
            train,
            val,
            [emb[p] for p in train],
            [emb[p] for p in val],
            plan,
            cfg,
            models / "vae.pt",
            models,
            "cpu",
            args.seed,
        ),
    }
    for name, run in stages.items():
        started = time.perf_counter()
        run()
        print(f"train_{name}: {time.perf_counter() - started:.0f} s", flush=True)
    card = json.loads((models / "model_card.json").read_text())
    print(json.dumps({k: card[k] for k in ("patch_size", "scale_factor", "vae", "ldm")}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"], choices=sorted(presets.PRESETS))
    parser.add_argument("--iters", type=int, default=5, help="timed steps per stage (after one warm-up step)")
    parser.add_argument("--cpu-patch", type=int, default=64, help="slice size for the cpu and tiny presets")
    parser.add_argument("--paper-batch", type=int, default=4, help="batch of the paper preset here (32 on A100)")
    parser.add_argument("--n-classes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--hippocampus", action="store_true", help="run the real cpu-preset training instead")
    parser.add_argument("--data", default=str(HIPPOCAMPUS))
    parser.add_argument("--out", default="/tmp/nnqc_hippocampus")
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overrides", default="{}", help="JSON overrides of the cpu preset (hippocampus run)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.hippocampus:
        hippocampus(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
