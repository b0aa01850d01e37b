# Configuration validation, subject discovery, paths and input functions shared by every stage.
import functools
import json
import math
import os

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake_interface_executor_plugins.settings import DeploymentMethod
from snakemake.utils import min_version, validate

from nnqc_pipe.data import demo as demo_module
from nnqc_pipe.chunks import CHUNK_ID_PATTERN, chunk_group, chunk_of, fill, make_chunks
from nnqc_pipe.config import (
    config_hash,
    discover_subjects,
    job_device,
    job_python_problem,
    label_map,
)
from nnqc_pipe.models.bundle import (
    BUNDLE_FILES,
    MANIFEST,
    BundleError,
    check_bundle,
    read_bundle,
)
from nnqc_pipe.data.split import assign_folds
from nnqc_pipe.models.presets import (
    check_guidance,
    check_overrides,
    plan_overrides,
    resolve_inference,
    search_settings,
    training_digest,
)

min_version("9.0")


# The demo config applies only when no --configfile is given: cohort configs are complete on their own.
if not config:

    configfile: "config/config.yaml"


validate(config, "../config/schemas/config.schema.yaml")
# model: overrides are checked against the preset here, so a typo stops the run before any job.
check_overrides(config["model"], config["preset"])

# Without --use-conda the jobs run the `python` on PATH: stop now, in one line, if it cannot import the package's
# dependencies (e.g. .venv/bin/snakemake called without activating the environment).
if (
    workflow.is_main_process
    and DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method
):
    _problem = job_python_problem()
    if _problem:
        raise WorkflowError(
            f"{_problem}. Activate the project's environment first (`. .venv/bin/activate`, "
            "or `make demo`), or run with --use-conda."
        )

# qc_model: a QC model trained elsewhere (a bundle of `nnqc-pipe export-model`) replaces fingerprint, plan,
# degradation and training; a corrupted or incompatible bundle stops the run here, naming every problem.
QC_MODEL_SOURCE = config["qc_model"]
QC_BUNDLE = None
if not QC_MODEL_SOURCE:
    check_guidance(config["inference"], config["model"], config["preset"])
if QC_MODEL_SOURCE:
    try:
        # The checksums are verified once, by the main process; jobs only read the description.
        QC_BUNDLE = (
            check_bundle(QC_MODEL_SOURCE, config)
            if workflow.is_main_process
            else read_bundle(QC_MODEL_SOURCE)
        )
    except BundleError as exc:
        raise WorkflowError(str(exc)) from None
# inference.ddim_steps left unset: the step count of the QC model's preset (cpu 1, paper 20; with qc_model, the
# preset the bundle was trained with).
config["inference"] = (
    resolve_inference(config["inference"], {}, QC_BUNDLE["preset"])
    if QC_BUNDLE
    else resolve_inference(config["inference"], config["model"], config["preset"])
)
if config["labels"] is None and not QC_MODEL_SOURCE:
    raise WorkflowError(
        "labels: null leaves nothing to train the QC model on; set qc_model: to a bundle "
        "exported from a labelled cohort (nnqc-pipe export-model results/<cohort> OUT)"
    )
# With qc_model, the embed jobs refuse a vision expert whose weights are not the ones the model was trained with.
EXPERT_SHA256 = QC_BUNDLE["expert"].get("weights_sha256") if QC_BUNDLE else None

COHORT = config["cohort"]
OUT = f"{config['results']}/{COHORT}"
LOGS = f"{OUT}/logs"
BENCH = f"{OUT}/benchmarks"
LABELS = label_map(config)
LABEL_VALUES = " ".join(str(v) for v in LABELS)
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
# The preset's own training values: a param of the training rules, so that a new release's preset retrains the
# models instead of silently reusing ones trained with the old values.
PRESET_DIGEST = training_digest(config["preset"])
LATENT_DIGEST = training_digest(config["preset"], "latent_search")
# The plan rounds patch sizes to the preset networks' downsampling factor unless the config fixes it.
PLAN_OVERRIDES = plan_overrides(config)
USES_IMAGE = config["model"].get("experts", {}).get("mode", "full") in ("image", "full")
# Degraded masks (known quality) are made for the test subjects of a cohort that trains its own model.
DEGRADED_LEVELS = [] if QC_MODEL_SOURCE else LEVELS
DEGRADED_SOURCES = [f"degraded_L{level}" for level in DEGRADED_LEVELS]
USER_SOURCES = dict(config["sources"])
# The learned QC opinion, when methods: lists it (learned.enabled: false, the older switch, still leaves it out):
# trained here, or taken from a qc_model bundle that has one.
if "enabled" in config["learned"] and workflow.is_main_process:
    logger.warning("learned.enabled is deprecated: list the QC opinions in methods:")
