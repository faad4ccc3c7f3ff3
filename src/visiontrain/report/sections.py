"""The registry of task-specific report sections, and the context they draw from.

Each task module registers one function ``(ReportContext) -> list[Plot]`` under its task
name; :func:`task_plots` looks it up, so adding a task's figures never touches the
report's driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from visiontrain.errors import UserError
from visiontrain.registry import Registry
from visiontrain.report.figures import Plot
from visiontrain.report.rundata import RunData
from visiontrain.report.samples import Samples, SampleSource, collect_samples

SectionBuilder = Callable[["ReportContext"], list[Plot]]
# Keyed by task name; a report is not configured by a section name, hence no config key.
_SECTIONS: Registry[SectionBuilder] = Registry("report section")


class ReportContext:
    """A run plus lazily computed validation samples, shared by a task's figures.

    Inference runs at most once per report, on first request; when it cannot run (no
    best checkpoint, data gone, a damaged file) the reason becomes a note and
    :meth:`samples` gives None, so the figures that need no model are still drawn.
    """

    def __init__(self, run: RunData, source: SampleSource | None = None) -> None:
        self.run = run
        self.source = source
        self._samples: Samples | None = None
        self._tried = False

    @property
    def val(self) -> dict[str, Any]:
        """The final val metrics (summary.json, else the best epoch's eval record)."""
        return self.run.split_metrics("val")

    def samples(self, limit: int) -> Samples | None:
        """Validation samples with the best checkpoint's outputs, or None (with a note)."""
        if not self._tried:
            self._tried = True
            try:
                self._samples = collect_samples(self.run, limit, self.source)
            except UserError as exc:
                self.run.notes.append(f"no per-image figures: {exc}".rstrip(".") + ".")
            except Exception as exc:
                # A damaged checkpoint or data that loads wrongly must not cost the curves
                # and tables; the page says what failed.
                self.run.notes.append(f"no per-image figures: {type(exc).__name__}: {exc}")
        return self._samples


def register_section(task: str) -> Callable[[SectionBuilder], SectionBuilder]:
    """Register the figure builder of ``task``'s report section.

    Raises:
        ValueError: ``task`` already has a section.
    """
    return _SECTIONS.decorator(task)


def task_plots(ctx: ReportContext) -> list[Plot]:
    """The task-specific figures of a run; none for a task without a section."""
    from visiontrain.report import (  # noqa: F401  (they register themselves)
        classification,
        detection,
        multilabel,
        regression,
        segmentation,
    )

    # A task without a section (a plugin's, say) still gets the generic report.
    builder = _SECTIONS.find(ctx.run.task)
    return builder(ctx) if builder is not None else []
