"""How long does snakemake take to build the DAG of a population-scale cohort? (target: <= 60 s for 10,000 subjects)

Generates, in a temporary folder, a cohort of N subjects whose image and label files are empty placeholders (the
DAG only needs them to exist) and a cohort config for it, then times `snakemake -n` in three situations:

1. ``fresh``: nothing computed yet. The dry run stops at the `split` checkpoint: the `inspect` chunk jobs + split.
2. ``after-split``: the checkpoint's outputs exist (fake inspect chunk records and per-subject records,
   subjects.tsv, split.tsv with the usual train/val/test shares), so the whole DAG is built: the preprocess, embed,
   degrade, infer and score chunk jobs (config ``chunks``: 50 subjects per job by default, ``--chunk-size``),
   training, report.
3. ``after-split --profile profiles/slurm``: the same with the cluster profile (its resources per rule; the chunk
   rules' time limits are computed per chunk).

With ``--labelled L`` only the first L subjects have a label file (train/val/test come from them, the others are
``unlabelled``) and ``--sources K`` gives every subject K user candidate masks; ``--study`` is the population
study of the README: 10,000 subjects, 500 labelled and 9,500 unlabelled, 3 sources; ``--study 100k`` the
population study of issue 19: 100,000 subjects, 5,000 labelled, 3 sources.

Job counts: every per-subject stage runs one job per chunk, so no rule may have more jobs than
ceil(subjects / chunk size) + ``JOB_SLACK`` (one partial chunk per role of split.tsv); the job count of every rule
of each dry run is printed against that bound and a rule above it is flagged (exit status 1), as is a DAG built in
more than 60 s.

Each dry run is run in a fresh process, as a user would. Two figures: "DAG built", the wall time until snakemake
prints its first job-stats table (Python start, workflow parsing, DAG building incl. the checkpoint update), and
"snakemake -n", the whole dry run (plus the listing of every job, which formats each job's shell command and
resources). The target applies to the first. With ``--profile`` the script also runs cProfile on the
after-split dry run and prints the top functions (cumulative time), to show where the time goes.

Usage:
    .venv/bin/python benchmarks/dag_scale.py                      # 10,000 subjects
    .venv/bin/python benchmarks/dag_scale.py --n-subjects 2000 --keep --profile
    .venv/bin/python benchmarks/dag_scale.py --study                      # 500 labelled + 9,500 unlabelled x 3
    .venv/bin/python benchmarks/dag_scale.py --n-subjects 100000 --labelled 5000 --sources 3   # = --study 100k
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO  # --workflow: measure another checkout (e.g. a copy with a proposed change)
TARGET_S = 60.0
JOB_SLACK = 4  # one partial chunk per role of split.tsv (train, val, test, unlabelled)
STUDIES = {"10k": (10_000, 500, 3), "100k": (100_000, 5_000, 3)}  # subjects, labelled, sources


def subject_names(n: int) -> list[str]:
    """The placeholder subjects' names, sorted (zero-padded to the width of the largest index)."""
    width = max(5, len(str(n - 1)))
    return [f"sub{i:0{width}d}" for i in range(n)]


