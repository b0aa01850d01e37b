"""Presets, devices, the autoencoder side, the LDM wrapper and pGT sampling, on tiny networks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision

from nnqc_pipe.dice import class_dice
from nnqc_pipe.models import presets
from nnqc_pipe.models.autoencoder import (
    MaskPerceptualLoss,
    autoencoder_kwargs,
    build_autoencoder,
    build_discriminator,
    build_perceptual,
    find_perceptual_weights,
    one_hot,
)
from nnqc_pipe.models.device import resolve_device
from nnqc_pipe.models.ldm import (
    ConditionalLDM,
    ddim_scheduler,
    drop_image,
    encode_candidate,
    spatial_condition,
    toe_kwargs,
    unet_kwargs,
)
from nnqc_pipe.models.pgt import PGTModels, generate_pgt, reconstruct, slice_uncertainty, start_timesteps
from nnqc_pipe.models.train_ldm import LDMTrainer

PLAN = {"patch_size": [32, 32], "n_classes": 3}
TINY = {
    "vae": {
        "channels": [8, 16],
        "attention_levels": [False, False],
        "norm_num_groups": 8,
        "disc_channels": 8,
        "disc_layers": 1,
    },
    "ldm": {
        "channels": [16, 16],
        "attention_levels": [False, True],
        "num_head_channels": 8,
        "norm_num_groups": 8,
        "candidate_encoding": "coverage",
        "image_input": False,
    },
    "experts": {"d_model": 16, "n_queries": 2, "n_heads": 2, "n_fourier": 4},
}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def cfg() -> dict:
    return presets.resolve("cpu", TINY, PLAN)


# --- presets and devices -------------------------------------------------------------------------


def test_presets_resolve_fill_plan_and_merge_overrides():
    paper = presets.resolve("paper", {"ldm": {"epochs": 3}}, {"patch_size": [256, 256], "n_classes": 2})
    assert paper["vae"]["channels"] == [64, 128, 256]
    assert paper["ldm"]["channels"] == [32, 64, 128, 256]
    assert paper["ldm"]["epochs"] == 3 and paper["ldm"]["lr"] == presets.PRESETS["paper"]["ldm"]["lr"]
    assert paper["patch_size"] == [256, 256] and paper["n_classes"] == 2
    assert paper["inference"]["ddim_steps"] == 20 and paper["vae"]["batch_size"] == 32
    assert presets.resolve("cpu", None, PLAN)["preset"] == "cpu"
    tiny = presets.resolve("tiny", None, PLAN)
    assert presets.required_divisor(tiny) == 4 * 2 and presets.required_divisor(paper) == 4 * 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vae": {"channels": [8, 12]}}, "norm_num_groups"),
        ({"experts": {"mode": "both"}}, "experts.mode"),
        ({"ldm": {"attention_levels": [True]}}, "attention_levels"),
        ({"ldm": {"image_dropout": 1.0}}, "image_dropout must lie"),
        ({"ldm": {"image_dropout": 0.2, "image_input": False}, "experts": {"mode": "position"}}, "sees no image"),
        ({"qcnet": {"spatial_dims": 1}}, "qcnet.spatial_dims"),
    ],
)
def test_presets_reject_unbuildable_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        presets.resolve("cpu", overrides, PLAN)


def test_image_guidance_is_checked_against_the_model_to_be_trained():
    presets.check_guidance({"image_guidance": 1.0}, {}, "cpu")
    presets.check_guidance({"image_guidance": 2.0}, {"ldm": {"image_dropout": 0.2}}, "cpu")
    with pytest.raises(ValueError, match="needs model.ldm.image_dropout"):
        presets.check_guidance({"image_guidance": 2.0}, {}, "cpu")


def test_ddim_steps_default_to_the_presets_and_never_retrain(monkeypatch):
    assert presets.resolve_inference({"samples": 2}, {}, "cpu") == {"samples": 2, "ddim_steps": 1}
    assert presets.resolve_inference({"ddim_steps": None}, {}, "paper")["ddim_steps"] == 20
    assert presets.resolve_inference({"ddim_steps": 7}, {}, "cpu")["ddim_steps"] == 7
    assert presets.resolve_inference({}, {"inference": {"ddim_steps": 4}}, "cpu")["ddim_steps"] == 4
    digest = presets.training_digest("cpu")
    changed = presets.deep_merge(presets.PRESETS["cpu"], {"inference": {"ddim_steps": 50}})
    monkeypatch.setitem(presets.PRESETS, "cpu", changed)
    assert presets.training_digest("cpu") == digest
    monkeypatch.setitem(presets.PRESETS, "cpu", presets.deep_merge(changed, {"ldm": {"lr": 1.0}}))
    assert presets.training_digest("cpu") != digest


def test_a_key_added_at_its_former_behaviour_retrains_nothing(monkeypatch):
    # qcnet.spatial_dims came after results existed: at 2 (what the network always was) the digests and the
    # training hash are those of a preset without the key; 3 is another network and retrains it
    resolved = presets.resolve("cpu", {}, PLAN)
    former = copy.deepcopy(resolved)
    del former["qcnet"]["spatial_dims"]
    assert presets.training_hash(resolved, "qcnet") == presets.training_hash(former, "qcnet")
    three = presets.resolve("cpu", {"qcnet": {"spatial_dims": 3}}, PLAN)
    assert presets.training_hash(three, "qcnet") != presets.training_hash(former, "qcnet")
    digest = presets.training_digest("cpu")
    without = copy.deepcopy(presets.PRESETS["cpu"])
    del without["qcnet"]["spatial_dims"]
    monkeypatch.setitem(presets.PRESETS, "cpu", without)
    assert presets.training_digest("cpu") == digest


def test_presets_reject_unknown_name_and_odd_patch():
    with pytest.raises(ValueError, match="unknown preset"):
        presets.resolve("gpu", None, PLAN)
    with pytest.raises(ValueError, match="multiple of 4"):
        presets.resolve("cpu", None, {"patch_size": [30, 32], "n_classes": 2})


def test_training_hash_ignores_run_length_only(cfg):
    longer = presets.resolve("cpu", TINY | {"ldm": TINY["ldm"] | {"epochs": 999, "max_minutes": 1}}, PLAN)
    assert presets.training_hash(cfg, "ldm") == presets.training_hash(longer, "ldm")
    other_lr = presets.resolve("cpu", TINY | {"ldm": TINY["ldm"] | {"lr": 1.0}}, PLAN)
    assert presets.training_hash(cfg, "ldm") != presets.training_hash(other_lr, "ldm")
    assert presets.training_hash(cfg, "vae") == presets.training_hash(other_lr, "vae")


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


# --- stage 1 ------------------------------------------------------------------------------------


def test_autoencoder_and_discriminator_shapes(cfg):
    ae = build_autoencoder(autoencoder_kwargs(cfg))
    x = one_hot(torch.randint(0, 3, (2, 32, 32)), 3)
    recon, z_mu, _ = ae(x)
    assert recon.shape == x.shape and recon.dtype == torch.float32
    assert z_mu.shape == (2, cfg["vae"]["latent_channels"], 16, 16)
    assert build_discriminator(cfg)(torch.softmax(recon, 1))[-1].ndim == 4


def test_perceptual_loss_off_without_local_weights(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    loss, info = build_perceptual({"network_type": "resnet50", "weights": None}, weight=0.1)
    assert loss is None and info["enabled"] is False and "nothing is downloaded" in info["reason"]
    assert "perceptual loss disabled" in caplog.text
    assert build_perceptual({"weights": None}, weight=0.0)[1]["reason"].endswith("is 0")


def test_perceptual_loss_from_local_file_has_gradient_on_soft_masks(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    weights.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    assert find_perceptual_weights({"weights": str(tmp_path)}) == weights, "TORCH_HOME layout"
    loss, info = build_perceptual({"network_type": "resnet50", "weights": str(weights)}, weight=1.0)
    assert isinstance(loss, MaskPerceptualLoss) and info["enabled"] is True
    logits = torch.randn(2, 3, 32, 32, requires_grad=True)
    value = loss(torch.softmax(logits, 1), one_hot(torch.randint(0, 3, (2, 32, 32)), 3))
    value.backward()
    assert torch.isfinite(value) and logits.grad.abs().sum() > 0


# --- stage 2 ------------------------------------------------------------------------------------


def test_coverage_encoding_is_class_coverage(cfg):
    cfg = cfg | {"vae": cfg["vae"] | {"channels": [8, 16, 16]}}
    cand = torch.zeros(1, 8, 8, dtype=torch.long)
    cand[0, :4, :4] = 1
    cand[0, 4:, 4:6] = 2
    lat = encode_candidate(cand, cfg, None, 1.0)
    assert lat.shape == (1, 2, 2, 2)
    assert lat[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert lat[0, 1].tolist() == [[0.0, 0.0], [0.0, 0.5]]


def test_unshuffle_condition_keeps_candidate_and_image_losslessly(cfg):
    cfg = cfg | {"ldm": cfg["ldm"] | {"candidate_encoding": "unshuffle", "image_input": True}}
    rng = np.random.default_rng(3)
    cand = torch.as_tensor(rng.integers(0, 3, (2, 32, 32)))
    image = torch.as_tensor(rng.normal(size=(2, 32, 32)).astype(np.float32))
    condition = spatial_condition(cand, image, cfg, None, 1.0)
    assert condition.shape == (2, 2 * 4 + 4, 16, 16)
    assert unet_kwargs(cfg)["in_channels"] == cfg["vae"]["latent_channels"] + 2 * 4 + 4
    back = torch.nn.functional.pixel_shuffle(condition, 2)
    assert torch.equal(back[:, 0] + 2 * back[:, 1], cand.float())
    assert torch.equal(back[:, 2], image)
    with pytest.raises(ValueError, match="image slices are needed"):
        spatial_condition(cand, None, cfg, None, 1.0)


def test_generate_pgt_with_image_input_depends_on_the_image(cfg):
    cfg = cfg | {"ldm": cfg["ldm"] | {"candidate_encoding": "unshuffle", "image_input": True}}
    models = _models(cfg)
    with torch.no_grad():  # MONAI zero-initialises the UNet's output convolution: give it weights
        for param in models.ldm.unet.out.parameters():
            param.normal_(std=0.1)
    rng = np.random.default_rng(4)
    cand = rng.integers(0, 3, (2, 32, 32)).astype(np.uint8)
    image = rng.normal(size=(2, 32, 32)).astype(np.float32)
    ratio, emb = np.array([0.2, 0.8]), _embeddings(2)
    a = generate_pgt(models, cand, ratio, emb, image=image, ddim_steps=2)
    b = generate_pgt(models, cand, ratio, emb, image=image * 3 + 1, ddim_steps=2)
    assert a.probabilities.shape == (2, 3, 32, 32)
    assert not np.allclose(a.probabilities, b.probabilities)
    with pytest.raises(ValueError, match="takes the image slices"):
        generate_pgt(models, cand, ratio, emb, ddim_steps=2)


def test_ldm_pads_latents_the_unet_cannot_halve(cfg):
    cfg = presets.resolve(
        "cpu", TINY | {"ldm": TINY["ldm"] | {"channels": [16, 16, 16], "attention_levels": [False, False, True]}}, PLAN
    )
    model = ConditionalLDM(unet_kwargs(cfg), toe_kwargs(cfg, pooled_dim=8, token_dim=8, n_tokens=4))
    noisy = torch.randn(2, cfg["vae"]["latent_channels"], 6, 10)
    eps = model(
        noisy, torch.tensor([1, 500]), torch.rand(2, 2, 6, 10), torch.rand(2), torch.randn(2, 8), torch.randn(2, 4, 8)
    )
    assert eps.shape == noisy.shape


# --- sampling -----------------------------------------------------------------------------------


def _models(cfg: dict, mode: str = "full") -> PGTModels:
    torch.manual_seed(0)
    cfg = cfg | {"experts": cfg["experts"] | {"mode": mode}}
    ldm = ConditionalLDM(unet_kwargs(cfg), toe_kwargs(cfg, pooled_dim=8, token_dim=8, n_tokens=4))
    vae = build_autoencoder(autoencoder_kwargs(cfg))
    return PGTModels(vae=vae.eval(), ldm=ldm.eval(), scale_factor=1.0, cfg=cfg, device=torch.device("cpu"))


def _weighted(models: PGTModels) -> PGTModels:
    """MONAI zero-initialises the UNet's output layer: give every all-zero parameter weights."""
    with torch.no_grad():
        for param in models.ldm.parameters():
            if not param.abs().sum():
                param.normal_(0, 0.1)
    return models


