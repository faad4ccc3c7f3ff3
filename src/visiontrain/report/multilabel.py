"""Multi-label figures: per-class precision/recall/F1/AP, per-class PR curves, label co-occurrence.

The PR curves come from summary.json (all val images, with the thresholds chosen at
training); a run that stopped before them gets curves from the first sampled val images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from visiontrain.report.classification import SCORED_IMAGES, reliability_plot
from visiontrain.report.figures import (
    Plot,
    annotate_cells,
    grid_shape,
    hide_unused,
    new_figure,
    per_class_bars,
    render,
)
from visiontrain.report.sections import ReportContext, register_section


def per_class_plot(per_class: dict[str, dict[str, Any]]) -> Plot | None:
    """Precision, recall, F1 and AP bars per class."""
    return per_class_bars(
        per_class,
        {"precision": "precision", "recall": "recall", "f1": "f1", "AP": "ap"},
        "score",
        "per_class_precision_recall",
        "Per-class precision, recall, F1 and AP (val)",
        "For each label: precision (of the images predicted to carry it, the share that do), "
        "recall (of the images that carry it, the share found), F1 at the class's threshold, "
        "and average precision over every threshold.",
    )


def _curves(ctx: ReportContext) -> tuple[dict[str, dict[str, Any]], str] | None:
    """Per-class ``{precision, recall, dot}``: summary.json's, else from sampled val images."""
    info = ((ctx.run.summary or {}).get("threshold") or {}).get("per_class") or {}
    curves = {
        name: {
            "precision": entry["pr_curve"]["precision"],
            "recall": entry["pr_curve"]["recall"],
            "dot": (entry.get("val_recall"), entry.get("val_precision"), entry.get("threshold")),
        }
        for name, entry in info.items()
        if isinstance(entry, dict) and entry.get("pr_curve")
    }
    if curves:
        return curves, "all val images (summary.json)"
    samples = ctx.samples(SCORED_IMAGES)
    if samples is None or not samples.outputs:
        return None
    from visiontrain.tasks.multilabel import label_probabilities
    from visiontrain.tasks.thresholds import pr_curve

    probs = label_probabilities(torch.stack(samples.outputs), samples.task_state)
    targets = (torch.stack(samples.targets) >= 0.5).long()
    for c, name in enumerate(samples.names):
        truth = targets[:, c]
        if 0 < int(truth.sum()) < len(truth):
            precision, recall, _ = pr_curve(probs[:, c], truth)
            curves[name] = {
                "precision": precision.tolist(),
                "recall": recall.tolist(),
                "dot": (None, None, None),
            }
    return (curves, f"the first {len(targets)} val images") if curves else None


def pr_plot(ctx: ReportContext) -> Plot | None:
    """One precision-recall panel per class, with the class's threshold marked."""
    found = _curves(ctx)
    if found is None:
        return None
    curves, source = found
    per_class = ctx.val.get("per_class") or {}
    rows, cols = grid_shape(len(curves), 4)
    fig, axes = new_figure(width=3.0 * cols, height=2.8 * rows, ncols=cols, nrows=rows)
    axes = np.atleast_1d(axes).reshape(rows, cols)
    for ax, (name, curve) in zip(axes.flat, curves.items(), strict=False):
        ax.plot(curve["recall"], curve["precision"])
        recall, precision, threshold = curve["dot"]
        if recall is not None and precision is not None:
            ax.plot([recall], [precision], marker="o", color="#d62728", linestyle="none",
                    label=f"threshold {threshold:.3g}")  # fmt: skip
            ax.legend(fontsize=7, loc="lower left")
        ap = (per_class.get(name) or {}).get("ap")
        ax.set_title(f"{name}" + (f"  AP {ap:.3f}" if isinstance(ap, float) else ""), fontsize=9)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.grid(alpha=0.3)
    hide_unused(axes, len(curves))
    return render(
        fig,
        "pr_curves",
        "Per-class precision-recall curves (val)",
        f"Precision and recall of each label at every decision threshold, over {source}; the "
        "dot is the class's threshold in force (train.threshold).",
    )


def cooccurrence_plot(matrix: list[list[int]], names: list[str]) -> Plot:
    """Label co-occurrence on val: counts, and P(column label | row label)."""
    counts = np.asarray(matrix, dtype=np.int64)
    diag = np.diag(counts).astype(np.float64)[:, None]
    conditional = np.divide(counts, diag, out=np.zeros(counts.shape), where=diag > 0)
    size = max(3.2, 0.55 * len(names) + 2.2)
    fig, axes = new_figure(width=2 * size + 0.6, height=size, ncols=2)
    for ax, values, title, fmt in (
        (axes[0, 0], counts, "images carrying both", "d"),
        (axes[0, 1], conditional, "P(column | row)", ".2f"),
    ):
        image = ax.imshow(values, cmap="Purples", vmin=0, vmax=1 if fmt != "d" else None)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ticks = np.arange(len(names))
        many = len(names) > 3
        ax.set_xticks(ticks, names, rotation=45 if many else 0, ha="right" if many else "center")
        ax.set_yticks(ticks, names)
        ax.set_title(title, fontsize=10)
        annotate_cells(ax, values, fmt)
    return render(
        fig,
        "label_cooccurrence",
        "Label co-occurrence (val)",
        "Left: how many val images carry both the row and the column label (the diagonal: "
        "each label's images). Right: each row divided by its diagonal, the share of the row "
        "label's images that also carry the column label.",
    )


@register_section("multilabel")
def multilabel_plots(ctx: ReportContext) -> list[Plot]:
    """All multi-label figures the run allows."""
    plots: list[Plot | None] = []
    names = ctx.run.class_names()
    if ctx.val.get("per_class"):
        plots.append(per_class_plot(ctx.val["per_class"]))
    plots.append(pr_plot(ctx))
    if ctx.val.get("cooccurrence") and names:
        plots.append(cooccurrence_plot(ctx.val["cooccurrence"], names))
    plots.append(reliability_plot(ctx, unit="(image, class) pairs"))
    return [p for p in plots if p is not None]
