"""E2 loading (UniMedCLIP format, plain open_clip, tiny fallback), the embedding cache and the Team of Experts.

The conditioning tests guard against the reference implementation's degenerate fusion (one query, one key:
softmax == 1, so c ignored the slice position and E1 got no gradient).
"""

from __future__ import annotations

import argparse
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from nnqc_pipe.models import presets
from nnqc_pipe.models.embed import embed_subject, load_embeddings
from nnqc_pipe.models.experts import (
    TINY_ARCHITECTURE,
    TeamOfExperts,
    load_vision_expert,
    model_config,
    read_pretrained_checkpoint,
    save_tiny_checkpoint,
    vision_state_dict,
)
from nnqc_pipe.models.ldm import ConditionalLDM, toe_kwargs, unet_kwargs

CPU = torch.device("cpu")
PLAN = {"patch_size": [16, 16], "n_classes": 2}
TINY = {
    "vae": {"channels": [8, 16], "attention_levels": [False, False], "norm_num_groups": 8},
    "ldm": {"channels": [16, 16], "attention_levels": [False, True], "num_head_channels": 8, "norm_num_groups": 8},
    "experts": {"d_model": 16, "n_queries": 3, "n_heads": 2, "n_fourier": 4},
}
E2 = {"pooled_dim": 12, "token_dim": 10, "n_tokens": 4}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


class NotPlainData:
    """A pickled object that the weights-only unpickler must not accept silently."""


def _tiny_clip(seed: int = 1) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(**model_config(TINY_ARCHITECTURE))


def _expert_cfg(checkpoint, **extra) -> dict:
    return {"architecture": TINY_ARCHITECTURE, "checkpoint": str(checkpoint), "token_grid": 2} | extra


def _visual_equal(expert, clip: CLIP) -> bool:
    ours, ref = expert.model.state_dict(), clip.visual.state_dict()
    return ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


# --- E2 loading ---------------------------------------------------------------------------------