def make_cohort(root: Path, n: int, chunk_size: int | None = None, labelled: int | None = None,
                sources: int = 0) -> Path:
    """Empty image placeholders, label placeholders for the first ``labelled`` subjects (default: all), ``sources``
    candidate placeholders per subject, and a cohort config; returns the config path."""
    images, labels = root / "data" / "imagesTr", root / "data" / "labelsTr"
    candidates = [root / "data" / f"model{k}" for k in range(sources)]
    for folder in (images, labels, *candidates):
        folder.mkdir(parents=True)
    n_labelled = n if labelled is None else labelled
    for i, subject in enumerate(subject_names(n)):
        name = f"{subject}.nii.gz"
        for folder in (images, *candidates, *([labels] if i < n_labelled else [])):
            (folder / name).touch()
    cfg = {
        "cohort": "scale",
        "results": str(root / "results"),
        "images": str(images / "{subject}.nii.gz"),
        "labels": str(labels / "{subject}.nii.gz"),
        "modality": "MR",
        "label_names": {"1": "foreground"},
        "split": {"test_fraction": 0.2, "seed": 42},
        "sources": {folder.name: str(folder / "{subject}.nii.gz") for folder in candidates},
    }
    if chunk_size is not None:
        cfg["chunks"] = {"subjects_per_job": chunk_size}
    path = root / "cohort.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fake_checkpoint(root: Path, n: int, chunk_size: int, labelled: int | None = None) -> None:
    """What `inspect` and the `split` checkpoint would have written: records, chunk records, subjects.tsv and
    split.tsv (the first ``labelled`` subjects cut into train/val/test, the others unlabelled)."""
    out = root / "results" / "scale"
    (out / "inspect").mkdir(parents=True, exist_ok=True)
    (out / "chunks" / "inspect").mkdir(parents=True, exist_ok=True)
    subjects = subject_names(n)
    for s in subjects:
        (out / "inspect" / f"{s}.json").write_text("{}")
    for index, start in enumerate(range(0, n, chunk_size)):
        rows = "".join(f"{s}\t\tinspect\t{out}/inspect/{s}.json\n" for s in subjects[start : start + chunk_size])
        (out / "chunks" / "inspect" / f"all-{index:04d}.tsv").write_text("subject\tsource\tkind\tpath\n" + rows)
    time.sleep(0.05)  # the checkpoint outputs must be newer than its inputs
    n_labelled = n if labelled is None else labelled
    n_test = round(0.2 * n_labelled)
    n_val = round(0.1 * (n_labelled - n_test))
    roles = ["test"] * n_test + ["val"] * n_val + ["train"] * (n_labelled - n_test - n_val)
    roles += ["unlabelled"] * (n - n_labelled)
    with open(out / "subjects.tsv", "w") as f:
        f.write("subject\tstatus\treason\tlabelled\timage\tlabel\n")
        for i, s in enumerate(subjects):
            label = f"{root}/data/labelsTr/{s}.nii.gz" if i < n_labelled else ""
            f.write(f"{s}\tok\t\t{i < n_labelled}\t{root}/data/imagesTr/{s}.nii.gz\t{label}\n")
    with open(out / "split.tsv", "w") as f:
        f.write("subject\trole\n")
        for s, r in zip(subjects, roles, strict=True):
            f.write(f"{s}\t{r}\n")


def dry_run(
    root: Path, config: Path, extra: list[str], log: Path, prof: Path | None = None
) -> tuple[float, float, str]:
    """One `snakemake -n` in a fresh process. Returns (seconds until the DAG is built, i.e. until snakemake prints
    its first job-stats table, seconds of the whole dry run including the listing of every job, the table)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # the cluster profile reads these; any value will do for a dry run
    env.setdefault("NNQC_SLURM_CPU_PARTITION", "cpu")
    env.setdefault("NNQC_SLURM_GPU_PARTITION", "gpu")
    head = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "snakemake"] if prof else ["snakemake"]
    cmd = [
        *head,
        "-n",
        "--snakefile",
        str(WORKFLOW / "Snakefile"),
        "--directory",
        str(root),
        "--configfile",
        str(config),
        "--quiet",
        "rules",
        *extra,
    ]
    t0 = time.perf_counter()
    t_dag = None
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=WORKFLOW, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if t_dag is None and line.startswith("Job stats:"):
                t_dag = time.perf_counter() - t0
            f.write(line)
        rc = proc.wait()
    dt = time.perf_counter() - t0
    text = log.read_text()
    if rc != 0:
        sys.exit(f"snakemake -n failed (rc {rc}); see {log}:\n{text[-3000:]}")
    stats = text[text.find("Job stats:") :].split("\n\n")[0] if "Job stats:" in text else "(no job stats)"
    return (t_dag if t_dag is not None else dt), dt, stats


def job_counts(stats: str) -> dict[str, int]:
    """Rule -> job count from snakemake's job-stats table (``total`` included)."""
    counts = {}
    for line in stats.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def total_jobs(stats: str) -> int:
    return job_counts(stats).get("total", 0)


def job_bound(n_subjects: int, chunk_size: int) -> int:
    """The most jobs any rule may have: one per chunk of every role, ceil(subjects / chunk) + JOB_SLACK."""
    return math.ceil(n_subjects / chunk_size) + JOB_SLACK


