"""What to do when the loss or the gradients stop being finite (``train.on_nan``).

* ``raise``: the run stops with a message naming the steps and the likely causes. The
  check reads the loss sum the loop reads anyway, once per log interval, so it costs
  nothing; the weights of the last checkpoint are untouched.
* ``skip``: every update is checked (one host sync per update, the price of deciding
  before the optimizer steps); a non-finite one is dropped: no optimizer, scheduler or
  EMA step, counted and logged. After ``train.max_nan_skips`` in a row the run rolls back.
* ``rollback``: the first non-finite update reloads the last good checkpoint, multiplies
  the learning rate by ``train.nan_lr_factor``, marks the offending batches to be passed
  over, and continues; at most ``train.max_rollbacks`` times, then the run stops.
"""

from __future__ import annotations

from typing import Any

import torch

CAUSES = (
    "Likely causes: a learning rate too high (try `visiontrain lr-find`, or lower "
    "optim.lr), no gradient clipping (train.grad_clip_norm=1.0), fp16 overflow "
    "(train.precision=bf16 or 32), or bad data (run `visiontrain doctor`)."
)


class Rollback(Exception):  # noqa: N818 - control flow: restart from the reloaded state
    """Raised inside an epoch to restart the loop from the reloaded checkpoint."""


class NanGuard:
    """Counts non-finite updates, decides skip or rollback, remembers batches to pass over.

    Args:
        policy: ``raise``, ``skip`` or ``rollback``.
        max_skips: consecutive skipped updates before a rollback (``skip``).
        max_rollbacks: rollbacks before the run stops.
        lr_factor: learning-rate multiplier applied at each rollback.
    """

    def __init__(self, policy: str, max_skips: int, max_rollbacks: int, lr_factor: float) -> None:
        self.policy, self.max_skips = policy, max_skips
        self.max_rollbacks, self.lr_factor = max_rollbacks, lr_factor
        self.skips = 0
        self.in_a_row = 0
        self.rollbacks = 0
        self.interval_skips = 0
        # (epoch, batch) of every micro-batch of the updates that went non-finite in the
        # current streak; passed over after a rollback.
        self.streak: list[tuple[int, int]] = []
        self.pass_over: set[tuple[int, int]] = set()

    @property
    def checks_every_update(self) -> bool:
        """Whether each update is tested before the optimizer steps (skip, rollback)."""
        return self.policy != "raise"

    def decide(self, finite: bool, batches: list[tuple[int, int]]) -> str:
        """``step``, ``skip`` or ``rollback`` for an update over ``batches``."""
        if finite:
            self.in_a_row = 0
            self.streak = []
            return "step"
        self.skips += 1
        self.interval_skips += 1
        self.in_a_row += 1
        self.streak.extend(batches)
        if self.policy == "rollback" or self.in_a_row > self.max_skips:
            return "rollback"
        return "skip"

    def can_roll_back(self) -> bool:
        """Whether another rollback is allowed."""
        return self.rollbacks < self.max_rollbacks

    def start_rollback(self) -> None:
        """Mark the streak's batches to be passed over; count the rollback."""
        self.pass_over.update(self.streak)
        self.streak = []
        self.in_a_row = 0
        self.rollbacks += 1

    def scale_lr(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """Multiply every learning rate the optimizer and its schedule hold by the factor."""
        f = self.lr_factor
        for group in optimizer.param_groups:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if isinstance(group.get(key), int | float):
                    group[key] *= f
        # LambdaLR and friends recompute the LR from base_lrs at every step.
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * f for lr in scheduler.base_lrs]
        if hasattr(scheduler, "min_lrs"):
            scheduler.min_lrs = [lr * f for lr in scheduler.min_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Counters and the batches to pass over (checkpointed)."""
        return {
            "skips": self.skips,
            "rollbacks": self.rollbacks,
            "pass_over": sorted([list(b) for b in self.pass_over]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.skips = int(state.get("skips", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.pass_over = {(int(e), int(b)) for e, b in state.get("pass_over", [])}
