"""``visiontrain compare``: put the metrics of finished runs side by side.

Each run is read from its ``summary.json`` (written by ``visiontrain train`` when a run
finishes). The first run is the baseline; every other run is shown with its deltas
(value - baseline value) against it. Three tables come out of one comparison:

* headline: every scalar metric of the split (loss, accuracy, macro F1, ...);
* per class: precision, recall, F1 and support of each class (classification runs);
* per target: MAE, RMSE and R² of each target (regression runs).

The comparison itself is a plain, JSON-ready dict (:func:`build_comparison`); the
renderers turn it into rich tables (:func:`render_tables`) or GitHub markdown
(:func:`render_markdown`); ``--html`` also writes a self-contained page with the tables and
the runs' overlaid validation curves (:mod:`visiontrain.report`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from visiontrain.errors import EXIT_OK, UserError
from visiontrain.headline import HEADLINE_ORDER, NOT_HEADLINE, PER_CLASS_ORDER, PER_TARGET_ORDER
from visiontrain.report.rundata import RunSummary
from visiontrain.rundir import SUMMARY_FILE

SPLITS = ("test", "val")
MISSING = "—"


Number = int | float
Row = dict[str, list[Any]]  # {"values": [...], "deltas": [...]}


def _is_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (booleans are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _summary_file(run: str | Path) -> Path:
    """The ``summary.json`` of a run argument (a run directory or the file itself)."""
    path = Path(run)
    if not path.exists():
        raise UserError(
            f"{path} does not exist; pass run directories (each holding {SUMMARY_FILE}) "
            f"or paths to {SUMMARY_FILE} files."
        )
    if path.is_dir():
        file = path / SUMMARY_FILE
        if not file.is_file():
            raise UserError(
                f"{path} has no {SUMMARY_FILE}: the run has not finished (or was "
                "interrupted); compare finished runs, or evaluate its checkpoint with "
                f"`visiontrain eval {path}`."
            )
        return file
    return path


def _read_summary(file: Path) -> dict[str, Any]:
    """Parse a ``summary.json``; any problem is a :class:`UserError` naming the file."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {file}: {exc.strerror or exc}.") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{file} is not a text file ({exc.reason}); is it a summary.json?") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "the file is damaged: re-run `visiontrain eval` on the run or train it again."
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise UserError(f"{file} is not a visiontrain run summary (it has no 'metrics' section).")
    return data


def _unique_names(dirs: Sequence[Path]) -> list[str]:
    """Column names: directory names, with the parent folder added where two are equal."""
    resolved = [d.resolve() for d in dirs]
    names = [d.name or str(d) for d in resolved]
    for name in set(names):
        clashes = [i for i, n in enumerate(names) if n == name]
        if len(clashes) > 1:
            for i in clashes:
                names[i] = f"{resolved[i].parent.name}/{resolved[i].name}"
    # Still equal (same folder twice, or equal parents too): number them.
    counts = {name: names.count(name) for name in names}
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if counts[name] > 1:
            seen[name] = seen.get(name, 0) + 1
            names[i] = f"{name} #{seen[name]}"
    return names


def load_summaries(paths: Sequence[str | Path]) -> list[RunSummary]:
    """Read the summaries of finished runs.

    Args:
        paths: Run directories (each holding ``summary.json``) or ``summary.json`` files.

    Returns:
        One :class:`RunSummary` per path, in the given order.

    Raises:
        UserError: A path does not exist, a run has no ``summary.json``, or a summary is
            unreadable or not valid JSON.
    """
    files = [_summary_file(p) for p in paths]
    summaries = [_read_summary(f) for f in files]
    dirs = [f.parent for f in files]
    return [
        RunSummary(name=name, path=d, summary=s)
        for name, d, s in zip(_unique_names(dirs), dirs, summaries, strict=True)
    ]


def _ordered(keys: Iterable[str], first: Sequence[str]) -> list[str]:
    """``keys`` without duplicates: those in ``first`` in its order, then the rest sorted."""
    present = set(keys)
    return [k for k in first if k in present] + sorted(present - set(first))


def _delta(value: Any, base: Any) -> Number | None:
    """``value - base``, or ``None`` when either is missing."""
    if value is None or base is None:
        return None
    return value - base


def _row(values: list[Number | None]) -> Row:
    """A comparison row: the runs' values and their deltas against the first."""
    deltas = [None] + [_delta(v, values[0]) for v in values[1:]]
    return {"values": values, "deltas": deltas}


def _split_metrics(run: RunSummary, split: str) -> dict[str, Any]:
    """A run's metrics on ``split``; a :class:`UserError` when the summary has none."""
    metrics = run.summary["metrics"].get(split)
    if isinstance(metrics, dict):
        return metrics
    others = [s for s in SPLITS if s != split and isinstance(run.summary["metrics"].get(s), dict)]
    hint = (
        f"compare on {others[0]} with --split {others[0]}."
        if others
        else "it has no metrics for any split."
    )
    raise UserError(
        f"run {run.name} ({run.path}) has no {split} metrics in its {SUMMARY_FILE}; {hint}"
    )


