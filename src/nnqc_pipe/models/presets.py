"""Model and training presets: ``paper`` (nnQC reference sizes, A100 nodes), ``cpu`` (small), ``tiny`` (tests, demo).

A preset is a nested dict; :func:`resolve` deep-merges a cohort's overrides onto it and fills in what the plan
decides (patch size, number of classes), so every field stays overridable from the config file. The resolved
dict is what ``train_vae``, ``train_ldm`` and ``sampling`` receive as ``cfg``.

Fields that only change how long a run lasts (``RUN_LENGTH_KEYS``) are left out of the training-state hash, so
raising ``epochs`` continues a finished or killed run instead of restarting it.
"""

from __future__ import annotations

import copy
from typing import Any

from nnqc_pipe.config import config_hash, deep_merge
from nnqc_pipe.degrade import check_severity_mix

CONDITIONING_MODES = ("none", "image", "position", "full")
CANDIDATE_ENCODINGS = ("coverage", "vae", "unshuffle")
SELECTION_SCORES = ("val_dice", "val_qc")
RUN_LENGTH_KEYS = ("epochs", "max_minutes", "patience")
# The preset sections each trained network depends on (its training hash).
SECTION_DEPENDENCIES = {"vae": ["vae"], "ldm": ["vae", "ldm", "experts", "encoder", "noise"],
                        "segmenter": ["segmenter"], "qcnet": ["qcnet"], "latent_search": ["latent_search"]}
# Inference-time settings inside a training section: never in a training hash or digest.
SEARCH_KEY = "search"
# Where the latent search's window sits (``latent_search.search.window``): nnQC's pGT's box or the candidate's.
SEARCH_WINDOWS = ("pgt", "candidate")
# The QC network's variants (``qcnet.spatial_dims``): per slice or the whole stack.
SPATIAL_DIMS = (2, 3)
# Sections with a digest of their own (their rule's param): left out of the digest of the other training rules, so
# that adding them did not retrain the models of existing results.
OWN_DIGEST_SECTIONS = ("latent_search",)
# Keys added to a section after results existed, with the value that does what the code did before: at that value
# they are left out of the digests and training hashes, so that adding them retrained nothing; any other value
# (a user's override) counts as usual.
DIGEST_EXEMPT = {"qcnet": {"spatial_dims": 2}}

_COMMON: dict[str, Any] = {
    "encoder": {
        # E2, the frozen vision expert. UniMedCLIP ViT-B/16 was trained with QuickGELU.
        "architecture": "ViT-B-16-quickgelu",
        "checkpoint": None,
        "tiny_fallback": False,
        "tiny_checkpoint": None,
        "allow_unsafe_pickle": False,
        "token_grid": 4,
        "batch_size": 32,
    },
    # The paper's spatial condition is the candidate's coverage at latent size, the image only reaches the LDM
    # through E2; the cpu/tiny presets feed candidate and image losslessly (see models/ldm.py).
    # Checkpoint selection: "val_dice" (pGT Dice against GT) or "val_qc" (1 − |predicted − real DSC| of the
    # validation candidates); validation pGTs start from pure noise unless val_start_strength < 1 (SDEdit).
    # The training candidates' severity mix (degrade.sample_severity): shares of clean, light (up to light_max)
    # and destroyed candidates, the rest uniform over [0, 1]. image_dropout: the share of training samples seen
    # without the image (channels and E2), which inference.image_guidance needs.
    "ldm": {"candidate_encoding": "unshuffle", "image_input": True, "min_snr_gamma": 5.0, "select_on": "val_dice",
            "val_start_strength": 1.0, "image_dropout": 0.0,
            "severity_mix": {"clean": 0.1, "light": 0.0, "destroyed": 0.1, "light_max": 0.2}},
    # The learned QC opinion (models/segmenter.py, models/qcnet.py): the k-fold segmenters that make its training
    # candidates, saved at the ``checkpoints`` epochs (poor to converged), and the QC network (a MONAI residual UNet
    # on image + one-hot candidate, predicting per-group "extra" and "missed" voxel error maps; loss weights of
    # the error-map BCE, the error-map Dice and the MAE of the volume DSC counted from the maps; ``spatial_dims`` 2
    # runs it per slice, 3 on the whole stack, measured in docs/method.md, "2D or 3D").
    "segmenter": {"channels": [16, 32, 64], "res_units": 1, "lr": 1e-3, "batch_size": 16,
                  "checkpoints": [1, 3, 8, 20], "max_minutes": 6},
    "qcnet": {"spatial_dims": 2, "channels": [16, 32, 64, 128], "res_units": 2, "lr": 1e-3, "epochs": 30,
              "volumes_per_epoch": 120, "volumes_per_step": 2, "patience": 8, "max_minutes": 12, "batch_size": 64,
              "loss_weights": {"bce": 1.0, "dice": 0.5, "dsc": 2.0}},
    # Wang et al.'s latent search (models/latent_search.py): the joint image–mask VAE on a ``grid``² window around
    # each volume's mask (side: the foreground box's extent times ``margin``; jittered in training when
    # ``augment``; each of ``channels`` halves it; loss image MSE + mask CE + beta·KL; selected on the validation
    # slices' reconstruction Dice) and the search at inference (Adam ``steps`` at ``lr`` from the encoder's mean,
    # ``batch_size`` slices at a time, in the window of nnQC's pGT of the candidate: ``window`` pgt, or candidate).
    # Measured on shared ACDC and hippocampus in docs/method.md.
    "latent_search": {"grid": 64, "margin": 1.3, "augment": True, "channels": [16, 32, 64, 128], "latent_size": 64,
                      "beta": 1e-3, "lr": 1e-3, "batch_size": 32, "epochs": 600, "patience": 100, "max_minutes": 6,
                      "val_max_slices": 512,
                      "search": {"steps": 30, "lr": 0.05, "image_weight": 10.0, "mask_weight": 1.0,
                                 "prior_weight": 1e-3, "batch_size": 64, "window": "pgt"}},
    "noise": {
        "n_train_timesteps": 1000,
        "schedule": "scaled_linear_beta",
        "beta_start": 0.0015,
        "beta_end": 0.0195,
        # x0 prediction: on hippocampus (cpu preset, same budget) validation pGT Dice 0.79 after 3 epochs, against
        # 0.19 for ε prediction (0.54 after 12); the paper preset keeps the paper's ε.
        "prediction_type": "sample",
    },
}

