"""The repair stage: its flag and stop rules on synthetic scores, the refinement loop on tiny images with an oracle QC,
the selection with the cohort segmenter's sources, and the stage switched off (no rule)."""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_benchmark
from test_infer import AFFINE, INFERENCE, N_SLICES, PLAN, SHAPE, _patch_pgt
from test_workflow import base_config, run_snakemake

from nnqc_pipe.data import preprocess as pp
from nnqc_pipe.dice import dice
from nnqc_pipe.models.pgt import PGT
from nnqc_pipe.models.repair import Refiner
from nnqc_pipe.models.segmenter import build_segmenter
from nnqc_pipe.qc import infer as infer_module
from nnqc_pipe.qc.decisions import VerdictThresholds
from nnqc_pipe.qc.repair import (
    ROUNDS_COLUMNS,
    RepairSettings,
    SubjectQC,
    cohort_qc,
    flag_table,
    refine_loop,
    stop_reason,
    tukey_low,
)
from nnqc_pipe.report.tables import SELECTION_SCHEMA, build_selection

REPAIR_RULES = {"train_repair_segmenter", "repair"}


# ---------------------------------------------------------------------------------------------------
# Flags and the stop rule
# ---------------------------------------------------------------------------------------------------


def test_tukey_low_fence_flags_only_below_q1_minus_k_iqr():
    scores = np.array([0.90, 0.91, 0.92, 0.93, 0.94, 0.50, np.nan])
    # Q1 0.905, Q3 0.9275 over the finite scores: the fence lies at 0.905 - 1.5 * 0.0225 = 0.87125
    assert tukey_low(scores).tolist() == [False, False, False, False, False, True, False]
    assert tukey_low(scores, k=20.0).sum() == 0  # a wide fence flags nothing
    assert not tukey_low(np.array([np.nan, np.nan])).any()
    assert not tukey_low(np.full(5, 0.8)).any()  # no spread, nothing below Q1


def test_flag_table_flags_low_outliers_and_fail_verdicts():
    # Q1 0.90, Q3 0.93: the fence lies at 0.855
    qc = pd.DataFrame({"subject": [f"s{i:02d}" for i in range(12)],
                       "score": [0.90, 0.91, 0.92, 0.93, 0.94] * 2 + [0.80, 0.60],
                       "uncertainty": [0.0] * 12})
    table = flag_table(qc, VerdictThresholds(fail_dsc=0.7, pass_dsc=0.8))
    flagged = table.set_index("subject")
    assert flagged.loc["s11", "verdict"] == "FAIL" and flagged.loc["s11", "flagged"]
    assert flagged.loc["s10", "flag_low_outlier"] and flagged.loc["s10", "flagged"]  # below the fence, not a FAIL
    assert flagged.loc["s10", "verdict"] != "FAIL"
    assert list(table.loc[table["flagged"], "subject"]) == ["s10", "s11"]
    # a cohort that fails as a whole has no outlier, every subject is flagged by its verdict
    failing = flag_table(qc.assign(score=0.5), VerdictThresholds())
    assert failing["flagged"].all() and not failing["flag_low_outlier"].any()


def test_stop_rule():
    assert stop_reason(0, 0, 5) == "nothing flagged"
    assert stop_reason(0, 5, 5) == "nothing flagged"
    assert stop_reason(3, 5, 5).startswith("5 refinement epochs done")
    assert stop_reason(3, 0, 0).startswith("0 refinement epochs done")
    assert stop_reason(3, 2, 5, time_up=True).startswith("time cap")
    assert stop_reason(3, 2, 5) is None


# ---------------------------------------------------------------------------------------------------
# The refinement loop on tiny images (a bright disk to segment), with an oracle QC (score = DSC against the truth)
# ---------------------------------------------------------------------------------------------------


def disk_stack(rng: np.random.Generator, n_slices: int = 3, size: int = 16, contrast: float = 1.0
               ) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for _ in range(n_slices):
        cy, cx, r = rng.uniform(5, size - 5), rng.uniform(5, size - 5), rng.uniform(2.5, 4.0)
        label = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
        images.append((contrast * label + 0.1 * rng.standard_normal((size, size))).astype(np.float32))
        labels.append(label)
    return np.stack(images), np.stack(labels)


