# Configuration validation, subject discovery, paths and input functions shared by every stage.
import json
import os

import pandas as pd
from snakemake.utils import min_version, validate

from nnqc_pipe import demo as demo_module
from nnqc_pipe.config import discover_subjects, label_map

min_version("9.0")


# The demo config applies only when no --configfile is given: cohort configs are complete on their own.
if not config:

    configfile: "config/config.yaml"


validate(config, "../config/schemas/config.schema.yaml")

COHORT = config["cohort"]
OUT = f"{config['results']}/{COHORT}"
LOGS = f"{OUT}/logs"
LABELS = label_map(config)
LABEL_VALUES = ",".join(str(v) for v in LABELS)
LEVELS = config["degradation"]["levels"]
HAS_LABELS = config["labels"] is not None
# Rules run `python -m nnqc_pipe`; the package is importable from this checkout in any environment.
shell.prefix(f"export PYTHONPATH='{workflow.basedir}/src'${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")


if config["demo"]["enabled"] and not os.path.abspath(config["images"]).startswith(
    os.path.abspath(config["results"]) + os.sep
):
    raise ValueError("demo.enabled generates data into the images pattern, which must lie under the results folder "
                     f"({config['results']}); refusing to write into {config['images']!r}")


def all_subjects():
    """Every subject to ingest: the config's list, the demo's names, or the files matching the image pattern."""
    if config["subjects"] is not None:
        return sorted(config["subjects"])
    if config["demo"]["enabled"]:
        return demo_module.subject_names(config["demo"]["n_subjects"])
    found = discover_subjects(config["images"])
    if not found:
        raise ValueError(f"no image matches the pattern {config['images']!r} (cohort {COHORT})")
    return found


SUBJECTS = all_subjects()


wildcard_constraints:
    subject=r"[^/]+",
    level=r"[1-5]",


def image_path(wildcards):
    return config["images"].format(subject=wildcards.subject)


def label_path(wildcards):
    """The subject's label file, or [] for a deployment cohort without labels."""
    return config["labels"].format(subject=wildcards.subject) if HAS_LABELS else []


def existing_label_path(wildcards):
    """The label file as an input only if it exists: ingestion reports a missing pair instead of failing."""
    path = label_path(wildcards)
    return path if path and os.path.exists(path) else []


def label_param(wildcards):
    """The label path as a command-line value ("none" without labels)."""
    return label_path(wildcards) or "none"


def roles(wildcards=None):
    """Role -> subjects, from the split checkpoint (valid subjects only)."""
    split_tsv = checkpoints.split.get().output.split_tsv
    df = pd.read_csv(split_tsv, sep="\t", dtype=str)
    return {role: sorted(df.loc[df.role == role, "subject"]) for role in ("train", "val", "test", "unlabelled")}


def usable_subjects(wildcards=None):
    r = roles()
    return r["train"] + r["val"] + r["test"] + r["unlabelled"]


def preprocessed_all(wildcards):
    return expand(f"{OUT}/preprocessed/{{subject}}.npz", subject=usable_subjects())


def degraded_all(wildcards):
    return expand(f"{OUT}/degraded/{{subject}}/manifest.parquet", subject=roles()["test"])


def as_json(obj):
    """A config section as a JSON string for a command-line option."""
    return json.dumps(obj, sort_keys=True)
