"""Figures of the HTML report: predicted vs real scatter plots, MAE per source, overlays of the worst candidates.

Overlays: for each chosen (source, subject) the slice with the most candidate-vs-pGT disagreement is shown in the
preprocessed (patch) space: the image, the pGT outline, and the error map (candidate-only voxels in red,
pGT-only in blue, class confusions in yellow).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from nnqc_pipe.data.io import atomic_path
from nnqc_pipe.data.preprocess import load_preprocessed, to_patch_space
from nnqc_pipe.qc.metrics import FOREGROUND, METRICS
from nnqc_pipe.report.tables import PREDICTED, REAL

ERROR_COLOURS = ListedColormap([(0, 0, 0, 0), (0.9, 0.1, 0.1, 0.8), (0.1, 0.4, 0.95, 0.8), (1.0, 0.85, 0.1, 0.8)])


def worst_cases(subjects: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` foreground rows that fail QC with the lowest predicted DSC (flagged outliers first)."""
    fg = subjects[(subjects.label == "foreground") & ~subjects.qc_pass.astype(bool)]
    flagged = fg.flag_low_dsc_outlier.astype(bool) | fg.flag_high_hd95_outlier.astype(bool)
    return fg.assign(_flagged=flagged).sort_values(["_flagged", "predicted_dsc"], ascending=[False, True]).head(n)


def case_slice(results: Path, source: str, subject: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Image, pGT class indices and error codes of the most erroneous slice, in patch space."""
    pre = load_preprocessed(results / "preprocessed" / f"{subject}.npz")
    pgt_values = np.asarray(nib.load(results / "pgt" / source / f"{subject}.nii.gz").dataobj)
    pgt = to_patch_space(pgt_values, pre.record)
    errors_values = np.asarray(nib.load(results / "errors" / source / f"{subject}.nii.gz").dataobj)
    errors = to_patch_space(errors_values, {**pre.record, "label_values": [1, 2, 3], "n_classes": 4})
    weight = errors > 0 if errors.any() else pgt > 0
    k = int(np.argmax(weight.sum(axis=(1, 2))))
    return pre.image[k], pgt[k], errors[k], k


def plot_worst_overlays(subjects: pd.DataFrame, results_dir: str | os.PathLike, n: int,
                        path: str | os.PathLike) -> None:
    """One panel per worst case (or a note that every candidate passed), written atomically as PNG."""
    cases = worst_cases(subjects, n)
    cols = max(1, min(3, len(cases)))
    rows = max(1, int(np.ceil(len(cases) / cols)))
    fig = Figure(figsize=(4 * cols, 4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if cases.empty:
        axes[0, 0].text(0.5, 0.5, "every candidate passed QC", ha="center", va="center")
    for ax, row in zip(axes.ravel(), cases.itertuples(), strict=False):
        image, pgt, errors, k = case_slice(Path(results_dir), row.source, row.subject)
        ax.imshow(image, cmap="gray")
        if pgt.any():
            ax.contour(pgt > 0, levels=[0.5], colors="lime", linewidths=1)
        ax.imshow(errors, cmap=ERROR_COLOURS, vmin=0, vmax=3, interpolation="nearest")
        ax.set_title(f"{row.source} / {row.subject}\nslice {k}, predicted DSC {row.predicted_dsc:.2f}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


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