LEARNED = (
    "learned" in config["methods"]
    and config["learned"].get("enabled", True)
    and (not QC_MODEL_SOURCE or os.path.isfile(f"{QC_MODEL_SOURCE}/qcnet.pt"))
)
# Wang et al.'s latent search, when methods lists it: trained here, or taken from a qc_model bundle that has one.
LATENT = "latent_search" in config["methods"] and (
    not QC_MODEL_SOURCE or os.path.isfile(f"{QC_MODEL_SOURCE}/latent_vae.pt")
)
# The QC opinions computed (nnqc_pipe.report.methods.OPINIONS): those listed, the learned opinion and the latent
# search where they can run.
METHODS = [
    m
    for m in config["methods"]
    if (m != "learned" or LEARNED) and (m != "latent_search" or LATENT)
]
# What infer needs: the inference section, with vae_recon: false when methods leaves that baseline out, and the
# latent search's settings and surrogate path pattern when methods lists it (keys only then, so that the default
# leaves the infer jobs' params, and their outputs, as they were).
INFERENCE_SETTINGS = {
    k: v for k, v in config["inference"].items() if k != "save_latent_surrogate"
}
if "vae_recon" not in METHODS:
    INFERENCE_SETTINGS["vae_recon"] = False
if LATENT:
    INFERENCE_SETTINGS["latent_search"] = {
        "search": search_settings(
            config["model"], QC_BUNDLE["preset"] if QC_BUNDLE else config["preset"]
        ),
        "surrogate": (
            f"{OUT}/latent_search/surrogate/{{source}}/{{subject}}.nii.gz"
            if config["inference"]["save_latent_surrogate"]
            else None
        ),
    }
# What the report needs from the config: its thresholds, the source selection and the opinions computed.
REPORT_SETTINGS = {
    **config["report"],
    "selection": config["selection"],
    "methods": METHODS,
}
FOLDS = list(range(config["learned"]["folds"]))
# User sources whose masks of the training subjects are extra training candidates of the learned opinion.
LEARNED_SOURCES = {
    name: pattern_
    for name, pattern_ in USER_SOURCES.items()
    if name not in config["learned"]["exclude_sources"]
}
# The repair stage (rules/repair.smk): a cohort segmenter refined on the subjects QC flags; its masks before and
# after refinement are two more sources of every test and unlabelled subject.
REPAIR = config["repair"]["enabled"]
REPAIR_SOURCES = (
    [config["repair"]["source"], f"{config['repair']['source']}_refined"]
    if REPAIR
    else []
)
if REPAIR and QC_MODEL_SOURCE:
    raise WorkflowError(
        "repair needs labelled training subjects for its segmenter; a qc_model cohort has none "
        "(set repair.enabled: false)"
    )
# The repair loop's score or reference is the learned opinion's: it needs the QC network.
REPAIR_USES_LEARNED = REPAIR and "learned" in {
    config["repair"]["score"],
    config["repair"]["reference"],
}
if REPAIR_USES_LEARNED and not LEARNED:
    raise WorkflowError(
        "repair.score/repair.reference: learned needs the learned opinion: list learned in methods"
    )
if set(REPAIR_SOURCES) & set(USER_SOURCES):
    raise WorkflowError(
        f"repair.source: {sorted(set(REPAIR_SOURCES) & set(USER_SOURCES))} is also a user source; "
        "choose another repair.source"
    )
if REPAIR:
    REPORT_SETTINGS["repair_sources"] = REPAIR_SOURCES
if config["report"]["verdict_score"] == "learned" and not LEARNED:
    raise WorkflowError(
        "report.verdict_score: learned needs the learned opinion: list learned in methods (with qc_model, a "
        "bundle exported with qcnet.pt)"
    )
