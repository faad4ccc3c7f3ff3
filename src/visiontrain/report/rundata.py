"""What a report reads from a run directory: config, summary, metric records.

Everything here works from files alone (no model, no data), so a run that was
interrupted before ``summary.json`` or ``best.pt`` existed still gets its curves.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontrain.errors import UserError
from visiontrain.rundir import (
    BEST_CHECKPOINT,
    BEST_SHARDED,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
)
from visiontrain.tracking.jsonl import read_records

BEST_CHECKPOINT_PATH = Path(CHECKPOINTS_DIR) / BEST_CHECKPOINT


@dataclass
class RunData:
    """The files of one run directory, parsed.

    Attributes:
        path: The run directory.
        config: ``config.yaml`` as a plain mapping (empty when the file is missing).
        summary: ``summary.json``, or None when the run has not finished.
        records: The records of ``metrics.jsonl`` in file order.
        notes: What is missing or skipped, for the report's notes box.
    """

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    records: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The run's name: its folder name."""
        return self.path.resolve().name

    @property
    def task(self) -> str:
        """The task name (classification, regression, detection, segmentation)."""
        return str((self.summary or {}).get("task") or self.config.get("task") or "unknown")

    @property
    def best_checkpoint(self) -> Path:
        """Where the best checkpoint lives (it may not exist).

        ``best.dcp/`` for a run trained with ``train.strategy=fsdp``.
        """
        sharded = self.path / CHECKPOINTS_DIR / BEST_SHARDED
        if sharded.is_dir() and not (self.path / BEST_CHECKPOINT_PATH).is_file():
            return sharded
        return self.path / BEST_CHECKPOINT_PATH

    @property
    def monitor(self) -> str:
        """The monitored metric, e.g. ``val/loss``."""
        summary = self.summary or {}
        train = self.config.get("train") or {}
        return str(summary.get("monitor") or train.get("monitor") or "val/loss")

    @property
    def monitor_mode(self) -> str:
        """``min`` or ``max``: the direction in which the monitored metric improves."""
        mode = (self.summary or {}).get("monitor_mode")
        if mode in ("min", "max"):
            return str(mode)
        configured = (self.config.get("train") or {}).get("monitor_mode")
        if configured in ("min", "max"):
            return str(configured)
        # The same rule as Task.monitor_mode, without building a task.
        parts = self.monitor.split("/")
        name = parts[1] if len(parts) > 1 else parts[0]
        return "min" if "loss" in name or name in ("mae", "rmse", "mse") else "max"

    def kind(self, kind: str, split: str | None = None) -> list[dict[str, Any]]:
        """Records of one kind (and split), in file order."""
        return [
            r
            for r in self.records
            if r.get("kind") == kind and (split is None or r.get("split") == split)
        ]

    def split_metrics(self, split: str) -> dict[str, Any]:
        """Final metrics of ``split``: summary.json's, else the best (or last) eval record.

        Returns:
            The metrics mapping, empty when the run has none for the split.
        """
        if self.summary is not None:
            metrics = (self.summary.get("metrics") or {}).get(split)
            return metrics if isinstance(metrics, dict) else {}
        evals = self.kind("eval", split)
        if not evals:
            return {}
        if split == "val":
            best = self.best_epoch()
            chosen = [r for r in evals if r.get("epoch") == best]
            if chosen:
                return chosen[-1]
        return evals[-1]

    def best_epoch(self) -> int | None:
        """The (1-based) epoch of the best checkpoint: summary.json's, else from the records."""
        if self.summary is not None and isinstance(self.summary.get("best_epoch"), int):
            return int(self.summary["best_epoch"])
        scored = [
            (value, r.get("epoch"))
            for r in self.kind("eval", "val")
            if (value := monitor_value(r, self.monitor)) is not None
        ]
        if not scored:
            return None
        pick = min if self.monitor_mode == "min" else max
        best = pick(scored, key=lambda pair: pair[0])
        return best[1] if isinstance(best[1], int) else None

    def best_score(self) -> float | None:
        """The monitored value at the best epoch."""
        if self.summary is not None and is_number(self.summary.get("best_score")):
            return float(self.summary["best_score"])
        best = self.best_epoch()
        for r in self.kind("eval", "val"):
            if r.get("epoch") == best:
                return monitor_value(r, self.monitor)
        return None

    def class_names(self) -> list[str]:
        """Class names from the summary, else from the val metrics' per-class table."""
        names = (self.summary or {}).get("class_names")
        if names:
            return [str(n) for n in names]
        return [str(n) for n in (self.split_metrics("val").get("per_class") or {})]


def is_number(value: Any) -> bool:
    """A finite-or-NaN int/float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def monitor_value(record: dict[str, Any], monitor: str) -> float | None:
    """The value of a monitor name (``val/loss``, ``val/iou/circle``) in an eval record.

    Nested names look in ``per_class`` and ``per_target``: ``val/<metric>/<name>``.
    """
    parts = monitor.split("/")
    if len(parts) == 2:
        value = record.get(parts[1])
    elif len(parts) == 3:
        metric, name = parts[1], parts[2]
        table = (record.get("per_class") or {}).get(name) or (record.get("per_target") or {}).get(
            name
        )
        value = (table or {}).get(metric)
    else:
        return None
    if not is_number(value) or math.isnan(float(value)):
        return None
    return float(value)


def _read_summary(path: Path) -> dict[str, Any] | None:
    """``summary.json``, None when absent; a damaged file is a UserError naming it."""
    file = path / SUMMARY_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"{file} cannot be read ({exc}); the file is damaged. Delete it to build a "
            "report from metrics.jsonl alone."
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{file} is not a visiontrain run summary (not a JSON object).")
    return data


def load_run(path: str | Path) -> RunData:
    """Read a run directory for a report.

    Args:
        path: The run directory (the folder that ``visiontrain train`` printed last).

    Returns:
        The parsed run, with notes about the files it lacks.

    Raises:
        UserError: The directory does not exist, or holds neither ``metrics.jsonl`` nor
            ``summary.json`` (nothing to report), or a file is damaged.
    """
    from visiontrain.config import read_yaml

    run = Path(path).expanduser()
    if not run.is_dir():
        raise UserError(
            f"run directory {run} does not exist; pass the folder that `visiontrain train` "
            "printed last (it holds config.yaml, metrics.jsonl and summary.json)."
        )
    summary = _read_summary(run)
    records = read_records(run / METRICS_FILE)
    if summary is None and not records:
        raise UserError(
            f"{run} has no {METRICS_FILE} and no {SUMMARY_FILE}: nothing to report. Is it "
            "a run directory of `visiontrain train`?"
        )
    config = read_yaml(run / CONFIG_FILE) if (run / CONFIG_FILE).is_file() else {}
    data = RunData(run, config, summary, records)
    if not config:
        data.notes.append(f"{CONFIG_FILE} is missing: the header lacks the run's settings.")
    if summary is None:
        data.notes.append(
            f"{SUMMARY_FILE} is missing: the run did not finish (or was interrupted). "
            f"Metrics below are the best epoch's val evaluation from {METRICS_FILE}."
        )
    if not records:
        data.notes.append(f"{METRICS_FILE} is missing or empty: no training curves.")
    return data


@dataclass(frozen=True)
class RunSummary:
    """A finished run's summary as read from disk.

    Attributes:
        name: Column header for the run (its directory name, made unique).
        path: The run directory (the folder that holds ``summary.json``).
        summary: The parsed contents of ``summary.json``.
    """

    name: str
    path: Path
    summary: dict[str, Any]
