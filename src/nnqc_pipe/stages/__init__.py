"""Stage entry functions: one module per rule file of ``rules/``, one function per rule, named after the rule.

``rules/<stage>.smk`` calls ``nnqc-pipe <rule-name>`` whose options are built from the signature and docstring of
``nnqc_pipe.stages.<stage>.<rule_name>`` (:mod:`nnqc_pipe.cli`). A stage function reads its inputs, calls the
domain modules (``data/``, ``degrade``, ``models/``, ``qc/``, ``report/``) and writes its outputs; it holds no method
logic of its own. Modules whose stages run networks import torch inside the functions, so the CPU stages start
without it.
"""

from __future__ import annotations

# Stage module -> its entry functions, in the order of the rules in rules/<module>.smk.
STAGES: dict[str, tuple[str, ...]] = {
    "ingest": ("demo_cohort", "inspect", "split"),
    "plan": ("fingerprint", "plan"),
    "preprocess": ("preprocess",),
    "degrade": ("degrade", "degrade_manifest"),
    "models": ("embed", "import_model", "train_vae", "train_ldm"),
    "learned": ("train_segmenter", "learned_candidates", "train_qcnet"),
    "latent": ("train_latent_vae",),
    "repair": ("train_repair_segmenter", "repair"),
    "infer": ("infer",),
    "score": ("score",),
    "report": ("report",),
}
