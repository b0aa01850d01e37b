"""A trained QC model as a reusable, self-describing artefact (a *bundle* folder).

``nnqc-pipe export-model results/<cohort> OUT`` (:func:`export_model`) writes::

    OUT/vae.pt, ldm.pt            the trained networks (as in results/<cohort>/models/)
    OUT/qcnet.pt                  the learned QC opinion's network, when the cohort trained one
    OUT/latent_vae.pt             the latent search's joint image–mask VAE, when the cohort trained one
    OUT/model_card.json           what was trained, how well (validation figures), with which vision expert
    OUT/plan.json                 the preprocessing plan the networks were trained with
    OUT/fingerprint.json          the training cohort's fingerprint (reference of the domain-shift check)
    OUT/bundle.json               the description: format, training cohort, modality, label names, vision expert
                                  identity (architecture, weights and checkpoint SHA-256), validation figures
    OUT/MANIFEST                  SHA-256 of every other file, ``sha256sum -c MANIFEST`` format

A cohort whose config sets ``qc_model: OUT`` uses the bundle instead of training: :func:`check_bundle` refuses, at
workflow start, a corrupted bundle or one incompatible with the cohort (label names, modality, vision expert), and
:func:`import_bundle` (rule ``import_model``) copies it into the cohort's results, adding ``qc_model`` (where the
model comes from) to the model card copy. Torch is imported only where an expert checkpoint must be opened.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from nnqc_pipe import __version__
from nnqc_pipe.config import deep_merge, label_map
from nnqc_pipe.data.io import atomic_path, file_sha256, read_json, write_json
from nnqc_pipe.models.presets import PRESETS

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "nnqc-pipe-qc-model"
BUNDLE_VERSION = 1
DESCRIPTION = "bundle.json"
MANIFEST = "MANIFEST"
MODEL_FILES = ("vae.pt", "ldm.pt", "model_card.json")
COHORT_FILES = ("plan.json", "fingerprint.json")
BUNDLE_FILES = (*MODEL_FILES, *COHORT_FILES, DESCRIPTION)
# Networks a bundle carries when the training cohort has them (the learned opinion and the latent search are
# optional).
OPTIONAL_MODEL_FILES = ("qcnet.pt", "latent_vae.pt")


class BundleError(ValueError):
    """A bundle cannot be written, is corrupted, or does not fit the cohort; the message names every problem."""


# ---- export ----


def expert_identity(encoder: dict[str, Any], checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """The vision expert the model was trained with, from the model card's ``encoder`` record.

    ``checkpoint`` overrides where the expert's file is (when it moved since training); its weights must then be
    the recorded ones. A pretrained expert's file must exist: its SHA-256 is how a cohort proves it has the same.
    """
    if "weights_sha256" not in encoder:
        return {"used": False}
    identity = {"used": True, **{k: encoder[k] for k in ("architecture", "pretrained", "token_grid", "weights_sha256")}}
    path = Path(checkpoint or encoder["checkpoint"])
    if checkpoint:
        check_expert_weights(path, encoder["weights_sha256"])
    if not encoder["pretrained"]:
        # The untrained tiny expert is rebuilt from its seed by any cohort with expert.tiny_fallback: its weights'
        # SHA-256 identifies it; its file is not part of the model.
        return {**identity, "checkpoint_sha256": None}
    if not path.is_file():
        raise BundleError(f"vision expert checkpoint {path} (model card) not found: its SHA-256 identifies the "
                          "expert in the bundle; pass --expert-checkpoint with its current location")
    return {**identity, "checkpoint_sha256": file_sha256(path)}


def check_expert_weights(path: str | os.PathLike, weights_sha256: str) -> None:
    """Refuse a vision expert checkpoint whose image-tower weights are not ``weights_sha256``."""
    from nnqc_pipe.models.experts import read_pretrained_checkpoint, vision_state_dict
    from nnqc_pipe.models.experts import weights_sha256 as digest

    found = digest(vision_state_dict(read_pretrained_checkpoint(path)))
    if found != weights_sha256:
        raise BundleError(f"vision expert checkpoint {path} has weights SHA-256 {found}, the model was trained "
                          f"with {weights_sha256}")


def validation_figures(card: dict[str, Any]) -> dict[str, Any]:
    """The model card's validation figures: the VAE's best validation Dice; the pGT's best validation Dice and QC
    score (1 - mean |predicted - real DSC|, cards that have it), every validation score of the selected epoch."""
    return {
        "vae_best_val_dice": card["vae"]["best_val_dice"],
        "vae_best_epoch": card["vae"]["best_epoch"],
        "pgt_best_val_dice": card["ldm"]["best_val_dice"],
        "pgt_best_val_qc": card["ldm"].get("best_val_qc"),
        "pgt_best_epoch": card["ldm"]["best_epoch"],
        "pgt_best_scores": card["ldm"]["best_scores"],
        "val_candidates_dice": card["ldm"]["candidate_scores"],
        "val_severities": card["ldm"]["val_severities"],
    }


def describe(card: dict[str, Any], fingerprint: dict[str, Any], training_cohort: str,
             expert_checkpoint: str | os.PathLike | None = None, fits: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """The content of ``bundle.json`` (with ``fits``: the training cohort's calibration and fusion, when given)."""
    names = dict(zip(fingerprint["label_values"], fingerprint["label_names"], strict=True))
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "pipeline_version": __version__,
        "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "training_cohort": training_cohort,
        "n_training_subjects": fingerprint["n_subjects"],
        "modality": fingerprint["modality"],
        "label_names": {str(value): name for value, name in names.items()},
        "preset": card["preset"],
        "patch_size": card["patch_size"],
        "conditioning_mode": card["conditioning_mode"],
        "expert": expert_identity(card["encoder"], expert_checkpoint),
        "validation": validation_figures(card),
        **({"fits": fits} if fits else {}),
    }


