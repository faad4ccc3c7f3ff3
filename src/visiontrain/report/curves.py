"""Training curves from ``metrics.jsonl`` and the overlaid curves of a run comparison.

Per epoch: loss and the monitored metric; per logged step: LR, gradient norm, throughput.

Epochs are shown 1-based, as the console prints them during training (``epoch 2/2``);
``summary.json`` stores them 0-based.
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib.ticker import MaxNLocator

from visiontrain.report.figures import BEST_COLOR, Plot, new_figure, render
from visiontrain.report.rundata import RunData, is_number, monitor_value


def _points(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    """``(xs, ys)`` of the records where both keys hold finite numbers."""
    xs, ys = [], []
    for r in records:
        a, b = r.get(x), r.get(y)
        if is_number(a) and is_number(b) and math.isfinite(b):
            xs.append(float(a) + (1 if x == "epoch" else 0))
            ys.append(float(b))
    return xs, ys


def _mark_best(ax: Any, run: RunData, xs: list[float], ys: list[float]) -> None:
    """A dashed line at the best epoch, and a star on the curve there."""
    best = run.best_epoch()
    if best is None:
        return
    ax.axvline(best, color=BEST_COLOR, linestyle="--", linewidth=1, label=f"best (epoch {best})")
    for x, y in zip(xs, ys, strict=True):
        if x == best:
            ax.plot([x], [y], marker="*", markersize=14, color=BEST_COLOR, linestyle="none")


def loss_plot(run: RunData) -> Plot | None:
    """Train and val loss per epoch, best epoch marked."""
    train = _points(run.kind("train_epoch"), "epoch", "loss")
    val = _points(run.kind("eval", "val"), "epoch", "loss")
    if not train[0] and not val[0]:
        return None
    fig, ax = new_figure()
    if train[0]:
        ax.plot(*train, marker="o", label="train (epoch mean)")
    if val[0]:
        ax.plot(*val, marker="o", label="val")
    _mark_best(ax, run, *(val if val[0] else train))
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    caption = "Mean training loss of each epoch and the validation loss after it"
    if not val[0]:
        caption += " (this task reports no validation loss)"
    return render(
        fig, "loss", "Loss per epoch", caption + "; the dashed line marks the best checkpoint."
    )


def monitor_plot(run: RunData) -> Plot | None:
    """The monitored validation metric per epoch, best epoch marked."""
    xs, ys = [], []
    for r in run.kind("eval", "val"):
        value = monitor_value(r, run.monitor)
        if value is not None and is_number(r.get("epoch")):
            xs.append(float(r["epoch"]))
            ys.append(value)
    if not xs:
        return None
    fig, ax = new_figure()
    ax.plot(xs, ys, marker="o", label=run.monitor)
    _mark_best(ax, run, xs, ys)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(run.monitor)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    better = "lower" if run.monitor_mode == "min" else "higher"
    return render(
        fig,
        "monitor",
        f"Monitored metric: {run.monitor}",
        f"{run.monitor} after each evaluation ({better} is better); the best checkpoint "
        "(checkpoints/best.pt) is the starred epoch.",
    )


def _step_plot(
    run: RunData, key: str, name: str, title: str, ylabel: str, caption: str, log: bool = False
) -> Plot | None:
    """One value of the ``train_step`` records against the optimizer step."""
    xs, ys = _points(run.kind("train_step"), "step", key)
    if not xs:
        return None
    fig, ax = new_figure(height=3.0)
    ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
    if log and min(ys) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return render(fig, name, title, caption)


def loss_terms_plot(run: RunData) -> Plot | None:
    """Each ``loss_<term>`` of a multi-term loss (a detector's) per logged step."""
    steps = run.kind("train_step")
    terms = sorted({k for r in steps for k in r if k.startswith("loss_") and is_number(r[k])})
    if not terms:
        return None
    fig, ax = new_figure(height=3.2)
    for term in terms:
        ax.plot(*_points(steps, "step", term), label=term.removeprefix("loss_"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss term")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return render(
        fig,
        "loss_terms",
        "Loss terms per step",
        "Each term of the training loss, averaged over the logged steps.",
    )


def training_curves(run: RunData) -> list[Plot]:
    """Every curve the run's records allow; a missing kind of record skips its plot."""
    plots = [
        loss_plot(run),
        monitor_plot(run),
        _step_plot(
            run,
            "lr",
            "lr",
            "Learning rate",
            "learning rate",
            "Learning rate of the first parameter group per logged optimizer step (log scale).",
            log=True,
        ),
        _step_plot(
            run,
            "grad_norm",
            "grad_norm",
            "Gradient norm",
            "gradient L2 norm",
            "Global L2 norm of the gradients before clipping, per logged step; spikes flag "
            "unstable training.",
        ),
        _step_plot(
            run,
            "samples_per_s",
            "throughput",
            "Throughput",
            "images / s",
            "Training images per second over each logging interval (data loading included).",
        ),
        loss_terms_plot(run),
    ]
    if not run.kind("train_step"):
        run.notes.append(
            "metrics.jsonl has no train_step records: no LR, gradient norm or throughput plots."
        )
    return [p for p in plots if p is not None]


def comparison_curves(runs: list[RunData], names: list[str]) -> list[Plot]:
    """Val loss and the first run's monitored metric per epoch, one line per run.

    Args:
        runs: The runs, baseline first.
        names: Legend names, one per run.
    """
    monitor = runs[0].monitor
    plots = []
    for key, title, ylabel in (
        ("loss", "Validation loss per epoch", "val loss"),
        (monitor, f"{monitor} per epoch", monitor),
    ):
        fig, ax = new_figure(width=7.0, height=3.8)
        drawn = 0
        for run, name in zip(runs, names, strict=True):
            xs, ys = [], []
            for r in run.kind("eval", "val"):
                value = monitor_value(r, key if "/" in key else f"val/{key}")
                if value is not None and is_number(r.get("epoch")):
                    xs.append(float(r["epoch"]))
                    ys.append(value)
            if xs:
                ax.plot(xs, ys, marker="o", label=name)
                drawn += 1
        if not drawn or (key == monitor and monitor == "val/loss"):
            continue  # nothing to show, or the same plot as the loss one
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        stem = "val_loss" if key == "loss" else "monitor"
        plots.append(
            render(fig, stem, title, f"{ylabel} of each run after every evaluation, overlaid.")
        )
    return plots
