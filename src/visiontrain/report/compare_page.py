"""The HTML page of ``visiontrain compare --html``: the comparison tables and curves."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from visiontrain.report.figures import Plot
from visiontrain.report.html import figures_section, page, section

# A formatted table: its title, the label columns, and rows of cells.
Table = tuple[str, list[str], list[list[str]]]


def _table(labels: list[str], runs: list[str], rows: list[list[str]]) -> str:
    """A comparison table; cells are already formatted ("value (delta)")."""
    head = "".join(f"<th>{escape(h)}</th>" for h in [*labels, *runs])
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{escape(c)}</td>" if i < len(labels) else f'<td class="num">{escape(c)}</td>'
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_comparison_page(
    comparison: dict[str, Any], tables: Sequence[Table], plots: Sequence[Plot]
) -> str:
    """The comparison as a self-contained page.

    Args:
        comparison: The dict of ``visiontrain compare``'s ``build_comparison``.
        tables: ``(title, label columns, formatted rows)`` per table, as the terminal shows.
        plots: The overlaid val curves of the runs.
    """
    runs = [r["name"] for r in comparison["runs"]]
    listing = "".join(
        f"<li><b>{escape(r['name'])}</b>{' (baseline)' if i == 0 else ''}: "
        f"<code>{escape(r['path'])}</code></li>"
        for i, r in enumerate(comparison["runs"])
    )
    intro = f"<ul>{listing}</ul>"
    if len(runs) > 1:
        intro += "<p>Other runs show value (delta vs the baseline).</p>"
    body = section("Runs", intro) + "".join(
        section(title, _table(labels, runs, rows)) for title, labels, rows in tables
    )
    body += figures_section("Validation curves", plots)
    subtitle = f"{len(runs)} runs on {comparison['split']}"
    return page("Run comparison", subtitle, body, "Written by visiontrain compare --html.")
