"""Run the checks, print and write the report, and the ``doctor`` verb."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from visiontrain.config import Config
from visiontrain.engine.parts import Parts, build_parts
from visiontrain.errors import EXIT_FAILURE, EXIT_OK
from visiontrain.io import atomic_write_json
from visiontrain.tools.doctor.base import (
    _CHECKS,
    LEVELS,
    DoctorContext,
    Finding,
    _jsonable,
    list_checks,
)

# -------------------------------------------------------------------------------- runner


def run_doctor(
    cfg: Config,
    console: Console,
    checks: list[str] | None = None,
    parts: Parts | None = None,
) -> list[Finding]:
    """Run the registered checks (or the named ones) and return their findings.

    Args:
        cfg: The resolved config.
        console: Where progress lines go.
        checks: Names of the checks to run (in registry order); None runs all.
        parts: Built parts to check; None builds them from ``cfg`` as ``train`` would.

    Returns:
        The findings, in check order.

    Raises:
        ConfigError: for an unknown check name (and anything ``build_parts`` raises).
    """
    names = list_checks()
    if checks is not None:
        for c in checks:
            _CHECKS.get(c)  # an unknown name is refused with the nearest one
        names = [n for n in names if n in checks]
    if parts is None:
        parts = build_parts(cfg)
    ctx = DoctorContext(cfg, parts, console)
    findings: list[Finding] = []
    for name in names:
        start = time.perf_counter()
        try:
            found = _CHECKS.get(name)(ctx)
        except Exception as exc:  # one broken check must not hide the others' findings
            found = [
                Finding(
                    name,
                    "error",
                    f"the check failed with {type(exc).__name__}: {exc}",
                    {"exception": type(exc).__name__},
                    "Fix the cause named in the message; run `visiontrain train` on the same "
                    "config to see the full traceback.",
                )
            ]
        seconds = time.perf_counter() - start
        for f in found:
            f.evidence.setdefault("check_seconds", round(seconds, 3))
        findings.extend(found)
    return findings


def output_dir(cfg: Config) -> Path:
    """``run.dir/run.name``, or ``run.dir/doctor-<task>-<data>-<timestamp>``."""
    from visiontrain.rundir import tool_dir

    return tool_dir(cfg, f"doctor-{cfg.task}")


_STYLE = {"ok": "green", "warning": "yellow", "error": "bold red"}


def _rounded(value: Any) -> Any:
    """Floats to 4 significant digits for the terminal; doctor.json keeps them whole."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _evidence_text(evidence: dict[str, Any], limit: int = 160) -> str:
    parts = []
    for k, v in evidence.items():
        if k in ("layers", "loss_curve", "check_seconds"):
            continue
        parts.append(f"{k}={_rounded(_jsonable(v))}")
    text = "; ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def print_report(findings: list[Finding], console: Console) -> None:
    """A table of the findings: level, check, and the message with its fix and evidence."""
    table = Table(title="visiontrain doctor", show_lines=True)
    # Level and check name never wrap, so that they stay greppable in a narrow terminal.
    table.add_column("level", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("finding", overflow="fold")
    for f in findings:
        text = escape(f.message)
        if f.fix:
            text += f"\n[bold]fix:[/] {escape(f.fix)}"
        evidence = _evidence_text(f.evidence)
        if evidence:
            text += f"\n[dim]{escape(evidence)}[/]"
        table.add_row(f"[{_STYLE[f.level]}]{f.level}[/]", f.name, text)
    console.print(table)
    counts = {lvl: sum(f.level == lvl for f in findings) for lvl in LEVELS}
    console.print(
        f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['ok']} ok",
        highlight=False,
    )


def write_report(findings: list[Finding], cfg: Config, device: torch.device, folder: Path) -> Path:
    """Write ``doctor.json`` (atomically) into ``folder`` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "doctor.json"
    counts = {lvl: sum(f.level == lvl for f in findings) for lvl in LEVELS}
    atomic_write_json(
        path,
        {
            "counts": counts,
            "device": str(device),
            "findings": [f.to_dict() for f in findings],
            "config": cfg.to_dict(),
        },
    )
    return path


def cmd_doctor(args: argparse.Namespace, console: Console) -> int:
    """``visiontrain doctor``: run the checks, print the report, write doctor.json."""
    from visiontrain.config import load_tool_config

    cfg = load_tool_config(args.items, "doctor", "checks a fresh build of the config")
    checks = None
    if args.check:
        checks = [c.strip() for item in args.check for c in item.split(",") if c.strip()]
    parts = build_parts(cfg)
    for note in parts.bundle.notes:
        console.print(f"note: {note}", highlight=False)
    findings = run_doctor(cfg, console, checks, parts)
    folder = output_dir(cfg)
    write_report(findings, cfg, parts.device, folder)
    print_report(findings, console)
    print(folder, flush=True)
    return EXIT_FAILURE if any(f.level == "error" for f in findings) else EXIT_OK


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``doctor`` sub-command to the CLI's sub-parsers.

    Args:
        sub: The object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The ``doctor`` parser.
    """
    p = sub.add_parser(
        "doctor",
        help="preflight: check data, model, training step, eval path, loader and precision",
        description="Build the config's data and model as `train` would and run named checks: "
        f"{', '.join(list_checks())}. Each finding has a level (ok, warning, error), the "
        "numbers behind it and a fix. Writes doctor.json to run.dir/run.name (default "
        "doctor-<task>-<data>-<timestamp>); the last line printed is that folder. Exit 1 "
        "when any finding is an error.",
        epilog="Example: visiontrain doctor configs/defects.yaml optim.lr=0.5 "
        "--check train.learning_rate",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this check (repeatable, or comma-separated); default: all",
    )
    p.set_defaults(func=cmd_doctor)
    return p
