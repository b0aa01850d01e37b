"""Figures of the HTML report: predicted vs real scatter plots, MAE per source, predicted-quality distributions,
verdict counts, risk–coverage curves, overlays of the worst and of the REVIEW candidates, and the methods board
(a figure and an HTML table).

Overlays: for each chosen (source, subject) the slice with the most candidate-vs-pGT disagreement is shown in the
preprocessed (patch) space: the image, the pGT outline (green), and the error map (candidate-only voxels in red,
pGT-only in blue, class confusions in yellow), with that legend on the figure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from nnqc_pipe.chunks import fill
from nnqc_pipe.data.io import atomic_path
from nnqc_pipe.data.preprocess import load_preprocessed, to_patch_space
from nnqc_pipe.qc.columns import PREDICTED, REAL
from nnqc_pipe.qc.decisions import risk_coverage_curve
from nnqc_pipe.qc.metrics import FOREGROUND, METRICS, error_map
from nnqc_pipe.report.methods import BEST_REAL, NO_LABELS_NOTE, leading_rows, present_methods

ERROR_COLOURS = ListedColormap([(0, 0, 0, 0), (0.9, 0.1, 0.1, 0.8), (0.1, 0.4, 0.95, 0.8), (1.0, 0.85, 0.1, 0.8)])
# Legend of every overlay: the error codes of qc.metrics.error_map and the pGT outline.
OVERLAY_LEGEND = [
    Patch(color=ERROR_COLOURS(1), label="extra: candidate only"),
    Patch(color=ERROR_COLOURS(2), label="missed: pGT only"),
    Patch(color=ERROR_COLOURS(3), label="class confusion"),
    Line2D([0], [0], color="lime", linewidth=1, label="pGT outline"),
    Line2D([0], [0], color="magenta", linewidth=1, label="learned opinion: wrong voxels"),
]
VERDICT_COLOURS = {"PASS": "tab:green", "REVIEW": "tab:orange", "FAIL": "tab:red"}


def worst_cases(subjects: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` foreground rows that fail QC with the lowest predicted DSC (flagged outliers first)."""
    fg = subjects[(subjects.label == "foreground") & ~subjects.qc_pass.astype(bool)]
    flagged = fg.flag_low_dsc_outlier.astype(bool) | fg.flag_high_hd95_outlier.astype(bool)
    return fg.assign(_flagged=flagged).sort_values(["_flagged", "predicted_dsc"], ascending=[False, True]).head(n)


