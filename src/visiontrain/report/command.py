"""``visiontrain report RUN``: rebuild a run's report (argparse only; imports are lazy)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

from visiontrain.errors import EXIT_OK


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """Write the report of each run given on the command line.

    Args:
        args: Parsed arguments with ``runs``.
        console: Where the path of each report is printed.

    Returns:
        The exit code, 0 (a bad run raises UserError, which the CLI turns into 2).
    """
    from visiontrain.report.write import write_report

    for run in args.runs:
        write_report(Path(run), console)
    return EXIT_OK


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``report`` sub-command to the CLI's sub-parsers.

    Args:
        sub: The object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The ``report`` parser.
    """
    p = sub.add_parser(
        "report",
        help="(re)build a run's report.html and plots/",
        description="Write RUN/report.html (self-contained: figures embedded, no network) "
        "and RUN/plots/*.png: loss and monitored metric per epoch with the best checkpoint "
        "marked, LR, gradient norm and throughput per step, and the task's evaluation "
        "figures (confusion matrix, PR curve, worst images; AP and sample boxes; IoU and "
        "sample masks). An unfinished run gets the figures its files allow.",
        epilog="Example: visiontrain report runs/classification-defects-20250101-120000",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory of `visiontrain train`")
    p.set_defaults(func=cmd_report)
    return p
