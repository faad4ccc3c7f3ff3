"""Classification figures: confusion matrix, per-class precision/recall, PR curve, worst images.

The PR curve is drawn for binary tasks only; the worst images are the validation images with
the lowest probability of their true class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from visiontrain.report.figures import (
    BEST_COLOR,
    Plot,
    annotate_cells,
    grid_shape,
    hide_unused,
    image_hwc,
    new_figure,
    per_class_bars,
    render,
)
from visiontrain.report.sections import ReportContext, register_section

# Images scored for the worst-images grid; the val loader's first images, in order.
SCORED_IMAGES = 400
WORST_SHOWN = 16


def confusion_plot(matrix: list[list[int]], names: list[str]) -> Plot:
    """Counts and row-normalised (recall per true class) confusion matrices side by side."""
    counts = np.asarray(matrix, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    size = max(3.2, 0.55 * len(names) + 2.2)
    fig, axes = new_figure(width=2 * size + 0.6, height=size, ncols=2)
    for ax, values, title, fmt in (
        (axes[0, 0], counts, "counts", "d"),
        (axes[0, 1], normalised, "normalised by true class", ".2f"),
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if fmt != "d" else None)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ticks = np.arange(len(names))
        ax.set_xticks(
            ticks,
            names,
            rotation=45 if len(names) > 3 else 0,
            ha="right" if len(names) > 3 else "center",
        )
        ax.set_yticks(ticks, names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=10)
        annotate_cells(ax, values, fmt)
    return render(
        fig,
        "confusion_matrix",
        "Confusion matrix (val)",
        "Rows are the true class, columns the prediction. Left: image counts; right: each row "
        "divided by its total, so the diagonal is the recall of each class.",
    )


def per_class_plot(per_class: dict[str, dict[str, Any]]) -> Plot | None:
    """Precision, recall and F1 bars per class."""
    return per_class_bars(
        per_class,
        {"precision": "precision", "recall": "recall", "f1": "f1"},
        "score",
        "per_class_precision_recall",
        "Per-class precision and recall (val)",
        "Precision (of the images predicted as the class, the share that are), recall (of "
        "the images of the class, the share found) and F1 for each class.",
    )


def _pr_points(ctx: ReportContext) -> tuple[list[float], list[float], str] | None:
    """The val PR curve: summary.json's, else computed from the sampled val images."""
    info = (ctx.run.summary or {}).get("threshold") or {}
    curve = info.get("pr_curve")
    if curve and curve.get("precision"):
        return curve["precision"], curve["recall"], "all val images (summary.json)"
    samples = ctx.samples(SCORED_IMAGES)
    if samples is None or len(samples.names) != 2:
        return None
    from visiontrain.tasks.classification import calibrated_probabilities
    from visiontrain.tasks.thresholds import pr_curve

    probs = calibrated_probabilities(torch.stack(samples.outputs), samples.task_state)
    targets = torch.stack(samples.targets).long()
    if not 0 < int(targets.sum()) < len(targets):
        return None
    precision, recall, _ = pr_curve(probs[:, 1], targets)
    return precision.tolist(), recall.tolist(), f"the first {len(targets)} val images"


def pr_plot(ctx: ReportContext) -> Plot | None:
    """Precision against recall of the positive class, with the chosen threshold marked."""
    points = _pr_points(ctx)
    if points is None:
        return None
    precision, recall, source = points
    names = ctx.run.class_names() or ["negative", "positive"]
    fig, ax = new_figure(width=5.0, height=4.0)
    ax.plot(recall, precision, label="PR curve")
    info = (ctx.run.summary or {}).get("threshold") or {}
    if "val_recall" in info and "val_precision" in info:
        ax.plot(
            [info["val_recall"]],
            [info["val_precision"]],
            marker="o",
            color=BEST_COLOR,
            linestyle="none",
            label=f"threshold {info.get('threshold', 0.5):.3g} ({info.get('rule', '')})",
        )
    ap = ctx.val.get("average_precision")
    ax.set_title(f"AP {ap:.3f}" if isinstance(ap, float) else "", fontsize=10)
    ax.set_xlabel(f"recall ({names[-1]})")
    ax.set_ylabel(f"precision ({names[-1]})")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return render(
        fig,
        "pr_curve",
        "Precision-recall curve (val)",
        f"Precision and recall of class `{names[-1]}` at every decision threshold, over "
        f"{source}; the dot is the threshold in force.",
    )


