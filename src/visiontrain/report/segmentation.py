"""Segmentation figures: IoU and Dice per class, and sample validation masks.

The samples show each image with its true and its predicted mask overlaid.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.patches import Patch

from visiontrain.report.figures import Plot, image_hwc, new_figure, per_class_bars, render
from visiontrain.report.sections import ReportContext, register_section

SHOWN_IMAGES = 4
IGNORE = 255
ALPHA = 0.55


def iou_plot(ctx: ReportContext) -> Plot | None:
    """IoU and Dice of each class."""
    return per_class_bars(
        ctx.val.get("per_class") or {},
        {"IoU": "iou", "Dice": "dice"},
        "score",
        "per_class_iou",
        "IoU per class (val)",
        "Intersection over union and Dice of each class over all validation pixels; a "
        "missing bar is a class in neither the masks nor the predictions.",
    )


def _colors(names: list[str]) -> np.ndarray:
    """RGBA per class; a class named background stays transparent so the image shows."""
    table = colormaps["tab10" if len(names) <= 10 else "tab20"]
    colors = np.array([table(i % table.N) for i in range(len(names))], dtype=np.float64)
    colors[:, 3] = ALPHA
    for i, name in enumerate(names):
        if name.lower() in ("background", "bg"):
            colors[i, 3] = 0.0
    return colors


def _overlay(mask: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """An RGBA image of a class-index mask; ignored pixels are transparent."""
    rgba = np.zeros((*mask.shape, 4))
    valid = (mask != IGNORE) & (mask < len(colors))
    rgba[valid] = colors[mask[valid]]
    return rgba


def masks_plot(ctx: ReportContext) -> Plot | None:
    """Image, true mask and predicted mask of the first validation images."""
    samples = ctx.samples(SHOWN_IMAGES)
    if samples is None or not samples.images:
        return None
    names = samples.names
    colors = _colors(names)
    rows = len(samples.images)
    fig, axes = new_figure(width=7.8, height=2.5 * rows + 0.4, ncols=3, nrows=rows)
    for r, (image, target, logits) in enumerate(
        zip(samples.images, samples.targets, samples.outputs, strict=True)
    ):
        pred = logits.argmax(dim=0) if logits.shape[0] > 1 else (logits[0] >= 0).long()
        picture = image_hwc(image)
        # Masks are drawn over a grey copy, so class colours do not blend with the image's.
        grey = image.float().mean(dim=0).numpy()
        mask = torch.as_tensor(target).long().numpy()
        for c, (overlay, title) in enumerate(
            ((None, "image"), (mask, "ground truth"), (pred.numpy(), "prediction"))
        ):
            ax = axes[r, c]
            if overlay is None:
                ax.imshow(picture, cmap="gray" if image.shape[0] == 1 else None)
            else:
                ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
                ax.imshow(_overlay(overlay, colors), interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [
        Patch(facecolor=colors[i, :3], label=n) for i, n in enumerate(names) if colors[i, 3] > 0
    ]
    if handles:
        fig.legend(
            handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8
        )
    return render(
        fig,
        "masks",
        "Sample masks (val)",
        f"The first {rows} of {samples.total} val images: the image, its true mask and the "
        "predicted mask overlaid (background and unlabelled pixels left clear).",
    )


@register_section("segmentation")
def segmentation_plots(ctx: ReportContext) -> list[Plot]:
    """All segmentation figures the run allows."""
    return [p for p in (iou_plot(ctx), masks_plot(ctx)) if p is not None]