def check_job_counts(stats: str, n_subjects: int, chunk_size: int) -> list[str]:
    """Print every rule's job count against :func:`job_bound`; returns the rules above it (a job per subject or
    per candidate instead of per chunk)."""
    bound = job_bound(n_subjects, chunk_size)
    over = []
    for rule, count in job_counts(stats).items():
        if rule == "total":
            continue
        flag = "" if count <= bound else f"  TOO MANY (> ceil({n_subjects}/{chunk_size}) + {JOB_SLACK} = {bound})"
        print(f"    {rule:20s} {count:7d}{flag}")
        if count > bound:
            over.append(rule)
    return over


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-subjects", type=int, default=10_000)
    ap.add_argument("--chunk-size", type=int, default=50, help="config chunks.subjects_per_job (default: 50)")
    ap.add_argument("--labelled", type=int, default=None,
                    help="subjects with a label file (default: all); the others are unlabelled")
    ap.add_argument("--sources", type=int, default=0, help="user candidate masks per subject (default: 0)")
    ap.add_argument("--study", nargs="?", const="10k", choices=sorted(STUDIES),
                    help="a population study (overrides the three above): 10k = 10,000 subjects, 500 labelled, "
                         "3 sources (the default); 100k = 100,000 subjects, 5,000 labelled, 3 sources")
    ap.add_argument("--keep", action="store_true", help="keep the temporary cohort folder")
    ap.add_argument("--profile", action="store_true", help="also cProfile the after-split dry run")
    ap.add_argument("--no-slurm", action="store_true", help="skip the dry run with --profile profiles/slurm")
    ap.add_argument("--workflow", type=Path, default=REPO, help="workflow checkout to measure (default: this one)")
    args = ap.parse_args()
    if args.study:
        args.n_subjects, args.labelled, args.sources = STUDIES[args.study]
    global WORKFLOW
    WORKFLOW = args.workflow.resolve()

    root = Path(tempfile.mkdtemp(prefix="nnqc-dag-scale-"))
    results = []
    too_many: set[str] = set()
    try:
        t0 = time.perf_counter()
        config = make_cohort(root, args.n_subjects, args.chunk_size, args.labelled, args.sources)
        labelled = args.n_subjects if args.labelled is None else args.labelled
        print(f"cohort of {args.n_subjects} placeholder subjects ({labelled} labelled, {args.sources} sources) in "
              f"{root} ({time.perf_counter() - t0:.1f} s)")

        t_dag, dt, stats = dry_run(root, config, [], root / "dry-fresh.log")
        results.append(("fresh (stops at the split checkpoint)", t_dag, dt, total_jobs(stats)))
        print(f"\n[fresh] DAG {t_dag:.1f} s, dry run {dt:.1f} s; jobs per rule:")
        too_many.update(check_job_counts(stats, args.n_subjects, args.chunk_size))

        fake_checkpoint(root, args.n_subjects, args.chunk_size, args.labelled)
        t_dag, dt, stats = dry_run(root, config, [], root / "dry-after-split.log")
        results.append(("after split (whole per-subject DAG)", t_dag, dt, total_jobs(stats)))
        print(f"\n[after-split] DAG {t_dag:.1f} s, dry run {dt:.1f} s; jobs per rule:")
        too_many.update(check_job_counts(stats, args.n_subjects, args.chunk_size))

        if not args.no_slurm:
            slurm = ["--profile", str(WORKFLOW / "profiles" / "slurm")]
            t_dag, dt, stats = dry_run(root, config, slurm, root / "dry-after-split-slurm.log")
            results.append(("after split, --profile profiles/slurm", t_dag, dt, total_jobs(stats)))
            print(f"\n[after-split, slurm profile] DAG {t_dag:.1f} s, dry run {dt:.1f} s; jobs per rule:")
            too_many.update(check_job_counts(stats, args.n_subjects, args.chunk_size))

        if args.profile:
            prof = root / "after-split.prof"
            dry_run(root, config, [], root / "dry-profiled.log", prof=prof)
            import pstats

            print("\ncProfile of the after-split dry run, top 25 by cumulative time:")
            pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(25)
            print("top 15 by own time:")
            pstats.Stats(str(prof)).sort_stats("tottime").print_stats(15)

        load = os.getloadavg()[0]
        print(
            f"\n{args.n_subjects} subjects ({labelled} labelled, {args.sources} sources), {args.chunk_size} per "
            f"chunk job, {os.cpu_count()} CPUs, "
            f"load average {load:.1f} "
            f"(target: DAG built in <= {TARGET_S:.0f} s)"
        )
        print(f"  {'':50s} {'DAG built':>10s} {'snakemake -n':>13s} {'jobs':>7s}")
        worst = 0.0
        for name, t_dag, dt, jobs in results:
            worst = max(worst, t_dag)
            flag = "ok" if t_dag <= TARGET_S else "SLOW"
            print(f"  {name:50s} {t_dag:8.1f} s {dt:11.1f} s {jobs:7d}  {flag}")
        bound = job_bound(args.n_subjects, args.chunk_size)
        print(f"  jobs per rule <= ceil({args.n_subjects}/{args.chunk_size}) + {JOB_SLACK} = {bound}: "
              + (f"TOO MANY for {sorted(too_many)}" if too_many else "ok"))
        return 0 if worst <= TARGET_S and not too_many else 1
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