_CPU: dict[str, Any] = deep_merge(
    _COMMON,
    {
        "plan_patch_size": None,
        "vae": {
            "channels": [16, 32, 32],
            "num_res_blocks": 1,
            "attention_levels": [False, False, False],
            "nonlocal_attn": False,
            # A sharper autoencoder (latent_channels 8, loss_weights.ce 1, 60 epochs) reconstructs hippocampus at
            # foreground Dice 0.97 instead of 0.89 but makes the pGT over-rate real segmenters' masks; measured in
            # docs/method.md ("The sharper regime"), it stays opt-in.
            "latent_channels": 2,
            "norm_num_groups": 16,
            "disc_channels": 32,
            "disc_layers": 2,
            "epochs": 10,
            "batch_size": 8,
            "lr": 1e-3,
            "disc_lr": 5e-4,
            "loss_weights": {"kl": 1e-6, "dice": 1.0, "ce": 0.0, "adv": 0.01, "perc": 0.1},
            "adv_warmup_epochs": 8,
            "perceptual": {"network_type": "resnet50", "weights": None},
            "patience": 10,
            "max_minutes": 8,
            "val_max_slices": 512,
        },
        "ldm": {
            "channels": [32, 64, 64],
            "num_res_blocks": 1,
            "attention_levels": [False, True, True],
            "num_head_channels": 32,
            "norm_num_groups": 16,
            "epochs": 40,
            "batch_size": 16,
            "lr": 5e-4,
            "ema_decay": 0.995,
            "grad_clip": 1.0,
            "warmup_steps": 100,
            "patience": 30,
            "max_minutes": 12,
            "val_every": 3,
            "val_severities": [0.3, 0.5],
            "val_ddim_steps": 10,
            "val_max_subjects": 6,
        },
        "experts": {"mode": "full", "d_model": 64, "n_queries": 4, "n_heads": 4, "n_fourier": 8},
        # One DDIM step from pure noise is the network's x0 estimate, the mean of the plausible masks: on the
        # real-segmenter benchmark it rates real models' masks better than 20 steps (a sample), at a sixth of the
        # cost, and the degraded levels a little worse (docs/method.md, "How many DDIM steps").
        "inference": {"ddim_steps": 1, "n_samples": 1, "batch_size": 64},
    },
)

