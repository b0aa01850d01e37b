"""Stage of ``rules/latent.smk``: Wang et al.'s latent-search QC opinion, its joint image–mask VAE
(:mod:`nnqc_pipe.models.latent_search`).

Torch is imported inside the function, so that importing this module (the command line does) stays cheap.
"""

from __future__ import annotations

from typing import Any

from nnqc_pipe.chunks import fill
from nnqc_pipe.data.io import PathLike
from nnqc_pipe.data.plan import read_plan
from nnqc_pipe.data.split import read_split


def train_latent_vae(split_tsv: PathLike, npz: str, plan_json: PathLike, settings: dict[str, Any], out_dir: PathLike,
                     device: str = "auto", seed: int = 0) -> None:
    """Train (or resume) the joint VAE on the train subjects' slices (image + label), selected on the val subjects'.

    Args:
        split_tsv: the split.
        npz: preprocessed .npz path pattern with {subject}.
        plan_json: the cohort's plan.json.
        settings: JSON object of the config's model settings.
        out_dir: models folder (latent_vae.pt, latent_vae_curves.csv).
        device: auto, cpu or cuda.
        seed: training seed.
    """
    from nnqc_pipe.models.latent_search import train_latent_vae as train_network
    from nnqc_pipe.models.presets import model_settings
    from nnqc_pipe.models.training import load_slices

    cfg = model_settings(settings, read_plan(plan_json).raw)
    train, val = (load_slices([fill(npz, subject=s) for s in subjects], cfg["patch_size"], cfg["n_classes"],
                              with_image=True) for subjects in (read_split(split_tsv)[r] for r in ("train", "val")))
    train_network(train, val, cfg, out_dir, device, seed)
