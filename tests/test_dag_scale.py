"""The job-count check of benchmarks/dag_scale.py on a job-stats table (no snakemake run)."""

from __future__ import annotations

from conftest import load_benchmark

dag_scale = load_benchmark("dag_scale")

STATS = """Job stats:
job                   count
------------------  -------
preprocess               42
infer                   120
report                    1
total                   163"""


def test_job_counts_parses_the_table() -> None:
    assert dag_scale.job_counts(STATS) == {"preprocess": 42, "infer": 120, "report": 1, "total": 163}
    assert dag_scale.total_jobs(STATS) == 163


def test_rules_above_one_job_per_chunk_are_flagged(capsys) -> None:
    assert dag_scale.job_bound(2000, 50) == 44
    assert dag_scale.check_job_counts(STATS, 2000, 50) == ["infer"]
    assert "TOO MANY" in capsys.readouterr().out


def test_subject_names_stay_sorted_at_100k() -> None:
    names = dag_scale.subject_names(100_001)
    assert names == sorted(names) and len(set(names)) == 100_001
    assert dag_scale.subject_names(3) == ["sub00000", "sub00001", "sub00002"]
