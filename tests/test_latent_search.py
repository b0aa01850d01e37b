"""Wang's latent search (nnqc_pipe.models.latent_search) on phantom slices: a joint VAE trained on disks (image and
mask agree), searched from true and broken pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnqc_pipe.models.latent_search import JointVAE, SearchSettings, VAESettings, latent_search, train_joint_vae

SIZE = 32


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


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def model() -> JointVAE:
    torch.manual_seed(0)
    vae = JointVAE(2, (SIZE, SIZE), latent_size=16, channels=(8, 16, 32))
    history = train_joint_vae(vae, *disks(256, seed=0), VAESettings(epochs=40, learning_rate=3e-3))
    assert history[-1]["loss"] < 0.2 * history[0]["loss"]
    return vae


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
    """Half of each disk erased: the surrogate recovers the disk the image shows, so the candidate scores low
    against it (the latent-search DSC), unlike a true mask."""
    images, masks = test_pairs
    broken = masks.copy()
    broken[:, :, SIZE // 2:] = 0
    result = latent_search(model, images, broken, SearchSettings(steps=30))
    before = np.mean([dice(b, m) for b, m in zip(broken, masks, strict=True)])
    after = np.mean([dice(s, m) for s, m in zip(result.surrogate, masks, strict=True)])
    assert after >= before + 0.3 and after >= 0.85
    true_pairs = latent_search(model, images, masks, SearchSettings(steps=30))
    score_broken = np.mean([dice(b, s) for b, s in zip(broken, result.surrogate, strict=True)])
    score_true = np.mean([dice(m, s) for m, s in zip(masks, true_pairs.surrogate, strict=True)])
    assert score_broken < score_true - 0.3


def test_slices_are_searched_independently_of_their_batch(model, test_pairs):
    images, masks = test_pairs
    together = latent_search(model, images, masks, SearchSettings(steps=10, batch_size=64))
    apart = latent_search(model, images, masks, SearchSettings(steps=10, batch_size=3))
    np.testing.assert_allclose(together.z, apart.z, atol=1e-4)
    np.testing.assert_array_equal(together.surrogate, apart.surrogate)
    assert all(p.requires_grad for p in model.parameters())  # the weights are frozen during the search only
