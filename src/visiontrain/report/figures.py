"""Matplotlib figures rendered to PNG bytes with the Agg canvas (no display, no pyplot).

Figures are built from :class:`matplotlib.figure.Figure` directly rather than through
``pyplot``: pyplot keeps global state (and picks a GUI backend where one exists), which a
report written at the end of training must not touch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
BEST_COLOR = "#d62728"


@dataclass(frozen=True)
class Plot:
    """One rendered figure of a report.

    Attributes:
        name: File stem: the PNG is written as ``plots/<name>.png``.
        title: Heading shown above the figure.
        caption: What the figure shows, for the reader.
        png: The PNG bytes.
    """

    name: str
    title: str
    caption: str
    png: bytes


def new_figure(width: float = 6.4, height: float = 3.6, ncols: int = 1, nrows: int = 1) -> Any:
    """A figure with a grid of axes, attached to an Agg canvas.

    Returns:
        ``(figure, axes)``; ``axes`` is one Axes for a 1x1 grid, else a 2-D array.
    """
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=nrows * ncols == 1)
    return fig, axes


def render(fig: Figure, name: str, title: str, caption: str) -> Plot:
    """Render ``fig`` to PNG and wrap it as a :class:`Plot`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return Plot(name, title, caption, buf.getvalue())


def image_hwc(image: Any) -> np.ndarray:
    """A CHW uint8 tensor as an HWC (or HW for one channel) array for ``imshow``."""
    array = image.cpu().numpy()
    if array.shape[0] == 1:
        return array[0]
    return np.transpose(array[:3], (1, 2, 0))


def grid_shape(count: int, max_cols: int) -> tuple[int, int]:
    """``(rows, cols)`` of a grid holding ``count`` panels, at most ``max_cols`` wide."""
    cols = max(1, min(count, max_cols))
    return max(1, -(-count // cols)), cols


def hide_unused(axes: np.ndarray, used: int) -> None:
    """Switch off the axes of a grid beyond the first ``used`` panels."""
    for ax in axes.flat[used:]:
        ax.set_axis_off()


def bar_chart(
    labels: list[str],
    series: dict[str, list[float]],
    ylabel: str,
    ylim: tuple[float, float] | None = (0.0, 1.0),
) -> Figure:
    """Grouped bars: one group per label, one bar per series (NaN bars are left out).

    Args:
        labels: Group names on the x axis (classes, targets).
        series: ``{legend name: one value per label}``.
        ylabel: Y axis label.
        ylim: Y axis range, or None for automatic.
    """
    fig, ax = new_figure(
        width=min(11.0, max(5.0, 0.5 * len(labels) * max(1, len(series)) + 2)), height=3.6
    )
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(
        x,
        labels,
        rotation=30 if len(labels) > 6 else 0,
        ha="right" if len(labels) > 6 else "center",
    )
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(ylim[0], ylim[1] * 1.08)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def per_class_bars(
    per_class: dict[str, dict[str, Any]],
    columns: dict[str, str],
    ylabel: str,
    name: str,
    title: str,
    caption: str,
) -> Plot | None:
    """Grouped bars of some per-class metrics (``columns``: legend label → metric key).

    Returns None when there is no per-class table; a class lacking a metric gets no bar.
    """
    if not per_class:
        return None
    names = list(per_class)
    series = {
        label: [float(per_class[n].get(key, np.nan)) for n in names]
        for label, key in columns.items()
    }
    return render(bar_chart(names, series, ylabel), name, title, caption)


def annotate_cells(ax: Any, values: np.ndarray, fmt: str, limit: int = 20) -> None:
    """Write each cell's value on a matrix image, white on the darker cells.

    Beyond ``limit`` rows the numbers no longer fit in the cells and are left out.
    """
    if len(values) > limit:
        return
    high = values.max() if values.size else 0
    for (i, j), v in np.ndenumerate(values):
        color = "white" if high and v > 0.6 * high else "black"
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8, color=color)
