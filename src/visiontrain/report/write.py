"""Write a run's report and a comparison page to disk."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visiontrain.io import atomic_write, atomic_write_text
from visiontrain.report.compare_page import Table, render_comparison_page
from visiontrain.report.curves import comparison_curves, training_curves
from visiontrain.report.figures import Plot
from visiontrain.report.page import render_run_page
from visiontrain.report.rundata import RunData, RunSummary, load_run
from visiontrain.report.samples import SampleSource
from visiontrain.report.sections import ReportContext, task_plots
from visiontrain.rundir import METRICS_FILE, PLOTS_DIR, REPORT_FILE
from visiontrain.tracking.jsonl import read_records

if TYPE_CHECKING:
    from rich.console import Console


def _write_plots(folder: Path, plots: Sequence[Plot]) -> None:
    """Replace the PNGs of ``folder`` with ``plots`` (a rebuild leaves no stale figure)."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = {f"{p.name}.png" for p in plots}
    for old in folder.glob("*.png"):
        if old.name not in keep:
            old.unlink()
    for plot in plots:
        atomic_write(folder / f"{plot.name}.png", lambda fh, png=plot.png: fh.write(png))


def write_report(
    run_dir: Path, console: Console | None = None, source: SampleSource | None = None
) -> Path:
    """Build the figures and page of one run; see :func:`visiontrain.report.write_report`."""
    start = time.perf_counter()
    run = load_run(run_dir)
    curves = training_curves(run)
    evaluation = task_plots(ReportContext(run, source))
    html = render_run_page(run, curves, evaluation)
    _write_plots(run.path / PLOTS_DIR, [*curves, *evaluation])
    out = run.path / REPORT_FILE
    atomic_write_text(out, html)
    if console is not None:
        console.print(
            f"report written to {out} ({len(curves) + len(evaluation)} figures, "
            f"{len(html) / 1024:.0f} KiB, {time.perf_counter() - start:.1f} s)",
            highlight=False,
        )
    return out


def write_comparison_html(
    comparison: dict[str, Any], tables: Sequence[Table], summaries: Sequence[RunSummary], out: Path
) -> Path:
    """Write the comparison tables and the runs' overlaid val curves as one HTML page.

    Args:
        comparison: The dict of ``visiontrain compare``'s ``build_comparison``.
        tables: The formatted tables (title, label columns, rows).
        summaries: The compared runs, in the comparison's order.
        out: The HTML file to write.

    Returns:
        ``out``.
    """
    runs = [RunData(s.path, {}, s.summary, read_records(s.path / METRICS_FILE)) for s in summaries]
    plots = comparison_curves(runs, [s.name for s in summaries])
    atomic_write_text(out, render_comparison_page(comparison, tables, plots))
    return out