@pytest.fixture(scope="module")
def tiny_cohort(torch_one_thread):
    rng = np.random.default_rng(0)
    labelled = [disk_stack(rng) for _ in range(4)]
    cohort = {f"c{i}": disk_stack(rng, contrast=0.6) for i in range(5)}  # dimmer disks: a shifted domain
    return (np.concatenate([i for i, _ in labelled]), np.concatenate([label for _, label in labelled]), cohort)


def make_refiner(labelled_images: np.ndarray, labels: np.ndarray, lr: float = 2e-2) -> Refiner:
    torch.manual_seed(0)
    net = build_segmenter(2, [4, 8], 0)
    return Refiner(net, labelled_images, labels, lr=lr, batch_size=4, device=torch.device("cpu"), seed=1)


def oracle_qc(truths: dict[str, np.ndarray]):
    """Score = DSC against the truth, reference = the truth: QC that knows the answer."""
    def qc(subject: str, mask: np.ndarray) -> SubjectQC:
        return SubjectQC(dice(mask > 0, truths[subject] > 0), 0.0, truths[subject])
    return qc


def test_refinement_loss_falls(tiny_cohort):
    images, labels, cohort = tiny_cohort
    refiner = make_refiner(images, labels)
    flagged = np.concatenate([cohort[s][0] for s in sorted(cohort)])
    references = np.concatenate([cohort[s][1] for s in sorted(cohort)])
    curves = [refiner.refine_epoch(epoch, flagged, references) for epoch in range(1, 9)]
    assert [c["alpha"] for c in curves[:3]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert curves[-1]["semi_supervised"] < 0.8 * curves[0]["semi_supervised"]
    assert curves[-1]["supervised"] < curves[0]["supervised"] and curves[-1]["loss"] < curves[0]["loss"]
    with pytest.raises(ValueError, match="count from 1"):
        refiner.refine_epoch(0, flagged, references)


def test_loop_refines_the_flagged_until_nothing_is_flagged(tiny_cohort, tmp_path):
    images, labels, cohort = tiny_cohort
    truths = {s: label for s, (_, label) in cohort.items()}
    settings = RepairSettings(epochs=40, thresholds=VerdictThresholds(fail_dsc=0.7, pass_dsc=0.8))
    state = tmp_path / "refine_state.pt"
    result = refine_loop(make_refiner(images, labels), {s: image for s, (image, _) in cohort.items()},
                         oracle_qc(truths), settings, state, run_hash="h1")
    assert result.stopped == "nothing flagged"
    rounds = result.rounds
    assert list(rounds.columns) == ROUNDS_COLUMNS
    assert rounds.loc[rounds["round"] == 0, "flagged"].all()  # the untrained network fails everywhere
    last = rounds["round"].max()
    assert 1 <= last < 40 and not rounds.loc[rounds["round"] == last, "flagged"].any()
    assert len(result.curves) == last and result.curves[0]["alpha"] == 1.0
    before = np.mean([dice(result.before[s] > 0, truths[s] > 0) for s in cohort])
    after = np.mean([dice(result.after[s] > 0, truths[s] > 0) for s in cohort])
    assert after >= 0.7 > before
    # the saved state is resumed: nothing left to do, the same masks
    again = refine_loop(make_refiner(images, labels), {s: image for s, (image, _) in cohort.items()},
                        oracle_qc(truths), settings, state, run_hash="h1")
    assert again.stopped == result.stopped and len(again.curves) == len(result.curves)
    assert all(np.array_equal(again.after[s], result.after[s]) for s in cohort)
    assert all(np.array_equal(again.before[s], result.before[s]) for s in cohort)


def test_loop_stops_at_once_when_nothing_is_flagged(tiny_cohort):
    images, labels, cohort = tiny_cohort

    def all_good(subject: str, mask: np.ndarray) -> SubjectQC:
        return SubjectQC(0.95, 0.0, mask)

    result = refine_loop(make_refiner(images, labels), {s: image for s, (image, _) in cohort.items()}, all_good,
                         RepairSettings(epochs=5))
    assert result.stopped == "nothing flagged" and result.curves == []
    assert set(result.rounds["round"]) == {0} and result.rounds["requalified"].all()
    assert all(np.array_equal(result.after[s], result.before[s]) for s in cohort)


def test_loop_stops_after_k_epochs(tiny_cohort):
    images, labels, cohort = tiny_cohort

    def always_failing(subject: str, mask: np.ndarray) -> SubjectQC:
        return SubjectQC(0.2, 0.0, cohort[subject][1])

    result = refine_loop(make_refiner(images, labels), {s: image for s, (image, _) in cohort.items()},
                         always_failing, RepairSettings(epochs=2))
    assert result.stopped.startswith("2 refinement epochs done") and len(result.curves) == 2
    assert [c["alpha"] for c in result.curves] == [1.0, 0.5]


@pytest.fixture
def stubbed_subject(tmp_path, monkeypatch) -> tuple[pp.Preprocessed, dict]:
    """test_infer's subject (a flipped, permuted, anisotropic grid) and a sampler that returns its hand-placed pGT
    (uncertainty of patch slice s: s/10), recording the seed it was given."""
    image = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=SHAPE).astype(np.float32), AFFINE), image)
    seen: dict = {}

    def generate(models, candidate, slice_ratio, embeddings, **kwargs) -> PGT:
        seen["seed"] = kwargs["seed"]
        return PGT(np.moveaxis(pp.one_hot(_patch_pgt(), 3), 0, 1), np.arange(N_SLICES, dtype=np.float32) / 10)

    monkeypatch.setattr(infer_module, "generate_pgt", generate)
    return pp.preprocess_subject("s1", image, None, PLAN), seen


