"""``metrics.jsonl``: one JSON object per line, appended and flushed line by line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visiontrain.engine.callbacks import Callback
from visiontrain.io import atomic_write_text

if TYPE_CHECKING:
    from visiontrain.engine.trainer import Trainer


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl; a torn (half-written) line is ignored."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records


class JsonlLogger(Callback):
    """Appends every record to ``metrics.jsonl``."""

    name = "jsonl"

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is not None and path.is_file():
            # Records written after the checkpoint belong to steps that will run again.
            kept = [r for r in read_records(path) if r.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:  # noqa: D102
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def on_fit_end(self, trainer: Trainer) -> None:  # noqa: D102
        self.close()

    def close(self) -> None:
        """Close the file."""
        if not self.fh.closed:
            self.fh.close()
