"""How often do the saved degradation levels land in their DSC bins, and how fast? (method step 3)

Loads every ``labelsTr/*.nii.gz`` of a cohort, reorients it to RAS, maps the label values to class indices
(sorted values of the whole cohort, background 0), runs :func:`nnqc_pipe.degrade.degrade_subject` with the
slice axis last, and prints the in-bin fraction per level and overall plus the seconds per subject.

    .venv/bin/python benchmarks/degradation_bins.py --data ../shared/data/hippocampus
    .venv/bin/python benchmarks/degradation_bins.py --data ../shared/data/acdc
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from nnqc_pipe.data.io import spacing_of
from nnqc_pipe.degrade import LEVEL_BINS, degrade_subject


def load_cohort(data: Path, limit: int | None) -> list[tuple[str, np.ndarray, tuple[float, float, float]]]:
    """(subject, RAS label values, spacing) for every label file, sorted by name."""
    paths = sorted((data / "labelsTr").glob("*.nii.gz"))[:limit]
    if not paths:
        raise SystemExit(f"no labelsTr/*.nii.gz under {data}")
    cohort = []
    for path in paths:
        img = nib.as_closest_canonical(nib.load(path))
        values = np.rint(np.asarray(img.dataobj)).astype(np.int64)
        cohort.append((path.name.removesuffix(".nii.gz"), values, spacing_of(img)))
    return cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/hippocampus"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="only the first N subjects")
    args = parser.parse_args()

    cohort = load_cohort(args.data, args.limit)
    label_values = np.unique(np.concatenate([np.unique(values) for _, values, _ in cohort]))
    label_values = label_values[label_values != 0]
    n_classes = 1 + label_values.size
    lookup = np.zeros(int(label_values.max()) + 1, dtype=np.uint8)
    lookup[label_values] = np.arange(1, n_classes, dtype=np.uint8)

    hits = {level: [] for level in LEVEL_BINS}
    seconds = []
    misses = []
    for subject, values, spacing in cohort:
        start = time.perf_counter()
        records = degrade_subject(lookup[values], spacing, n_classes, args.seed, subject, slice_axis=2)
        seconds.append(time.perf_counter() - start)
        for record in records:
            hits[record["level"]].append(record["in_bin"])
            if not record["in_bin"]:
                misses.append(f"{subject} L{record['level']}: DSC {record['dsc_foreground']:.3f}")

    print(f"cohort {args.data} — {len(cohort)} subjects, {n_classes} classes, seed {args.seed}")
    for level, (lo, hi) in LEVEL_BINS.items():
        print(
            f"  L{level} [{lo:.2f}, {hi:.2f}{']' if level == max(LEVEL_BINS) else ')'}: "
            f"{100 * np.mean(hits[level]):5.1f} % in bin"
        )
    overall = np.concatenate([np.asarray(h) for h in hits.values()])
    print(f"  overall: {100 * overall.mean():5.1f} % in bin ({overall.sum()}/{overall.size})")
    print(
        f"  time: {np.mean(seconds):.3f} s per subject (max {np.max(seconds):.3f} s), shape e.g. {cohort[0][1].shape}"
    )
    for miss in misses:
        print(f"  out of bin: {miss}")


if __name__ == "__main__":
    main()
