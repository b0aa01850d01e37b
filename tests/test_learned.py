"""The learned QC opinion on tiny arrays: candidates, the balanced sampler, the counted DSC, the network and its
training, the estimated truth, and the fused score's out-of-fold fitting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from nnqc_pipe.data.preprocess import Preprocessed, invert_maps, original_slice_order
from nnqc_pipe.data.split import assign_folds
from nnqc_pipe.dice import dice
from nnqc_pipe.models.candidates import make_candidates, seggen
from nnqc_pipe.models.error_counts import count_terms, dsc_from_terms, error_groups
from nnqc_pipe.models.qcnet import (
    QCNET,
    CandidateSet,
    QCNetTrainer,
    balanced_draws,
    build_qcnet,
    error_targets,
    load_candidate_set,
    load_qcnet,
    stack_logits,
    train_qcnet,
    volume_dsc,
)
from nnqc_pipe.models.segmenter import SegmenterTrainer, prediction_key
from nnqc_pipe.qc.calibration import (
    MIN_SOURCE_SUBJECTS,
    PRIOR_METHOD,
    combine,
    combine_label,
    exported_fits,
    fusion_regression,
)
from nnqc_pipe.qc.learned import estimated_truth, learned_dice, learned_slice_counts, real_group_scores

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _disc_stack(n_slices: int = 6, size: int = 24, radius: float = 6.0, core: float = 3.0) -> np.ndarray:
    """A cylinder of class 1 with a class-2 core, slices first."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    sl = np.where(r < core, 2, np.where(r < radius, 1, 0)).astype(np.uint8)
    return np.repeat(sl[None], n_slices, axis=0)


def _record(shape: tuple[int, int, int], n_classes: int = 3) -> dict:
    """An identity inversion record: RAS storage, slicing axis 0, patch = original in-plane grid."""
    return {"subject": "s", "orig_shape": list(shape), "orig_affine": np.eye(4).tolist(), "ras_shape": list(shape),
            "ras_spacing": [1.0, 1.0, 1.0], "slicing_axis": 0, "inplane_axes": [1, 2], "slice_spacing": 1.0,
            "patch_size": list(shape[1:]), "n_classes": n_classes, "label_values": list(range(1, n_classes)),
            "offset": [0.0, 0.0], "step": [1.0, 1.0]}


def test_counted_dsc_equals_the_real_dsc_for_certain_error_maps():
    truth, cand = _disc_stack(radius=6), _disc_stack(radius=5)
    for name, group in error_groups(3):
        c = cand > 0 if group is None else cand == group
        t = truth > 0 if group is None else truth == group
        tp, fp, fn = count_terms(c, (c & ~t).astype(float), (t & ~c).astype(float))
        assert dsc_from_terms(tp, fp, fn) == pytest.approx(dice(c, t), abs=2e-3), name
    assert dsc_from_terms(0.0, 0.0, 0.0) == 1.0  # two empty masks agree


def test_error_targets_mark_extra_and_missed_voxels_per_group():
    truth = torch.as_tensor(_disc_stack(radius=6)).long()
    cand = torch.as_tensor(_disc_stack(radius=5)).long()
    target = error_targets(cand, truth, 3)
    assert target.shape == (6, 6, 24, 24)  # fg, class 1, class 2; extra and missed each
    assert target[:, 0].sum() == 0 and target[:, 1].sum() == ((truth > 0) & (cand == 0)).sum()
    assert torch.equal(error_targets(truth, truth, 3), torch.zeros_like(target))


def test_volume_dsc_from_perfect_probabilities_is_the_real_dsc():
    truth, cand = torch.as_tensor(_disc_stack(radius=7)), torch.as_tensor(_disc_stack(radius=5, core=4))
    probs = error_targets(cand.long(), truth.long(), 3)
    predicted = volume_dsc(probs, cand, 3).numpy()
    real = [dice(cand.numpy() > 0, truth.numpy() > 0), dice(cand.numpy() == 1, truth.numpy() == 1),
            dice(cand.numpy() == 2, truth.numpy() == 2)]
    np.testing.assert_allclose(predicted, real, atol=2e-3)


