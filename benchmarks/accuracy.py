"""How well does predicted quality match real quality on a cohort, and how long does the whole pipeline take?

Runs the WHOLE pipeline with snakemake on a cohort, then reads its report and prints the figures next to the
targets (PASS/MISS):

- DSC Pearson r and MAE, HD95 Pearson r and MAE (mm), for the foreground and per class, per source and over the
  pooled sources written by ``nnqc_pipe.report.tables``: ``all_degraded`` (the saved degradation levels L1..L5, the
  paper's controlled benchmark: the headline figures) and ``all`` (every source, ``gt`` included);
- Kendall tau of the ranking of the sources by mean predicted vs mean real foreground DSC (``ranking.parquet``);
- the wall time of each stage (the snakemake benchmark TSVs under ``<results>/<cohort>/benchmarks/``, summed per
  top-level rule: ``<rule>.tsv`` and ``<rule>/**/*.tsv``; with 2 cores two jobs overlap, so the sums can exceed
  the elapsed time) and the total wall time of the snakemake call.

Targets: DSC r >= 0.85, DSC MAE <= 0.10, HD95 r >= 0.85, tau = 1, whole pipeline <= 45 min on 2 cores.

The run uses a derived cohort config written next to the results (``<results>/benchmark_<cohort>.yaml``): the
cohort file with absolute image/label paths, ``results`` set to ``--results``, ``split.test_fraction`` 0.2 (an
80/20 split: train and val both come from the 80 %, ``split.val_fraction`` of it is kept for validation),
``preset`` set to ``--preset`` and the ``--set key=value`` overrides (dotted keys, YAML values) on top. Snakemake
runs from the repository root (``--directory``); its output goes to ``<results>/<cohort>/benchmark_snakemake.log``.
The printed table is also written as JSON (``--json``, default ``<results>/<cohort>/report/benchmark_accuracy.json``).

Usage (the full run takes ~45 min of both cores; run it on a quiet machine):
    .venv/bin/python benchmarks/accuracy.py --fresh                                # hippocampus, cpu preset, 2 cores
    .venv/bin/python benchmarks/accuracy.py --fresh --cohort-config config/cohorts/acdc.yaml
    .venv/bin/python benchmarks/accuracy.py --skip-run                             # summarise results/bench/hippocampus
    .venv/bin/python benchmarks/accuracy.py --skip-run --results results --cohort-config config/config.yaml
    # a small end-to-end check on the built-in demo phantoms:
    .venv/bin/python benchmarks/accuracy.py --fresh --cohort-config config/config.yaml --preset tiny \\
        --results /tmp/nnqc_bench --test-fraction 0.34 --set demo.n_subjects=6 --set split.val_fraction=0.25 \\
        --set plan.max_patch_size=32 --set model.vae.epochs=1 --set model.ldm.epochs=1 --set model.ldm.val_every=1 \\
        --set inference.ddim_steps=2 --set device=cpu

With ``--skip-run`` the total wall time is the one measured by the run that wrote the JSON, when there is one
(or ``--wall-s``), else the approximate span of the benchmark files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from nnqc_pipe.data.io import read_parquet_metadata

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "results" / "bench"
POOLS = ("all_degraded", "all")  # pooled sources in summary.parquet; the first gives the headline figures
HEADLINE_POOL, HEADLINE_LABEL = "all_degraded", "foreground"
METRICS = {"dsc": "DSC", "hd95_mm": "HD95"}
TARGETS = {
    "dsc_r": (">=", 0.85),
    "dsc_mae": ("<=", 0.10),
    "hd95_r": (">=", 0.85),
    "kendall_tau": (">=", 1.0),
    "total_wall_min": ("<=", 45.0),
}
# nnQC paper, mean over 10 datasets (docs/method.md); for orientation only.
PAPER = {"dsc_r": 0.89, "dsc_mae": 0.12, "hd95_r": 0.94, "hd95_mae": 9.54, "kendall_tau": 0.87}


# ---------------------------------------------------------------------------------------------------
# The derived config and the run
# ---------------------------------------------------------------------------------------------------


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set wants key=value, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part!r} is already set to a value")
        node[leaf] = yaml.safe_load(value)
    return out


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in recursively (new dicts; the inputs are not changed)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def absolute(pattern: str | None, base: Path) -> str | None:
    """A path pattern made absolute against ``base`` (the directory snakemake runs in)."""
    if pattern is None:
        return None
    return pattern if os.path.isabs(pattern) else str((base / pattern).resolve())


def derive_config(
    cohort: dict[str, Any], results: Path, preset: str | None, test_fraction: float, sets: dict[str, Any]
) -> dict[str, Any]:
    """The benchmark's cohort config: absolute paths, ``results``, the 80/20 split, the preset, then ``sets``.

    The demo cohort generates its data under the results folder, so with ``demo.enabled`` the image/label
    patterns are moved from the cohort's results folder to ``results``.
    """
    config = merge(cohort, {"results": str(results), "split": {"test_fraction": test_fraction}})
    if preset:
        config["preset"] = preset
    config = merge(config, sets)
    old_results = Path(cohort.get("results", "results"))
    for key in ("images", "labels"):
        pattern = config.get(key)
        if pattern is None:
            continue
        if config.get("demo", {}).get("enabled") and not os.path.isabs(pattern):
            try:
                pattern = str(results / Path(pattern).relative_to(old_results))
            except ValueError:
                pass
        config[key] = absolute(pattern, REPO)
    for name, pattern in dict(config.get("sources") or {}).items():
        config["sources"][name] = absolute(pattern, REPO)
    return config


def run_snakemake(config_path: Path, cores: int, log_path: Path, extra: Sequence[str] = (),
                  timeout: float | None = None) -> tuple[int, float]:
    """``snakemake --cores N --configfile <config>`` from the repository root; returns (exit code, wall seconds).

    With ``timeout`` (seconds) snakemake runs in its own process group, which is stopped then (SIGTERM, SIGKILL
    after 30 s), and the exit code is 124.
    """
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(REPO),
        "--cores", str(cores), "--configfile", str(config_path), *extra,
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print("running:", " ".join(cmd), f"> {log_path}", flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=timeout is not None)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
    return rc, time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------
# Summaries of the report and the benchmark files (small, tested functions)
# ---------------------------------------------------------------------------------------------------


def verdict(name: str, value: float | None) -> str:
    """PASS/MISS of ``value`` against ``TARGETS[name]``; ``n/a`` when the value is missing or undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    op, target = TARGETS[name]
    ok = value >= target - 1e-9 if op == ">=" else value <= target + 1e-9
    return "PASS" if ok else "MISS"


