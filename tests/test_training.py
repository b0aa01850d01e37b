"""Both training stages on a tiny phantom cohort: outputs, resumption after a 'kill', the model card, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nnqc_pipe.models import presets
from nnqc_pipe.models.embed import embed_subject, load_embeddings
from nnqc_pipe.models.pgt import generate_pgt, load_models
from nnqc_pipe.models.train_ldm import train_ldm
from nnqc_pipe.models.train_vae import train_vae

PLAN = {"patch_size": [32, 32], "n_classes": 3}
TINY = {
    "vae": {
        "channels": [8, 16],
        "attention_levels": [False, False],
        "norm_num_groups": 8,
        "disc_channels": 8,
        "disc_layers": 1,
        "batch_size": 8,
        "epochs": 2,
        "adv_warmup_epochs": 1,
        "loss_weights": {"ce": 1.0},
    },
    "ldm": {
        "channels": [16, 16],
        "attention_levels": [False, True],
        "num_head_channels": 8,
        "norm_num_groups": 8,
        "batch_size": 8,
        "epochs": 2,
        "val_every": 1,
        "val_ddim_steps": 2,
        "val_max_subjects": 2,
    },
    "experts": {"d_model": 16, "n_queries": 2, "n_heads": 2, "n_fourier": 4},
    "encoder": {"tiny_fallback": True, "token_grid": 2},
    "inference": {"batch_size": 16},
}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _phantom(rng: np.random.Generator, n_slices: int = 8, size: int = 32) -> dict[str, np.ndarray]:
    """An ellipsoid with a core (classes 1, 2) that grows and shrinks along the slices, plus a noisy image."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(12, 20, 2)
    a, b = rng.uniform(5, 9, 2)
    label = np.zeros((n_slices, size, size), np.uint8)
    for s in range(n_slices):
        grow = np.sin(np.pi * (s + 0.5) / n_slices)
        r = ((yy - cy) / (a * grow + 1)) ** 2 + ((xx - cx) / (b * grow + 1)) ** 2
        label[s][r < 1] = 1
        label[s][r < 0.4] = 2
    image = (label + rng.normal(0, 0.3, label.shape)).astype(np.float32)
    ratio = (np.arange(n_slices) / (n_slices - 1)).astype(np.float32)
    return {"image": image, "label": label, "slice_ratio": ratio}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """Six preprocessed phantom subjects (4 train, 2 validation) and their embedding caches."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    cfg = presets.resolve("cpu", TINY, PLAN)
    npz, emb = [], []
    for i in range(6):
        path = root / "preprocessed" / f"s{i}.npz"
        path.parent.mkdir(exist_ok=True)
        np.savez(path, **_phantom(rng))
        embed_subject(path, root / "embeddings" / f"s{i}.npz", cfg["encoder"], "cpu")
        npz.append(str(path))
        emb.append(str(root / "embeddings" / f"s{i}.npz"))
    return {"root": root, "cfg": cfg, "train": npz[:4], "val": npz[4:], "train_emb": emb[:4], "val_emb": emb[4:]}


def _cfg(cohort: dict, section: str, epochs: int) -> dict:
    return presets.resolve("cpu", TINY | {section: TINY[section] | {"epochs": epochs}}, PLAN)


def _run_vae(cohort: dict, out: Path, epochs: int) -> dict:
    train_vae(cohort["train"], cohort["val"], PLAN, _cfg(cohort, "vae", epochs), out, "cpu", seed=7)
    return torch.load(out / "vae.pt", weights_only=True)


def _run_ldm(cohort: dict, vae_dir: Path, out: Path, epochs: int) -> dict:
    cfg = _cfg(cohort, "ldm", epochs)
    train_ldm(
        cohort["train"],
        cohort["val"],
        cohort["train_emb"],
        cohort["val_emb"],
        PLAN,
        cfg,
        vae_dir / "vae.pt",
        out,
        "cpu",
        seed=7,
    )
    return torch.load(out / "ldm.pt", weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def vae_dir(cohort) -> Path:
    """An uninterrupted two-epoch VAE run."""
    out = cohort["root"] / "vae_full"
    _run_vae(cohort, out, epochs=2)
    return out


def test_vae_writes_outputs_and_curves(vae_dir):
    ckpt = torch.load(vae_dir / "vae.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * 4 and 0.0 <= ckpt["best_score"] <= 1.0
    assert {"model", "discriminator", "opt_g", "opt_d", "best_model", "config_hash"} <= ckpt.keys()
    assert ckpt["perceptual"]["enabled"] is False and "reason" in ckpt["perceptual"]
    curves = pd.read_csv(vae_dir / "vae_curves.csv")
    assert list(curves["epoch"]) == [1, 2]
    assert {"loss", "dice", "ce", "kl", "val_dice", "seconds", "slices_per_s"} <= set(curves.columns)
    assert (curves["ce"] > 0).all(), "the cross-entropy term is on (loss_weights.ce)"
    assert np.isnan(curves["adv_g"][0]) and curves["adv_g"][1] > 0, "adversarial term starts after warm-up"


def test_vae_resumes_where_a_killed_run_stopped(cohort, vae_dir, caplog):
    out = cohort["root"] / "vae_resumed"
    first = _run_vae(cohort, out, epochs=1)
    assert first["epoch"] == 1
    caplog.set_level("INFO")
    resumed = _run_vae(cohort, out, epochs=2)
    assert "resuming from" in caplog.text and "after epoch 1" in caplog.text
    assert resumed["step"] == 2 * 4 and len(resumed["curves"]) == 2
    assert resumed["curves"][0] == first["curves"][0], "the first epoch must not be re-run"
    full = torch.load(vae_dir / "vae.pt", weights_only=True)
    _assert_same_weights(resumed["model"], full["model"])
    _assert_same_weights(resumed["opt_g"]["state"][0], full["opt_g"]["state"][0])


def test_changed_configuration_starts_afresh(cohort, vae_dir, caplog):
    out = cohort["root"] / "vae_changed"
    _run_vae(cohort, out, epochs=1)
    cfg = presets.resolve("cpu", TINY | {"vae": TINY["vae"] | {"epochs": 1, "lr": 3e-4}}, PLAN)
    train_vae(cohort["train"], cohort["val"], PLAN, cfg, out, "cpu", seed=7)
    assert "another configuration" in caplog.text
    assert torch.load(out / "vae.pt", weights_only=True)["epoch"] == 1


@pytest.fixture(scope="module")
def ldm_dir(cohort, vae_dir) -> Path:
    """An uninterrupted two-epoch LDM run on the VAE above."""
    out = cohort["root"] / "ldm_full"
    _run_ldm(cohort, vae_dir, out, epochs=2)
    return out


def test_ldm_writes_full_state_curves_and_model_card(ldm_dir, vae_dir):
    ckpt = torch.load(ldm_dir / "ldm.pt", weights_only=True)
    assert {"model", "ema", "optimizer", "lr_schedule", "best_model", "config_hash", "scale_factor"} <= ckpt.keys()
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * 4 and ckpt["scale_factor"] > 0
    curves = pd.read_csv(ldm_dir / "ldm_curves.csv")
    assert {"loss", "val_dice", "val_dice_s0.3", "val_dice_s0.5", "seconds", "slices_per_s"} <= set(curves.columns)
    # the QC error of the validation candidates is measured too: 1 - mean |predicted DSC - real DSC|
    assert {"val_qc", "val_qc_mae_s0.3", "val_qc_mae_s0.5"} <= set(curves.columns)
    qc = curves.dropna(subset=["val_qc"])
    assert np.allclose(qc["val_qc"], 1 - qc[["val_qc_mae_s0.3", "val_qc_mae_s0.5"]].mean(axis=1))
    card = json.loads((ldm_dir / "model_card.json").read_text())
    assert card["encoder"]["architecture"] == "nnqc-tiny-vit" and card["encoder"]["pretrained"] is False
    assert card["perceptual_loss"]["enabled"] is False
    assert card["scale_factor"] == ckpt["scale_factor"]
    assert card["ldm"]["best_val_dice"] == ckpt["best_scores"]["val_dice"] and card["ldm"]["selected_on"] == "val_dice"
    assert set(card["checkpoints"]) == {"vae.pt", "ldm.pt"} and card["preset"] == "cpu"
    assert set(card["ldm"]["candidate_scores"]) == {"candidate_dice_s0.3", "candidate_dice_s0.5"}


def test_ldm_resumes_where_a_killed_run_stopped(cohort, vae_dir, ldm_dir, caplog):
    out = cohort["root"] / "ldm_resumed"
    first = _run_ldm(cohort, vae_dir, out, epochs=1)
    caplog.set_level("INFO")
    resumed = _run_ldm(cohort, vae_dir, out, epochs=2)
    assert "resuming from" in caplog.text
    assert resumed["step"] == 2 * 4 and resumed["curves"][0] == first["curves"][0]
    assert resumed["scale_factor"] == first["scale_factor"]
    full = torch.load(ldm_dir / "ldm.pt", weights_only=True)
    _assert_same_weights(resumed["model"], full["model"])
    _assert_same_weights(resumed["ema"], full["ema"])


def test_trained_models_generate_pgt(cohort, ldm_dir, vae_dir):
    (ldm_dir / "vae.pt").write_bytes((vae_dir / "vae.pt").read_bytes())
    models = load_models(ldm_dir, "cpu")
    data = np.load(cohort["val"][0])
    pgt = generate_pgt(
        models,
        data["label"],
        data["slice_ratio"],
        load_embeddings(cohort["val_emb"][0]),
        image=data["image"],
        ddim_steps=3,
        n_samples=2,
        batch_size=8,
        seed=0,
    )
    assert pgt.probabilities.shape == (8, 3, 32, 32) and np.isfinite(pgt.uncertainty).all()
    assert models.scale_factor == torch.load(ldm_dir / "ldm.pt", weights_only=True)["scale_factor"]


def test_position_only_ldm_needs_no_embeddings(cohort, vae_dir):
    cfg = presets.resolve(
        "cpu", TINY | {"experts": TINY["experts"] | {"mode": "position"}, "ldm": TINY["ldm"] | {"epochs": 1}}, PLAN
    )
    out = cohort["root"] / "ldm_position"
    train_ldm(cohort["train"], cohort["val"], None, None, PLAN, cfg, vae_dir / "vae.pt", out, "cpu", seed=1)
    card = json.loads((out / "model_card.json").read_text())
    assert card["encoder"]["used"] is False and card["conditioning_mode"] == "position"


def test_ldm_trained_with_image_dropout_samples_with_image_guidance(cohort, vae_dir):
    cfg = presets.resolve("cpu", TINY | {"ldm": TINY["ldm"] | {"epochs": 1, "image_dropout": 0.5}}, PLAN)
    out = cohort["root"] / "ldm_image_dropout"
    train_ldm(cohort["train"], cohort["val"], cohort["train_emb"], cohort["val_emb"], PLAN, cfg, vae_dir / "vae.pt",
              out, "cpu", seed=3)
    (out / "vae.pt").write_bytes((vae_dir / "vae.pt").read_bytes())
    models = load_models(out, "cpu")
    assert models.cfg["ldm"]["image_dropout"] == 0.5
    data = np.load(cohort["val"][0])
    args = (models, data["label"], data["slice_ratio"], load_embeddings(cohort["val_emb"][0]))
    plain = generate_pgt(*args, image=data["image"], ddim_steps=2, seed=0)
    guided = generate_pgt(*args, image=data["image"], ddim_steps=2, seed=0, image_guidance=2.0)
    assert not np.allclose(plain.probabilities, guided.probabilities)