def test_cohort_qc_scores_a_patch_mask_against_its_pgt_on_the_original_grid(stubbed_subject):
    """The loop's QC of a mask: the mask goes back to the original grid, gets its pGT with the subject's seed, is
    scored there, and the reference is the pGT mapped to the patch grid (the hand-placed voxel outside the image is
    cropped)."""
    pre, seen = stubbed_subject
    qc = cohort_qc(SimpleNamespace(n_classes=3), {"s1": pre}, None, INFERENCE, {"s1": 11})
    placed = _patch_pgt()
    same = qc("s1", placed)
    assert seen["seed"] == 11 and same.score == 1.0
    inside = placed.copy()
    inside[0, 0, 8] = 0
    np.testing.assert_array_equal(same.reference, inside)
    assert same.uncertainty == pytest.approx(np.mean(np.arange(6) / 10))
    empty = qc("s1", np.zeros_like(placed))
    assert empty.score == 0.0 and np.array_equal(empty.reference, inside)
    with pytest.raises(ValueError, match="learned opinion"):
        cohort_qc(SimpleNamespace(n_classes=3), {"s1": pre}, None, INFERENCE, {"s1": 11}, reference="learned")


# ---------------------------------------------------------------------------------------------------
# Selection with the cohort segmenter's sources
# ---------------------------------------------------------------------------------------------------

REPAIR = ["nnqc_segmenter", "nnqc_segmenter_refined"]


def selection_subjects() -> pd.DataFrame:
    # subject -> source -> (verdict score, real DSC)
    table = {"s1": {"unet": (0.90, 0.91), "nnqc_segmenter": (0.80, 0.80), "nnqc_segmenter_refined": (0.95, 0.93)},
             "s2": {"unet": (0.50, 0.45), "nnqc_segmenter": (0.60, 0.62), "nnqc_segmenter_refined": (0.85, 0.86)},
             "s3": {"unet": (0.40, 0.42), "nnqc_segmenter": (0.30, 0.30), "nnqc_segmenter_refined": (0.35, 0.33)},
             "s4": {"nnqc_segmenter": (0.75, 0.77), "nnqc_segmenter_refined": (0.82, 0.84)}}
    rows = [{"cohort": "c", "source": source, "subject": subject, "label": label, "verdict_score": score,
             "predicted_dsc": score, "real_dsc": real, "uncertainty": 0.01}
            for subject, sources in table.items() for source, (score, real) in sources.items()
            for label in ("foreground", "wall")]
    rows += [{"cohort": "c", "source": "gt", "subject": "s1", "label": "foreground", "verdict_score": 0.99,
              "predicted_dsc": 0.99, "real_dsc": 1.0, "uncertainty": 0.0}]
    return pd.DataFrame(rows)


