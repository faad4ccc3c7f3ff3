"""Regression figures: predicted against true value per target, and R² per target."""

from __future__ import annotations

import numpy as np
import torch

from visiontrain.report.figures import Plot, bar_chart, new_figure, render
from visiontrain.report.sections import ReportContext, register_section

SCORED_IMAGES = 400


def scatter_plot(ctx: ReportContext) -> Plot | None:
    """One panel per target: the model's value against the true one, with the y = x line."""
    samples = ctx.samples(SCORED_IMAGES)
    if samples is None or not samples.images or "target_mean" not in samples.task_state:
        return None
    mean = torch.tensor(samples.task_state["target_mean"])
    std = torch.tensor(samples.task_state["target_std"])
    # The model predicts standardised targets; the figure is in the data's own units.
    pred = (torch.stack(samples.outputs).float() * std + mean).numpy()
    true = torch.stack(samples.targets).float().reshape(pred.shape).numpy()
    names = samples.names
    fig, axes = new_figure(width=3.6 * len(names), height=3.6, ncols=len(names))
    for k, (ax, name) in enumerate(zip(np.atleast_1d(axes).flat, names, strict=False)):
        ax.scatter(true[:, k], pred[:, k], s=10, alpha=0.6)
        low = float(min(true[:, k].min(), pred[:, k].min()))
        high = float(max(true[:, k].max(), pred[:, k].max()))
        ax.plot([low, high], [low, high], color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
        ax.grid(alpha=0.3)
    return render(
        fig,
        "predicted_vs_true",
        "Predicted against true values (val)",
        f"Each dot is one of the first {len(true)} of {samples.total} val images; points on "
        "the dashed line are exact.",
    )


def r2_plot(ctx: ReportContext) -> Plot | None:
    """R² of each target (unit-free, unlike MAE and RMSE)."""
    per_target = ctx.val.get("per_target") or {}
    if not per_target:
        return None
    names = list(per_target)
    values = [float(per_target[n].get("r2", np.nan)) for n in names]
    fig = bar_chart(names, {"R²": values}, "R²", ylim=None)
    return render(
        fig,
        "per_target_r2",
        "R² per target (val)",
        "Share of each target's variance that the model explains: 1 is perfect, 0 is no "
        "better than predicting the mean. MAE and RMSE (in the target's units) are in the "
        "table above.",
    )


@register_section("regression")
def regression_plots(ctx: ReportContext) -> list[Plot]:
    """All regression figures the run allows."""
    return [p for p in (r2_plot(ctx), scatter_plot(ctx)) if p is not None]