PRESETS: dict[str, dict[str, Any]] = {
    "paper": deep_merge(
        _COMMON,
        {
            "plan_patch_size": [256, 256],
            "vae": {
                "channels": [64, 128, 256],
                "num_res_blocks": 2,
                "attention_levels": [False, False, False],
                "nonlocal_attn": True,
                "latent_channels": 2,
                "norm_num_groups": 32,
                "disc_channels": 64,
                "disc_layers": 3,
                "epochs": 500,
                "batch_size": 32,
                "lr": 5e-5,
                "disc_lr": 5e-5,
                "loss_weights": {"kl": 1e-6, "dice": 1.0, "ce": 0.0, "adv": 0.01, "perc": 1.0},
                "adv_warmup_epochs": 10,
                "perceptual": {"network_type": "resnet50", "weights": None},
                "patience": 50,
                "max_minutes": None,
                "val_max_slices": 512,
            },
            "ldm": {
                "candidate_encoding": "coverage",
                "image_input": False,
                "channels": [32, 64, 128, 256],
                "num_res_blocks": 2,
                "attention_levels": [False, True, True, True],
                "num_head_channels": 32,
                "norm_num_groups": 32,
                "epochs": 1500,
                "batch_size": 32,
                "lr": 2.5e-5,
                "ema_decay": 0.999,
                "grad_clip": 1.0,
                "warmup_steps": 500,
                "patience": 100,
                "max_minutes": None,
                "val_every": 10,
                "val_severities": [0.3, 0.5],
                "val_ddim_steps": 20,
                "val_max_subjects": 16,
            },
            "experts": {"mode": "full", "d_model": 512, "n_queries": 8, "n_heads": 8, "n_fourier": 16},
            "segmenter": {"channels": [32, 64, 128, 256], "res_units": 2, "max_minutes": None},
            "qcnet": {"channels": [32, 64, 128, 256, 320], "epochs": 200, "volumes_per_epoch": 400, "patience": 30,
                      "max_minutes": None},
            "latent_search": {"grid": 128, "channels": [32, 64, 128, 256], "latent_size": 128, "epochs": 1000,
                              "patience": 150, "max_minutes": None, "search": {"steps": 100}},
            "noise": {"prediction_type": "epsilon"},
            "inference": {"ddim_steps": 20, "n_samples": 1, "batch_size": 32},
        },
    ),
    "cpu": _CPU,
    # tiny = cpu with smaller networks and shorter runs: what tests and the demo need to finish in minutes
    "tiny": deep_merge(
        _CPU,
        {
            "vae": {
                "norm_num_groups": 8,
                "disc_channels": 16,
                "epochs": 4,
                "batch_size": 16,
                "adv_warmup_epochs": 2,
                "patience": None,
                "max_minutes": 3,
                "val_max_slices": 128,
            },
            "ldm": {
                "channels": [16, 32],
                "attention_levels": [False, True],
                "num_head_channels": 16,
                "norm_num_groups": 8,
                "epochs": 4,
                "lr": 1e-3,
                "ema_decay": 0.99,
                "warmup_steps": 20,
                "patience": None,
                "max_minutes": 3,
                "val_every": 2,
                "val_ddim_steps": 5,
                "val_max_subjects": 2,
            },
            "experts": {"d_model": 32, "n_heads": 2},
            "segmenter": {"channels": [8, 16], "checkpoints": [1, 2], "max_minutes": 2},
            "qcnet": {"channels": [8, 16, 32], "res_units": 1, "epochs": 2, "volumes_per_epoch": 16, "patience": None,
                      "max_minutes": 2},
            "latent_search": {"grid": 32, "channels": [8, 16], "latent_size": 16, "epochs": 2, "patience": None,
                              "max_minutes": 2,
                              "val_max_slices": 128, "search": {"steps": 10}},
            "inference": {"ddim_steps": 10, "batch_size": 32},
        },
    ),
}


