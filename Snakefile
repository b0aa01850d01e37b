# nnqc-pipe: segmentation quality control with nnQC. Stages live in rules/, logic in src/nnqc_pipe/.


include: "rules/common.smk"
include: "rules/ingest.smk"
include: "rules/plan.smk"
include: "rules/preprocess.smk"
include: "rules/degrade.smk"
include: "rules/models.smk"
include: "rules/learned.smk"
include: "rules/latent.smk"
include: "rules/repair.smk"
include: "rules/infer.smk"
include: "rules/score.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        f"{OUT}/subjects.tsv",
        f"{OUT}/fingerprint.json",
        f"{OUT}/plan.json",
        preprocessed_all,
        f"{OUT}/degraded/manifest.parquet" if HAS_LABELS and not QC_MODEL_SOURCE else [],
        f"{OUT}/report/subjects.parquet",