def test_selection_falls_back_to_the_refined_segmenter_where_the_user_sources_fail():
    table = build_selection(selection_subjects(), False, 0.7, REPAIR, "fallback")
    assert list(table.columns) == list(SELECTION_SCHEMA)
    selection = table.set_index("subject")
    assert selection["selected_source"].to_dict() == {"s1": "unet", "s2": "nnqc_segmenter_refined", "s3": "unet",
                                                      "s4": "nnqc_segmenter_refined"}
    assert selection.loc["s1", "n_candidates"] == 1  # the user's mask passes: the segmenter is not a candidate
    assert selection.loc["s1", "selected_reason"].startswith("the only candidate: unet 0.90")
    assert selection.loc["s2", "selected_reason"] == ("every user source predicted below 0.70 (best unet 0.50): "
                                                      "the cohort segmenter's nnqc_segmenter_refined 0.85")
    assert selection.loc["s2", "real_dsc"] == 0.86 and not selection.loc["s2", "all_failed"]
    assert selection.loc["s3", "all_failed"] and selection.loc["s3", "selected_reason"].startswith(
        "every candidate predicted below 0.70; the best is unet 0.40")
    assert selection.loc["s4", "selected_reason"].startswith("no user source: the cohort segmenter's")


def test_selection_compete_and_pgt_fallback():
    compete = build_selection(selection_subjects(), False, 0.7, REPAIR, "compete").set_index("subject")
    assert compete.loc["s1", "selected_source"] == "nnqc_segmenter_refined" and compete.loc["s1", "n_candidates"] == 3
    assert compete.loc["s1", "selected_reason"] == ("highest predicted DSC of 3 candidates: nnqc_segmenter_refined "
                                                    "0.95 (runner-up unet by 0.05)")
    with_pgt = build_selection(selection_subjects(), True, 0.7, REPAIR, "fallback").set_index("subject")
    assert with_pgt.loc["s3", "selected_source"] == "pgt" and with_pgt.loc["s3", "runner_up_source"] == "unet"
    assert with_pgt.loc["s3", "selected_reason"].endswith("the pGT as a pseudo-label")
    assert with_pgt.loc["s2", "selected_source"] == "nnqc_segmenter_refined"
    without = build_selection(selection_subjects(), False, 0.7).set_index("subject")  # no repair stage
    assert without.loc["s2", "selected_source"] == "nnqc_segmenter_refined"  # unknown sources are plain candidates
    with pytest.raises(ValueError, match="repair_sources"):
        build_selection(selection_subjects(), False, 0.7, REPAIR, "always")


def test_selection_ranks_on_the_configured_score():
    subjects = selection_subjects()
    # the latent search's scores order s1 the other way round: unet above both segmenter masks
    subjects["latent_search_dsc"] = subjects["verdict_score"].where(subjects["source"] != "unet", 0.99)
    by_latent = build_selection(subjects, False, 0.7, REPAIR, "compete", score="latent_search").set_index("subject")
    assert by_latent.loc["s1", "selected_source"] == "unet" and by_latent.loc["s1", "predicted_dsc"] == 0.99
    assert by_latent.loc["s1", "real_dsc"] == 0.91
    by_verdict = build_selection(subjects, False, 0.7, REPAIR, "compete").set_index("subject")
    assert by_verdict.loc["s1", "selected_source"] == "nnqc_segmenter_refined"
    with pytest.raises(ValueError, match="no learned_dsc values"):
        build_selection(subjects, False, 0.7, REPAIR, "compete", score="learned")
    with pytest.raises(ValueError, match="is not one of"):
        build_selection(subjects, False, 0.7, REPAIR, "compete", score="best")


