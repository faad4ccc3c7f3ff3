"""Callbacks: a few hooks, each callback owning its state (saved in every checkpoint).

Hooks: ``on_fit_start``, ``on_log`` (every metrics record), ``on_update`` (after each
optimizer update), ``on_epoch_end``, ``on_fit_end``; plus ``state_dict`` and
``load_state_dict``. Checkpointing, early stopping, loggers and progress are callbacks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visiontrain.engine.async_save import AsyncWriter, snapshot
from visiontrain.engine.checkpoint import load_checkpoint, save_checkpoint
from visiontrain.engine.distributed import current
from visiontrain.engine.sharded import (
    checkpoint_dist,
    read_state,
    remove_sharded,
    rewrite_state,
    save_sharded,
)
from visiontrain.io import atomic_link
from visiontrain.rundir import (
    BEST_CHECKPOINT,
    BEST_SHARDED,
    LAST_CHECKPOINT,
    LAST_SHARDED,
    is_sharded,
)

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
        async_save: bool = False,
        sharded: bool = False,
    ) -> None:
        self.folder = folder
        # train.strategy=fsdp: every rank writes its shards into NAME.dcp/ (engine/sharded.py).
        self.sharded = sharded
        # run.async_save: rank 0's files (every rank's shards under fsdp) are written by a
        # background thread; sharded saves run their collectives on a group of their own.
        self.writer = AsyncWriter() if async_save and (write or sharded) else None
        self.save_dist = checkpoint_dist(current()) if self.writer and sharded else None
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

    def save_last(self, trainer: Trainer, wait: bool = False) -> Path:
        """Write last.pt now (also used on SIGINT/SIGTERM, with ``wait``).

        Args:
            trainer: the trainer whose state is saved.
            wait: return only once the file is written, also under ``run.async_save``.
        """
        path = self.last_path
        state = trainer.checkpoint_state()
        if self.write or self.sharded:
            self._save([path.name], state, trainer)
            if wait:
                self.flush()
        self._last_save = time.monotonic()
        return path

    @property
    def last_path(self) -> Path:
        """``last.pt``, or ``last.dcp/`` when checkpoints are sharded."""
        return self.folder / (LAST_SHARDED if self.sharded else LAST_CHECKPOINT)

    @property
    def best_path(self) -> Path:
        """``best.pt``, or ``best.dcp/`` when checkpoints are sharded."""
        return self.folder / (BEST_SHARDED if self.sharded else BEST_CHECKPOINT)

    def exists(self, path: Path) -> bool:
        """Whether the checkpoint ``path`` (a file or a committed sharded folder) exists."""
        return is_sharded(path) if self.sharded else path.is_file()

    def read(self, path: Path) -> dict[str, Any]:
        """A checkpoint's state, verified; for a sharded one its ``state.pt`` alone.

        A sharded checkpoint's tensors are read into the live model by
        ``engine.sharded.load_sharded``.
        """
        return read_state(path) if self.sharded else load_checkpoint(path)

    def _write(self, what: str, state: dict[str, Any], write: Callable[[dict], None]) -> None:
        """Write now, or from a host copy on the background thread (``run.async_save``)."""
        if self.writer is None:
            write(state)
            return
        copy = snapshot(state)
        self.writer.submit(what, lambda: write(copy))

    def flush(self) -> None:
        """Wait for the checkpoint write in flight (``run.async_save``); raise its failure."""
        if self.writer is not None:
            self.writer.wait()

    def store_task_state(self, task_state: dict[str, Any]) -> None:
        """Write what the task chose after training (a threshold) into the kept weights.

        The choice was made with the restored best weights, so it goes into best.pt (or
        last.pt when no epoch improved), which ``predict`` and ``eval`` read. The file is
        rewritten atomically.
        """
        if not self.write:
            return
        self.flush()
        for path in (self.best_path, self.last_path):
            if self.sharded and is_sharded(path):
                rewrite_state(path, {"task_state": task_state})
                return
            if path.is_file():
                state = load_checkpoint(path)
                state["task_state"] = task_state
                save_checkpoint(path, state)
                return

    def on_update(self, trainer: Trainer) -> None:  # noqa: D102
        if self.writer is not None:
            self.writer.poll()  # a background write that failed ends the run here
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
        if not (self.write or self.sharded):
            return
        # last goes last: killed between two writes, a resume starts from the previous
        # last checkpoint and redoes this epoch, rewriting best, instead of trusting a best
        # score whose best checkpoint was never written.
        # The same state goes to up to three names; it is written once and hard-linked to
        # the others (a copy where the filesystem cannot link), so an epoch costs one file.
        names = [self.best_path.name] if trainer.improved else []
        if self.keep_last > 0:
            names.append(f"epoch-{trainer.epoch + 1:04d}{self.last_path.suffix}")
        names.append(self.last_path.name)
        self._save(names, state, trainer)

    def _save(self, names: list[str], state: dict[str, Any], trainer: Trainer) -> None:
        """Write ``state`` under ``names`` in order, then prune old epoch checkpoints.

        ``.pt`` files are written by rank 0; sharded folders by every rank, on the save
        group of their own under ``run.async_save``.
        """
        dist = self.save_dist or trainer.dist

        def write(copy: dict[str, Any]) -> None:
            if self.sharded:
                save_sharded([self.folder / n for n in names], copy, dist)
            else:
                self._put_epoch(names, copy)
            if self.write and self.keep_last > 0:
                epochs = sorted(self.folder.glob(f"epoch-*{self.last_path.suffix}"))
                for old in epochs[: -self.keep_last]:
                    remove_sharded(old) if self.sharded else old.unlink(missing_ok=True)

        self._write(", ".join(names), state, write)

    def _put_epoch(self, names: list[str], state: dict[str, Any]) -> None:
        """Write ``state`` once under the first name and link it to the others, in order."""
        written: Path | None = None
        for name in names:
            path = self.folder / name
            if written is None or not atomic_link(written, path):
                save_checkpoint(path, state)
                written = path

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
