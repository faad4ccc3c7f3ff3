"""Callbacks: a few hooks, each callback owning its state (saved in every checkpoint).

Hooks: ``on_fit_start``, ``on_log`` (every metrics record), ``on_update`` (after each
optimizer update), ``on_epoch_end``, ``on_fit_end``; plus ``state_dict`` and
``load_state_dict``. Checkpointing, early stopping, loggers and progress are callbacks.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visiontrain.engine.checkpoint import load_checkpoint, save_checkpoint
from visiontrain.io import atomic_link
from visiontrain.rundir import BEST_CHECKPOINT, LAST_CHECKPOINT

if TYPE_CHECKING:
    from visiontrain.engine.trainer import Trainer


class Callback:
    """Base class; every hook is optional."""

    name = "callback"

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step (also after a resume)."""

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """A metrics record (train interval, train epoch, val, test)."""

    def on_update(self, trainer: Trainer) -> None:
        """After an optimizer update."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        """After an epoch's training and (when due) evaluation."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last epoch, test evaluation included."""

    def close(self) -> None:
        """Release files and displays (also on an interrupted run)."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""


def is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` improves on ``best`` by more than ``min_delta``."""
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class Checkpointer(Callback):
    """Writes last.pt (each epoch and every ``save_every_steps``), best.pt and epoch files."""

    name = "checkpointer"

    def __init__(
        self,
        folder: Path,
        keep_last: int,
        save_every_steps: int | None,
        write: bool = True,
        save_every_minutes: float | None = None,
    ) -> None:
        self.folder = folder
        self.save_every_minutes = save_every_minutes
        self._last_save = time.monotonic()
        # Under DDP every rank builds the state (it gathers each rank's RNG), rank 0 writes.
        self.write = write
        self.keep_last = keep_last
        self.save_every_steps = save_every_steps
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self.best_metrics: dict[str, Any] | None = None

    def save_last(self, trainer: Trainer) -> Path:
        """Write last.pt now (also used on SIGINT/SIGTERM)."""
        path = self.folder / LAST_CHECKPOINT
        state = trainer.checkpoint_state()
        if self.write:
            save_checkpoint(path, state)
        self._last_save = time.monotonic()
        return path

    def store_task_state(self, task_state: dict[str, Any]) -> None:
        """Write what the task chose after training (a threshold) into the kept weights.

        The choice was made with the restored best weights, so it goes into best.pt (or
        last.pt when no epoch improved), which ``predict`` and ``eval`` read. The file is
        rewritten atomically.
        """
        if not self.write:
            return
        for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
            path = self.folder / name
            if path.is_file():
                state = load_checkpoint(path)
                state["task_state"] = task_state
                save_checkpoint(path, state)
                return

    def on_update(self, trainer: Trainer) -> None:  # noqa: D102
        every = self.save_every_steps
        due = bool(every and trainer.global_step % every == 0)
        if self.save_every_minutes:
            late = time.monotonic() - self._last_save >= self.save_every_minutes * 60
            if trainer.dist.enabled:
                # Clocks differ between ranks: they agree at log steps, all on the same step.
                log_step = trainer.global_step % trainer.cfg.train.log_every == 0
                late = log_step and trainer.dist.any(late)
            due = due or late
        # Only mid-epoch: the epoch-end save covers the last update of an epoch.
        if due and not trainer.at_epoch_end:
            self.save_last(trainer)

    def on_epoch_end(self, trainer: Trainer) -> None:  # noqa: D102
        if trainer.evaluated_this_epoch and is_better(
            trainer.monitor_value, self.best_score, trainer.monitor_mode
        ):
            self.best_score = trainer.monitor_value
            self.best_epoch = trainer.epoch
            self.best_step = trainer.global_step
            self.best_metrics = trainer.results.get("val_last")
            trainer.improved = True
        state = trainer.checkpoint_state()
        self._last_save = time.monotonic()
        if not self.write:
            return
        # last.pt goes last: killed between two writes, a resume starts from the previous
        # last.pt and redoes this epoch, rewriting best.pt, instead of trusting a best
        # score whose best.pt was never written.
        # The same state goes to up to three names; it is written once and hard-linked to
        # the others (a copy where the filesystem cannot link), so an epoch costs one file.
        written: Path | None = None

        def put(path: Path) -> None:
            nonlocal written
            if written is None or not atomic_link(written, path):
                save_checkpoint(path, state)
                written = path

        if trainer.improved:
            put(self.folder / BEST_CHECKPOINT)
        if self.keep_last > 0:
            put(self.folder / f"epoch-{trainer.epoch + 1:04d}.pt")
            epochs = sorted(self.folder.glob("epoch-*.pt"))
            for old in epochs[: -self.keep_last]:
                old.unlink(missing_ok=True)
        put(self.folder / LAST_CHECKPOINT)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "best_metrics": self.best_metrics,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.best_score = state.get("best_score")
        self.best_epoch = state.get("best_epoch")
        self.best_step = state.get("best_step")
        self.best_metrics = state.get("best_metrics")


class EarlyStopping(Callback):
    """Stop after ``patience`` evaluations without an improvement of ``min_delta``."""

    name = "early_stopping"

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, trainer: Trainer) -> None:  # noqa: D102
        if not trainer.evaluated_this_epoch:
            return
        if is_better(trainer.monitor_value, self.best, trainer.monitor_mode, self.min_delta):
            self.best, self.wait = trainer.monitor_value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = trainer.epoch
            trainer.should_stop = True
            trainer.console(
                f"early stopping: {trainer.cfg.train.monitor} has not improved by more than "
                f"{self.min_delta} for {self.patience} evaluations (best {self.best:.5g})"
            )

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"best": self.best, "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.best, self.wait = state.get("best"), state.get("wait", 0)
        self.stopped_epoch = state.get("stopped_epoch")
