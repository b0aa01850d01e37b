"""Checks a `snakemake --profile profiles/slurm` run of the demo on the CI cluster (called by run-demo.sh).

1. Every job went through sbatch: the main snakemake ran no rule itself but `all`; the SLURM job ids it reported
   are exactly the jobs SLURM knows under the run's job name, and every one of them COMPLETED; the number of rule
   jobs equals the steps snakemake counted.
2. GPU rules were submitted to the GPU partition with an A100, every other rule to the CPU partition.
3. The expected outputs exist (expected-outputs.txt), and the report covers every scored (source, subject).

Usage: check_run.py SNAKEMAKE_LOG COHORT_DIR EXPECTED_FILE CONFIG_YAML
Environment: NNQC_SLURM_CPU_PARTITION, NNQC_SLURM_GPU_PARTITION (as given to the run).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import subprocess
import sys

import yaml

GPU_RULES = {"embed", "train_vae", "train_ldm", "train_segmenter", "train_qcnet", "infer"}
FAILURES: list[str] = []


def fail(msg: str) -> None:
    FAILURES.append(msg)
    print(f"FAIL: {msg}")


def ok(msg: str) -> None:
    print(f"ok:   {msg}")


def parse_log(path: str) -> dict:
    text = open(path, encoding="utf-8", errors="replace").read()
    run_ids = re.findall(r"SLURM run ID: (\S+)", text)
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", text)
    arrays = re.findall(r"Submitted array job with Snakemake IDs (\S+) and SLURM job ID (\d+)", text)
    # a checkpoint's job is announced as "checkpoint NAME:" (locally "localcheckpoint NAME:")
    remote_rules = collections.Counter(re.findall(r"^\s*(?:rule|checkpoint) (\w+):$", text, flags=re.M))
    local_rules = collections.Counter(re.findall(r"^\s*local(?:rule|checkpoint) (\w+):$", text, flags=re.M))
    steps = re.findall(r"^(\d+) of (\d+) steps \(100%\) done", text, flags=re.M)
    return {
        "run_id": run_ids[-1] if run_ids else None,
        "submitted": submitted,
        "arrays": arrays,
        "remote_rules": remote_rules,
        "local_rules": local_rules,
        "total_steps": int(steps[-1][1]) if steps else None,
    }


def slurm_jobs(run_id: str) -> list[dict]:
    out = subprocess.run(
        ["squeue", "--states=all", "-h", "--name", run_id, "-O", "JobID:|,State:|,Partition:|,tres-per-job:|,Comment:"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    jobs = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 5 and parts[0]:
            jobs.append(dict(zip(["id", "state", "partition", "tres", "comment"], parts[:5], strict=True)))
    return jobs


def rule_of_comment(comment: str) -> str:
    """rule_<name>[_wildcards_...] for a job (the plugin's --comment)."""
    c = comment.removeprefix("rule_").split("_wildcards_")[0]
    return c


def check_jobs(log: dict, cpu_partition: str, gpu_partition: str) -> None:
    if not log["run_id"]:
        fail("no 'SLURM run ID' in the snakemake log: the slurm executor was not used")
        return
    ok(f"slurm executor, run id {log['run_id']}")
    bad_local = {r: n for r, n in log["local_rules"].items() if r != "all"}
    if bad_local:
        fail(f"rules run by the main snakemake instead of sbatch: {bad_local}")
    else:
        ok("no rule but 'all' ran outside SLURM")
    n_rule_jobs = sum(log["remote_rules"].values())
    if log["total_steps"] is None:
        fail("snakemake did not report '100% done'")
    elif n_rule_jobs + sum(log["local_rules"].values()) != log["total_steps"]:
        fail(f"{n_rule_jobs} rule jobs + {sum(log['local_rules'].values())} local != {log['total_steps']} steps")
    else:
        ok(f"{n_rule_jobs} rule jobs (+ 'all') = {log['total_steps']} steps: {dict(log['remote_rules'])}")

    ids = set(log["submitted"]) | {sid for _, sid in log["arrays"]}
    jobs = slurm_jobs(log["run_id"])
    known = {j["id"].split("_")[0] for j in jobs}
    if not ids:
        fail("snakemake reported no sbatch submission")
    elif ids != known:
        fail(
            f"SLURM ids reported by snakemake {sorted(ids, key=int)} != jobs SLURM knows for the run "
            f"{sorted(known, key=int)} (MinJobAge too short?)"
        )
    else:
        ok(f"{len(ids)} sbatch submissions, all known to slurmctld")
    states = collections.Counter(j["state"] for j in jobs)
    not_completed = [j for j in jobs if j["state"] != "COMPLETED"]
    if not_completed:
        # retries: a job that failed and was resubmitted leaves a failed SLURM job behind
        print(f"WARN: SLURM jobs not COMPLETED (retried by snakemake?): {not_completed}")
    ok(f"SLURM job states: {dict(states)}")

    per_rule: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for j in jobs:
        name = rule_of_comment(j["comment"])
        rules = {r for r in log["remote_rules"] if name == r or name.endswith("_" + r) or f"_{r}_" in f"_{name}_"}
        is_gpu = bool(rules & GPU_RULES)
        want = gpu_partition if is_gpu else cpu_partition
        gpu_ok = ("gpu:a100:1" in j["tres"]) if is_gpu else ("gpu" not in j["tres"])
        per_rule[name][(j["partition"], j["tres"])] += 1
        if j["partition"] != want or not gpu_ok:
            fail(
                f"job {j['id']} ({name}): partition {j['partition']}, tres {j['tres']}; wanted {want}"
                + (" with gres gpu:a100:1" if is_gpu else " without GPU")
            )
    print("sbatch jobs per rule (partition, GPU request): count")
    for name in sorted(per_rule):
        for (part, tres), n in sorted(per_rule[name].items()):
            print(f"    {name:40s} {part:6s} {tres:20s} {n}")


def check_outputs(cohort_dir: str, expected_file: str, config_file: str) -> None:
    cfg = yaml.safe_load(open(config_file))
    split_tsv = os.path.join(cohort_dir, "split.tsv")
    roles: dict[str, list[str]] = collections.defaultdict(list)
    if os.path.exists(split_tsv):
        import pandas as pd

        df = pd.read_csv(split_tsv, sep="\t", dtype=str)
        for role, sub in df.groupby("role"):
            roles[role] = sorted(sub["subject"])
    levels = (cfg.get("degradation") or {}).get("levels", [1, 2, 3, 4, 5])
    sources = ["gt", *(f"degraded_L{lv}" for lv in levels)]
    counts = {
        "usable": sum(len(roles[r]) for r in ("train", "val", "test", "unlabelled")),
        "test": len(roles["test"]),
        "test*sources": len(roles["test"]) * len(sources),
    }
    for raw in open(expected_file):
        line = raw.split("#")[0].strip()
        if not line:
            continue
        pattern, _, rule = (p.strip() for p in line.partition("="))
        found = glob.glob(os.path.join(cohort_dir, pattern))
        if not found:
            fail(f"missing output {pattern}")
            continue
        if rule:
            want = counts[rule]
            if len(found) != want:
                fail(f"{pattern}: {len(found)} files, want {want} ({rule})")
                continue
        ok(f"{pattern}: {len(found)} file(s)")

    scores = glob.glob(os.path.join(cohort_dir, "scores", "*", "*.parquet"))
    subjects_pq = os.path.join(cohort_dir, "report", "subjects.parquet")
    if scores and os.path.exists(subjects_pq):
        import pandas as pd

        want = {(os.path.basename(os.path.dirname(p)), os.path.basename(p)[: -len(".parquet")]) for p in scores}
        rep = pd.read_parquet(subjects_pq)
        have = set(zip(rep["source"].astype(str), rep["subject"].astype(str), strict=True))
        if want - have:
            missing = sorted(want - have)
            fail(f"report/subjects.parquet lacks {len(missing)} scored (source, subject): {missing[:5]}")
        else:
            ok(f"report/subjects.parquet covers all {len(want)} scored (source, subject), {len(rep)} rows")
        for name in ("slices", "summary", "ranking"):
            path = os.path.join(cohort_dir, "report", f"{name}.parquet")
            if os.path.exists(path):
                n = len(pd.read_parquet(path))
                (ok if n else fail)(f"report/{name}.parquet: {n} rows")


def main() -> int:
    log_path, cohort_dir, expected_file, config_file = sys.argv[1:5]
    cpu = os.environ.get("NNQC_SLURM_CPU_PARTITION", "cpu")
    gpu = os.environ.get("NNQC_SLURM_GPU_PARTITION", "gpu")
    check_jobs(parse_log(log_path), cpu, gpu)
    check_outputs(cohort_dir, expected_file, config_file)
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
