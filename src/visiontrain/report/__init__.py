"""Run reports: ``report.html`` (self-contained) and ``plots/*.png`` in a run directory.

:func:`write_report` works from the run directory alone — ``config.yaml``,
``summary.json``, ``metrics.jsonl``, ``checkpoints/best.pt`` and the run's data — and
draws whatever those allow: an interrupted run still gets its training curves.
``visiontrain report RUN`` rebuilds a report.

This module stays light (no matplotlib, no torch at import): the CLI imports it to
register the ``report`` verb on every start.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from visiontrain.report.command import add_parser

if TYPE_CHECKING:
    from rich.console import Console

    from visiontrain.report.samples import SampleSource

__all__ = ["add_parser", "write_report"]


def write_report(
    run_dir: Path, console: Console | None = None, source: SampleSource | None = None
) -> Path:
    """Write ``report.html`` and ``plots/*.png`` into a run directory.

    Args:
        run_dir: The run directory (as printed by ``visiontrain train``).
        console: Where to print the one-line result; None prints nothing.
        source: The trained module and data of a run in this process (a user's own
            module or Datasets, which the run directory alone cannot rebuild).

    Returns:
        The path of ``report.html``.

    Raises:
        UserError: The directory does not exist, holds nothing to report, or a file in
            it is damaged. A missing ``summary.json`` or ``best.pt`` is not an error: the
            report shows what exists and says what is missing.
    """
    from visiontrain.report.write import write_report as _write

    return _write(Path(run_dir), console, source)