def test_balanced_draws_equalise_the_dsc_bins():
    dsc = np.concatenate([np.full(90, 0.95), np.full(10, 0.35)])  # 9:1 imbalance
    draws = balanced_draws(dsc, 4000, np.random.default_rng(0))
    share_low = np.mean(dsc[draws] < 0.5)
    assert 0.45 < share_low < 0.55
    with pytest.raises(ValueError, match="no training candidates"):
        balanced_draws(np.array([]), 3, np.random.default_rng(0))


def test_seggen_is_seeded_and_spans_quality():
    label = _disc_stack(n_slices=4, size=32, radius=9, core=4)
    assert np.array_equal(seggen(label, 0.8, 7), seggen(label, 0.8, 7))
    mild, strong = seggen(label, 0.05, 3), seggen(label, 1.0, 3)
    assert set(np.unique(strong)) <= {0, 1, 2}
    assert dice(mild > 0, label > 0) > 0.85
    assert dice(strong > 0, label > 0) < dice(mild > 0, label > 0)


def test_make_candidates_lists_every_kind_with_the_truth_first():
    label = _disc_stack(n_slices=6, size=32, radius=9, core=4)
    pre = Preprocessed(image=label.astype(np.float32), label=label, slice_ratio=np.linspace(0, 1, 6),
                       record=_record(label.shape))
    seg = {1: np.zeros_like(label), 5: label}
    out = make_candidates(pre, seg, {"model_a": label}, n_seggen=2, n_degraded=2, seed=0)
    kinds = [k for k, _ in out]
    assert kinds[0] == "gt" and np.array_equal(out[0][1], label)
    assert kinds[1:3] == ["segmenter_e1", "segmenter_e5"] and kinds[-1] == "source_model_a"
    assert sum(k.startswith("seggen_") for k in kinds) == 2 and sum(k.startswith("degraded_") for k in kinds) == 2
    assert [k for k, _ in make_candidates(pre, seg, {}, 2, 2, seed=0)] == kinds[:-1]  # seeded: same draws
    unlabelled = Preprocessed(image=pre.image, label=None, slice_ratio=pre.slice_ratio, record=pre.record)
    with pytest.raises(ValueError, match="ground truth"):
        make_candidates(unlabelled, {}, {}, 1, 1, 0)


def test_real_group_scores_on_the_original_grid():
    truth, cand = _disc_stack(radius=6), _disc_stack(radius=5)
    dsc, nsd = real_group_scores(cand, truth, (2.0, 1.0, 1.0), 3, tolerance_mm=1.0)
    assert dsc[0] == pytest.approx(dice(cand > 0, truth > 0))
    assert dsc[2] == pytest.approx(1.0) and nsd[2] == pytest.approx(1.0)  # the core is identical
    assert 0 < nsd[0] < 1


def test_learned_counts_dice_and_estimated_truth_on_a_flipped_grid():
    """Error maps that are exactly the candidate's errors, counted on the patch grid, give the real DSC per slice
    (in the stored slice order) and volume, and an estimated truth equal to the truth, also when the stored grid is
    flipped along the slicing axis."""
    truth_patch, cand_patch = _disc_stack(radius=6), _disc_stack(radius=4)
    cand_patch[2] = 0  # one missed slice
    probs = error_targets(torch.as_tensor(cand_patch).long(), torch.as_tensor(truth_patch).long(), 3).numpy()
    record = _record(truth_patch.shape)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = truth_patch.shape[0] - 1
    record["orig_affine"] = flip.tolist()
    cand_orig, truth_orig = cand_patch[::-1].copy(), truth_patch[::-1].copy()  # what the files hold
    counts = learned_slice_counts(probs, cand_patch, record)
    axis, index = original_slice_order(record)
    slices = pd.DataFrame({"slice_index": index, **{k: v[index] for k, v in counts.items()}})
    scores = learned_dice(slices, {1: "wall", 2: "core"}, [1, 2])
    assert scores[("foreground", None)] == pytest.approx(dice(cand_orig > 0, truth_orig > 0), abs=2e-3)
    assert scores[("wall", None)] == pytest.approx(dice(cand_orig == 1, truth_orig == 1), abs=2e-3)
    missed = int(index[2])  # the patch's slice 2 in the stored order
    assert scores[("foreground", missed)] < 0.01 and scores[("core", missed)] < 0.1
    np.testing.assert_array_equal(estimated_truth(probs, cand_orig, record), truth_orig)
    assert invert_maps(probs, record).shape == (6, *truth_orig.shape)