# combined_dsc fuses the opinions in methods: it needs two of them.
if (
    "combined" in (config["report"]["verdict_score"], config["selection"]["score"])
    and len(METHODS) < 2
):
    raise WorkflowError(
        "report.verdict_score/selection.score: combined fuses the opinions in methods and needs at least two: "
        f"methods is {METHODS}"
    )
SELECTION_SCORE_METHOD = {"calibrated": "nnqc", "combined": "nnqc"}.get(
    config["selection"]["score"], config["selection"]["score"]
)
if SELECTION_SCORE_METHOD != "verdict" and SELECTION_SCORE_METHOD not in METHODS:
    raise WorkflowError(
        f"selection.score: {config['selection']['score']} needs {SELECTION_SCORE_METHOD} in methods"
    )
# Rules run `python -m nnqc_pipe`; the package is importable from this checkout in any environment.
shell.prefix(
    f"export PYTHONPATH='{workflow.basedir}/src'${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
)


if config["demo"]["enabled"] and not os.path.abspath(config["images"]).startswith(
    os.path.abspath(config["results"]) + os.sep
):
    raise ValueError(
        "demo.enabled generates data into the images pattern, which must lie under the results folder "
        f"({config['results']}); refusing to write into {config['images']!r}"
    )


def all_subjects():
    """Every subject to ingest: the config's list, the demo's names, or the files matching the image pattern."""
    if config["subjects"] is not None:
        return sorted(config["subjects"])
    if config["demo"]["enabled"]:
        return demo_module.subject_names(config["demo"]["n_subjects"])
    found = discover_subjects(config["images"])
    if not found:
        raise ValueError(
            f"no image matches the pattern {config['images']!r} (cohort {COHORT})"
        )
    return found


SUBJECTS = all_subjects()


wildcard_constraints:
    chunk=CHUNK_ID_PATTERN,
    fold=r"\d+",


# ---- The file contract's per-subject paths, as patterns for the chunk jobs ({subject}, {source}, {level}) ----
PATTERNS = {
    "image": config["images"],
    "label": config["labels"] or "none",
    "inspect": f"{OUT}/inspect/{{subject}}.json",
    "npz": f"{OUT}/preprocessed/{{subject}}.npz",
    "embeddings": f"{OUT}/embeddings/{{subject}}.npz" if USES_IMAGE else "none",
    "degraded": f"{OUT}/degraded/{{subject}}/L{{level}}.nii.gz",
    "degraded_manifest": f"{OUT}/degraded/{{subject}}/manifest.parquet",
    "pgt": f"{OUT}/pgt/{{source}}/{{subject}}.nii.gz",
    "slices": f"{OUT}/pgt/{{source}}/{{subject}}.slices.parquet",
    "errors": (
        f"{OUT}/errors/{{source}}/{{subject}}.nii.gz"
        if config["inference"]["save_error_maps"]
        else "none"
    ),
    "scores": f"{OUT}/scores/{{source}}/{{subject}}.parquet",
    "selected": f"{OUT}/selected/{{subject}}.nii.gz",
    "repair": f"{OUT}/repair/{{source}}/{{subject}}.nii.gz",
    "learned_candidates": f"{OUT}/learned/candidates/{{subject}}.npz",
    "learned": (
        f"{OUT}/learned/estimated/{{source}}/{{subject}}.nii.gz" if LEARNED else "none"
    ),
}
# Candidate masks of every source: the GT, the saved degradation levels, the user's sources.
CANDIDATES = {
    **({"gt": config["labels"]} if HAS_LABELS else {}),
    **{
        f"degraded_L{level}": fill(PATTERNS["degraded"], level=level)
        for level in DEGRADED_LEVELS
    },
    **USER_SOURCES,
    **{name: fill(PATTERNS["repair"], source=name) for name in REPAIR_SOURCES},
}
REPAIR_RECORD = f"{OUT}/repair/record.tsv"


def pattern(name):
    """A params value: the path pattern ``name`` (a function, so that Snakemake leaves its {placeholders} alone)."""
    return lambda wildcards: PATTERNS[name]


