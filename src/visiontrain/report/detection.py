"""Detection figures: AP per class, and validation images with true and predicted boxes."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.patches import Rectangle

from visiontrain.report.figures import (
    Plot,
    grid_shape,
    hide_unused,
    image_hwc,
    new_figure,
    per_class_bars,
    render,
)
from visiontrain.report.sections import ReportContext, register_section

SHOWN_IMAGES = 8
# The default of `visiontrain predict --score-threshold`, so the figure matches predict.
SCORE_THRESHOLD = 0.5
TRUE_COLOR = "#2ca02c"
PRED_COLOR = "#d62728"


def ap_plot(ctx: ReportContext) -> Plot | None:
    """AP@[.5:.95] and AP@.5 per class."""
    return per_class_bars(
        ctx.val.get("per_class") or {},
        {"AP@[.5:.95]": "ap", "AP@.5": "ap_50"},
        "average precision",
        "per_class_ap",
        "Average precision per class (val)",
        "COCO average precision of each class over IoU thresholds .5 to .95, and at IoU .5; "
        "a missing bar is a class with no validation boxes.",
    )


def samples_plot(ctx: ReportContext) -> Plot | None:
    """The first validation images with ground-truth boxes (green) and predictions (red)."""
    samples = ctx.samples(SHOWN_IMAGES)
    if samples is None or not samples.images:
        return None
    threshold = float(samples.task_state.get("score_threshold", SCORE_THRESHOLD))
    count = len(samples.images)
    rows, cols = grid_shape(count, 4)
    fig, axes = new_figure(width=2.6 * cols, height=2.7 * rows, ncols=cols, nrows=rows)
    axes = np.atleast_1d(axes).reshape(rows, cols)
    names = samples.names
    for ax, image, target, out in zip(
        axes.flat, samples.images, samples.targets, samples.outputs, strict=False
    ):
        ax.imshow(image_hwc(image), cmap="gray" if image.shape[0] == 1 else None)
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
            _box(ax, box, names[int(label)], TRUE_COLOR, "-")
        keep = out["scores"] >= threshold
        for box, label, score in zip(
            out["boxes"][keep].tolist(),
            out["labels"][keep].tolist(),
            out["scores"][keep].tolist(),
            strict=True,
        ):
            _box(ax, box, f"{names[int(label)]} {score:.2f}", PRED_COLOR, "--")
        ax.set_title(f"{len(target['boxes'])} true, {int(keep.sum())} predicted", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    hide_unused(axes, count)
    return render(
        fig,
        "detections",
        "Sample detections (val)",
        f"The first {count} of {samples.total} val images: ground truth in green (solid), "
        f"predictions scoring at least {threshold:g} in red (dashed) with their scores.",
    )


def _box(ax: Any, box: list[float], text: str, color: str, style: str) -> None:
    """Draw one labelled xyxy box."""
    x1, y1, x2, y2 = box
    ax.add_patch(
        Rectangle(
            (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linestyle=style, linewidth=1.5
        )
    )
    ax.text(
        x1,
        y1,
        text,
        color="white",
        fontsize=6,
        va="bottom",
        bbox={"facecolor": color, "alpha": 0.7, "pad": 1, "linewidth": 0},
    )


@register_section("detection")
def detection_plots(ctx: ReportContext) -> list[Plot]:
    """All detection figures the run allows."""
    return [p for p in (ap_plot(ctx), samples_plot(ctx)) if p is not None]