def bundle_sources(results_dir: Path) -> dict[str, Path]:
    """Bundle file name -> where it is in a cohort's results; refuses when any is missing."""
    sources = {name: results_dir / "models" / name for name in MODEL_FILES}
    sources.update({name: results_dir / name for name in COHORT_FILES})
    sources.update({name: results_dir / "models" / name for name in OPTIONAL_MODEL_FILES
                    if (results_dir / "models" / name).is_file()})
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise BundleError(f"{results_dir} holds no trained QC model: missing {missing} (run the workflow first)")
    return sources


def check_card_checksums(card: dict[str, Any], sources: dict[str, Path]) -> None:
    """Refuse networks that are not the ones the model card describes (e.g. retrained after it was written)."""
    for name, recorded in card["checkpoints"].items():
        if file_sha256(sources[name]) != recorded:
            raise BundleError(f"{sources[name]} is not the file model_card.json describes (SHA-256 differs); "
                              "rerun the workflow so that the model card is rewritten")


def write_manifest(folder: Path) -> None:
    """``MANIFEST``: the SHA-256 of every other file of ``folder``, sorted by name, in ``sha256sum`` format."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    (folder / MANIFEST).write_text("".join(f"{file_sha256(folder / n)}  {n}\n" for n in names))


def export_model(results_dir: str | os.PathLike, out: str | os.PathLike, force: bool = False,
                 expert_checkpoint: str | os.PathLike | None = None, fits: dict[str, Any] | None = None) -> Path:
    """Write the bundle of a cohort's trained model to ``out`` (a new folder; ``force`` replaces one).

    ``fits``: the training cohort's calibration map and opinion fusion (``bundle.json``'s ``fits``), which a cohort
    without labels of its own applies (:func:`nnqc_pipe.qc.calibration.report_fits` reads them from its report).

    The bundle is assembled in a temporary folder next to ``out`` and renamed into place, so ``out`` is either
    complete or absent.
    """
    results, dest = Path(results_dir), Path(out)
    if dest.exists() and not force:
        raise BundleError(f"{dest} exists; choose another folder or pass --force to replace it")
    sources = bundle_sources(results)
    card = read_json(sources["model_card.json"])
    check_card_checksums(card, sources)
    training_cohort = (card.get("qc_model") or {}).get("training_cohort", results.name)
    description = describe(card, read_json(sources["fingerprint.json"]), training_cohort, expert_checkpoint, fits)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for name, path in sources.items():
            shutil.copyfile(path, tmp / name)
        write_json(description, tmp / DESCRIPTION)
        write_manifest(tmp)
        replace_folder(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported the QC model of %s to %s (%s, labels %s)", results, dest, description["modality"],
             description["label_names"])
    return dest


def replace_folder(new: Path, dest: Path) -> None:
    """Rename ``new`` to ``dest``; an existing ``dest`` is moved aside first and deleted after."""
    if not dest.exists():
        os.replace(new, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
    os.replace(dest, old / dest.name)
    os.replace(new, dest)
    shutil.rmtree(old)


# ---- use ----


def manifest_problems(bundle_dir: str | os.PathLike) -> list[str]:
    """What is wrong with a bundle's files: missing, unlisted, or not matching their MANIFEST checksum."""
    folder = Path(bundle_dir)
    if not (folder / MANIFEST).is_file():
        return [f"{folder / MANIFEST} is missing (not a bundle written by nnqc-pipe export-model?)"]
    listed = {}
    for line in (folder / MANIFEST).read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    problems = [f"{name}: missing from the bundle's MANIFEST" for name in BUNDLE_FILES if name not in listed]
    for name, digest in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: listed in the MANIFEST but missing")
        elif file_sha256(path) != digest:
            problems.append(f"{path}: SHA-256 differs from the MANIFEST (corrupted or modified file)")
    return problems