# ---------------------------------------------------------------------------------------------------
# The workflow: the stage switched off defines no rule; switched on, a wrong combination stops the run
# ---------------------------------------------------------------------------------------------------


def repair_config(workdir, **extra) -> dict:
    data = workdir / "results" / "e2e" / "data"
    return base_config(workdir, f"{data}/imagesTr/{{subject}}.nii.gz", f"{data}/labelsTr/{{subject}}.nii.gz",
                       demo={"enabled": True, "n_subjects": 6, "seed": 3}, **extra)


def test_repair_switched_off_defines_no_rule(tmp_path):
    off = run_snakemake(repair_config(tmp_path), tmp_path, "--list-rules")
    assert off.returncode == 0 and not REPAIR_RULES & set(off.stdout.split())
    on = run_snakemake(repair_config(tmp_path, repair={"enabled": True}), tmp_path, "--list-rules")
    assert on.returncode == 0 and REPAIR_RULES <= set(on.stdout.split())


def test_repair_with_learned_reference_needs_the_learned_opinion(tmp_path):
    config = repair_config(tmp_path, repair={"enabled": True, "reference": "learned"}, methods=["nnqc"])
    proc = run_snakemake(config, tmp_path, "--list-rules")
    assert proc.returncode != 0 and "needs the learned opinion" in proc.stdout + proc.stderr


def test_selection_score_needs_its_method(tmp_path):
    config = repair_config(tmp_path, selection={"score": "latent_search"})
    proc = run_snakemake(config, tmp_path, "--list-rules")
    assert proc.returncode != 0 and "needs latent_search in methods" in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------
# The benchmark's figures (benchmarks/repair.py) on the selection tables above
# ---------------------------------------------------------------------------------------------------


def test_benchmark_figures():
    bench = load_benchmark("repair")
    subjects = selection_subjects()
    selection = build_selection(subjects, False, 0.7, REPAIR, "fallback")
    rounds = pd.DataFrame({"round": [0, 0, 0, 0, 1, 1], "subject": ["s1", "s2", "s3", "s4", "s2", "s3"],
                           "flagged": [False, True, True, False, False, True]})
    figures = bench.summarise(subjects, selection, rounds, REPAIR, repair_seconds=120.0)
    assert figures["n_subjects"] == 4 and figures["best_user_source"] is None  # unet lacks s4: no complete source
    only_unet = bench.summarise(subjects[subjects["subject"] != "s4"], selection, rounds, REPAIR)
    assert only_unet["best_user_source"] == "unet"
    assert only_unet["best_user_real_dsc"] == pytest.approx((0.91 + 0.45 + 0.42) / 3)
    assert figures["segmenter_real_dsc"] == pytest.approx((0.80 + 0.62 + 0.30 + 0.77) / 4)
    assert figures["selection_real_dsc"] == pytest.approx((0.91 + 0.86 + 0.42 + 0.84) / 4)
    assert figures["oracle_real_dsc"] == pytest.approx((0.93 + 0.86 + 0.42 + 0.84) / 4)
    assert figures["n_flagged"] == 2 and figures["n_repaired"] == 1 and figures["repaired_subjects"] == ["s2"]
    assert figures["flagged_refined_real_dsc"] == pytest.approx((0.86 + 0.33) / 2)
    assert figures["refinement_epochs"] == 1 and figures["minutes_per_100_refined"] == pytest.approx(100.0)
    assert figures["checks"]["refinement_raises_flagged_real_dsc"]
    assert figures["checks"]["selection_within_0.01_of_oracle"]  # s1 kept unet, 0.02 below the oracle: 0.005 in mean
    assert figures["checks"]["selection_above_best_single_source"] is None  # no best single source to beat
    assert only_unet["checks"]["selection_above_best_single_source"]
    assert "repaired" in bench.format_figures(figures)
    with pytest.raises(ValueError, match="repair.enabled"):
        bench.summarise(subjects[~subjects["source"].isin(REPAIR)], selection, rounds, REPAIR)
