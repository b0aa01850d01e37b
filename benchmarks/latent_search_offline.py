"""Wang et al.'s latent search, scored offline on an existing real-segmenter run with another joint VAE or other
search settings (docs/method.md, "More hearts, longer training (ACDC, offline)").

Every test subject's ``gt``, degradation levels and user sources (the repair stage's masks are left out) are
searched as the infer stage searches them: the window on nnQC's pGT of the same candidate (read from the run's
``pgt/`` folder, so the window is the pipeline's), the surrogate mapped back to the original grid and the
candidate's foreground DSC against it. With the run's own ``models/latent_vae.pt`` and its settings the figures
equal the report's ``latent_search_dsc`` (the ``pipeline`` column). Prints r, MAE and bias over all candidates, the
atlas model's mean and MAE and the mean per source; writes ``--out`` (CSV) when given.

    python benchmarks/latent_search_offline.py --run results/bench_real/acdc --vae other/latent_vae.pt \\
        --set image_weight=30
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from nnqc_pipe.data.preprocess import (
    invert_probabilities,
    load_candidate,
    load_preprocessed,
    to_patch_space,
    values_to_indices,
)
from nnqc_pipe.data.split import read_split
from nnqc_pipe.dice import dice
from nnqc_pipe.models.latent_search import LatentSearch, load_latent_search

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import candidate_paths  # noqa: E402

log = logging.getLogger("latent_search_offline")

FOREGROUND = "foreground"


def search_dsc(search: LatentSearch, run: Path, subject: str, source: str, path: str) -> float:
    """The candidate's foreground DSC against its surrogate on the original grid, the window on the run's pGT."""
    pre = load_preprocessed(run / "preprocessed" / f"{subject}.npz")
    record = pre.record
    values = load_candidate(path, record)
    pgt = to_patch_space(load_candidate(run / "pgt" / source / f"{subject}.nii.gz", record, "pGT"), record)
    surrogate = invert_probabilities(search.probabilities(pre.image, to_patch_space(values, record), pgt), record) > 0
    return dice(values_to_indices(values, record["label_values"]) > 0, surrogate)


def figures(table: pd.DataFrame, column: str) -> str:
    """One line: r, MAE and bias of ``column`` against ``real`` over all rows, and the atlas model's mean and MAE."""
    error = table[column] - table.real
    atlas = table[table.source == "atlas"]
    line = (f"{column:10s} r {np.corrcoef(table[column], table.real)[0, 1]:.3f}  MAE {error.abs().mean():.3f}  "
            f"bias {error.mean():+.3f}")
    if len(atlas):
        line += f"  atlas {atlas[column].mean():.3f} (MAE {(atlas[column] - atlas.real).abs().mean():.3f})"
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a real-segmenter benchmark run (<results>/<cohort>)")
    parser.add_argument("--vae", type=Path, help="a latent_vae.pt (default: the run's own)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a search setting (steps, lr, image_weight, mask_weight, prior_weight), repeatable")
    parser.add_argument("--subjects", type=int, help="only the first N test subjects")
    parser.add_argument("--out", type=Path, help="CSV of every candidate's scores")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run = args.run.resolve()
    config = yaml.safe_load((run.parent / f"benchmark_real_{run.name}.yaml").read_text())
    search = load_latent_search(args.vae or run / "models" / "latent_vae.pt", "cpu")
    changes = {}
    for item in args.sets:
        key, value = item.split("=", 1)
        changes[key] = type(getattr(search.settings, key))(float(value))
    search = LatentSearch(search.model, dataclasses.replace(search.settings, window="pgt", **changes))
    report = pd.read_parquet(run / "report" / "subjects.parquet")
    report = report[report.label == FOREGROUND].set_index(["subject", "source"])
    rows = []
    for subject in read_split(run / "split.tsv")["test"][: args.subjects]:
        for source, path in candidate_paths(config, run, subject).items():
            rows.append({"subject": subject, "source": source, "real": report.real_dsc[(subject, source)],
                         "pipeline": report.get("latent_search_dsc", pd.Series(dtype=float)).get((subject, source)),
                         "offline": search_dsc(search, run, subject, source, path)})
        log.info("%s searched", subject)
    table = pd.DataFrame(rows)
    if args.out:
        table.to_csv(args.out, index=False)
    print(f"{len(table)} candidates of {table.subject.nunique()} test subjects; search settings {search.settings}")
    for column in ("pipeline", "offline"):
        if table[column].notna().all():
            print(figures(table, column))
    print(table.groupby("source")[["real", "pipeline", "offline"]].mean().round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
