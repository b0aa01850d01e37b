"""Does QC-driven repair help? The figures of the repair stage, read from a finished run's report (issue 20).

On the labelled test subjects (foreground, real DSC against the manual masks), with the repair stage on:

- the mean real DSC of the user's best single source (the user source with the highest mean real DSC), of the
  cohort segmenter before refinement (``<source>``) and after it (``<source>_refined``), of the QC-based selection
  (``selection.parquet``: over the user's sources and, as ``selection.repair_sources`` says, the segmenter's) and of
  the oracle choice (per subject, the highest real DSC of any of those candidates);
- on the subjects the loop flagged (``repair/rounds.parquet``, flagged in any round), the segmenter's mean real
  DSC before and after refinement and how many were repaired (real DSC >= 0.8 after, < 0.7 before);
- the checks of the issue's closing note (selection above the best single source and within 0.01 of the oracle;
  refinement raising the flagged subjects' mean real DSC) as PASS/MISS;
- the cost: the ``repair`` rule's wall time (its Snakemake benchmark file), in minutes per 100 cohort subjects and
  per 100 subjects refined on.

Everything is also written as JSON, ``<run>/report/benchmark_repair.json``.

Usage, on a run of the real-segmenter benchmark with the repair stage on (2 CPU cores):
    .venv/bin/python benchmarks/real_segmenters.py --cohort acdc --set repair.enabled=true \\
        --set selection.repair_sources=compete
    .venv/bin/python benchmarks/repair.py results/bench_real/acdc
or on any finished run with ``repair.enabled: true``: ``benchmarks/repair.py results/<cohort>``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from nnqc_pipe.data.io import read_parquet_metadata

FOREGROUND = "foreground"
REPAIRED_AFTER, REPAIRED_BEFORE = 0.8, 0.7  # a flagged subject is repaired: real DSC >= 0.8 after, < 0.7 before
ORACLE_GAP = 0.01  # the closing note's target: selection within this of the oracle


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else math.nan


def _check(a: float, b: float, holds: Any) -> bool | None:
    """``holds(a, b)``, or None when either figure is NaN."""
    return None if math.isnan(a) or math.isnan(b) else bool(holds(a, b))


def real_dsc_table(subjects: pd.DataFrame) -> pd.DataFrame:
    """Subject x source real foreground DSC of the labelled rows (gt and the degraded levels left out)."""
    rows = subjects[(subjects["label"] == FOREGROUND) & subjects["real_dsc"].notna()]
    rows = rows[(rows["source"] != "gt") & ~rows["source"].astype(str).str.startswith("degraded_")]
    return rows.pivot_table(index="subject", columns="source", values="real_dsc", aggfunc="mean")


def summarise(subjects: pd.DataFrame, selection: pd.DataFrame, rounds: pd.DataFrame, repair_sources: list[str],
              repair_seconds: float | None = None) -> dict[str, Any]:
    """The repair figures (module docstring) from the report's ``subjects`` and ``selection`` tables, the loop's
    ``rounds`` and the two repair source names (before, after refinement)."""
    before, after = repair_sources
    real = real_dsc_table(subjects)
    missing = [s for s in repair_sources if s not in real]
    if missing:
        raise ValueError(f"no labelled rows of {missing} in the report: was the run made with repair.enabled?")
    user = [s for s in real.columns if s not in repair_sources]
    evaluated = real.dropna(subset=repair_sources)
    per_user = evaluated[user].dropna(axis=1, how="any").mean(axis=0) if user else pd.Series(dtype=float)
    best_user = str(per_user.idxmax()) if len(per_user) else None
    chosen = selection.set_index("subject").reindex(evaluated.index)
    flagged_any = rounds.groupby("subject")["flagged"].any()
    flagged = evaluated[evaluated.index.isin(flagged_any[flagged_any].index)]
    repaired = flagged[(flagged[before] < REPAIRED_BEFORE) & (flagged[after] >= REPAIRED_AFTER)]
    figures = {
        "n_subjects": len(evaluated),
        "best_user_source": best_user,
        "best_user_real_dsc": float(per_user.max()) if best_user else math.nan,
        "segmenter_real_dsc": _mean(evaluated[before]),
        "refined_real_dsc": _mean(evaluated[after]),
        "selection_real_dsc": _mean(chosen["real_dsc"]),
        "n_selection_without_real_dsc": int(chosen["real_dsc"].isna().sum()),
        "selected_sources": {str(k): int(v) for k, v in chosen["selected_source"].value_counts().items()},
        "oracle_real_dsc": _mean(evaluated[[*user, *repair_sources]].max(axis=1)),
        "n_flagged": int(flagged_any.sum()),
        "n_flagged_labelled": len(flagged),
        "flagged_segmenter_real_dsc": _mean(flagged[before]),
        "flagged_refined_real_dsc": _mean(flagged[after]),
        "n_repaired": len(repaired),
        "repaired_subjects": sorted(map(str, repaired.index)),
        "refinement_epochs": int(rounds["round"].max()) if len(rounds) else 0,
        "n_cohort_subjects": int(rounds["subject"].nunique()),
    }
    if repair_seconds is not None:
        figures["repair_minutes"] = repair_seconds / 60
        figures["minutes_per_100_cohort_subjects"] = 100 * repair_seconds / 60 / max(figures["n_cohort_subjects"], 1)
        figures["minutes_per_100_refined"] = (100 * repair_seconds / 60 / figures["n_flagged"]
                                              if figures["n_flagged"] else math.nan)
    best, selected, oracle = (figures[k] for k in ("best_user_real_dsc", "selection_real_dsc", "oracle_real_dsc"))
    flagged_before, flagged_after = figures["flagged_segmenter_real_dsc"], figures["flagged_refined_real_dsc"]
    figures["checks"] = {  # None: a figure is missing (no user source, nothing flagged)
        "selection_above_best_single_source": _check(best, selected, lambda b, s: s > b),
        "selection_within_0.01_of_oracle": _check(oracle, selected, lambda o, s: o - s <= ORACLE_GAP),
        "refinement_raises_flagged_real_dsc": _check(flagged_before, flagged_after, lambda b, a: a > b),
    }
    return figures


def json_safe(value: Any) -> Any:
    """NaN -> None, recursively (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def format_figures(figures: dict[str, Any]) -> str:
    """The figures as lines of text."""
    def number(value: Any) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    lines = [
        f"labelled test subjects: {figures['n_subjects']} (of {figures['n_cohort_subjects']} in the cohort)",
        f"mean real DSC: best user source ({figures['best_user_source']}) {number(figures['best_user_real_dsc'])}, "
        f"segmenter {number(figures['segmenter_real_dsc'])}, refined {number(figures['refined_real_dsc'])}, "
        f"QC selection {number(figures['selection_real_dsc'])}, oracle {number(figures['oracle_real_dsc'])}",
        f"selected: {figures['selected_sources']} ({figures['n_selection_without_real_dsc']} without a real DSC)",
        f"flagged: {figures['n_flagged']} ({figures['n_flagged_labelled']} labelled); their segmenter real DSC "
        f"{number(figures['flagged_segmenter_real_dsc'])} -> {number(figures['flagged_refined_real_dsc'])} after "
        f"{figures['refinement_epochs']} epoch(s); repaired (>= {REPAIRED_AFTER} after, < {REPAIRED_BEFORE} before): "
        f"{figures['n_repaired']} {figures['repaired_subjects']}",
    ]
    if "repair_minutes" in figures:
        lines.append(f"cost: {figures['repair_minutes']:.1f} min for the repair rule, "
                     f"{number(figures['minutes_per_100_cohort_subjects'])} min per 100 cohort subjects, "
                     f"{number(figures['minutes_per_100_refined'])} min per 100 subjects refined")
    lines += [f"{'n/a ' if ok is None else 'PASS' if ok else 'MISS'} {name}" for name, ok in figures["checks"].items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run's cohort folder, results/<cohort>")
    args = parser.parse_args()
    report, repair = args.run / "report", args.run / "repair"
    if not (repair / "rounds.parquet").is_file():
        print(f"no {repair / 'rounds.parquet'}: run the pipeline with repair.enabled: true", file=sys.stderr)
        return 1
    sources = read_parquet_metadata(report / "selection.parquet")["repair_sources"]
    timing = args.run / "benchmarks" / "repair.tsv"
    seconds = float(pd.read_csv(timing, sep="\t")["s"].iloc[0]) if timing.is_file() else None
    figures = summarise(pd.read_parquet(report / "subjects.parquet"), pd.read_parquet(report / "selection.parquet"),
                        pd.read_parquet(repair / "rounds.parquet"), sources, seconds)
    figures["stopped"] = read_parquet_metadata(repair / "rounds.parquet").get("stopped")
    print(format_figures(figures))
    print(f"loop stopped: {figures['stopped']}")
    out = report / "benchmark_repair.json"
    out.write_text(json.dumps(json_safe(figures), indent=2) + "\n")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
