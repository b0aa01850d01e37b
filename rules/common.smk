# Configuration validation, subject discovery, paths and input functions shared by every stage.
import functools
import json
import os

import pandas as pd
from snakemake.logging import logger
from snakemake.utils import min_version, validate

from nnqc_pipe import demo as demo_module
from nnqc_pipe.config import config_hash, discover_subjects, label_map
from nnqc_pipe.presets import plan_overrides

min_version("9.0")


# The demo config applies only when no --configfile is given: cohort configs are complete on their own.
if not config:

    configfile: "config/config.yaml"


validate(config, "../config/schemas/config.schema.yaml")

COHORT = config["cohort"]
OUT = f"{config['results']}/{COHORT}"
LOGS = f"{OUT}/logs"
BENCH = f"{OUT}/benchmarks"
LABELS = label_map(config)
LABEL_VALUES = ",".join(str(v) for v in LABELS)
LEVELS = config["degradation"]["levels"]
HAS_LABELS = config["labels"] is not None
MODELS = f"{OUT}/models"
CONFIG_DIGEST = config_hash(config)
# What the model stages need from the config (passed as one JSON option).
SETTINGS = {
    "preset": config["preset"],
    "model": config["model"],
    "expert": config["expert"],
    "perceptual_weights": config["perceptual_weights"],
    "tiny_checkpoint": f"{MODELS}/tiny_vision_expert.pt",
}
# The plan rounds patch sizes to the preset networks' downsampling factor unless the config fixes it.
PLAN_OVERRIDES = plan_overrides(config)
USES_IMAGE = config["model"].get("experts", {}).get("mode", "full") in ("image", "full")
DEGRADED_SOURCES = [f"degraded_L{level}" for level in LEVELS]
USER_SOURCES = dict(config["sources"])
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
    source="|".join(["gt", r"degraded_L[1-5]", *USER_SOURCES]),
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


@functools.lru_cache(maxsize=4)
def _read_roles(split_tsv, mtime):
    df = pd.read_csv(split_tsv, sep="\t", dtype=str)
    return {role: sorted(df.loc[df.role == role, "subject"]) for role in ("train", "val", "test", "unlabelled")}


def roles(wildcards=None):
    """Role -> subjects, from the split checkpoint (valid subjects only); read once per version of the file."""
    split_tsv = checkpoints.split.get().output.split_tsv
    return _read_roles(split_tsv, os.path.getmtime(split_tsv))


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


def embeddings_of(subjects):
    """Embedding caches of ``subjects`` (none when the conditioning does not use the image)."""
    return expand(f"{OUT}/embeddings/{{subject}}.npz", subject=subjects) if USES_IMAGE else []


def source_subjects(source):
    """Subjects QC'd for a source: test subjects for gt/degraded; test + unlabelled subjects that have a
    candidate file for the user's sources (a missing file is listed in the log, not invented)."""
    r = roles()
    if source == "gt" or source in DEGRADED_SOURCES:
        return r["test"]
    wanted = r["test"] + r["unlabelled"]
    present = [s for s in wanted if os.path.exists(USER_SOURCES[source].format(subject=s))]
    missing = sorted(set(wanted) - set(present))
    if missing:
        logger.warning(f"source {source}: no candidate file for {len(missing)} subject(s): {missing[:10]}")
    return present


def all_sources():
    return (["gt", *DEGRADED_SOURCES] if HAS_LABELS else []) + list(USER_SOURCES)


def candidate_path(wildcards):
    """The candidate mask of (source, subject) on the subject's original grid."""
    if wildcards.source == "gt":
        return label_path(wildcards)
    if wildcards.source in DEGRADED_SOURCES:
        return f"{OUT}/degraded/{wildcards.subject}/L{wildcards.source[len('degraded_L'):]}.nii.gz"
    return USER_SOURCES[wildcards.source].format(subject=wildcards.subject)


def gt_param(wildcards):
    """The subject's GT label for real metrics, or "none" (unlabelled subject)."""
    return label_path(wildcards) if wildcards.subject not in roles()["unlabelled"] and HAS_LABELS else "none"


def scores_all(wildcards):
    return [f"{OUT}/scores/{source}/{subject}.parquet" for source in all_sources() for subject in
            source_subjects(source)]
