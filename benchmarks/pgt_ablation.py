"""Inference-time ablation of the pGT on a finished run: how does the QC error change with the reverse diffusion's
start (``inference.start_strength``: 1 = pure noise as in the paper, < 1 = SDEdit start from the noised candidate)?

It reuses a run's trained models and files (``<results>/<cohort>/``: ``models/``, ``preprocessed/``,
``embeddings/``, ``split.tsv``, the candidates of ``report/subjects.parquet``) and, for a seeded subset of the test
subjects and every source of theirs, samples the pGT with each start strength through the pipeline's own
``qc.infer.infer_subject`` and scores it with ``qc.metrics.compute_metrics`` on the original grid, as the ``infer`` and
``score`` rules do. Printed per start strength: predicted vs real foreground DSC over all candidates (r, MAE, bias),
the mean predicted DSC of ``gt`` and of each source, the within-source r of each real segmenter, and the seconds
per candidate. Figures are also written as JSON (``--json``).

Usage (after a full run, e.g. benchmarks/real_segmenters.py or benchmarks/accuracy.py):
    .venv/bin/python benchmarks/pgt_ablation.py --run results/bench_real/hippocampus \\
        --config results/bench_real/benchmark_hippocampus.yaml --strengths 1 0.6 0.4 --subjects 10
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from nnqc_pipe.chunks import fill
from nnqc_pipe.data.preprocess import indices_to_values, load_preprocessed, spacing_from_record
from nnqc_pipe.models.pgt import load_models
from nnqc_pipe.qc.infer import infer_subject
from nnqc_pipe.qc.metrics import compute_metrics

log = logging.getLogger("pgt_ablation")


def candidate_table(run: Path, config: Path, n_subjects: int, seed: int) -> pd.DataFrame:
    """(subject, source, candidate path, real foreground DSC) of a seeded subset of the run's test subjects."""
    subjects = pd.read_parquet(run / "report" / "subjects.parquet")
    fg = subjects[(subjects.label == "foreground") & subjects.real_dsc.notna()]
    names = sorted(fg.subject.unique())
    keep = sorted(np.random.default_rng(seed).permutation(names)[:n_subjects])
    rows = fg[fg.subject.isin(keep)][["subject", "source", "real_dsc"]].sort_values(["subject", "source"])
    patterns = candidate_patterns(run, config)
    rows["candidate"] = [fill(patterns[s], subject=subj) for subj, s in zip(rows.subject, rows.source, strict=True)]
    return rows.reset_index(drop=True)


def candidate_patterns(run: Path, config: Path) -> dict[str, str]:
    """Source -> candidate path pattern: the cohort config's labels (``gt``) and sources, the run's degraded levels."""
    cfg = yaml.safe_load(config.read_text())
    patterns = {"gt": cfg["labels"], **cfg.get("sources", {})}
    patterns.update({f"degraded_L{lv}": str(run / "degraded" / "{subject}" / f"L{lv}.nii.gz") for lv in range(1, 6)})
    return patterns


def predicted_dsc(models: Any, run: Path, subject: str, candidate: str, inference: dict[str, Any], seed: int) -> float:
    """Predicted foreground DSC of one candidate (candidate vs its pGT on the original grid)."""
    pre = load_preprocessed(run / "preprocessed" / f"{subject}.npz")
    embeddings = run / "embeddings" / f"{subject}.npz"
    result = infer_subject(models, pre, candidate, embeddings if embeddings.exists() else None, inference, seed)
    pgt = indices_to_values(result.pgt, pre.record["label_values"])
    names = dict(zip(pre.record["label_values"], pre.record["label_names"], strict=True))
    rows = compute_metrics(result.candidate, pgt, spacing_from_record(pre.record), names)
    return float(next(r["dsc"] for r in rows if r["label"] == "foreground"))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="<results>/<cohort> of a finished run")
    parser.add_argument("--config", type=Path, required=True, help="the cohort config the run used (absolute paths)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 0.6, 0.4])
    parser.add_argument("--subjects", type=int, default=10, help="test subjects (seeded subset)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    models = load_models(args.run / "models", "cpu")
    table = candidate_table(args.run, args.config, args.subjects, args.seed)
    log.info("%d candidates of %d subjects", len(table), table.subject.nunique())
    results = {}
    for strength in args.strengths:
        inference = {"ddim_steps": args.steps, "samples": args.samples, "batch_size": 64, "start_strength": strength}
        started = time.perf_counter()
        table["predicted"] = [predicted_dsc(models, args.run, s, c, inference, args.seed)
                              for s, c in zip(table.subject, table.candidate, strict=True)]
        results[strength] = summarise(table) | {"s_per_candidate": (time.perf_counter() - started) / len(table)}
        r = results[strength]
        print(f"start_strength {strength:g}: r {r['pearson_r']:.3f}  MAE {r['mae']:.3f}  bias {r['bias']:+.3f}  "
              f"{r['s_per_candidate']:.1f} s/candidate")
        for source, s in r["per_source"].items():
            within = "-" if s["within_r"] is None else f"{s['within_r']:.2f}"
            print(f"    {source:16s} predicted {s['mean_predicted']:.3f}  real {s['mean_real']:.3f}  "
                  f"MAE {s['mae']:.3f}  within-source r {within}")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
