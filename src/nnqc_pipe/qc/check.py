"""``nnqc-pipe check``: QC of one image + mask outside Snakemake, with a trained model folder.

The plan is read from ``--plan`` or from the cohort folder of ``--model-dir`` (``<results>/<cohort>/plan.json``);
the image is preprocessed with it, embedded with the model's own vision expert when the conditioning uses the
image, the pGT sampled, mapped back to the image grid and compared with the mask. When the model folder holds the
learned opinion (``qcnet.pt``), its ``learned_dsc`` and ``learned_nsd`` are reported beside nnQC's scores, and
when it holds the latent search's VAE (``latent_vae.pt``), ``latent_search_dsc`` (with the search settings the VAE
was trained with).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pandas as pd

from nnqc_pipe.data.io import read_json
from nnqc_pipe.data.preprocess import indices_to_values, preprocess_subject, save_preprocessed, spacing_from_record
from nnqc_pipe.models.embed import embed_subject
from nnqc_pipe.models.latent_search import LATENT_VAE, load_latent_search
from nnqc_pipe.models.pgt import load_models
from nnqc_pipe.models.qcnet import QCNET, load_qcnet
from nnqc_pipe.qc.baselines import LATENT_PREFIX, LATENT_SEARCH_COLUMN, reconstruction_dice
from nnqc_pipe.qc.infer import infer_subject, save_inference
from nnqc_pipe.qc.learned import LEARNED_DSC, LEARNED_NSD, learned_dice, learned_scores
from nnqc_pipe.qc.metrics import compute_metrics

log = logging.getLogger(__name__)


def find_plan(model_dir: str | os.PathLike, plan: str | os.PathLike | None) -> dict:
    """The plan the models were trained with."""
    candidates = [Path(plan)] if plan else [Path(model_dir) / "plan.json", Path(model_dir).parent / "plan.json"]
    for path in candidates:
        if path.is_file():
            return read_json(path)
    raise FileNotFoundError(f"no plan.json found (looked at {[str(p) for p in candidates]}); pass --plan")


def check_case(image: str | os.PathLike, mask: str | os.PathLike, model_dir: str | os.PathLike,
               out: str | os.PathLike | None = None, plan: str | os.PathLike | None = None,
               ddim_steps: int | None = None, samples: int = 1, device: str = "auto", seed: int = 0,
               tolerance_mm: float = 2.0, start_strength: float = 1.0, image_guidance: float = 1.0) -> pd.DataFrame:
    """Predicted quality of ``mask`` for ``image``; writes the pGT to ``out`` when given. Returns the metrics.

    ``ddim_steps`` None: the step count of the model's preset (recorded in its checkpoint).
    """
    plan_ = find_plan(model_dir, plan)
    subject = Path(image).name.split(".")[0]
    models = load_models(model_dir, device)
    learned = load_qcnet(Path(model_dir) / QCNET, device) if (Path(model_dir) / QCNET).is_file() else None
    latent_path = Path(model_dir) / LATENT_VAE
    latent = load_latent_search(latent_path, device) if latent_path.is_file() else None
    pre = preprocess_subject(subject, image, None, plan_)
    steps = ddim_steps or int(models.cfg["inference"]["ddim_steps"])
    inference = {"ddim_steps": steps, "samples": samples, "batch_size": 64, "start_strength": start_strength,
                 "image_guidance": image_guidance}
    with tempfile.TemporaryDirectory() as tmp:
        embeddings = None
        if models.ldm.toe.uses_image:
            npz = Path(tmp) / "case.npz"
            save_preprocessed(pre, npz)
            embeddings = Path(tmp) / "embeddings.npz"
            embed_subject(npz, embeddings, models.cfg["encoder"], device)
        result = infer_subject(models, pre, mask, embeddings, inference, seed, learned, latent)
    if out:
        save_inference(result, pre.record, out, Path(out).with_suffix("").with_suffix(".slices.parquet"), None)
    names = dict(zip(plan_["label_values"], plan_["label_names"], strict=True))
    pgt = indices_to_values(result.pgt, plan_["label_values"])
    spacing = spacing_from_record(pre.record)
    table = pd.DataFrame(compute_metrics(result.candidate, pgt, spacing, names, tolerance_mm))
    if result.estimated is not None:
        estimated = indices_to_values(result.estimated, plan_["label_values"])
        scores = learned_scores(learned_dice(result.slices, names, plan_["label_values"]),
                                compute_metrics(result.candidate, estimated, spacing, names, tolerance_mm))
        for column, values in scores.items():
            table[column] = [values.get((label, None), float("nan")) for label in table["label"]]
    if latent is not None:
        scores = reconstruction_dice(result.slices, names, plan_["label_values"], LATENT_PREFIX)
        table[LATENT_SEARCH_COLUMN] = [scores.get((label, None), float("nan")) for label in table["label"]]
    return table


def check(image: str, mask: str, model_dir: str, out: str | None, plan: str | None, ddim_steps: int | None,
          samples: int, device: str, seed: int, start_strength: float = 1.0, image_guidance: float = 1.0) -> None:
    """Command-line entry: print the predicted scores of one case."""
    table = check_case(image, mask, model_dir, out, plan, ddim_steps, samples, device, seed,
                       start_strength=start_strength, image_guidance=image_guidance)
    columns = ["label", "dsc", "hd95_mm", "nsd", "iou", "ravd"]
    shown = table[columns].rename(columns=lambda c: c if c == "label" else f"predicted_{c}")
    for column in (LEARNED_DSC, LEARNED_NSD, LATENT_SEARCH_COLUMN):
        if column in table:
            shown[column] = table[column]
    print(shown.to_string(index=False))