def rule_device(wildcards, resources):
    """--device of a network rule: `auto` is `cuda` in a job the profile gives a GPU (nnqc_pipe.config.job_device),
    so that on a node without CUDA it fails at once; `device: cpu` runs anywhere."""
    return job_device(config["device"], resources.get("gpu"), resources.get("gres"))


def as_json(obj):
    """A config section as a JSON string for a command-line option."""
    return json.dumps(obj, sort_keys=True)


# ---- Chunks: every per-subject stage runs one job per chunk of subjects (nnqc_pipe.chunks) ----
CHUNK_SIZES = {
    stage: config["chunks"]["stages"].get(stage) or config["chunks"]["subjects_per_job"]
    for stage in ("inspect", "preprocess", "degrade", "embed", "infer", "score")
}
# After the split, a stage's chunks are cut from these roles of split.tsv, each role on its own (chunk ids
# <role>-<index>), so that e.g. training waits only for the train/val chunks.
STAGE_ROLES = {
    "preprocess": ("train", "val", "test", "unlabelled"),
    "embed": ("train", "val", "test", "unlabelled"),
    "degrade": ("test",),
    "infer": ("test", "unlabelled"),
    "score": ("test", "unlabelled"),
}
CHUNKS_DIR = f"{OUT}/chunks"
SPLIT_TSV = f"{OUT}/split.tsv"
INSPECT_CHUNKS = make_chunks({"all": SUBJECTS}, CHUNK_SIZES["inspect"])


@functools.lru_cache(maxsize=4)
def _read_roles(split_tsv, mtime):
    df = pd.read_csv(split_tsv, sep="\t", dtype=str)
    return {
        role: sorted(df.loc[df.role == role, "subject"])
        for role in ("train", "val", "test", "unlabelled")
    }


def roles(wildcards=None):
    """Role -> subjects, from the split checkpoint (valid subjects only); read once per version of the file."""
    checkpoints.split.get()
    return _read_roles(SPLIT_TSV, os.path.getmtime(SPLIT_TSV))


@functools.lru_cache(maxsize=4)
def _qc_sources(mtime):
    """Subject -> the sources QC'd for it: gt and the degraded levels for test subjects; every user source with a
    candidate file for test and unlabelled subjects (a missing file is listed in the log, not invented), and with
    repair the cohort segmenter's two sources for every test and unlabelled subject. Subjects with no source at all
    are left out."""
    r = _read_roles(SPLIT_TSV, mtime)
    out, missing = {}, {}
    for role in ("test", "unlabelled"):
        for subject in r[role]:
            sources = ["gt", *DEGRADED_SOURCES] if role == "test" and HAS_LABELS else []
            for name, pattern_ in USER_SOURCES.items():
                if os.path.exists(fill(pattern_, subject=subject)):
                    sources.append(name)
                else:
                    missing.setdefault(name, []).append(subject)
            sources += REPAIR_SOURCES
            if sources:
                out[subject] = sources
    for name, subjects in missing.items():
        logger.warning(
            f"source {name}: no candidate file for {len(subjects)} subject(s): {subjects[:10]}"
        )
    return out


@functools.lru_cache(maxsize=16)
def _stage_chunks(stage, mtime):
    if stage == "inspect":
        return INSPECT_CHUNKS
    r = _read_roles(SPLIT_TSV, mtime)
    keep = _qc_sources(mtime) if stage in ("infer", "score") else None
    groups = {
        role: [s for s in r[role] if keep is None or s in keep]
        for role in STAGE_ROLES[stage]
    }
    return make_chunks(groups, CHUNK_SIZES[stage])


@functools.lru_cache(maxsize=16)
def _stage_index(stage, mtime):
    return chunk_of(_stage_chunks(stage, mtime))


def _split_mtime(stage):
    return 0.0 if stage == "inspect" else os.path.getmtime(SPLIT_TSV)


def stage_chunks(stage):
    """Chunk id -> subjects of a per-subject stage. For input functions and targets: after the split it goes
    through the checkpoint, so that Snakemake waits for split.tsv."""
    if stage != "inspect":
        checkpoints.split.get()
    return _stage_chunks(stage, _split_mtime(stage))


def members(stage, chunk):
    """The subjects of a chunk (input functions)."""
    return stage_chunks(stage)[chunk]