def review_cases(subjects: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` riskiest foreground rows with verdict REVIEW (the cases a human looks at)."""
    fg = subjects[(subjects.label == "foreground") & (subjects.verdict == "REVIEW")]
    return fg.sort_values(["risk", "source", "subject"], ascending=[False, True, True], kind="stable").head(n)


def case_slice(results: Path, candidate: str, source: str, subject: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Image, pGT class indices and error codes (candidate vs pGT) of the most erroneous slice, in patch space."""
    pre = load_preprocessed(results / "preprocessed" / f"{subject}.npz")
    pgt = to_patch_space(np.asarray(nib.load(results / "pgt" / source / f"{subject}.nii.gz").dataobj), pre.record)
    cand = to_patch_space(np.asarray(nib.load(candidate).dataobj), pre.record)
    errors = error_map(cand, pgt)
    weight = errors > 0 if errors.any() else pgt > 0
    k = int(np.argmax(weight.sum(axis=(1, 2))))
    return pre.image[k], pgt[k], errors[k], k


def learned_error_slice(results: Path, candidate: str, source: str, subject: str, k: int) -> np.ndarray | None:
    """Patch-space slice ``k`` of the voxels the learned opinion calls wrong (candidate vs its estimated truth),
    or None without the learned opinion."""
    estimated = results / "learned" / "estimated" / source / f"{subject}.nii.gz"
    if not estimated.is_file():
        return None
    pre = load_preprocessed(results / "preprocessed" / f"{subject}.npz")
    truth = to_patch_space(np.asarray(nib.load(estimated).dataobj), pre.record)
    cand = to_patch_space(np.asarray(nib.load(candidate).dataobj), pre.record)
    return cand[k] != truth[k]


def _title(row: Any, k: int) -> str:
    learned = getattr(row, "learned_dsc", np.nan)
    opinions = f"nnQC {row.predicted_dsc:.2f}" + (f", learned {learned:.2f}" if np.isfinite(learned) else "")
    verdict = f", {row.verdict} (risk {row.risk:.2f})" if hasattr(row, "verdict") else ""
    return f"{row.source} / {row.subject}\nslice {k}, {opinions}{verdict}"


def plot_cases(cases: pd.DataFrame, results_dir: str | os.PathLike, candidates: dict[str, str],
               path: str | os.PathLike, empty_note: str) -> None:
    """One overlay panel per case (image, pGT outline, candidate errors against the pGT, and the learned opinion's
    wrong voxels outlined where it ran, with a legend), or ``empty_note``."""
    cols = max(1, min(3, len(cases)))
    rows = max(1, int(np.ceil(len(cases) / cols)))
    fig = Figure(figsize=(4 * cols, 4.6 * rows + 0.6))  # room for the two-line titles
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if cases.empty:
        axes[0, 0].text(0.5, 0.5, empty_note, ha="center", va="center")
    for ax, row in zip(axes.ravel(), cases.itertuples(), strict=False):
        candidate = fill(candidates[row.source], subject=row.subject)
        image, pgt, errors, k = case_slice(Path(results_dir), candidate, row.source, row.subject)
        ax.imshow(image, cmap="gray")
        if pgt.any():
            ax.contour(pgt > 0, levels=[0.5], colors="lime", linewidths=1)
        ax.imshow(errors, cmap=ERROR_COLOURS, vmin=0, vmax=3, interpolation="nearest")
        learned = learned_error_slice(Path(results_dir), candidate, row.source, row.subject, k)
        if learned is not None and learned.any():
            ax.contour(learned, levels=[0.5], colors="magenta", linewidths=0.8)
        ax.set_title(_title(row, k), fontsize=9)
    fig.legend(handles=OVERLAY_LEGEND, loc="lower center", ncol=3, fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path)


def plot_worst_overlays(subjects: pd.DataFrame, results_dir: str | os.PathLike, candidates: dict[str, str], n: int,
                        path: str | os.PathLike) -> None:
    """Overlays of the ``n`` worst candidates (:func:`worst_cases`)."""
    plot_cases(worst_cases(subjects, n), results_dir, candidates, path, "every candidate passed QC")


def plot_review_gallery(subjects: pd.DataFrame, results_dir: str | os.PathLike, candidates: dict[str, str], n: int,
                        path: str | os.PathLike) -> None:
    """Overlays of the ``n`` riskiest REVIEW candidates (:func:`review_cases`), error regions outlined in colour."""
    plot_cases(review_cases(subjects, n), results_dir, candidates, path, "no candidate to review")


def plot_verdicts(subjects: pd.DataFrame, path: str | os.PathLike, label: str = FOREGROUND) -> None:
    """Stacked bars of PASS / REVIEW / FAIL counts per source."""
    rows = subjects[subjects["label"] == label]
    counts = rows.groupby(["source", "verdict"]).size().unstack(fill_value=0).reindex(columns=list(VERDICT_COLOURS),
                                                                                       fill_value=0)
    fig = Figure(figsize=(6, 0.5 * max(len(counts), 2) + 1.5))
    ax = fig.add_subplot()
    left = np.zeros(len(counts))
    for verdict, colour in VERDICT_COLOURS.items():
        ax.barh(counts.index.astype(str), counts[verdict], left=left, color=colour, label=verdict)
        left += counts[verdict].to_numpy()
    ax.set_xlabel(f"subjects ({label})")
    ax.set_title("Verdicts per source")
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def plot_risk_coverage(subjects: pd.DataFrame, path: str | os.PathLike, fail_dsc: float,
                       label: str = FOREGROUND) -> None:
    """Risk–coverage curves (failure rate at real DSC < ``fail_dsc`` among the candidates accepted, most
    confident first) per source with ground truth and pooled; a note when no ground truth exists."""
    rows = subjects[(subjects["label"] == label) & subjects[f"{REAL}_dsc"].notna()]
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    if rows.empty:
        ax.text(0.5, 0.5, "no subjects with ground truth", ha="center", va="center", transform=ax.transAxes)
    else:
        groups = [(str(s), g) for s, g in rows.groupby("source", sort=True)] + [("all", rows)]
        for name, group in groups:
            curve = risk_coverage_curve(group[f"{PREDICTED}_dsc"], group[f"{REAL}_dsc"], fail_dsc)
            style = {"color": "black", "linewidth": 2} if name == "all" else {"linewidth": 1}
            ax.plot(curve["coverage"], curve["risk"], label=name, **style)
        ax.legend(fontsize="small")
    ax.set_xlabel("coverage (fraction accepted, highest predicted DSC first)")
    ax.set_ylabel(f"risk (fraction with real DSC < {fail_dsc:g})")
    ax.set_title("Risk–coverage")
    save_figure(fig, path)


def plot_predicted_distributions(subjects: pd.DataFrame, path: str | os.PathLike, label: str = FOREGROUND) -> None:
    """Box plots of the predicted DSC per source: the view of a cohort without ground truth."""
    rows = subjects[(subjects["label"] == label) & subjects[f"{PREDICTED}_dsc"].notna()]
    groups = [(str(s), g[f"{PREDICTED}_dsc"].to_numpy()) for s, g in rows.groupby("source", sort=True)]
    fig = Figure(figsize=(max(5, 0.8 * len(groups) + 2), 4.5))
    ax = fig.add_subplot()
    if groups:
        ax.boxplot([g for _, g in groups], tick_labels=[s for s, _ in groups])
        ax.tick_params(axis="x", rotation=45)
    else:
        ax.text(0.5, 0.5, "no predictions", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel(f"predicted DSC ({label})")
    ax.set_title("Predicted quality per source")
    fig.tight_layout()
    save_figure(fig, path)


METHOD_PANELS = (("pearson_r", "Pearson r (higher is better)"), ("mae", "MAE (lower is better)"))


def plot_methods(board: pd.DataFrame, subjects: pd.DataFrame, path: str | os.PathLike,
                 label: str = FOREGROUND) -> None:
    """The methods board at a glance: Pearson r and MAE of each method against the real DSC in the pools ``all``,
    ``all_real`` and ``best_real``; without labelled subjects, box plots of each method's predicted DSC."""
    rows = leading_rows(board, label)
    if rows.empty:
        _plot_method_distributions(subjects, path, label)
        return
    methods = list(dict.fromkeys(rows["method"]))
    pools = [(p, f"{p} ({g['sources'].iloc[0]})" if p == BEST_REAL else p) for p, g in rows.groupby("pool", sort=False)]
    fig = Figure(figsize=(11, 0.35 * len(methods) * len(pools) + 2))
    height = 0.8 / len(pools)
    for i, (stat, title) in enumerate(METHOD_PANELS):
        ax = fig.add_subplot(1, 2, i + 1)
        for k, (pool, name) in enumerate(pools):
            values = rows[rows["pool"] == pool].set_index("method")[stat].reindex(methods)
            ax.barh(np.arange(len(methods)) + k * height, values, height=height, label=name)
        ax.set_yticks(np.arange(len(methods)) + height * (len(pools) - 1) / 2, methods)
        ax.invert_yaxis()
        ax.set_title(f"{title}, {label}")
    fig.axes[0].legend(fontsize="small")
    fig.suptitle("Which QC method to trust on this cohort (real DSC of the labelled candidates)")
    fig.tight_layout()
    save_figure(fig, path)


def _plot_method_distributions(subjects: pd.DataFrame, path: str | os.PathLike, label: str) -> None:
    """Box plots of each method's score of the candidates of ``label``, with the board's note."""
    rows = subjects[subjects["label"] == label]
    groups = [(m, rows[c].dropna().to_numpy()) for m, c in present_methods(rows).items()]
    fig = Figure(figsize=(max(5, 1.0 * len(groups) + 2), 4.5))
    ax = fig.add_subplot()
    if groups:
        ax.boxplot([g for _, g in groups], tick_labels=[m for m, _ in groups])
    ax.set_ylabel(f"predicted DSC ({label})")
    ax.set_title("Each method's predicted DSC", fontsize="medium")
    fig.text(0.5, 0.01, NO_LABELS_NOTE, ha="center", va="bottom", fontsize="small", wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(fig, path)


METHODS_TABLE_COLUMNS = ["method", "pool", "sources", "n", "pearson_r", "mae", "bias", "spearman_rho",
                         "failure_auc", "sensitivity", "specificity", "aurc", "kendall_tau", "pairwise_accuracy",
                         "good_reviewed", "failures_reviewed"]


def write_methods_table(board: pd.DataFrame, subjects: pd.DataFrame, path: str | os.PathLike,
                        label: str = FOREGROUND) -> None:
    """The methods board's rows of ``label`` in the pools ``all``, ``all_real`` and ``best_real`` as an HTML table;
    without labelled subjects, the board's note and each method's predicted DSC summarised (n, mean, quartiles)."""
    rows = leading_rows(board, label)
    if rows.empty:
        scores = subjects[subjects["label"] == label]
        described = pd.DataFrame({m: scores[c].describe() for m, c in present_methods(scores).items()}).T
        body = f"<p>{NO_LABELS_NOTE}.</p>" + described.to_html(float_format="{:.3f}".format, na_rep="—")
    else:
        body = rows[METHODS_TABLE_COLUMNS].to_html(index=False, float_format="{:.3f}".format, na_rep="—")
    html = (f"<html><head><meta charset='utf-8'><title>QC methods board ({label})</title></head><body>"
            f"<h3>QC methods against the real DSC ({label})</h3>{body}"
            "<p>All pools, every label and every source: report/methods.parquet (docs/report.md).</p></body></html>")
    with atomic_path(path) as tmp:
        Path(tmp).write_text(html, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------


def plot_predicted_vs_real(
    subjects: pd.DataFrame, metric: str, path: str | os.PathLike, label: str = FOREGROUND
) -> None:
    """Scatter of predicted vs real ``metric`` per subject, one colour per source, with the identity line."""
    rows = subjects[subjects["label"] == label]
    pred_col, real_col = f"{PREDICTED}_{metric}", f"{REAL}_{metric}"
    rows = rows[np.isfinite(rows[pred_col]) & np.isfinite(rows[real_col])]
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    if rows.empty:
        ax.text(0.5, 0.5, "no subjects with ground truth", ha="center", va="center", transform=ax.transAxes)
    else:
        for source, group in rows.groupby("source", sort=True):
            ax.scatter(group[real_col], group[pred_col], s=14, alpha=0.7, label=str(source))
        low = float(min(rows[pred_col].min(), rows[real_col].min()))
        high = float(max(rows[pred_col].max(), rows[real_col].max()))
        ax.plot([low, high], [low, high], color="black", linewidth=1, linestyle="--", label="identity")
        ax.legend(fontsize="small")
    ax.set_xlabel(f"real {metric} ({label})")
    ax.set_ylabel(f"predicted {metric} ({label})")
    ax.set_title(f"Predicted vs real {metric}")
    save_figure(fig, path)


def plot_mae_per_level(summary: pd.DataFrame, path: str | os.PathLike, label: str = FOREGROUND) -> None:
    """Bars of MAE ± std (predicted vs real) per source and pool, one panel per metric, for ``label``."""
    rows = summary[(summary["label"] == label) & (summary["n"] > 0)]
    metrics = [m for m in METRICS if m in set(rows["metric"])]
    fig = Figure(figsize=(4 * max(len(metrics), 1), 4))
    if not metrics:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no subjects with ground truth", ha="center", va="center", transform=ax.transAxes)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        data = rows[rows["metric"] == metric]
        positions = np.arange(len(data))
        ax.bar(positions, data["mae"], yerr=data["mae_std"].fillna(0.0), capsize=3)
        ax.set_xticks(positions, data["source"], rotation=45, ha="right", fontsize="small")
        ax.set_title(f"MAE {metric} ({label})")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Save a figure atomically, the format taken from the file extension (png, svg, pdf)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".").lower(), dpi=120, bbox_inches="tight")
