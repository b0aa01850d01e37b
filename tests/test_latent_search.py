"""Wang's latent search (nnqc_pipe.models.latent_search) on phantom slices: a joint VAE trained on disks (image and
mask agree), searched from true and broken pairs; its training stage (rule train_latent_vae) on a tiny cohort,
resumed; the latent-search DSC counted from the surrogate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from nnqc_pipe.models.latent_search import (
    LATENT_VAE,
    CropBox,
    JointVAE,
    LatentVAETrainer,
    SearchSettings,
    crop_box,
    latent_search,
    load_latent_search,
    mask_window,
    paste_window,
    search_box,
    window_theta,
)
from nnqc_pipe.models.presets import search_settings
from nnqc_pipe.models.training import SliceSet
from nnqc_pipe.qc.baselines import LATENT_PREFIX, reconstruction_counts, reconstruction_dice
from nnqc_pipe.stages.latent import train_latent_vae

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SIZE = 32
CFG = {"grid": SIZE, "margin": 1.3, "augment": True, "channels": [8, 16, 32], "latent_size": 16, "lr": 3e-3,
       "beta": 1e-3, "batch_size": 32, "val_max_slices": 64, "search": {"steps": 30}}


def disks(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Slices of a bright disk (random centre and radius, noisy background) and its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images, masks = np.zeros((n, SIZE, SIZE), np.float32), np.zeros((n, SIZE, SIZE), np.int64)
    for i in range(n):
        centre, radius = rng.uniform(11, 21, 2), rng.uniform(5, 9)
        masks[i] = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
        images[i] = masks[i] + 0.05 * rng.standard_normal((SIZE, SIZE))
    return images, masks


def slice_set(images: np.ndarray, masks: np.ndarray) -> SliceSet:
    return SliceSet(label=masks.astype(np.uint8), slice_ratio=np.zeros(len(masks), np.float32),
                    subject=np.zeros(len(masks), np.int32), names=["disks"], image=images.astype(np.float16))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def model() -> JointVAE:
    torch.manual_seed(0)
    trainer = LatentVAETrainer(CFG, 2, (SIZE, SIZE), torch.device("cpu"))
    trainer.attach(slice_set(*disks(256, seed=0)), slice_set(*disks(32, seed=2)), seed=0)
    history = [trainer.run_epoch(epoch) for epoch in range(40)]
    assert history[-1]["loss"] < 0.2 * history[0]["loss"]
    assert trainer.validate(40, final=True)["val_dice"] > 0.9
    trainer.net.eval()
    return trainer.net


@pytest.fixture(scope="module")
def test_pairs() -> tuple[np.ndarray, np.ndarray]:
    return disks(8, seed=1)


def test_the_search_lowers_its_loss(model, test_pairs):
    images, masks = test_pairs
    broken = masks.copy()
    broken[:, :, SIZE // 2:] = 0
    for candidate in (masks, broken):
        result = latent_search(model, images, candidate, SearchSettings(steps=30))
        assert result.losses.shape == (31, len(images))
        assert (result.losses[-1] < result.losses[0]).all()


def test_a_true_pair_stays_close_to_itself(model, test_pairs):
    images, masks = test_pairs
    result = latent_search(model, images, masks, SearchSettings(steps=30))
    assert result.surrogate.shape == masks.shape and result.probabilities.shape == (8, 2, SIZE, SIZE)
    assert min(dice(s, m) for s, m in zip(result.surrogate, masks, strict=True)) >= 0.93


def test_a_broken_mask_is_pulled_towards_the_manifold(model, test_pairs):
    """Half of each disk erased: the surrogate recovers part of the disk the image shows, so the candidate scores
    low against it (the latent-search DSC), unlike a true mask. The window follows the candidate, so the erased half
    shifts it off the disks and limits the recovery (Dice 0.44 -> 0.59-0.69 here; 0.44 -> 0.85 on the whole
    patch, before the window)."""
    images, masks = test_pairs
    broken = masks.copy()
    broken[:, :, SIZE // 2:] = 0
    result = latent_search(model, images, broken, SearchSettings(steps=30))
    before = np.mean([dice(b, m) for b, m in zip(broken, masks, strict=True)])
    after = np.mean([dice(s, m) for s, m in zip(result.surrogate, masks, strict=True)])
    assert after >= before + 0.1
    true_pairs = latent_search(model, images, masks, SearchSettings(steps=30))
    score_broken = np.mean([dice(b, s) for b, s in zip(broken, result.surrogate, strict=True)])
    score_true = np.mean([dice(m, s) for m, s in zip(masks, true_pairs.surrogate, strict=True)])
    assert score_broken < score_true - 0.3


def test_the_window_follows_the_mask_and_pastes_back_in_place():
    """The window is centred on the volume's foreground box, its side the box's extent times the margin (at least
    grid / 2, the whole patch when empty); sampling a mask into it and pasting its one-hot back returns the mask."""
    mask = np.zeros((3, 40, 48), np.int64)
    mask[1, 10:20, 20:36] = 1
    mask[2, 12:18, 22:30] = 1
    box = crop_box(mask, margin=1.5, grid=16)
    assert box.center == (14.5, 27.5) and box.size == 24.0
    assert crop_box(mask, margin=1.0, grid=64).size == 32.0
    assert crop_box(np.zeros_like(mask), 1.5, 16) == CropBox((19.5, 23.5), 48.0)
    theta = window_theta(np.tile(box.center, (3, 1)), np.full(3, box.size), mask.shape[1:])
    window = mask_window(torch.as_tensor(mask), theta, 2, grid=24)  # one window pixel per patch pixel
    assert window.shape == (3, 2, 24, 24) and torch.allclose(window.sum(1), torch.ones(3, 24, 24))
    assert int(window[1, 1].sum()) == int((mask[1] == 1).sum())
    back = paste_window(window, box, mask.shape[1:]).argmax(1).numpy()
    np.testing.assert_array_equal(back, mask)


def test_a_located_window_recovers_more_of_a_broken_mask(model, test_pairs):
    """With ``window: pgt`` the window sits on the locator's box (here the true masks, as a good pGT would place
    it), not on the broken candidate's: the erased half stays in view, the surrogate recovers more of each disk than
    in the candidate's window, and the broken candidate scores lower against it."""
    images, masks = test_pairs
    broken = masks.copy()
    broken[:, :, SIZE // 2:] = 0
    own = latent_search(model, images, broken, SearchSettings(steps=30))
    located = latent_search(model, images, broken, SearchSettings(steps=30, window="pgt"), locator=masks)
    recovered = {name: np.mean([dice(s, m) for s, m in zip(result.surrogate, masks, strict=True)])
                 for name, result in (("own", own), ("located", located))}
    assert recovered["located"] >= recovered["own"] + 0.05
    scores = {name: np.mean([dice(b, s) for b, s in zip(broken, result.surrogate, strict=True)])
              for name, result in (("own", own), ("located", located))}
    assert scores["located"] < scores["own"]


def test_the_search_box_comes_from_the_locator_where_asked():
    candidate = np.zeros((2, 40, 40), np.int64)
    candidate[:, 2:8, 2:8] = 1
    locator = np.zeros_like(candidate)
    locator[:, 20:30, 24:34] = 1
    model = JointVAE(2, 16, 8, (8, 16))
    pgt = SearchSettings(window="pgt")
    assert search_box(model, candidate, SearchSettings(), locator) == crop_box(candidate, model.margin, 16)
    assert search_box(model, candidate, pgt, locator) == crop_box(locator, model.margin, 16)
    assert search_box(model, candidate, pgt, np.zeros_like(locator)) == crop_box(candidate, model.margin, 16)
    with pytest.raises(ValueError, match="needs the pseudo ground truth"):
        search_box(model, candidate, pgt)
    with pytest.raises(ValueError, match="differ in shape"):
        search_box(model, candidate, pgt, locator[:1])
    with pytest.raises(ValueError, match="is not one of"):
        SearchSettings(window="image")


def test_an_unknown_window_stops_the_workflow_at_start():
    """``search_settings`` runs when the Snakefile is parsed: a typo fails there, naming the key, not in infer."""
    assert all(search_settings({}, preset)["window"] == "pgt" for preset in ("cpu", "paper", "tiny"))
    assert search_settings({"latent_search": {"search": {"window": "candidate"}}}, "cpu")["window"] == "candidate"
    with pytest.raises(ValueError, match=r"model\.latent_search\.search\.window 'image' is not one of"):
        search_settings({"latent_search": {"search": {"window": "image"}}}, "cpu")


def test_slices_are_searched_independently_of_their_batch(model, test_pairs):
    images, masks = test_pairs
    together = latent_search(model, images, masks, SearchSettings(steps=10, batch_size=64))
    apart = latent_search(model, images, masks, SearchSettings(steps=10, batch_size=3))
    np.testing.assert_allclose(together.z, apart.z, atol=1e-4)
    np.testing.assert_array_equal(together.surrogate, apart.surrogate)
    assert all(p.requires_grad for p in model.parameters())  # the weights are frozen during the search only


def test_the_latent_search_dsc_of_true_pairs_is_counted_near_one(model, test_pairs):
    """The surrogate of a true pair, counted per slice like the infer stage does, gives a volume DSC near 1 (the
    volume's from the summed counts, not a mean of slices)."""
    images, masks = test_pairs
    surrogate = latent_search(model, images, masks, SearchSettings(steps=30)).surrogate
    counts = reconstruction_counts(masks, surrogate, 0, 2, LATENT_PREFIX)
    slices = pd.DataFrame({"slice_index": np.arange(len(masks)), **counts})
    scores = reconstruction_dice(slices, {1: "disk"}, [1], LATENT_PREFIX)
    assert scores[("foreground", None)] >= 0.93 and scores[("disk", None)] == scores[("foreground", None)]
    overlap, total = counts["latent_overlap_fg"].sum(), counts["latent_total_fg"].sum()
    assert scores[("foreground", None)] == pytest.approx(2 * overlap / total)


def _tiny_cohort(root) -> dict:
    """Six preprocessed disk subjects (4 train, 2 val), a split and a plan."""
    rows = []
    for i in range(6):
        images, masks = disks(8, seed=10 + i)
        np.savez(root / f"s{i}.npz", image=images, label=masks.astype(np.uint8),
                 slice_ratio=np.linspace(0, 1, 8, dtype=np.float32))
        rows.append({"subject": f"s{i}", "role": "train" if i < 4 else "val"})
    pd.DataFrame(rows).to_csv(root / "split.tsv", sep="\t", index=False)
    plan = {"slicing_axis": 2, "inplane_axes": [0, 1], "target_spacing": [1.0, 1.0], "patch_size": [SIZE, SIZE],
            "n_classes": 2, "label_values": [1], "label_names": ["disk"], "normalization": "zscore"}
    (root / "plan.json").write_text(json.dumps(plan))
    return {"split_tsv": root / "split.tsv", "npz": str(root / "{subject}.npz"), "plan_json": root / "plan.json"}


def _settings(epochs: int) -> dict:
    return {"preset": "tiny", "expert": {"tiny_fallback": True}, "perceptual_weights": None,
            "model": {"latent_search": {"epochs": epochs, "batch_size": 16}}}


def test_training_stage_writes_the_model_and_resumes(tmp_path, caplog):
    cohort = _tiny_cohort(tmp_path)
    out = tmp_path / "models"
    train_latent_vae(**cohort, settings=_settings(1), out_dir=out, device="cpu", seed=3)
    first = torch.load(out / LATENT_VAE, weights_only=True)
    assert first["epoch"] == 1 and first["step"] == 2  # 32 training slices in batches of 16
    caplog.set_level("INFO")
    train_latent_vae(**cohort, settings=_settings(2), out_dir=out, device="cpu", seed=3)
    assert "resuming from" in caplog.text and "after epoch 1" in caplog.text
    resumed = torch.load(out / LATENT_VAE, weights_only=True)
    assert resumed["epoch"] == 2 and resumed["curves"][0] == first["curves"][0]
    curves = pd.read_csv(out / "latent_vae_curves.csv")
    assert list(curves["epoch"]) == [1, 2] and {"loss", "image_mse", "mask_ce", "kl", "val_dice"} <= set(curves)
    assert 0 <= curves["val_dice"].max() <= 1
    search = load_latent_search(out / LATENT_VAE, "cpu")
    assert search.settings.steps == 10 and search.n_classes == 2  # the tiny preset's search, from the checkpoint
    images, masks = disks(3, seed=99)
    assert search.settings.window == "pgt"  # placed by the pGT, which infer passes
    assert search.probabilities(images, masks, locator=masks).shape == (3, 2, SIZE, SIZE)
    assert load_latent_search(out / LATENT_VAE, "cpu", {"steps": 2}).settings.steps == 2