def _nested_rows(tables: list[dict[str, Any]], order: Sequence[str]) -> dict[str, dict[str, Row]]:
    """Rows of a per-class or per-target section, one group per name across all runs.

    Args:
        tables: For each run, its ``{name: {metric: value}}`` mapping (empty when absent).
        order: Metrics listed first, in this order; other numeric metrics follow sorted.

    Returns:
        ``{name: {metric: row}}`` with names in first-seen order over the runs.
    """
    names: list[str] = []
    for table in tables:
        names.extend(n for n in table if n not in names)
    result: dict[str, dict[str, Row]] = {}
    for name in names:
        entries = [t.get(name) if isinstance(t.get(name), dict) else {} for t in tables]
        metrics = _ordered((k for e in entries for k, v in e.items() if _is_number(v)), order)
        metrics = metrics or list(order)  # a name no run has numbers for: all rows missing
        result[name] = {
            m: _row([e[m] if _is_number(e.get(m)) else None for e in entries]) for m in metrics
        }
    return result


def build_comparison(summaries: Sequence[RunSummary], split: str) -> dict[str, Any]:
    """Compare runs on one split; the first run is the baseline.

    Args:
        summaries: Runs as returned by :func:`load_summaries` (at least one).
        split: ``"test"`` or ``"val"``.

    Returns:
        A JSON-ready dict::

            {"split": split,
             "runs": [{"name": ..., "path": ...}, ...],
             "headline": {metric: {"values": [...], "deltas": [None, ...]}},
             "per_class": {class: {metric: {"values": [...], "deltas": [...]}}},
             "per_target": {target: {metric: {"values": [...], "deltas": [...]}}}}

        ``values`` has one entry per run (``None`` where a run lacks the number) and
        ``deltas`` holds value - baseline value (``None`` for the baseline itself and where
        either number is missing). Classes are listed in the first run's class order, then
        classes that only later runs have.

    Raises:
        UserError: A run's summary has no metrics for ``split``.
    """
    if not summaries:
        raise UserError("nothing to compare: pass at least one run.")
    tasks = {run.name: run.summary.get("task") for run in summaries}
    if len(set(tasks.values())) > 1:
        listed = ", ".join(f"{name} ({task})" for name, task in tasks.items())
        raise UserError(
            f"these runs solve different tasks: {listed}. Their metrics do not compare "
            "(a delta between a classifier's loss and a detector's is meaningless); "
            "compare runs of one task."
        )
    metrics = [_split_metrics(run, split) for run in summaries]
    warnings = []
    sizes = {run.name: m.get("samples") for run, m in zip(summaries, metrics, strict=True)}
    if len({s for s in sizes.values() if s is not None}) > 1:
        listed = ", ".join(f"{name} {n}" for name, n in sizes.items())
        warnings.append(
            f"the runs were scored on {split} sets of different sizes ({listed} images): "
            "their numbers are not on the same data, so the deltas mix the models with the data."
        )

    headline_keys = _ordered(
        (k for m in metrics for k, v in m.items() if _is_number(v) and k not in NOT_HEADLINE),
        HEADLINE_ORDER,
    )
    headline = {
        k: _row([m[k] if _is_number(m.get(k)) else None for m in metrics]) for k in headline_keys
    }

    def section(key: str) -> list[dict[str, Any]]:
        return [m[key] if isinstance(m.get(key), dict) else {} for m in metrics]

    per_class_tables = section("per_class")
    # A run's class_names fix its class order and list classes its per_class may lack
    # (they show as missing); classes that only later runs have come after the first's.
    ordered_tables: list[dict[str, Any]] = []
    for run, table in zip(summaries, per_class_tables, strict=True):
        names = [str(n) for n in run.summary.get("class_names") or []] if table else []
        names += [n for n in table if n not in names]
        ordered_tables.append({n: table.get(n) for n in names})

    return {
        "split": split,
        "runs": [{"name": run.name, "path": str(run.path)} for run in summaries],
        "headline": headline,
        "per_class": _nested_rows(ordered_tables, PER_CLASS_ORDER),
        "per_target": _nested_rows(section("per_target"), PER_TARGET_ORDER),
        "warnings": warnings,
    }


def format_value(value: Number | None) -> str:
    """A number for display: ints as is, floats to 4 decimals, ``—`` when missing."""
    if value is None:
        return MISSING
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def format_cell(value: Number | None, delta: Number | None, baseline: bool) -> str:
    """A table cell: the value, and for non-baseline runs its signed delta in brackets."""
    text = format_value(value)
    if baseline or value is None or delta is None:
        return text
    sign = f"{delta:+d}" if isinstance(delta, int) else f"{delta:+.4f}"
    return f"{text} ({sign})"


def _cells(row: Row) -> list[str]:
    """The formatted cells of a comparison row, one per run."""
    return [
        format_cell(v, d, baseline=i == 0)
        for i, (v, d) in enumerate(zip(row["values"], row["deltas"], strict=True))
    ]