def resolve(preset_name: str, overrides: dict[str, Any] | None, plan: dict[str, Any]) -> dict[str, Any]:
    """Return the preset ``preset_name`` with ``overrides`` deep-merged in and the plan's sizes filled in.

    ``plan`` must carry ``patch_size`` ([H, W]) and ``n_classes``; they are copied to the top level of the
    result because the networks are built for exactly those slices.
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    cfg = deep_merge(PRESETS[preset_name], overrides or {})
    cfg["preset"] = preset_name
    cfg["patch_size"] = [int(v) for v in plan["patch_size"]]
    cfg["n_classes"] = int(plan["n_classes"])
    _validate(cfg)
    return cfg


def training_hash(cfg: dict[str, Any], section: str, extra: dict[str, Any] | None = None) -> str:
    """Hash of what a training run's result depends on, run-length fields excluded.

    ``section`` is ``vae``, ``ldm``, ``segmenter``, ``qcnet`` or ``latent_search``; the LDM also depends on the
    autoencoder, the experts, the encoder and the noise schedule. ``extra`` adds run inputs (subject lists, seed).
    """
    keys = ["patch_size", "n_classes", *SECTION_DEPENDENCIES[section]]
    relevant = {k: copy.deepcopy(_digested(k, cfg[k])) for k in keys}
    for key in (*RUN_LENGTH_KEYS, SEARCH_KEY):
        relevant[section].pop(key, None)
    relevant["extra"] = copy.deepcopy(extra or {})
    return config_hash(relevant)


def _validate(cfg: dict[str, Any]) -> None:
    """Fail early, naming the config key, on settings the networks cannot be built with."""
    for section in ("vae", "ldm"):
        groups = cfg[section]["norm_num_groups"]
        bad = [c for c in cfg[section]["channels"] if c % groups]
        if bad:
            raise ValueError(f"{section}.channels {bad} are not multiples of {section}.norm_num_groups={groups}")
        if len(cfg[section]["attention_levels"]) != len(cfg[section]["channels"]):
            raise ValueError(f"{section}.attention_levels must have one entry per {section}.channels level")
    if cfg["qcnet"]["spatial_dims"] not in SPATIAL_DIMS:
        raise ValueError(f"qcnet.spatial_dims must be one of {SPATIAL_DIMS}, got {cfg['qcnet']['spatial_dims']!r}")
    if cfg["ldm"]["select_on"] not in SELECTION_SCORES:
        raise ValueError(f"ldm.select_on must be one of {SELECTION_SCORES}")
    if cfg["ldm"]["candidate_encoding"] not in CANDIDATE_ENCODINGS:
        raise ValueError(f"ldm.candidate_encoding must be one of {CANDIDATE_ENCODINGS}")
    mix = cfg["ldm"]["severity_mix"]
    try:
        check_severity_mix(mix["clean"], mix["light"], mix["destroyed"])
    except ValueError as err:
        raise ValueError(f"ldm.severity_mix: {err}") from None
    mode = cfg["experts"]["mode"]
    if mode not in CONDITIONING_MODES:
        raise ValueError(f"experts.mode {mode!r} is not one of {CONDITIONING_MODES}")
    dropout = cfg["ldm"]["image_dropout"]
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"ldm.image_dropout must lie in [0, 1), got {dropout}")
    if dropout and not (cfg["ldm"]["image_input"] or mode in ("image", "full")):
        raise ValueError(f"ldm.image_dropout {dropout}: the model sees no image (ldm.image_input false, "
                         f"experts.mode {mode!r})")
    factor = 2 ** (len(cfg["vae"]["channels"]) - 1)
    if any(s % factor for s in cfg["patch_size"]):
        raise ValueError(f"patch_size {cfg['patch_size']} must be a multiple of {factor} for vae.channels")
    latent_factor = 2 ** len(cfg["latent_search"]["channels"])
    if cfg["latent_search"]["grid"] % latent_factor:
        raise ValueError(f"latent_search.grid {cfg['latent_search']['grid']} must be a multiple of {latent_factor} "
                         "for latent_search.channels")
    if cfg["n_classes"] < 2:
        raise ValueError("n_classes must be at least 2 (background + one structure)")


def required_divisor(cfg: dict[str, Any]) -> int:
    """Patch-size multiple at which neither the autoencoder nor the UNet needs padding (a planner hint)."""
    return 2 ** (len(cfg["vae"]["channels"]) - 1) * 2 ** (len(cfg["ldm"]["channels"]) - 1)


def check_overrides(overrides: dict[str, Any], preset_name: str, where: str = "model") -> None:
    """Reject, naming the key, an override the preset does not have or of another type than the preset's value.

    Called when the workflow starts (``rules/common.smk``), so that ``model: {ldm: {epoch: 3}}`` stops the run
    before any job instead of failing in the training job. A preset value of ``None`` accepts any type; ints
    are accepted where floats are expected.
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    _check_against(overrides, PRESETS[preset_name], where, preset_name)