def worst_plot(ctx: ReportContext) -> Plot | None:
    """The validation images with the lowest probability of their true class."""
    samples = ctx.samples(SCORED_IMAGES)
    if samples is None or not samples.images:
        return None
    from visiontrain.tasks.classification import calibrated_probabilities, decide

    probs = calibrated_probabilities(torch.stack(samples.outputs), samples.task_state)
    targets = torch.stack(samples.targets).long()
    chosen = decide(probs, samples.task_state.get("threshold"))
    p_true = probs[torch.arange(len(targets)), targets]
    order = torch.argsort(p_true)[:WORST_SHOWN].tolist()
    rows, cols = grid_shape(len(order), 4)
    fig, axes = new_figure(width=2.1 * cols, height=2.35 * rows, ncols=cols, nrows=rows)
    axes = np.atleast_1d(axes).reshape(rows, cols)
    names = samples.names
    for ax, i in zip(axes.flat, order, strict=False):
        ax.imshow(
            image_hwc(samples.images[i]), cmap="gray" if samples.images[i].shape[0] == 1 else None
        )
        wrong = int(chosen[i]) != int(targets[i])
        ax.set_title(
            f"true {names[int(targets[i])]} (p {float(p_true[i]):.2f})\n"
            f"pred {names[int(chosen[i])]} ({float(probs[i, chosen[i]]):.2f})",
            fontsize=8,
            color=BEST_COLOR if wrong else "black",
        )
        ax.set_xticks([])
        ax.set_yticks([])
    hide_unused(axes, len(order))
    return render(
        fig,
        "worst_images",
        "Worst-classified validation images",
        f"The {len(order)} images with the lowest probability of their true class among the "
        f"first {len(samples.images)} of {samples.total} val images; titles give the true "
        "class with its probability and the prediction with its confidence (red: wrong).",
    )


def reliability_plot(ctx: ReportContext, unit: str = "images") -> Plot | None:
    """Accuracy against confidence per bin (val): a calibrated model lies on the diagonal.

    Args:
        ctx: The report's run.
        unit: What was binned (``images``; multilabel: ``(image, class) pairs``).
    """
    table = ctx.val.get("reliability")
    if not isinstance(table, dict) or not any(table.get("count") or []):
        return None
    bins = int(table["bins"])
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    acc = np.array([np.nan if a is None else a for a in table["accuracy"]], dtype=float)
    conf = np.array([np.nan if c is None else c for c in table["confidence"]], dtype=float)
    count = np.asarray(table["count"], dtype=float)
    fig, axes = new_figure(width=8.4, height=3.8, ncols=2)
    ax = axes[0, 0]
    ax.bar(centres, np.nan_to_num(acc), width=1.0 / bins, edgecolor="black", alpha=0.7,
           label="accuracy")  # fmt: skip
    ax.plot(centres, conf, marker="o", linestyle="none", color=BEST_COLOR, markersize=3,
            label="mean confidence")  # fmt: skip
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    cal = (ctx.run.summary or {}).get("calibration") or {}
    title = f"ECE {ctx.val.get('ece', float('nan')):.4f}"
    if cal:
        title += f" (temperature {cal['temperature']:.3g}; before {cal['val_ece_before']:.4f})"
    ax.set_title(title, fontsize=10)
    axes[0, 1].bar(centres, count, width=1.0 / bins, edgecolor="black")
    axes[0, 1].set_xlabel("confidence of the predicted class")
    axes[0, 1].set_ylabel(unit)
    axes[0, 1].set_title(f"{unit} per bin", fontsize=10)
    return render(
        fig,
        "reliability",
        "Reliability diagram (val)",
        f"The val {unit} in {bins} bins of the predicted class's probability: bars are the "
        "accuracy in each bin, dots the mean confidence; a calibrated model has them on the "
        f"diagonal. ECE is the gap averaged over {unit}."
        + (" After temperature scaling (train.calibrate)." if cal else ""),
    )


@register_section("classification")
def classification_plots(ctx: ReportContext) -> list[Plot]:
    """All classification figures the run allows."""
    plots: list[Plot | None] = []
    names = ctx.run.class_names()
    if ctx.val.get("confusion_matrix") and names:
        plots.append(confusion_plot(ctx.val["confusion_matrix"], names))
    if ctx.val.get("per_class"):
        plots.append(per_class_plot(ctx.val["per_class"]))
    if len(names) == 2:
        plots.append(pr_plot(ctx))
    plots.append(reliability_plot(ctx))
    plots.append(worst_plot(ctx))
    return [p for p in plots if p is not None]
