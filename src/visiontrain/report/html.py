"""Self-contained HTML: inline CSS, figures as base64 PNG data URIs, no network at all.

The page's Content-Security-Policy forbids every fetch except ``data:`` images, so a
report cannot reach the network even if a name in it looked like a URL. A small inline
script records, on load, how many images failed to decode (``data-broken-images`` on
``<body>``), which lets a headless browser check the page.
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from visiontrain.report.figures import Plot
from visiontrain.version import __version__

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1f2328; background: #f6f8fa; }
header { background: #24292f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 1.5em; word-break: break-all; }
header .sub { color: #c9d1d9; font-size: 0.95em; }
main { padding: 12px 32px 32px; max-width: 1200px; }
section { background: #fff; border: 1px solid #d0d7de; border-radius: 6px;
          padding: 12px 20px; margin: 16px 0; }
h2 { font-size: 1.2em; margin: 4px 0 12px; }
h3 { font-size: 1em; margin: 12px 0 6px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
dl.meta dt { font-weight: 600; color: #57606a; }
dl.meta dd { margin: 0; font-family: ui-monospace, monospace; word-break: break-all; }
table { border-collapse: collapse; margin: 4px 0 12px; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-family: ui-monospace, monospace; }
.notes { background: #fff8c5; border-color: #d4a72c; }
.figures { display: grid; gap: 16px;
           grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); }
figure { margin: 0; padding: 8px; border: 1px solid #eaeef2; border-radius: 6px;
         min-width: 0; }
figure.wide { grid-column: 1 / -1; }
figure h3 { margin-top: 0; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.88em; color: #57606a; max-width: 640px; margin-top: 6px; }
footer { color: #57606a; font-size: 0.85em; padding: 0 32px 24px; }
code { background: #eaeef2; padding: 1px 4px; border-radius: 4px; }
"""

# Figures wider than this (pixels) take a whole row of the figure grid.
WIDE_PX = 700

SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (im) { return !im.complete || im.naturalWidth === 0; });
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-broken-images", String(broken.length));
});
"""


def fmt(value: Any) -> str:
    """A cell value: ints as is, floats to 4 decimals, NaN and None as ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], label_cols: int = 1) -> str:
    """An HTML table; the first ``label_cols`` columns are text, the rest numbers."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = []
    for row in rows:
        cells = [
            f"<td>{escape(str(c))}</td>"
            if i < label_cols
            else f'<td class="num">{escape(fmt(c))}</td>'
            for i, c in enumerate(row)
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def definition_list(items: Iterable[tuple[str, Any]]) -> str:
    """A two-column ``<dl>`` of label → value (values escaped)."""
    parts = [
        f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in items if v not in (None, "")
    ]
    return f'<dl class="meta">{"".join(parts)}</dl>'


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_width(png: bytes) -> int:
    """The pixel width of a PNG, from its IHDR chunk."""
    return int.from_bytes(png[16:20], "big") if png[:8] == b"\x89PNG\r\n\x1a\n" else 0


def figure(plot: Plot) -> str:
    """One figure with its title and caption, the PNG embedded; wide ones span the row."""
    wide = ' class="wide"' if png_width(plot.png) > WIDE_PX else ""
    return (
        f'<figure id="{escape(plot.name)}"{wide}><h3>{escape(plot.title)}</h3>'
        f'<img src="{data_uri(plot.png)}" alt="{escape(plot.title)}" '
        f'data-file="plots/{escape(plot.name)}.png">'
        f"<figcaption>{escape(plot.caption)}</figcaption></figure>"
    )


def section(title: str, body: str, css_class: str = "") -> str:
    """A boxed section with a heading."""
    cls = f' class="{css_class}"' if css_class else ""
    return f"<section{cls}><h2>{escape(title)}</h2>{body}</section>"


def figures_section(title: str, plots: Sequence[Plot]) -> str:
    """A section of figures, or nothing when there are none."""
    if not plots:
        return ""
    return section(title, '<div class="figures">' + "".join(figure(p) for p in plots) + "</div>")


def notes_section(notes: Sequence[str]) -> str:
    """The yellow box listing what the report could not show and why."""
    if not notes:
        return ""
    items = "".join(f"<li>{escape(n)}</li>" for n in dict.fromkeys(notes))
    return section("Notes", f"<ul>{items}</ul>", "notes")


def page(title: str, subtitle: str, body: str, footer: str) -> str:
    """The whole document around ``body`` (already HTML)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style>"
        f"<script>{SCRIPT}</script></head>\n<body>"
        f'<header><h1>{escape(title)}</h1><div class="sub">{escape(subtitle)}</div></header>'
        f"<main>{body}</main>"
        f"<footer>{escape(footer)} Generated {escape(stamp)} by visiontrain "
        f"{escape(__version__)}.</footer></body></html>\n"
    )