def read_bundle(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """The description (``bundle.json``) of a bundle; refuses a folder that is not a bundle of a known format."""
    path = Path(bundle_dir) / DESCRIPTION
    if not path.is_file():
        raise BundleError(f"qc_model: {path} not found; export a model with `nnqc-pipe export-model "
                          "results/<cohort> OUT` and point qc_model at OUT")
    description = read_json(path)
    if description.get("format") != BUNDLE_FORMAT or description.get("format_version") != BUNDLE_VERSION:
        raise BundleError(f"qc_model: {path} is not a {BUNDLE_FORMAT} bundle of version {BUNDLE_VERSION}")
    return description


def cohort_expert_problems(identity: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Why the cohort's vision expert (config ``expert``, ``preset``, ``model``) is not the bundle's."""
    if not identity["used"]:
        return []
    expert = config["expert"]
    checkpoint = expert.get("checkpoint")
    has_file = bool(checkpoint) and Path(checkpoint).is_file()
    problems = []
    if not identity["pretrained"]:
        if has_file or not expert.get("tiny_fallback"):
            problems.append(f"vision expert: the QC model was trained with the untrained tiny expert, the cohort "
                            f"has expert.checkpoint {checkpoint!r} and tiny_fallback {expert.get('tiny_fallback')}")
    elif not has_file:
        problems.append(f"vision expert: the QC model needs the {identity['architecture']} checkpoint with SHA-256 "
                        f"{identity['checkpoint_sha256']}; the cohort's expert.checkpoint {checkpoint!r} is not a file")
    else:
        if expert["architecture"] != identity["architecture"]:
            problems.append(f"vision expert architecture: bundle {identity['architecture']!r}, cohort "
                            f"{expert['architecture']!r}")
        if file_sha256(checkpoint) != identity["checkpoint_sha256"]:
            problems.append(f"vision expert checksum: {checkpoint} is not the checkpoint the QC model was trained "
                            f"with (SHA-256 {identity['checkpoint_sha256']})")
    token_grid = cohort_encoder(config)["token_grid"]
    if token_grid != identity["token_grid"]:
        problems.append(f"vision expert token grid: bundle {identity['token_grid']}, cohort {token_grid} "
                        "(model.encoder.token_grid)")
    return problems


def cohort_encoder(config: dict[str, Any]) -> dict[str, Any]:
    """The cohort's resolved ``encoder`` settings (preset with the config's model overrides)."""
    return deep_merge(PRESETS[config["preset"]], config["model"])["encoder"]


def compatibility_problems(description: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Why a bundle does not fit a cohort config: label names, modality, vision expert."""
    problems = []
    cohort_labels = {str(v): n for v, n in label_map(config).items()}
    if cohort_labels != description["label_names"]:
        problems.append(f"label names: bundle {description['label_names']}, cohort {cohort_labels}")
    if config["modality"] != description["modality"]:
        problems.append(f"modality: bundle {description['modality']}, cohort {config['modality']}")
    return problems + cohort_expert_problems(description["expert"], config)


def check_bundle(bundle_dir: str | os.PathLike, config: dict[str, Any]) -> dict[str, Any]:
    """The bundle's description, after checking its files and its fit with ``config``; raises
    :class:`BundleError` naming every problem."""
    description = read_bundle(bundle_dir)
    problems = manifest_problems(bundle_dir) + compatibility_problems(description, config)
    if problems:
        raise BundleError(f"qc_model {bundle_dir} cannot be used for cohort {config['cohort']}:\n  - "
                          + "\n  - ".join(problems))
    return description


def require_expert(info: dict[str, Any], weights_sha256: str) -> None:
    """Refuse a loaded vision expert (its ``info`` record) whose weights are not the QC model's."""
    if info["weights_sha256"] != weights_sha256:
        raise ValueError(f"vision expert {info['checkpoint']} has weights SHA-256 {info['weights_sha256']}; the "
                         f"QC model (qc_model) was trained with {weights_sha256}")


def import_bundle(bundle_dir: str | os.PathLike, models_dir: str | os.PathLike, fingerprint_out: str | os.PathLike,
                  plan_out: str | os.PathLike) -> None:
    """Copy a verified bundle into a cohort's results: the networks and the model card (with ``qc_model``: where
    the model comes from) into ``models_dir``, the training fingerprint and the plan to their cohort paths."""
    folder = Path(bundle_dir)
    problems = manifest_problems(folder)
    if problems:
        raise BundleError(f"qc_model {folder}: " + "; ".join(problems))
    description = read_bundle(folder)
    for name, dest in (("vae.pt", Path(models_dir) / "vae.pt"), ("ldm.pt", Path(models_dir) / "ldm.pt"),
                       ("fingerprint.json", fingerprint_out), ("plan.json", plan_out),
                       *((name, Path(models_dir) / name) for name in OPTIONAL_MODEL_FILES
                         if (folder / name).is_file())):
        with atomic_path(dest) as tmp:
            shutil.copyfile(folder / name, tmp)
    card = read_json(folder / "model_card.json")
    card["qc_model"] = {
        "source": str(folder.resolve()),
        "training_cohort": description["training_cohort"],
        "exported": description["exported"],
        "pipeline_version": description["pipeline_version"],
        "manifest_sha256": file_sha256(folder / MANIFEST),
        **({"fits": description["fits"]} if description.get("fits") else {}),
    }
    write_json(card, Path(models_dir) / "model_card.json")
