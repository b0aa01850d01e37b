"""Inference-time ablation of the pGT on a trained run: how does the QC error change with the LDM checkpoint (the
one selected on validation pGT Dice, ``best``, or the last epoch's EMA, ``final``), with the reverse diffusion's
start (``inference.start_strength``: 1 = pure noise as in the paper, < 1 = SDEdit start from the noised candidate),
with the number of DDIM steps and noise draws, and with guidance on the image (``inference.image_guidance``, for a
model trained with ``ldm.image_dropout``)?

It reuses a run's trained models and files (``<results>/<cohort>/``: ``models/``, ``preprocessed/``,
``embeddings/``, ``split.tsv``, ``degraded/``) and the cohort config's labels and sources; for a seeded subset of
the test subjects and each of their sources it samples the pGT through the pipeline's own
``qc.infer.infer_subject`` and scores the candidate against it and against the GT with
``qc.metrics.compute_metrics`` on the original grid, as the ``infer`` and ``score`` rules do. Printed per setting:
predicted vs real foreground DSC over all candidates (r, MAE, bias), the mean predicted DSC of ``gt`` and of each
source, the within-source r of each real segmenter, and the seconds
per candidate. Figures are also written as JSON (``--json``).

Usage (after a full run, e.g. benchmarks/real_segmenters.py or benchmarks/accuracy.py):
    .venv/bin/python benchmarks/pgt_ablation.py --run results/bench_real/hippocampus \\
        --config results/bench_real/benchmark_real_hippocampus.yaml --weights best final --strengths 1 0.5 \\
        --subjects 6 --sources gt degraded_L3 degraded_L5 unet_e5 unet_e40 atlas
    .venv/bin/python benchmarks/pgt_ablation.py ... --steps 20 1 --samples 2 8 --guidances 1 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import yaml

from nnqc_pipe.chunks import fill
from nnqc_pipe.data.preprocess import indices_to_values, load_preprocessed, spacing_from_record
from nnqc_pipe.models.pgt import load_models
from nnqc_pipe.models.training import read_checkpoint
from nnqc_pipe.qc.infer import infer_subject
from nnqc_pipe.qc.metrics import compute_metrics

log = logging.getLogger("pgt_ablation")


def candidate_table(run: Path, config: Path, n_subjects: int, seed: int, sources: list[str] | None) -> pd.DataFrame:
    """(subject, source, candidate path) of a seeded subset of the run's test subjects and their sources."""
    split = pd.read_csv(run / "split.tsv", sep="\t")
    names = sorted(split.loc[split.role == "test", "subject"])
    keep = sorted(np.random.default_rng(seed).permutation(names)[:n_subjects])
    patterns = candidate_patterns(run, config)
    chosen = [s for s in patterns if sources is None or s in sources]
    rows = [{"subject": subj, "source": s, "candidate": fill(patterns[s], subject=subj)}
            for subj in keep for s in chosen]
    return pd.DataFrame(rows)


def candidate_patterns(run: Path, config: Path) -> dict[str, str]:
    """Source -> candidate path pattern: the cohort config's labels (``gt``) and sources, the run's degraded levels."""
    cfg = yaml.safe_load(config.read_text())
    patterns = {"gt": cfg["labels"], **cfg.get("sources", {})}
    patterns.update({f"degraded_L{lv}": str(run / "degraded" / "{subject}" / f"L{lv}.nii.gz") for lv in range(1, 6)})
    return patterns


def foreground_dsc(candidate: np.ndarray, reference: np.ndarray, record: dict[str, Any]) -> float:
    """Foreground DSC of two masks on the subject's original grid (the score rule's metric)."""
    names = {v: f"class_{v}" for v in record["label_values"]}
    rows = compute_metrics(candidate, reference, spacing_from_record(record), names)
    return float(next(r["dsc"] for r in rows if r["label"] == "foreground"))


def predicted_and_real(models: Any, run: Path, gt: str, subject: str, candidate: str, inference: dict[str, Any],
                       seed: int) -> tuple[float, float]:
    """Predicted (candidate vs its pGT) and real (candidate vs GT) foreground DSC of one candidate."""
    pre = load_preprocessed(run / "preprocessed" / f"{subject}.npz")
    embeddings = run / "embeddings" / f"{subject}.npz"
    result = infer_subject(models, pre, candidate, embeddings if embeddings.exists() else None, inference, seed)
    pgt = indices_to_values(result.pgt, pre.record["label_values"])
    label = np.asarray(nib.load(fill(gt, subject=subject)).dataobj)
    return foreground_dsc(result.candidate, pgt, pre.record), foreground_dsc(result.candidate, label, pre.record)