def test_qcnet_shapes_and_a_training_step_lowers_its_loss():
    net = build_qcnet(3, [8, 16], 1)
    assert net(torch.zeros(5, 4, 24, 24)).shape == (5, 6, 24, 24)
    truth = _disc_stack(n_slices=4, radius=6)
    candidates = [truth, _disc_stack(n_slices=4, radius=4), np.zeros_like(truth)]
    real = np.array([[1.0, 1.0, 1.0], [0.6, 0.5, 1.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    data = CandidateSet(images=[truth.astype(np.float16)], labels=[truth], subject=np.zeros(3, dtype=np.int64),
                        candidates=candidates, real_dsc=real, names=["s"])
    cfg = {"channels": [8, 16], "res_units": 1, "lr": 3e-3, "volumes_per_epoch": 6, "volumes_per_step": 3,
           "batch_size": 8, "loss_weights": {"bce": 1.0, "dice": 0.5, "dsc": 2.0}}
    trainer = QCNetTrainer(cfg, 3, torch.device("cpu"))
    trainer.attach(data, data, seed=0)
    first = trainer.run_epoch(0)["loss"]
    for epoch in range(1, 12):
        last = trainer.run_epoch(epoch)["loss"]
    assert last < first
    scores = trainer.validate(12, final=True)
    assert set(scores) == {"val_qc", "val_mae", "val_r"} and 0 <= scores["val_qc"] <= 1
    assert trainer.predicted_dsc(data).shape == (3, 3)


def test_qcnet_with_the_pgt_channel_reads_the_pgt_and_needs_it(tmp_path):
    truth = _disc_stack(n_slices=4, radius=6)
    candidates = np.stack([truth, _disc_stack(n_slices=4, radius=4), np.zeros_like(truth)])
    np.savez(tmp_path / "s_pre.npz", image=truth.astype(np.float32), label=truth)
    np.savez(tmp_path / "s_cand.npz", candidates=candidates, real_dsc=np.array([[1.0] * 3, [0.6, 0.5, 1.0], [0.0] * 3]))
    np.savez(tmp_path / "s_pgt.npz", pgts=np.stack([truth] * 3))
    patterns = (str(tmp_path / "{subject}_cand.npz"), str(tmp_path / "{subject}_pre.npz"))
    plain = load_candidate_set(["s"], *patterns)
    data = load_candidate_set(["s"], *patterns, str(tmp_path / "{subject}_pgt.npz"))
    assert plain.pgts is None and len(data.pgts) == 3
    cfg = {"channels": [8, 16], "res_units": 1, "lr": 3e-3, "volumes_per_epoch": 3, "volumes_per_step": 3,
           "batch_size": 8, "loss_weights": {"bce": 1.0, "dice": 0.5, "dsc": 2.0}, "epochs": 1, "patience": 5,
           "max_minutes": 1}
    with pytest.raises(ValueError, match="pGT channel"):
        QCNetTrainer(cfg, 3, torch.device("cpu"), pgt_channel=True).attach(plain, plain, seed=0)
    train_qcnet(data, data, {"qcnet": cfg, "n_classes": 3, "patch_size": [24, 24]}, tmp_path / "models", "cpu", 0)
    net = load_qcnet(tmp_path / "models" / QCNET, "cpu")
    assert net.pgt_channel and net.net(torch.zeros(2, 7, 24, 24)).shape == (2, 6, 24, 24)
    image = truth.astype(np.float32)
    assert net.probabilities(image, truth, truth).shape == (4, 6, 24, 24)
    with pytest.raises(ValueError, match="pGT channel"):
        net.probabilities(image, truth)
    # the pGT reaches the network: another pGT, other error maps
    empty = np.zeros_like(truth)
    assert not np.allclose(net.probabilities(image, truth, truth), net.probabilities(image, truth, empty))
    np.savez(tmp_path / "s_pgt.npz", pgts=np.stack([truth] * 2))
    with pytest.raises(ValueError, match="do not match"):
        load_candidate_set(["s"], *patterns, str(tmp_path / "{subject}_pgt.npz"))


def test_the_3d_network_keeps_every_slice_in_place():
    # an identity convolution returns its input: the 3D path hands back [S, C, H, W] in the input's slice order,
    # padded internally to the network's total stride and cropped again
    identity = torch.nn.Conv3d(4, 4, 1, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(4)[:, :, None, None, None])
    identity.strides = (2, 2)
    volumes = [torch.randn(5, 4, 6, 6), torch.randn(3, 4, 6, 6)]
    out = stack_logits(identity, volumes, spatial_dims=3)
    torch.testing.assert_close(out, torch.cat(volumes))
    # 2D: one batch of every slice, the same layout
    flat = torch.nn.Conv2d(4, 4, 1, bias=False)
    torch.testing.assert_close(stack_logits(flat, volumes, spatial_dims=2), flat(torch.cat(volumes)))


def test_a_3d_qc_network_trains_and_reloads_as_3d(tmp_path):
    truth = _disc_stack(n_slices=5, radius=6)
    candidates = [truth, _disc_stack(n_slices=5, radius=4), np.zeros_like(truth)]
    real = np.array([[1.0, 1.0, 1.0], [0.6, 0.5, 1.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    data = CandidateSet(images=[truth.astype(np.float16)], labels=[truth], subject=np.zeros(3, dtype=np.int64),
                        candidates=candidates, real_dsc=real, names=["s"])
    cfg = {"spatial_dims": 3, "channels": [8, 16], "res_units": 1, "lr": 3e-3, "volumes_per_epoch": 3,
           "volumes_per_step": 3, "batch_size": 8, "loss_weights": {"bce": 1.0, "dice": 0.5, "dsc": 2.0},
           "epochs": 2, "patience": 5, "max_minutes": 1}
    train_qcnet(data, data, {"qcnet": cfg, "n_classes": 3, "patch_size": [24, 24]}, tmp_path, "cpu", 0)
    net = load_qcnet(tmp_path / QCNET, "cpu")
    assert net.spatial_dims == 3 and net.net.dimensions == 3
    probs = net.probabilities(truth.astype(np.float32), candidates[1])
    assert probs.shape == (5, 6, 24, 24) and np.all((probs >= 0) & (probs <= 1))


def test_segmenter_predicts_its_held_out_subjects_at_the_checkpoints():
    label = _disc_stack(n_slices=4, size=16, radius=5, core=2)
    image = label.astype(np.float32)
    cfg = {"channels": [4, 8], "res_units": 1, "lr": 1e-2, "batch_size": 4, "checkpoints": [1, 2]}
    trainer = SegmenterTrainer(0, cfg, 3, torch.device("cpu"))
    trainer.attach(image, label, {"held": (image, label)}, seed=0)
    for epoch in range(2):
        trainer.run_epoch(epoch)
        scores = trainer.validate(epoch + 1, final=epoch == 1)
        assert set(scores) == {"heldout_dice"}
    assert sorted(trainer.predictions) == [prediction_key("held", 1), prediction_key("held", 2)]
    assert trainer.predictions[prediction_key("held", 2)].shape == label.shape
    assert trainer.validate(3, final=False) == {}  # not a checkpoint


def test_folds_are_deterministic_and_balanced():
    subjects = [f"s{i:02d}" for i in range(10)]
    folds = assign_folds(subjects, 3, seed=4)
    assert folds == assign_folds(list(reversed(subjects)), 3, seed=4)
    assert sorted(np.bincount(list(folds.values()))) == [3, 3, 4]
    with pytest.raises(ValueError, match="at least 2"):
        assign_folds(subjects, 1, 0)


def _fusion_rows(n_subjects: int = 10, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        for source in ("a", "b", "c"):
            real = rng.uniform(0.3, 1.0)
            rows.append({"subject": f"s{s}", "source": source, "label": "foreground", "real_dsc": real,
                         "predicted_dsc": real - 0.1 + rng.normal(0, 0.05),
                         "learned_dsc": real + rng.normal(0, 0.02)})
    return pd.DataFrame(rows)


def test_combined_score_is_fitted_out_of_fold_and_never_sees_its_own_subject():
    rows = _fusion_rows()
    combined, info = combine_label(rows)
    weights = info["coefficients"]["predicted_dsc+learned_dsc"]
    assert info["fitted"] and weights["learned_dsc"] > weights["predicted_dsc"] and weights["rows"] == len(rows)
    assert np.mean(np.abs(combined - rows["real_dsc"])) < np.mean(np.abs(rows["predicted_dsc"] - rows["real_dsc"]))
    # Leakage check: changing one subject's own real DSC must not change that subject's combined score.
    leaked = rows.copy()
    own = leaked["subject"] == "s3"
    leaked.loc[own, "real_dsc"] = 0.0
    np.testing.assert_allclose(combine_label(leaked)[0][own.to_numpy()], combined[own.to_numpy()])
    # Rows without ground truth get the fit on every labelled row.
    unlabelled = pd.concat([rows, rows.iloc[:2].assign(subject="new", real_dsc=np.nan)], ignore_index=True)
    assert np.isfinite(combine_label(unlabelled)[0][-2:]).all()


def test_combined_score_without_enough_labels_is_the_plain_mean_and_says_so():
    rows = _fusion_rows(n_subjects=3)
    values, info = combine_label(rows)
    assert not info["fitted"] and "3 labelled subjects" in info["reason"]
    np.testing.assert_allclose(values, rows[["predicted_dsc", "learned_dsc"]].mean(axis=1))
    column, info = combine(rows.drop(columns="learned_dsc"))
    assert column.isna().all() and "fewer than two opinions" in info["all"]["reason"]


def test_combined_score_uses_the_opinions_each_row_has():
    """The agreement is missing for the subjects without another real segmenter: their rows are scored by the fit
    without it, the others gain from it, no row is left unscored and no subject's own label reaches its score."""
    rows = _fusion_rows(n_subjects=20, seed=1)
    rng = np.random.default_rng(2)
    rows["baseline_agreement_dsc"] = rows["real_dsc"] + rng.normal(0, 0.005, len(rows))
    lonely = rows["subject"].isin(["s0", "s7", "s13"])
    rows.loc[lonely, "baseline_agreement_dsc"] = np.nan
    rows["learned_dsc"] = rows["real_dsc"] + rng.normal(0, 0.08, len(rows))
    combined, info = combine_label(rows)
    assert np.isfinite(combined).all()
    assert set(info["coefficients"]) == {"predicted_dsc+learned_dsc+baseline_agreement_dsc",
                                         "predicted_dsc+learned_dsc"}
    error = np.abs(combined - rows["real_dsc"].to_numpy())
    assert error[~lonely.to_numpy()].mean() < 0.01 < error[lonely.to_numpy()].mean()
    leaked = rows.copy()
    own = (leaked["subject"] == "s7").to_numpy()
    leaked.loc[own, "real_dsc"] = 0.0
    np.testing.assert_allclose(combine_label(leaked)[0][own], combined[own])


def test_a_cohort_without_labels_fuses_with_the_qc_models_coefficients():
    """The fusion a bundle carries: each row with the fitted pattern of the most opinions it has; the plain mean
    where no pattern fits; the same values as the labelled cohort's own fit for its unlabelled rows."""
    rows = _fusion_rows(n_subjects=12, seed=3)
    rows["baseline_agreement_dsc"] = rows["real_dsc"] + 0.01
    rows.loc[rows["subject"] == "s0", "baseline_agreement_dsc"] = np.nan
    new = rows.iloc[3:7].assign(subject="new", real_dsc=np.nan)  # subjects s1, s2: with the agreement
    new.loc[new.index[:2], "baseline_agreement_dsc"] = np.nan
    values, info = combine_label(pd.concat([rows, new], ignore_index=True))
    prior = {"coefficients": info["coefficients"]}
    transferred, how = combine_label(new, prior=prior)
    np.testing.assert_allclose(transferred, values[-4:])
    assert not how["fitted"] and how["method"] == PRIOR_METHOD and "0 labelled subjects" in how["reason"]
    only_agreement = {"coefficients": {"predicted_dsc+baseline_agreement_dsc": {
        "predicted_dsc": 0.5, "baseline_agreement_dsc": 0.5, "intercept": 0.1, "rows": 10}}}
    fused, _ = combine_label(new, prior=only_agreement)
    expected_mean = new[["predicted_dsc", "learned_dsc"]].mean(axis=1).to_numpy()[:2]
    np.testing.assert_allclose(fused[:2], expected_mean)  # no agreement: no pattern fits, the plain mean
    np.testing.assert_allclose(fused[2:], np.clip(0.1 + 0.5 * new["predicted_dsc"].to_numpy()[2:]
                                                  + 0.5 * new["baseline_agreement_dsc"].to_numpy()[2:], 0, 1))


def test_real_segmenters_get_a_fusion_of_their_own():
    """nnQC rates the manual mask and the degradations low but the real segmenters' masks right: one regression over
    every candidate would over-rate the real masks, so with enough labelled subjects they get their own fit (out of
    fold, like the pooled one), and the bundle carries that one."""
    rng = np.random.default_rng(5)
    rows = []
    for s in range(MIN_SOURCE_SUBJECTS):
        for source, real in (("gt", 1.0), ("degraded_L2", rng.uniform(0.5, 0.7)), ("unet", rng.uniform(0.6, 0.9)),
                             ("atlas", rng.uniform(0.4, 0.8))):
            synthetic = source.startswith(("gt", "degraded"))
            predicted = (0.8 * real if synthetic else real) + rng.normal(0, 0.01)
            rows.append({"subject": f"s{s}", "source": source, "label": "foreground", "real_dsc": real,
                         "predicted_dsc": predicted, "learned_dsc": real + rng.normal(0, 0.1)})
    rows = pd.DataFrame(rows)
    combined, info = combine(rows)
    users = rows["source"].isin(["unet", "atlas"]).to_numpy()
    error = np.abs(combined.to_numpy() - rows["real_dsc"].to_numpy())
    pooled, _ = combine_label(rows)
    assert error[users].mean() < 0.02 < np.abs(pooled - rows["real_dsc"].to_numpy())[users].mean()
    own = info["foreground"]["user_sources"]
    assert own["labelled_subjects"] == MIN_SOURCE_SUBJECTS and own["labelled_rows"] == users.sum()
    leaked = rows.copy()
    mine = ((leaked["subject"] == "s4") & users).to_numpy()
    leaked.loc[mine, "real_dsc"] = 0.0
    np.testing.assert_allclose(combine(leaked)[0].to_numpy()[mine], combined.to_numpy()[mine])
    assert exported_fits({}, info)["combined"]["foreground"]["coefficients"] == own["coefficients"]
    few = rows[rows["subject"] != "s0"]  # one subject short: every row keeps the pooled fit
    assert "user_sources" not in combine(few)[1]["foreground"]


def test_combined_regression_on_too_few_rows_falls_back_to_nnqc_alone():
    x = np.array([[0.5, 0.9, 0.1], [0.7, 0.2, 0.3], [0.9, 0.4, 0.8]])
    model = fusion_regression(x, np.array([0.4, 0.6, 0.8]))
    np.testing.assert_allclose(model.coef_, [1.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(model.predict(x), [0.4, 0.6, 0.8], atol=1e-9)