def training_digest(preset_name: str, section: str | None = None) -> str:
    """Hash of a preset's training values: of ``section`` alone (one of :data:`OWN_DIGEST_SECTIONS`), or of every
    other section. Inference settings (the ``inference`` section, a section's ``search``) never retrain."""
    preset = {name: _digested(name, values) for name, values in PRESETS[preset_name].items()}
    if section is not None:
        return config_hash({k: v for k, v in preset[section].items() if k != SEARCH_KEY})
    return config_hash({k: v for k, v in preset.items() if k not in ("inference", *OWN_DIGEST_SECTIONS)})


def _digested(section: str, values: Any) -> Any:
    """A config section as digests and training hashes see it: without its :data:`DIGEST_EXEMPT` keys that hold
    their former behaviour's value."""
    exempt = DIGEST_EXEMPT.get(section, {})
    if not exempt:
        return values
    return {k: v for k, v in values.items() if not (k in exempt and v == exempt[k])}


def search_settings(overrides: dict[str, Any], preset_name: str) -> dict[str, Any]:
    """The latent search's settings (``latent_search.search``) of a preset with the config's ``model`` overrides;
    an unknown ``window`` stops the workflow at start, naming the key."""
    settings = dict(deep_merge(PRESETS[preset_name], overrides)["latent_search"][SEARCH_KEY])
    if settings["window"] not in SEARCH_WINDOWS:
        raise ValueError(f"model.latent_search.search.window {settings['window']!r} is not one of {SEARCH_WINDOWS}")
    return settings


def resolve_inference(inference: dict[str, Any], overrides: dict[str, Any], preset_name: str) -> dict[str, Any]:
    """The config's ``inference`` section with ``ddim_steps`` taken from the preset (and ``model`` overrides) where
    the config leaves it unset: each preset samples with the step count its prediction type was measured at."""
    resolved = dict(inference)
    if resolved.get("ddim_steps") is None:
        resolved["ddim_steps"] = int(deep_merge(PRESETS[preset_name], overrides)["inference"]["ddim_steps"])
    return resolved


def check_guidance(inference: dict[str, Any], overrides: dict[str, Any], preset_name: str) -> None:
    """Reject ``inference.image_guidance`` != 1 when the model to be trained gets no image dropout.

    Called when the workflow starts, so the mistake stops the run before training instead of in every infer job.
    """
    guidance = float(inference.get("image_guidance", 1.0))
    dropout = deep_merge(PRESETS[preset_name], overrides)["ldm"]["image_dropout"]
    if guidance != 1.0 and not dropout:
        raise ValueError(f"inference.image_guidance {guidance:g} needs model.ldm.image_dropout > 0 (preset "
                         f"{preset_name!r} trains without it, so the image-free prediction guidance uses is unlearnt)")


def _check_against(overrides: dict[str, Any], reference: dict[str, Any], where: str, preset_name: str) -> None:
    if not isinstance(overrides, dict):
        raise ValueError(f"config key {where} must be a mapping, got {type(overrides).__name__}")
    for key, value in overrides.items():
        path = f"{where}.{key}"
        if key not in reference:
            raise ValueError(f"config key {path} is not a field of preset {preset_name!r}; "
                             f"known keys under {where}: {sorted(reference)}")
        expected = reference[key]
        if isinstance(expected, dict):
            _check_against(value, expected, path, preset_name)
        elif expected is not None and value is not None and not _same_kind(value, expected):
            raise ValueError(f"config key {path} must be {type(expected).__name__} like the preset's "
                             f"{expected!r}, got {value!r}")


def _same_kind(value: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(expected, bool)
    if isinstance(expected, float):
        return isinstance(value, int | float)
    return isinstance(value, type(expected))


def plan_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The config's ``plan`` section with ``divisor: auto`` replaced by the preset networks' downsampling factor."""
    overrides = dict(config["plan"])
    if overrides["divisor"] == "auto":
        overrides["divisor"] = required_divisor(deep_merge(PRESETS[config["preset"]], config["model"]))
    return overrides


def model_settings(settings: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """The resolved model preset from the config's ``preset``, ``model``, ``expert`` and ``perceptual_weights``."""
    encoder = {**settings["expert"], "tiny_checkpoint": settings.get("tiny_checkpoint")}
    overrides = deep_merge(settings["model"], {"encoder": encoder})
    if settings.get("perceptual_weights"):
        overrides = deep_merge(overrides, {"vae": {"perceptual": {"weights": settings["perceptual_weights"]}}})
    return resolve(settings["preset"], overrides, plan)
