"""Variants of the learned opinion's QC network against the run's own (issue 17's ablations): the pGT as an extra
input channel, and 3D instead of 2D.

The QC network (``nnqc_pipe.models.qcnet``) normally sees the image slice and the one-hot candidate. The variants,
each trained on the same candidates, with the same settings and seed, as the run's own network (the ``control``;
its training is deterministic: docs/method.md, "Each candidate kind left out"):

- ``pgt_channel``: also sees the one-hot pGT nnQC generates for the same candidate
  (:func:`nnqc_pipe.models.qcnet.build_qcnet` with ``pgt_channel``). The catch the issue names: the pGTs of the QC
  network's training candidates come from an LDM that trained on those very subjects, so they are more accurate than
  any pGT it will see at test time. The script measures that optimism first (nnQC's DSC error on the training
  candidates against the test candidates', same grid) and then trains with those pGTs anyway: the figures say what
  the channel is worth where the optimism is *not* handled (k-fold LDMs would handle it, at k times the LDM's cost).
- ``3d``: the same network in 3D (``qcnet.spatial_dims: 3``) on each whole candidate stack.

``--seeds`` retrains every variant with other seeds (the control too), so that a difference can be read against
the spread of one network's retrainings.

Reads an existing real-segmenter benchmark run (``benchmarks/real_segmenters.py``: its config, split, models,
preprocessed stacks, learned candidates, degraded candidates and the report's real DSC); writes only under
``--work``: ``pgt/{subject}.npz`` (the training candidates' pGTs, patch grid; ``pgt_channel`` only),
``models/<variant>_seed<N>/qcnet.pt`` and ``candidates.csv`` (every test candidate's learned DSC from every network,
and the real DSC). A rerun reuses what exists. The figures (foreground, the test subjects' ``gt``,
``degraded_L1..5`` and user sources):

    python benchmarks/learned_variants.py --run results/bench_real/hippocampus --work results/pgt_channel \
        --variants control pgt_channel 3d --seeds 0 1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.metrics import roc_auc_score

from nnqc_pipe.data.io import write_npz
from nnqc_pipe.data.plan import read_plan
from nnqc_pipe.data.preprocess import load_candidate, load_preprocessed, to_patch_space
from nnqc_pipe.data.split import read_split
from nnqc_pipe.dice import dice
from nnqc_pipe.models.embed import load_embeddings
from nnqc_pipe.models.pgt import PGTModels, generate_pgt, load_models
from nnqc_pipe.models.presets import model_settings, resolve
from nnqc_pipe.models.qcnet import QCNet, load_candidate_set, load_qcnet, train_qcnet, volume_dsc
from nnqc_pipe.stages.infer import subject_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import candidate_paths  # noqa: E402

log = logging.getLogger("learned_variants")

FOREGROUND = "foreground"
FAIL_DSC = 0.7
# Each variant's change to the run's QC network settings (``pgt_channel`` also trains on the candidates' pGTs).
VARIANTS: dict[str, dict[str, Any]] = {"control": {}, "pgt_channel": {}, "3d": {"spatial_dims": 3}}


def candidate_pgt(models: PGTModels, run: Path, subject: str, candidate: np.ndarray, inference: dict[str, Any],
                  seed: int) -> np.ndarray:
    """nnQC's pGT (class indices, patch grid) of one class-index candidate stack, drawn as the infer stage draws it
    (the subject's seed, the run's DDIM steps and samples)."""
    pre = load_preprocessed(run / "preprocessed" / f"{subject}.npz")
    embeddings_path = run / "embeddings" / f"{subject}.npz"
    embeddings = load_embeddings(embeddings_path) if embeddings_path.is_file() else None
    result = generate_pgt(models, candidate, pre.slice_ratio, embeddings, image=pre.image,
                          ddim_steps=int(inference["ddim_steps"]), n_samples=int(inference["samples"]),
                          batch_size=int(inference["batch_size"]), seed=subject_seed(seed, subject))
    return result.probabilities.argmax(1).astype(np.uint8)


def training_pgts(models: PGTModels, run: Path, subjects: list[str], inference: dict[str, Any], seed: int,
                  work: Path) -> list[dict[str, float]]:
    """Write the pGT of every learned training candidate of ``subjects`` (``work/pgt/{subject}.npz``, key ``pgts``
    [N, S, H, W], the candidates' order) and return nnQC's foreground DSC against the real one per candidate."""
    rows = []
    for i, subject in enumerate(subjects):
        path = work / "pgt" / f"{subject}.npz"
        with np.load(run / "learned" / "candidates" / f"{subject}.npz") as data:
            candidates, kinds, real = data["candidates"], data["kinds"], data["real_dsc"][:, 0]
        if path.is_file():
            with np.load(path) as cached:
                pgts = cached["pgts"]
        else:
            pgts = np.stack([candidate_pgt(models, run, subject, c, inference, seed) for c in candidates])
            write_npz(path, pgts=pgts)
        for kind, cand, pgt, dsc in zip(kinds, candidates, pgts, real, strict=True):
            rows.append({"subject": subject, "kind": str(kind), "real": float(dsc), "nnqc": dice(cand > 0, pgt > 0)})
        log.info("training pGTs: %s (%d/%d)", subject, i + 1, len(subjects))
    return rows


def test_candidates(config: dict[str, Any], run: Path, subjects: list[str]) -> list[tuple[str, str, str]]:
    """(subject, source, mask path) of every test candidate scored here (:func:`bench_utils.candidate_paths`)."""
    return [(s, source, path) for s in subjects for source, path in candidate_paths(config, run, s).items()]


def learned_dsc(net: QCNet, image: np.ndarray, candidate: np.ndarray, pgt: np.ndarray | None) -> float:
    """The network's counted foreground DSC of one candidate volume (patch grid, as the infer stage counts it)."""
    probs = torch.as_tensor(net.probabilities(image, candidate, pgt))
    return float(volume_dsc(probs, torch.as_tensor(candidate).long(), net.n_classes)[0])


def score_test(models: PGTModels, networks: dict[str, QCNet], run: Path, config: dict[str, Any],
               subjects: list[str], inference: dict[str, Any], seed: int) -> pd.DataFrame:
    """Every network's learned DSC and nnQC's pGT DSC of every test candidate (:func:`test_candidates`)."""
    rows = []
    for subject, source, path in test_candidates(config, run, subjects):
        pre = load_preprocessed(run / "preprocessed" / f"{subject}.npz")
        candidate = to_patch_space(load_candidate(path, pre.record), pre.record)
        pgt = candidate_pgt(models, run, subject, candidate, inference, seed)
        rows.append({"subject": subject, "source": source, "nnqc_patch": dice(candidate > 0, pgt > 0),
                     **{name: learned_dsc(net, pre.image, candidate, pgt if net.pgt_channel else None)
                        for name, net in networks.items()}})
    return pd.DataFrame(rows)


def network_path(run: Path, work: Path, variant: str, seed: int, run_seed: int) -> Path:
    """Where a network of ``variant`` (a key of :data:`VARIANTS`) trained with ``seed`` lies: the run's own
    network is the control at the run's seed."""
    if variant == "control" and seed == run_seed:
        return run / "models" / "qcnet.pt"
    return work / "models" / f"{variant}_seed{seed}" / "qcnet.pt"


def variant_config(cfg: dict[str, Any], variant: str) -> dict[str, Any]:
    """The resolved model settings ``cfg`` with ``variant``'s QC network changes (:data:`VARIANTS`)."""
    return cfg | {"qcnet": cfg["qcnet"] | VARIANTS[variant]}


def train_network(run: Path, work: Path, roles: dict[str, list[str]], cfg: dict[str, Any], variant: str, seed: int,
                  out: Path, device: str) -> None:
    """Train one QC network of ``variant`` on the run's learned candidates (with their pGTs for ``pgt_channel``)."""
    pgt_npz = str(work / "pgt" / "{subject}.npz") if variant == "pgt_channel" else None
    sets = [load_candidate_set(roles[r], str(run / "learned" / "candidates" / "{subject}.npz"),
                               str(run / "preprocessed" / "{subject}.npz"), pgt_npz) for r in ("train", "val")]
    train_qcnet(*sets, variant_config(cfg, variant), out.parent, device, seed)


def summary(table: pd.DataFrame, predictors: list[str]) -> pd.DataFrame:
    """Per predictor: r and MAE over all candidates; real models' r, MAE and failure AUC (real DSC < 0.7); Pearson r
    inside the best real model; the atlas model's MAE; ``gt``'s mean score."""
    real_sources = sorted(s for s in table.source.unique() if s != "gt" and not s.startswith("degraded_"))
    models_ = table[table.source.isin(real_sources)]
    best = models_.groupby("source").real.mean().idxmax() if len(models_) else None
    rows = []
    for p in predictors:
        row = {"predictor": p, "all_r": np.corrcoef(table[p], table.real)[0, 1],
               "all_mae": (table[p] - table.real).abs().mean(),
               "real_r": np.corrcoef(models_[p], models_.real)[0, 1],
               "real_mae": (models_[p] - models_.real).abs().mean()}
        failed = models_.real < FAIL_DSC
        row["real_auc"] = roc_auc_score(failed, -models_[p]) if 0 < failed.sum() < len(failed) else np.nan
        if best is not None:
            inside = models_[models_.source == best]
            row[f"within_{best}_r"] = np.corrcoef(inside[p], inside.real)[0, 1]
        atlas = table[table.source == "atlas"]
        row["atlas_mae"] = (atlas[p] - atlas.real).abs().mean() if len(atlas) else np.nan
        row["gt_mean"] = table.loc[table.source == "gt", p].mean()
        rows.append(row)
    return pd.DataFrame(rows).set_index("predictor")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a real-segmenter benchmark run (<results>/<cohort>)")
    parser.add_argument("--work", type=Path, required=True, help="folder for this script's outputs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the run's)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["control", "pgt_channel"],
                        help="the networks to train and compare (default: control pgt_channel)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run, work = args.run.resolve(), args.work.resolve()
    config = yaml.safe_load((run.parent / f"benchmark_real_{run.name}.yaml").read_text())
    seed = int(config.get("seed", 0))
    plan_ = read_plan(run / "plan.json").raw
    settings = {"preset": config["preset"], "model": config.get("model", {}), "expert": config.get("expert", {}),
                "perceptual_weights": None, "tiny_checkpoint": str(run / "models" / "tiny_vision_expert.pt")}
    cfg = resolve(settings["preset"], model_settings(settings, plan_), plan_)
    inference = {"ddim_steps": cfg["inference"]["ddim_steps"], "samples": config.get("inference", {}).get(
        "samples", 2), "batch_size": config.get("inference", {}).get("batch_size", 64)}
    roles = read_split(run / "split.tsv")
    models = load_models(run / "models", args.device)

    started = time.time()
    train_rows = pd.DataFrame()
    if "pgt_channel" in args.variants:
        train_rows = pd.DataFrame(training_pgts(models, run, roles["train"] + roles["val"], inference, seed, work))
        log.info("training pGTs: %.0f s", time.time() - started)
    networks = {}
    for training_seed in args.seeds or [seed]:
        for variant in args.variants:
            path = network_path(run, work, variant, training_seed, seed)
            if not path.is_file():
                train_network(run, work, roles, cfg, variant, training_seed, path, args.device)
            networks[f"{variant}_seed{training_seed}"] = load_qcnet(path, args.device)
    report = pd.read_parquet(run / "report" / "subjects.parquet")
    real = report[report.label == FOREGROUND].set_index(["subject", "source"]).real_dsc
    table = score_test(models, networks, run, config, roles["test"], inference, seed)
    table["real"] = [real[(s, src)] for s, src in zip(table.subject, table.source, strict=True)]
    table["nnqc"] = [report.loc[(report.label == FOREGROUND) & (report.subject == s) & (report.source == src),
                                "predicted_dsc"].iloc[0] for s, src in zip(table.subject, table.source, strict=True)]
    table.to_csv(work / "candidates.csv", index=False)

    if len(train_rows):
        train_rows["kind"] = train_rows.kind.str.replace(r"_\d+$", "", regex=True)
        test_error = (table.nnqc_patch - table.real).abs()
        print("nnQC's pGT on the LDM's own training subjects vs the test subjects (foreground, patch grid):")
        print(f"  training candidates: MAE {(train_rows.nnqc - train_rows.real).abs().mean():.3f}, gt scored "
              f"{train_rows.loc[train_rows.kind == 'gt', 'nnqc'].mean():.3f}")
        print(f"  test candidates:     MAE {test_error.mean():.3f}, gt scored "
              f"{table.loc[table.source == 'gt', 'nnqc_patch'].mean():.3f}")
    board = summary(table, [*networks, "nnqc"])
    print(f"\nlearned DSC of each variant (control at seed {seed}: the run's own network), and nnQC:")
    print(board.round(3).to_string())
    if len(args.seeds or []) > 1:
        variant = board.index.str.replace(r"_seed\d+$", "", regex=True)
        print("\nper variant over the seeds: mean (standard deviation)")
        spread = board.groupby(variant).agg(["mean", "std"])
        print(spread.round(3).to_string())
    print("\nmean per source:")
    print(table.groupby("source")[["real", *networks, "nnqc"]].mean().round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