def _embeddings(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {
        "pooled": rng.normal(size=(n, 8)).astype(np.float32),
        "tokens": rng.normal(size=(n, 4, 8)).astype(np.float32),
    }


def test_generate_pgt_shapes_determinism_and_batch_independence(cfg):
    models = _models(cfg)
    rng = np.random.default_rng(0)
    cand = rng.integers(0, 3, (5, 32, 32)).astype(np.uint8)
    ratio = np.linspace(0, 1, 5).astype(np.float32)
    emb = {
        "pooled": rng.normal(size=(5, 8)).astype(np.float32),
        "tokens": rng.normal(size=(5, 4, 8)).astype(np.float32),
    }
    a = generate_pgt(models, cand, ratio, emb, ddim_steps=3, n_samples=2, batch_size=4, seed=1)
    b = generate_pgt(models, cand, ratio, emb, ddim_steps=3, n_samples=2, batch_size=10, seed=1)
    assert a.probabilities.shape == (5, 3, 32, 32) and a.uncertainty.shape == (5,)
    np.testing.assert_allclose(a.probabilities.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    assert np.all((a.uncertainty >= 0) & (a.uncertainty <= 1))
    with pytest.raises(ValueError, match="needs the subject's image embeddings"):
        generate_pgt(models, cand, ratio, None, ddim_steps=2)


def test_reconstruct_gives_batch_independent_class_probabilities(cfg):
    models = _models(cfg)
    cand = np.zeros((5, 32, 32), np.uint8)
    cand[:, 8:20, 8:20] = 1
    a, b = reconstruct(models, cand, batch_size=2), reconstruct(models, cand, batch_size=5)
    assert a.shape == (5, 3, 32, 32)
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_generate_pgt_without_image_embeddings_in_position_mode(cfg):
    pgt = generate_pgt(
        _models(cfg, "position"), np.zeros((2, 32, 32), np.uint8), np.array([0.0, 1.0]), None, ddim_steps=2
    )
    assert pgt.probabilities.shape == (2, 3, 32, 32)


@pytest.mark.parametrize(("encoding", "channels"), [("coverage", 2), ("vae", None), ("unshuffle", 8)])
def test_candidate_encodings_feed_the_unet(cfg, encoding, channels):
    channels = channels or cfg["vae"]["latent_channels"]  # the vae encoding is the candidate's own latent
    cfg = cfg | {"ldm": cfg["ldm"] | {"candidate_encoding": encoding}}
    models = _models(cfg)
    assert models.ldm.unet.conv_in.conv.in_channels == cfg["vae"]["latent_channels"] + channels
    cand = torch.zeros(2, 32, 32, dtype=torch.long)
    cand[:, 8:20, 8:20] = 1
    condition = models.condition(cand)
    assert condition.shape == (2, channels, 16, 16) and not condition.requires_grad
    pgt = generate_pgt(models, cand.numpy(), np.array([0.2, 0.8]), _embeddings(2), ddim_steps=2)
    assert pgt.probabilities.shape == (2, 3, 32, 32)


def test_slice_uncertainty_counts_only_the_region_of_interest():
    sure = torch.zeros(1, 2, 3, 4, 4)
    sure[:, :, 0] = 1.0
    assert slice_uncertainty(sure, torch.zeros(1, 4, 4, dtype=torch.long)).item() == 0.0
    split = torch.zeros(1, 2, 3, 4, 4)
    split[:, 0, 1], split[:, 1, 0] = 1.0, 1.0
    assert slice_uncertainty(split, torch.zeros(1, 4, 4, dtype=torch.long)).item() == pytest.approx(
        np.log(2) / np.log(3), rel=1e-4
    )


def test_class_dice_conventions():
    a = np.zeros((4, 4), np.uint8)
    b = a.copy()
    assert class_dice(a, b, 3).tolist() == [1.0, 1.0]
    b[0, 0] = 1
    assert class_dice(a, b, 3).tolist() == [0.0, 1.0]
    a[0, :2] = 1
    assert class_dice(a, b, 3)[0] == pytest.approx(2 / 3)


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_prediction_types_have_their_targets_and_loss_weights(cfg, kind):
    cfg = cfg | {"noise": cfg["noise"] | {"prediction_type": kind}}
    trainer = LDMTrainer(cfg, toe_kwargs(cfg, pooled_dim=8, token_dim=8, n_tokens=4), torch.device("cpu"))
    z0, noise, t = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4), torch.tensor([0, 999])
    alpha_bar = trainer.noise.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {"epsilon": noise, "sample": z0, "v_prediction": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * z0}
    torch.testing.assert_close(trainer.target(z0, noise, t), expected[kind])
    snr = (alpha_bar / (1 - alpha_bar)).flatten()
    gamma = cfg["ldm"]["min_snr_gamma"]
    weights = {
        "epsilon": snr.clamp(max=gamma) / snr,
        "sample": torch.ones(2),
        "v_prediction": snr.clamp(max=gamma) / (snr + 1),
    }
    torch.testing.assert_close(trainer.loss_weight(t), weights[kind])
    if kind == "epsilon":  # the almost noise-free step is down-weighted, the pure-noise step is not
        assert weights[kind][0] < 0.01 and weights[kind][1] == 1.0
    assert ddim_scheduler(cfg, 5).prediction_type == kind


def test_partial_noise_start_runs_fewer_steps_and_depends_on_the_candidate(cfg):
    """start_strength < 1 starts from the candidate's noised latent: the earliest DDIM steps are skipped, and a
    different candidate changes the start as well as the condition."""
    scheduler = ddim_scheduler(cfg, 10)
    assert len(start_timesteps(scheduler, 1.0)) == 10
    half = start_timesteps(scheduler, 0.5)
    assert 0 < len(half) < 10 and int(half.max()) <= 500
    models = _weighted(_models(cfg))  # with output weights, x0 depends on x_t
    rng = np.random.default_rng(0)
    cand = rng.integers(0, 3, (3, 32, 32)).astype(np.uint8)
    ratio = np.linspace(0, 1, 3).astype(np.float32)
    emb = _embeddings(3)
    a = generate_pgt(models, cand, ratio, emb, ddim_steps=4, seed=1, start_strength=0.3)
    b = generate_pgt(models, cand, ratio, emb, ddim_steps=4, seed=1, start_strength=0.3)
    full = generate_pgt(models, cand, ratio, emb, ddim_steps=4, seed=1)
    np.testing.assert_allclose(a.probabilities, b.probabilities)
    assert not np.allclose(a.probabilities, full.probabilities)
    with pytest.raises(ValueError, match="start_strength"):
        generate_pgt(models, cand, ratio, emb, ddim_steps=4, start_strength=0.0)


def test_drop_image_zeroes_only_the_image_channels_of_dropped_samples(cfg):
    cfg = cfg | {"ldm": cfg["ldm"] | {"candidate_encoding": "unshuffle", "image_input": True}}
    condition = torch.rand(3, 2 * 4 + 4, 16, 16) + 0.1
    out = drop_image(condition, torch.tensor([True, False, True]), cfg)
    assert torch.equal(out[[0, 2]], condition[[0, 2]])
    assert torch.equal(out[1, :8], condition[1, :8]) and not out[1, 8:].any()
    no_image = cfg | {"ldm": cfg["ldm"] | {"image_input": False}}
    assert torch.equal(drop_image(condition, torch.tensor([False] * 3), no_image), condition)


def test_context_without_the_image_ignores_the_image_embeddings(cfg):
    models = _models(cfg)
    ratio = torch.tensor([0.1, 0.9])
    pooled, tokens = torch.randn(2, 8), torch.randn(2, 4, 8)
    drop = torch.tensor([False, False])
    a = models.ldm.context(ratio, pooled, tokens, drop)
    b = models.ldm.context(ratio, pooled * 5, tokens - 2, drop)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(models.ldm.context(ratio, pooled, tokens), a)


def test_image_guidance_needs_image_dropout_and_changes_the_pgt(cfg):
    cfg = cfg | {"ldm": cfg["ldm"] | {"candidate_encoding": "unshuffle", "image_input": True}}
    rng = np.random.default_rng(5)
    cand = rng.integers(0, 3, (2, 32, 32)).astype(np.uint8)
    image = rng.normal(size=(2, 32, 32)).astype(np.float32)
    ratio, emb = np.array([0.2, 0.8]), _embeddings(2)
    with pytest.raises(ValueError, match="image_dropout"):
        generate_pgt(_models(cfg), cand, ratio, emb, image=image, ddim_steps=2, image_guidance=2.0)
    models = _weighted(_models(cfg | {"ldm": cfg["ldm"] | {"image_dropout": 0.2}}))
    plain = generate_pgt(models, cand, ratio, emb, image=image, ddim_steps=2)
    same = generate_pgt(models, cand, ratio, emb, image=image, ddim_steps=2, image_guidance=1.0)
    guided = generate_pgt(models, cand, ratio, emb, image=image, ddim_steps=2, image_guidance=3.0)
    np.testing.assert_array_equal(plain.probabilities, same.probabilities)
    assert not np.allclose(plain.probabilities, guided.probabilities, atol=1e-4)
    np.testing.assert_allclose(guided.probabilities.sum(1), 1.0, atol=1e-5)