def test_unimedclip_format_checkpoint_loads_vision_tower_only(tmp_path):
    clip = _tiny_clip()
    state = {f"module.{k}": v for k, v in clip.state_dict().items()}
    state["module.text_encoder.transformer.embeddings.word_embeddings.weight"] = torch.zeros(4, 4)
    checkpoint = {
        "epoch": 10,
        "name": "unimed-clip-vit-b16",
        "state_dict": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(1e-5), "betas": (0.9, 0.98), "params": [0]}]},
        "args": argparse.Namespace(model="ViT-B-16-quickgelu", text_encoder_name="BiomedBERT"),
    }
    path = tmp_path / "unimed_clip_vit_b16.pt"
    torch.save(checkpoint, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

    expert = load_vision_expert(_expert_cfg(path), CPU, tmp_path)

    assert _visual_equal(expert, clip)
    assert not any(p.requires_grad for p in expert.model.parameters()) and not expert.model.training
    assert expert.info["checkpoint"] == str(path) and len(expert.info["weights_sha256"]) == 64
    assert expert.image_size == (224, 224)


def test_plain_open_clip_state_dict_and_vision_only_dict(tmp_path):
    clip = _tiny_clip(2)
    torch.save(clip.state_dict(), tmp_path / "plain.pt")
    assert _visual_equal(load_vision_expert(_expert_cfg(tmp_path / "plain.pt"), CPU, tmp_path), clip)
    assert vision_state_dict(clip.visual.state_dict()).keys() == clip.visual.state_dict().keys()


def test_untrusted_pickled_objects_are_refused_unless_allowed(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": _tiny_clip().state_dict(), "extra": NotPlainData()}, path)
    with pytest.raises(ValueError, match="allow_unsafe_pickle"):
        read_pretrained_checkpoint(path)
    assert "state_dict" in read_pretrained_checkpoint(path, allow_unsafe_pickle=True)


def test_wrong_architecture_and_missing_checkpoint_are_clear_errors(tmp_path):
    torch.save(_tiny_clip().state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="does not match architecture 'ViT-S-32'"):
        load_vision_expert(_expert_cfg(tmp_path / "tiny.pt", architecture="ViT-S-32"), CPU, tmp_path)
    with pytest.raises(FileNotFoundError, match="encoder.checkpoint"):
        load_vision_expert(_expert_cfg(tmp_path / "absent.pt", tiny_fallback=False), CPU, tmp_path)
    with pytest.raises(ValueError, match="hub schemas are not allowed"):
        model_config("hf-hub:someone/model")


def test_tiny_fallback_is_saved_then_loaded_through_the_same_loader(tmp_path, caplog):
    cfg = {"architecture": "ViT-B-16-quickgelu", "checkpoint": None, "tiny_fallback": True, "token_grid": 2}
    expert = load_vision_expert(cfg, CPU, tmp_path)
    assert (tmp_path / "tiny_vision_expert.pt").is_file()
    assert expert.info["architecture"] == TINY_ARCHITECTURE and expert.info["pretrained"] is False
    assert "UNTRAINED" in caplog.text
    again = save_tiny_checkpoint(tmp_path / "again.pt")
    assert (
        expert.info["weights_sha256"] == load_vision_expert(_expert_cfg(again), CPU, tmp_path).info["weights_sha256"]
    ), "the tiny encoder must be deterministic"


def test_embed_subject_writes_the_cache(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "s1.npz"
    np.savez(npz, image=rng.normal(size=(3, 16, 24)).astype(np.float32), slice_ratio=np.array([0, 0.5, 1]))
    cfg = {"architecture": "ViT-B-16-quickgelu", "checkpoint": None, "tiny_fallback": True, "token_grid": 2}
    embed_subject(npz, tmp_path / "emb" / "s1.npz", cfg, "cpu")
    with np.load(tmp_path / "emb" / "s1.npz") as raw:
        assert raw["pooled"].dtype == np.float16 and raw["pooled"].shape == (3, 64)
        assert raw["tokens"].shape == (3, 4, 64)
        assert json.loads(str(raw["encoder"]))["pretrained"] is False
    cache = load_embeddings(tmp_path / "emb" / "s1.npz")
    assert cache["pooled"].dtype == np.float32 and not np.allclose(cache["pooled"][0], cache["pooled"][1])


# --- Team of Experts ----------------------------------------------------------------------------


def _toe(mode: str) -> TeamOfExperts:
    torch.manual_seed(0)
    return TeamOfExperts(mode=mode, d_model=16, n_queries=3, n_heads=2, n_fourier=4, **E2)


def _image(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 12, generator=g), torch.randn(batch, 4, 10, generator=g)


@pytest.mark.parametrize("mode", ["full", "position"])
def test_context_changes_when_only_the_slice_ratio_changes(mode):
    toe = _toe(mode).eval()
    pooled, tokens = _image(1)
    pooled, tokens = pooled.expand(2, -1), tokens.expand(2, -1, -1)
    c = toe(torch.tensor([0.2, 0.7]), pooled, tokens)
    assert c.shape == (2, 3, 16)
    assert (c[0] - c[1]).abs().max() > 1e-3


def test_full_mode_attention_weights_depend_on_position():
    toe = _toe("full").eval()
    pooled, tokens = _image(1)
    queries = toe.norm_q(toe.e1(torch.tensor([0.1, 0.9])))
    keys = toe.norm_kv(torch.cat([toe.key_pooled(pooled)[:, None], toe.key_tokens(tokens)], 1) + toe.key_position)
    _, weights = toe.attn(queries, keys.expand(2, -1, -1), keys.expand(2, -1, -1), need_weights=True)
    assert weights.shape == (2, 3, 5)
    assert (weights[0] - weights[1]).abs().max() > 1e-4


def test_image_mode_ignores_position_and_none_mode_is_constant():
    pooled, tokens = _image(2)
    image = _toe("image").eval()
    same_image = image(torch.tensor([0.1, 0.9]), pooled[:1].expand(2, -1), tokens[:1].expand(2, -1, -1))
    torch.testing.assert_close(same_image[0], same_image[1])
    assert (image(torch.tensor([0.5, 0.5]), pooled, tokens).diff(dim=0).abs().max()) > 1e-3
    none = _toe("none").eval()(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(none[0], none[1])
    with pytest.raises(ValueError, match="needs the image embeddings"):
        _toe("full")(torch.tensor([0.5]))


def _ldm(mode: str) -> ConditionalLDM:
    cfg = presets.resolve("cpu", TINY | {"experts": TINY["experts"] | {"mode": mode}}, PLAN)
    torch.manual_seed(0)
    return ConditionalLDM(unet_kwargs(cfg), toe_kwargs(cfg, **E2))


def _loss(model: ConditionalLDM, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noisy, noise = torch.randn(4, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    pooled, tokens = _image(4, seed)
    eps = model(
        noisy,
        torch.tensor([10, 200, 500, 900]),
        torch.rand(4, model.unet.conv_in.conv.in_channels - 2, 8, 8, generator=g),
        torch.rand(4, generator=g),
        pooled,
        tokens,
    )
    return F.mse_loss(eps, noise)


def _trained_grads(mode: str) -> dict[str, torch.Tensor]:
    """Gradients after two optimiser steps (the UNet's zero-initialised output layers block them at step 0)."""
    model = _ldm(mode)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for seed in range(3):
        optimizer.zero_grad()
        loss = _loss(model, seed)
        loss.backward()
        if seed < 2:
            optimizer.step()
    assert torch.isfinite(loss)
    return {name: p.grad for name, p in model.named_parameters()}


def test_e1_and_projections_receive_gradient_through_the_unet():
    grads = _trained_grads("full")
    d = 16
    for name in ("toe.e1.mlp.0.weight", "toe.e1.mlp.4.weight", "toe.key_tokens.weight", "toe.key_pooled.weight"):
        assert grads[name].abs().sum() > 0, name
    in_proj = grads["toe.attn.in_proj_weight"]
    for part, rows in {"query": slice(0, d), "key": slice(d, 2 * d), "value": slice(2 * d, 3 * d)}.items():
        assert in_proj[rows].abs().sum() > 0, f"F_{part[0].upper()} projection has no gradient"


@pytest.mark.parametrize("mode", ["none", "image", "position", "full"])
def test_every_ablation_mode_trains_through_the_unet(mode):
    grads = _trained_grads(mode)
    toe_grads = [g for name, g in grads.items() if name.startswith("toe.") and g is not None]
    assert toe_grads and sum(g.abs().sum() for g in toe_grads) > 0
    assert ("toe.e1.mlp.0.weight" in grads) == (mode in ("position", "full"))
    assert ("toe.attn.in_proj_weight" in grads) == (mode in ("image", "full"))