def agreement_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (source, label): n and Pearson r / MAE of DSC and HD95, pooled sources first, foreground first.

    Columns ``n``, ``dsc_r``, ``dsc_mae``, ``hd95_r``, ``hd95_mae`` (``n`` = subjects with a finite DSC pair).
    """
    rows = summary[summary["metric"].isin(list(METRICS))]
    wide = rows.pivot(index=["source", "label"], columns="metric", values=["pearson_r", "mae", "n"])
    out = pd.DataFrame(index=wide.index)
    for metric in METRICS:
        short = metric.split("_")[0]
        for stat, column in (("pearson_r", f"{short}_r"), ("mae", f"{short}_mae")):
            out[column] = wide[(stat, metric)].astype(float) if (stat, metric) in wide else math.nan
    out["n"] = wide[("n", "dsc")].fillna(0).astype(int) if ("n", "dsc") in wide else 0
    out = out.reset_index()
    out["pooled"] = out["source"].isin(POOLS)
    out["pool_order"] = out["source"].map({p: i for i, p in enumerate(POOLS)}).fillna(len(POOLS))
    out["label_order"] = (out["label"] != "foreground").astype(int)
    out = out.sort_values(["pool_order", "source", "label_order", "label"], kind="stable")
    return out[["source", "label", "pooled", "n", "dsc_r", "dsc_mae", "hd95_r", "hd95_mae"]].reset_index(drop=True)


def ranking_summary(ranking: pd.DataFrame) -> dict[str, Any]:
    """Kendall tau and the two orders of the ranked sources (best first)."""
    metric_col = next((c for c in ranking.columns if c.startswith("mean_predicted_")), None)
    metric = metric_col.removeprefix("mean_predicted_") if metric_col else "dsc"
    ranked = ranking.dropna(subset=["predicted_rank", "real_rank"])
    taus = ranking["kendall_tau"].dropna().unique()
    tau = float(taus[0]) if taus.size else math.nan
    return {
        "metric": metric,
        "kendall_tau": tau,
        "n_sources": int(len(ranked)),
        "predicted_order": ranked.sort_values(["predicted_rank", "source"])["source"].tolist(),
        "real_order": ranked.sort_values(["real_rank", "source"])["source"].tolist(),
        "sources": [
            {
                "source": r["source"],
                "mean_predicted": _num(r.get(f"mean_predicted_{metric}")),
                "mean_real": _num(r.get(f"mean_real_{metric}")),
                "predicted_rank": _int(r["predicted_rank"]),
                "real_rank": _int(r["real_rank"]),
            }
            for _, r in ranking.sort_values("source").iterrows()
        ],
    }


def benchmark_files(bench_dir: Path) -> dict[str, list[Path]]:
    """Top-level rule name -> its benchmark TSVs: ``<rule>.tsv`` and any ``<rule>/**/*.tsv`` below it."""
    found: dict[str, list[Path]] = {}
    if not bench_dir.is_dir():
        return found
    for path in sorted(bench_dir.glob("*.tsv")):
        found.setdefault(path.stem, []).append(path)
    for folder in sorted(p for p in bench_dir.iterdir() if p.is_dir()):
        files = sorted(folder.rglob("*.tsv"))
        if files:
            found.setdefault(folder.name, []).extend(files)
    return found


def stage_times(bench_dir: Path, since: float | None = None) -> pd.DataFrame:
    """Per top-level rule: jobs, summed and longest job wall seconds, summed CPU seconds, largest job RSS (MB).

    ``since`` (epoch seconds) keeps only files written at or after it (the jobs of this run). Also returns, in
    ``df.attrs``, the files left out as older and an approximate wall span of the counted jobs (first job start
    = min(mtime - s), last job end = max(mtime)).
    """
    rows, skipped, starts, ends = [], 0, [], []
    for rule, files in benchmark_files(bench_dir).items():
        jobs, wall, cpu, longest, rss = 0, 0.0, 0.0, 0.0, math.nan
        for path in files:
            mtime = path.stat().st_mtime
            if since is not None and mtime < since:
                skipped += 1
                continue
            table = pd.read_csv(path, sep="\t")
            seconds = pd.to_numeric(table["s"], errors="coerce").fillna(0.0)
            jobs += 1
            wall += float(seconds.sum())
            longest = max(longest, float(seconds.max()) if len(seconds) else 0.0)
            if "cpu_time" in table:
                cpu += float(pd.to_numeric(table["cpu_time"], errors="coerce").fillna(0.0).sum())
            if "max_rss" in table:
                rss = float(np.fmax(rss, pd.to_numeric(table["max_rss"], errors="coerce").max()))
            starts.append(mtime - float(seconds.sum()))
            ends.append(mtime)
        if jobs:
            rows.append({"rule": rule, "jobs": jobs, "wall_s": wall, "max_job_s": longest, "cpu_s": cpu,
                         "max_rss_mb": rss})
    df = pd.DataFrame(rows, columns=["rule", "jobs", "wall_s", "max_job_s", "cpu_s", "max_rss_mb"])
    df = df.sort_values("wall_s", ascending=False, kind="stable").reset_index(drop=True)
    df.attrs["skipped_older"] = skipped
    df.attrs["span_s"] = (max(ends) - min(starts)) if ends else math.nan
    return df


def target_checks(
    agreement: pd.DataFrame, ranking: dict[str, Any], total_wall_s: float | None, wall_source: str
) -> list[dict[str, Any]]:
    """The headline figures against the targets: DSC r/MAE and HD95 r of ``all_degraded`` foreground (else
    ``all``), Kendall tau, total wall time (minutes; ``wall_source`` says where it comes from)."""
    checks = []
    head = agreement[(agreement["source"] == HEADLINE_POOL) & (agreement["label"] == HEADLINE_LABEL)]
    if head.empty:
        head = agreement[(agreement["source"] == "all") & (agreement["label"] == HEADLINE_LABEL)]
    where = f"{head['source'].iloc[0]} {HEADLINE_LABEL}" if not head.empty else "no pooled rows"
    for name, title in (("dsc_r", "DSC Pearson r"), ("dsc_mae", "DSC MAE"), ("hd95_r", "HD95 Pearson r")):
        value = float(head[name].iloc[0]) if not head.empty else math.nan
        checks.append(_check(name, f"{title} ({where})", value))
    checks.append(_check("kendall_tau", f"Kendall tau ({ranking['n_sources']} sources)", ranking["kendall_tau"]))
    minutes = total_wall_s / 60 if total_wall_s is not None and not math.isnan(total_wall_s) else math.nan
    checks.append(_check("total_wall_min", f"whole pipeline, min ({wall_source})", minutes))
    return checks


def _check(name: str, title: str, value: float) -> dict[str, Any]:
    op, target = TARGETS[name]
    outcome = verdict(name, value)
    if "partial" in title:
        outcome = "n/a (partial run)"
    elif "approx" in title and outcome != "n/a":
        outcome += " (approx.)"
    return {"name": name, "figure": title, "value": _num(value), "target": f"{op} {target:g}",
            "paper": PAPER.get(name), "verdict": outcome}


def _num(value: Any) -> float | None:
    """A JSON-safe float (None for missing/NaN)."""
    if value is None or pd.isna(value):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def measured_wall(json_path: Path) -> float | None:
    """The snakemake wall time recorded by an earlier full run in ``json_path`` (None if none was)."""
    try:
        previous = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return None
    if previous.get("total_wall_source") == "snakemake call" and previous.get("total_wall_s") is not None:
        return float(previous["total_wall_s"])
    return None


def summarise(
    report_dir: Path, bench_dir: Path, total_wall_s: float | None = None, since: float | None = None
) -> dict[str, Any]:
    """Everything the benchmark prints, as one JSON-safe dict.

    Without ``total_wall_s`` (``--skip-run``) the total is the approximate wall span of the benchmark files.
    """
    summary = pd.read_parquet(report_dir / "summary.parquet")
    ranking = pd.read_parquet(report_dir / "ranking.parquet")
    subjects = pd.read_parquet(report_dir / "subjects.parquet")
    agreement = agreement_table(summary)
    rank = ranking_summary(ranking)
    stages = stage_times(bench_dir, since)
    if total_wall_s is not None:
        wall, wall_source = total_wall_s, "snakemake call"
        if stages.attrs["skipped_older"]:
            wall_source += f"; partial: {stages.attrs['skipped_older']} jobs done before"
    else:
        wall, wall_source = stages.attrs["span_s"], "approx.: span of the benchmark files"
    meta = read_parquet_metadata(report_dir / "summary.parquet")
    card = meta.get("model_card") or {}
    return {
        "report_dir": str(report_dir),
        "cohort": str(subjects["cohort"].iloc[0]) if len(subjects) else None,
        "config_hash": meta.get("config_hash"),
        "pipeline_version": meta.get("pipeline_version"),
        "model": {k: card.get(k) for k in ("preset", "patch_size", "n_classes", "conditioning_mode")},
        "n_subjects": {s: int(g["subject"].nunique()) for s, g in subjects.groupby("source")},
        "agreement": [{k: (_num(v) if isinstance(v, float) else v) for k, v in row.items()}
                      for row in agreement.to_dict("records")],
        "ranking": rank,
        "stages": stages.to_dict("records"),
        "stage_files_skipped_older": int(stages.attrs["skipped_older"]),
        "total_wall_s": _num(wall),
        "total_wall_source": wall_source,
        "targets": target_checks(agreement, rank, wall, wall_source),
    }


# ---------------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_report(result: dict[str, Any]) -> str:
    """The printed tables: agreement, ranking, stage times, targets."""
    model = result.get("model") or {}
    lines = [f"cohort {result['cohort']}  report {result['report_dir']}  config {result['config_hash']}",
             f"model: preset {model.get('preset')}, patch {model.get('patch_size')}, "
             f"{model.get('n_classes')} classes, conditioning {model.get('conditioning_mode')}",
             "subjects per source: " + ", ".join(f"{s} {n}" for s, n in result["n_subjects"].items()), ""]
    lines.append("Predicted vs real quality (per subject; pooled rows marked * carry the targets)")
    lines.append(f"  {'source':14} {'label':18} {'n':>4} {'DSC r':>12} {'DSC MAE':>12} {'HD95 r':>12} "
                 f"{'HD95 MAE mm':>11}")
    for row in result["agreement"]:
        cells = []
        for name in ("dsc_r", "dsc_mae", "hd95_r"):
            mark = f" {verdict(name, row[name])}" if row["pooled"] and row[name] is not None else ""
            cells.append(f"{_fmt(row[name])}{mark}")
        source = row["source"] + (" *" if row["pooled"] else "")
        lines.append(f"  {source:14} {row['label']:18} {row['n']:>4} {cells[0]:>12} {cells[1]:>12} {cells[2]:>12} "
                     f"{_fmt(row['hd95_mae'], 2):>11}")
    rank = result["ranking"]
    lines += ["", f"Ranking by mean {rank['metric']} ({rank['n_sources']} sources), Kendall tau = "
              f"{_fmt(rank['kendall_tau'])}",
              "  predicted: " + " > ".join(rank["predicted_order"]),
              "  real:      " + " > ".join(rank["real_order"])]
    for s in rank["sources"]:
        lines.append(f"  {s['source']:14} predicted {_fmt(s['mean_predicted'])} (rank {s['predicted_rank']})  "
                     f"real {_fmt(s['mean_real'])} (rank {s['real_rank']})")
    lines += ["", "Stage times (snakemake benchmark files, summed per rule; jobs overlap on several cores)",
              f"  {'rule':18} {'jobs':>5} {'wall s':>9} {'longest s':>10} {'cpu s':>9}"]
    for s in result["stages"]:
        lines.append(f"  {s['rule']:18} {s['jobs']:>5} {s['wall_s']:>9.1f} {s['max_job_s']:>10.1f} "
                     f"{s['cpu_s']:>9.1f}")
    total = sum(s["wall_s"] for s in result["stages"])
    lines.append(f"  {'sum of jobs':18} {sum(s['jobs'] for s in result['stages']):>5} {total:>9.1f}")
    if result["stage_files_skipped_older"]:
        lines.append(f"  ({result['stage_files_skipped_older']} benchmark files from earlier runs left out)")
    lines.append(f"  total wall time: {_fmt(result['total_wall_s'], 1)} s ({result['total_wall_source']})")
    lines += ["", "Targets", f"  {'figure':60} {'value':>9} {'target':>9} {'paper':>7}  verdict"]
    for c in result["targets"]:
        paper = "" if c["paper"] is None else f"{c['paper']:g}"
        lines.append(f"  {c['figure']:60} {_fmt(c['value']):>9} {c['target']:>9} {paper:>7}  {c['verdict']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort-config", type=Path, default=REPO / "config" / "cohorts" / "hippocampus.yaml")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results folder (results/<cohort>/)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--preset", default="cpu", help="model preset of the run (cpu, paper, tiny)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="split.test_fraction (0.2: 80/20)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, dotted key and YAML value, e.g. inference.ddim_steps=10 (repeatable)")
    parser.add_argument("--skip-run", action="store_true", help="only summarise an existing results folder")
    parser.add_argument("--fresh", action="store_true",
                        help="delete <results>/<cohort>/ first, so that the whole pipeline runs and is timed")
    parser.add_argument("--wall-s", type=float, help="with --skip-run: the run's measured wall time in seconds")
    parser.add_argument("--json", type=Path, help="default: <results>/<cohort>/report/benchmark_accuracy.json")
    parser.add_argument("snakemake_args", nargs="*", help="extra snakemake arguments after --, e.g. -- --keep-going")
    args = parser.parse_args()

    cohort = yaml.safe_load(args.cohort_config.read_text()) or {}
    results = args.results.resolve()
    out = results / cohort["cohort"]
    wall, since = args.wall_s, None
    if not args.skip_run:
        if args.fresh and out.exists():
            print(f"--fresh: removing {out}", flush=True)
            shutil.rmtree(out)
        elif out.exists():
            print(f"warning: {out} exists; snakemake only runs what is missing, so the total wall time is not the "
                  "whole pipeline's (use --fresh)", file=sys.stderr)
        config = derive_config(cohort, results, args.preset, args.test_fraction, parse_sets(args.sets))
        config_path = results / f"benchmark_{cohort['cohort']}.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        since = time.time() - 1.0
        rc, wall = run_snakemake(config_path, args.cores, out / "benchmark_snakemake.log", args.snakemake_args)
        print(f"snakemake finished with exit code {rc} after {wall:.1f} s", flush=True)
        if rc != 0:
            tail = (out / "benchmark_snakemake.log").read_text().splitlines()[-40:]
            print("\n".join(tail), file=sys.stderr)
            return rc
    report_dir = out / "report"
    if not (report_dir / "summary.parquet").is_file():
        print(f"no report at {report_dir}", file=sys.stderr)
        return 1
    json_path = args.json or report_dir / "benchmark_accuracy.json"
    if args.skip_run and wall is None:
        wall = measured_wall(json_path)
    result = summarise(report_dir, out / "benchmarks", wall, since)
    result["run"] = {"skip_run": args.skip_run, "cores": args.cores, "cohort_config": str(args.cohort_config),
                     "preset": None if args.skip_run else args.preset, "sets": args.sets,
                     "load_average": os.getloadavg()[0]}
    print(format_report(result))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