def chunk_members(stage, chunk):
    """The subjects of a chunk, for params and resources: read from split.tsv directly, as params may not use the
    checkpoint (on a cluster node only the job itself is rebuilt); split.tsv exists whenever such a job runs.
    """
    return _stage_chunks(stage, _split_mtime(stage))[chunk]


def chunk_tasks(stage, chunk):
    """Source -> subjects of an infer/score chunk (params)."""
    sources = _qc_sources(_split_mtime(stage))
    tasks = {}
    for subject in chunk_members(stage, chunk):
        for source in sources[subject]:
            tasks.setdefault(source, []).append(subject)
    return tasks


def chunk_records(stage, subjects=None):
    """The chunk records (outputs) of ``stage``: of every chunk, or of the chunks holding any of ``subjects``."""
    chunks = stage_chunks(stage)
    if subjects is None:
        ids = list(chunks)
    else:
        where = _stage_index(stage, _split_mtime(stage))
        ids = sorted({where[s] for s in subjects})
    return [f"{CHUNKS_DIR}/{stage}/{c}.tsv" for c in ids]


def chunk_files(name, stage, chunk):
    """Pattern ``name`` filled in for every subject of a chunk (input functions)."""
    return [fill(PATTERNS[name], subject=s) for s in members(stage, chunk)]


def chunk_runtime(stage, minutes_per_item, base=10):
    """Time limit (minutes) of a chunk job: ``base`` + ``minutes_per_item`` per subject (infer/score: per
    candidate), times the attempt, so that a retry after a time-out gets more time."""

    def runtime(wildcards, attempt):
        if stage in ("infer", "score"):
            n = sum(len(s) for s in chunk_tasks(stage, wildcards.chunk).values())
        else:
            n = len(chunk_members(stage, wildcards.chunk))
        return math.ceil((base + minutes_per_item * n) * attempt)

    return runtime


def inspect_labels(wildcards):
    """Label files of an inspect chunk: those that exist (ingestion makes an image without one unlabelled, or
    excludes it with require_labels); the demo's are made by rule demo_cohort."""
    if not HAS_LABELS:
        return []
    files = chunk_files("label", "inspect", wildcards.chunk)
    return (
        files if config["demo"]["enabled"] else [f for f in files if os.path.exists(f)]
    )


def candidate_inputs(stage, chunk):
    """What the candidates of an infer chunk need: label files, degrade chunk records, user masks, the repair
    stage's record (the score chunks depend on them through the infer chunk records)."""
    subjects = members(stage, chunk)
    sources = _qc_sources(_split_mtime(stage))
    files, degraded = set(), []
    for subject in subjects:
        for source in sources[subject]:
            if source in DEGRADED_SOURCES:
                degraded.append(subject)
            elif source in REPAIR_SOURCES:
                files.add(REPAIR_RECORD)
            else:
                files.add(fill(CANDIDATES[source], subject=subject))
    return sorted(files) + (chunk_records("degrade", degraded) if degraded else [])


def role_label_files(stage, chunk):
    """Label files of a chunk's subjects, for the roles that have them (none for an unlabelled chunk)."""
    if not HAS_LABELS or chunk_group(chunk) == "unlabelled":
        return []
    return chunk_files("label", stage, chunk)


def role_label_pattern(stage):
    """The label path pattern for a chunk's params: 'none' for an unlabelled chunk (its subjects have no file)."""
    return lambda wildcards: (
        "none" if chunk_group(wildcards.chunk) == "unlabelled" else PATTERNS["label"]
    )


def training_subjects():
    r = roles()
    return r["train"] + r["val"]


def preprocessed_all(wildcards):
    """Every preprocess chunk (rule all)."""
    return chunk_records("preprocess")


def fold_members(fold):
    """The labelled training subjects of a fold of the learned opinion's segmenters (input functions)."""
    folds = assign_folds(training_subjects(), len(FOLDS), config["seed"])
    return sorted(s for s, f in folds.items() if f == int(fold))


def fold_sources(fold):
    """The user sources' masks that exist for a fold's subjects (extra training candidates)."""
    return [
        fill(pattern_, subject=s)
        for s in fold_members(fold)
        for pattern_ in LEARNED_SOURCES.values()
        if os.path.exists(fill(pattern_, subject=s))
    ]