def _sections(comparison: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, label columns, rows)`` for each non-empty table of a comparison."""
    split = comparison["split"]
    out: list[tuple[str, list[str], list[list[str]]]] = [
        (
            f"headline ({split})",
            ["metric"],
            [[m, *_cells(row)] for m, row in comparison["headline"].items()],
        )
    ]
    for key, title, label in (
        ("per_class", "per class", "class"),
        ("per_target", "per target", "target"),
    ):
        groups = comparison.get(key) or {}
        if groups:
            rows = [
                [name, m, *_cells(row)]
                for name, metrics in groups.items()
                for m, row in metrics.items()
            ]
            out.append((f"{title} ({split})", [label, "metric"], rows))
    return out


def _md_escape(text: str) -> str:
    """Escape a markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|")


def render_markdown(comparison: dict[str, Any]) -> str:
    """GitHub markdown: one ``### title (split)`` heading and pipe table per section.

    Args:
        comparison: The dict from :func:`build_comparison`.

    Returns:
        The markdown text, ending in a newline.
    """
    runs = [r["name"] for r in comparison["runs"]]
    parts: list[str] = []
    if len(runs) > 1:
        parts.append(f"Baseline: `{runs[0]}`; other runs show value (delta vs baseline).\n")
    for title, labels, rows in _sections(comparison):
        header = [*labels, *runs]
        lines = [
            f"### {title}",
            "",
            "| " + " | ".join(_md_escape(h) for h in header) + " |",
            "|" + "|".join([":---"] * len(labels) + ["---:"] * len(runs)) + "|",
        ]
        lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def render_tables(comparison: dict[str, Any]) -> list[Table]:
    """Rich tables of a comparison: headline, then per class / per target when present.

    Args:
        comparison: The dict from :func:`build_comparison`.

    Returns:
        The tables, ready for ``console.print``.
    """
    runs = [r["name"] for r in comparison["runs"]]
    caption = f"baseline: {runs[0]}; (±) = delta vs baseline" if len(runs) > 1 else None
    tables: list[Table] = []
    for title, labels, rows in _sections(comparison):
        table = Table(title=title, caption=caption)
        for label in labels:
            table.add_column(label, justify="left")
        for name in runs:
            table.add_column(name, justify="right", overflow="fold")
        grouped = len(labels) > 1
        previous = None
        for row in rows:
            cells = list(row)
            if grouped:
                if previous is not None and cells[0] != previous:
                    table.add_section()
                previous = cells[0]
            table.add_row(*cells)
        tables.append(table)
    return tables


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    """Compare finished runs from their summary.json files.

    Args:
        args: Parsed arguments with ``runs``, ``split``, ``format`` and ``html``.
        console: Where tables are printed (markdown and JSON go to stdout as plain text).

    Returns:
        The exit code, 0.
    """
    summaries = load_summaries(args.runs)
    comparison = build_comparison(summaries, args.split)
    for warning in comparison["warnings"]:
        # stderr: stdout may be redirected into a markdown or JSON file.
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if args.html:
        from visiontrain.report.write import write_comparison_html

        out = write_comparison_html(comparison, _sections(comparison), summaries, Path(args.html))
        # stderr: stdout may be redirected into a markdown or JSON file.
        Console(stderr=True, highlight=False).print(f"HTML comparison written to {out}")
    if args.format == "json":
        print(json.dumps(comparison, indent=2), flush=True)
    elif args.format == "markdown":
        print(render_markdown(comparison), end="", flush=True)
    else:
        for table in render_tables(comparison):
            console.print(table)
    return EXIT_OK


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` sub-command to the CLI's sub-parsers.

    Args:
        sub: The object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The ``compare`` parser.
    """
    p = sub.add_parser(
        "compare",
        help="compare the metrics of finished runs",
        description="Compare finished runs from their summary.json: headline metrics "
        "(loss, accuracy, macro F1, ...), per-class precision/recall/F1/support and, for "
        "regression, per-target MAE/RMSE/R². The first run is the baseline; every other "
        "run shows value (delta vs baseline). Only finished runs have a summary.json; "
        "evaluate an interrupted run's checkpoint with `visiontrain eval`.",
        epilog="Examples: visiontrain compare runs/exp1 runs/exp2 --format markdown > cmp.md; "
        "visiontrain compare runs/exp1 runs/exp2 --html cmp.html",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run directory (holding summary.json) or path to a summary.json; "
        "the first is the baseline",
    )
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="test",
        help="which split's metrics to compare (default: test)",
    )
    p.add_argument(
        "--format",
        choices=("table", "markdown", "json"),
        default="table",
        help="table: rich tables on the terminal; markdown: GitHub pipe tables; json: "
        "values and deltas per metric (null where missing). markdown and json go to stdout "
        "for redirecting into a file (default: table)",
    )
    p.add_argument(
        "--html",
        metavar="OUT.html",
        help="also write a self-contained HTML page: the tables plus the runs' val loss and "
        "monitored metric per epoch, overlaid",
    )
    p.set_defaults(func=cmd_compare)
    return p
