"""The run report page: header facts, metric tables, then the figures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from visiontrain.headline import HEADLINE_ORDER, NOT_HEADLINE
from visiontrain.report.figures import Plot
from visiontrain.report.html import (
    definition_list,
    figures_section,
    notes_section,
    page,
    section,
    table,
)
from visiontrain.report.rundata import RunData, is_number

SPLITS = ("val", "test")


def _model_text(model: dict[str, Any]) -> str:
    """``simple_cnn (width 4, depth 2)``: the model and the options that were set."""
    name = str(model.get("name") or "unknown")
    options = [
        f"{key} {model[key]}"
        for key in ("encoder", "width", "depth", "norm", "dropout", "drop_path")
        if model.get(key) is not None
    ]
    if model.get("pretrained"):
        options.append("pretrained")
    return f"{name} ({', '.join(options)})" if options else name


def _data_text(data: dict[str, Any]) -> str:
    """``defects, 16 px, batch 16``: the data source and its main settings."""
    parts = [str(data.get("name") or "unknown")]
    if data.get("root"):
        parts.append(f"root {data['root']}")
    if data.get("image_size"):
        parts.append(f"{data['image_size']} px")
    if data.get("batch_size"):
        parts.append(f"batch {data['batch_size']}")
    return ", ".join(parts)


def header_facts(run: RunData) -> list[tuple[str, Any]]:
    """Label → value pairs of the header box."""
    cfg, summary = run.config, run.summary or {}
    optim = cfg.get("optim") or {}
    train = cfg.get("train") or {}
    best = run.best_epoch()
    score = run.best_score()
    epochs = summary.get("epochs_run")
    if epochs is None:
        epochs = len({r.get("epoch") for r in run.kind("train_epoch")}) or None
    timings = summary.get("timings") or {}
    return [
        ("task", run.task),
        ("model", _model_text(cfg.get("model") or {}) if cfg else None),
        ("data", _data_text(cfg.get("data") or {}) if cfg else None),
        ("loss", (summary.get("loss") or {}).get("name") or (cfg.get("loss") or {}).get("name")),
        ("optimizer", f"{optim.get('name')} lr {optim.get('lr')}" if optim else None),
        ("epochs", f"{epochs} of {train.get('epochs', '?')}" if epochs is not None else None),
        ("monitor", f"{run.monitor} ({run.monitor_mode})"),
        (
            "best checkpoint",
            f"epoch {best}, {run.monitor} {score:.4f}"
            if best is not None and score is not None
            else "none yet",
        ),
        ("stopped early", summary.get("stopped_early")),
        (
            "device",
            f"{summary.get('device')} (precision {summary.get('precision')})" if summary else None,
        ),
        ("time", f"{timings['total_s']:.1f} s" if is_number(timings.get("total_s")) else None),
        ("run directory", str(run.path.resolve())),
    ]


def headline_table(run: RunData) -> str:
    """Scalar metrics of val and test, known ones first (as ``compare`` orders them)."""
    metrics = {s: run.split_metrics(s) for s in SPLITS}
    splits = [s for s in SPLITS if metrics[s]]
    if not splits:
        return "<p>No evaluation has finished yet.</p>"
    keys = {
        k for s in splits for k, v in metrics[s].items() if is_number(v) and k not in NOT_HEADLINE
    }
    skip = {"step", "epoch", "time"}  # bookkeeping fields of a metrics.jsonl record
    ordered = [k for k in HEADLINE_ORDER if k in keys] + sorted(keys - set(HEADLINE_ORDER) - skip)
    rows = [[k.replace("_", " "), *(metrics[s].get(k) for s in splits)] for k in ordered]
    rows.append(["images", *(metrics[s].get("samples") for s in splits)])
    return table(["metric", *splits], rows)


def detail_tables(run: RunData) -> str:
    """Per-class (or per-target) tables of each split, with the columns the task wrote."""
    parts = []
    for key, label in (("per_class", "class"), ("per_target", "target")):
        for split in SPLITS:
            rows = run.split_metrics(split).get(key) or {}
            if not rows:
                continue
            columns = list(next(iter(rows.values())))
            parts.append(f"<h3>{split}</h3>")
            parts.append(
                table(
                    [label, *columns], ([n, *(r.get(c) for c in columns)] for n, r in rows.items())
                )
            )
    return "".join(parts)


def threshold_text(run: RunData) -> str:
    """The decision threshold of a binary classifier and how it was chosen."""
    info = (run.summary or {}).get("threshold") or {}
    if "threshold" not in info:
        return ""
    pairs = [
        ("threshold", f"{info['threshold']:.4g}"),
        ("rule", info.get("rule")),
        ("val precision", f"{info.get('val_precision', float('nan')):.4f}"),
        ("val recall", f"{info.get('val_recall', float('nan')):.4f}"),
        ("val F1", f"{info.get('val_f1', float('nan')):.4f}"),
        ("note", info.get("note")),
    ]
    return "<h3>Decision threshold (binary)</h3>" + definition_list(pairs)


def render_run_page(run: RunData, curves: Sequence[Plot], task_plots: Sequence[Plot]) -> str:
    """The complete report page of one run.

    Args:
        run: The run's files (its notes are shown in the notes box).
        curves: Training-curve figures.
        task_plots: The task's evaluation figures.
    """
    best = run.best_epoch()
    score = run.best_score()
    subtitle = f"{run.task} · {_model_text(run.config.get('model') or {})} · " + _data_text(
        run.config.get("data") or {}
    )
    if best is not None and score is not None:
        subtitle += f" · best epoch {best}: {run.monitor} {score:.4f}"
    per_class = detail_tables(run)
    body = "".join(
        [
            notes_section(run.notes),
            section("Run", definition_list(header_facts(run))),
            section("Metrics", headline_table(run) + threshold_text(run)),
            section("Per class" if run.task != "regression" else "Per target", per_class)
            if per_class
            else "",
            figures_section("Training curves", curves),
            figures_section(f"Evaluation: {run.task}", task_plots),
        ]
    )
    footer = f"Rebuild with: visiontrain report {run.path}."
    return page(f"Run report: {run.name}", subtitle, body, footer)