def load_weights(run: Path, weights: str) -> Any:
    """The run's models with the LDM's selected (``best``) or last-epoch EMA (``final``) weights."""
    models = load_models(run / "models", "cpu")
    if weights == "final":
        state = read_checkpoint(run / "models" / "ldm.pt")
        models.ldm.load_state_dict({k.removeprefix("module."): v for k, v in state["ema"].items()
                                    if k.startswith("module.")})
    return models


def summarise(table: pd.DataFrame) -> dict[str, Any]:
    """Agreement of predicted with real DSC over all candidates, per-source means and within-source r."""
    err = table.predicted - table.real_dsc
    out: dict[str, Any] = {"n": len(table), "pearson_r": float(np.corrcoef(table.predicted, table.real_dsc)[0, 1]),
                           "mae": float(err.abs().mean()), "bias": float(err.mean()), "per_source": {}}
    for source, rows in table.groupby("source"):
        within = (float(np.corrcoef(rows.predicted, rows.real_dsc)[0, 1])
                  if len(rows) > 2 and rows.real_dsc.std() > 0 and rows.predicted.std() > 0 else None)
        out["per_source"][source] = {"mean_predicted": float(rows.predicted.mean()),
                                     "mean_real": float(rows.real_dsc.mean()),
                                     "mae": float((rows.predicted - rows.real_dsc).abs().mean()), "within_r": within}
    return out


def setting_key(weights: str, inference: dict[str, Any]) -> str:
    """The name of one setting, e.g. ``best/start_strength=1/ddim_steps=20/samples=2/image_guidance=1``."""
    fields = ("start_strength", "ddim_steps", "samples", "image_guidance")
    return "/".join([weights] + [f"{name}={inference[name]:g}" for name in fields])


def print_result(key: str, r: dict[str, Any]) -> None:
    """One block of the printed table."""
    print(f"{key}: r {r['pearson_r']:.3f}  MAE {r['mae']:.3f}  bias {r['bias']:+.3f}  "
          f"{r['s_per_candidate']:.1f} s/candidate")
    for source, s in r["per_source"].items():
        within = "-" if s["within_r"] is None else f"{s['within_r']:.2f}"
        print(f"    {source:16s} predicted {s['mean_predicted']:.3f}  real {s['mean_real']:.3f}  "
              f"MAE {s['mae']:.3f}  within-source r {within}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="<results>/<cohort> of a finished run")
    parser.add_argument("--config", type=Path, required=True, help="the cohort config the run used (absolute paths)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 0.6, 0.4])
    parser.add_argument("--subjects", type=int, default=10, help="test subjects (seeded subset)")
    parser.add_argument("--steps", type=int, nargs="+", default=[20], help="DDIM steps (each is a setting)")
    parser.add_argument("--samples", type=int, nargs="+", default=[2], help="noise draws per slice (each a setting)")
    parser.add_argument("--guidances", type=float, nargs="+", default=[1.0],
                        help="inference.image_guidance values (1 = off; others need ldm.image_dropout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", nargs="+", choices=["best", "final"], default=["best"],
                        help="LDM weights: the selected checkpoint (best) and/or the last epoch's EMA (final)")
    parser.add_argument("--sources", nargs="+", default=None, help="sources to use (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    table = candidate_table(args.run, args.config, args.subjects, args.seed, args.sources)
    gt = candidate_patterns(args.run, args.config)["gt"]
    log.info("%d candidates of %d subjects", len(table), table.subject.nunique())
    results = {}
    settings = list(itertools.product(args.strengths, args.steps, args.samples, args.guidances))
    for weights in args.weights:
        models = load_weights(args.run, weights)
        for strength, steps, samples, guidance in settings:
            inference = {"ddim_steps": steps, "samples": samples, "batch_size": 64, "start_strength": strength,
                         "image_guidance": guidance}
            started = time.perf_counter()
            pairs = [predicted_and_real(models, args.run, gt, s, c, inference, args.seed)
                     for s, c in zip(table.subject, table.candidate, strict=True)]
            table["predicted"], table["real_dsc"] = zip(*pairs, strict=True)
            key = setting_key(weights, inference)
            results[key] = summarise(table) | {"s_per_candidate": (time.perf_counter() - started) / len(table)}
            print_result(key, results[key])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
