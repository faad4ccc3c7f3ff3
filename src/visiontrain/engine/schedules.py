"""LR schedule registry; each schedule declares the granularity the trainer steps it at.

``step``: after every optimizer update (onecycle, warmup_cosine); ``epoch``: after every
epoch (step, exponential, cosine, cosine_restarts); ``metric``: after every evaluation,
with the monitored value (plateau). ``none`` keeps the LR constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch.optim import Optimizer, lr_scheduler

from visiontrain.config import OptimConfig, ScheduleConfig, refuse_unused
from visiontrain.errors import ConfigError
from visiontrain.registry import Registry


@dataclass
class Schedule:
    """A scheduler and when to step it."""

    scheduler: lr_scheduler.LRScheduler | lr_scheduler.ReduceLROnPlateau | None
    interval: str  # "step" | "epoch" | "metric" | "none"


@dataclass(frozen=True)
class Horizon:
    """Training length, known before the first step."""

    epochs: int
    updates_per_epoch: int
    # train.freeze_epochs: the first epochs train the head alone (a phase of their own).
    head_epochs: int = 0

    @property
    def total_updates(self) -> int:
        """Optimizer updates in the whole run."""
        return self.epochs * self.updates_per_epoch


Builder = Callable[[Optimizer, ScheduleConfig, OptimConfig, Horizon], Schedule]
_SCHEDULES: Registry[tuple[Builder, frozenset[str]]] = Registry("schedule", key="schedule.name")


def register_schedule(name: str, uses: tuple[str, ...] = ()) -> Callable[[Builder], Builder]:
    """Register a schedule builder and the ``schedule.*`` keys it honours.

    Raises:
        ValueError: ``name`` is already registered.
    """
    return _SCHEDULES.decorator(name, lambda fn: (fn, frozenset(uses)))


def list_schedules() -> list[str]:
    """Registered schedule names."""
    return _SCHEDULES.names()


def build_schedule(
    opt: Optimizer, cfg: ScheduleConfig, optim_cfg: OptimConfig, horizon: Horizon
) -> Schedule:
    """Build ``schedule.name`` for an optimizer over a known horizon.

    Raises:
        ConfigError: the name is unknown, or a ``schedule.*`` key it ignores is set.
    """
    builder, uses = _SCHEDULES.get(cfg.name)
    refuse_unused(cfg, "schedule", uses, f"schedule {cfg.name}")
    return builder(opt, cfg, optim_cfg, horizon)


def _or(value: float | int | None, default: float | int) -> float | int:
    return default if value is None else value


@register_schedule("none")
def _none(opt: Optimizer, cfg: ScheduleConfig, o: OptimConfig, h: Horizon) -> Schedule:
    return Schedule(None, "none")


@register_schedule("step", ("step_size", "gamma"))
def _step(opt: Optimizer, cfg: ScheduleConfig, o: OptimConfig, h: Horizon) -> Schedule:
    size = int(_or(cfg.step_size, max(1, h.epochs // 3)))
    return Schedule(lr_scheduler.StepLR(opt, size, gamma=_or(cfg.gamma, 0.1)), "epoch")


@register_schedule("exponential", ("gamma",))
def _exponential(opt: Optimizer, cfg: ScheduleConfig, o: OptimConfig, h: Horizon) -> Schedule:
    return Schedule(lr_scheduler.ExponentialLR(opt, gamma=_or(cfg.gamma, 0.95)), "epoch")


@register_schedule("cosine", ("min_lr",))
def _cosine(opt: Optimizer, cfg: ScheduleConfig, o: OptimConfig, h: Horizon) -> Schedule:
    sched = lr_scheduler.CosineAnnealingLR(opt, T_max=h.epochs, eta_min=_or(cfg.min_lr, 0.0))
    return Schedule(sched, "epoch")


@register_schedule("cosine_restarts", ("t0", "t_mult", "min_lr"))
def _restarts(opt: Optimizer, cfg: ScheduleConfig, o: OptimConfig, h: Horizon) -> Schedule:
    sched = lr_scheduler.CosineAnnealingWarmRestarts(
        opt,
        T_0=int(_or(cfg.t0, max(1, h.epochs // 3))),
        T_mult=int(_or(cfg.t_mult, 1)),
        eta_min=_or(cfg.min_lr, 0.0),
    )
    return Schedule(sched, "epoch")


@register_schedule("plateau", ("patience", "factor", "min_lr"))
def _plateau(opt: Optimizer, cfg: ScheduleConfig, o: OptimConfig, h: Horizon) -> Schedule:
    # The mode is set by the trainer from train.monitor before the first step.
    sched = lr_scheduler.ReduceLROnPlateau(
        opt,
        factor=_or(cfg.factor, 0.1),
        patience=int(_or(cfg.patience, 3)),
        min_lr=_or(cfg.min_lr, 0.0),
    )
    return Schedule(sched, "metric")


@register_schedule("onecycle", ("max_lr", "pct_start"))
def _onecycle(opt: Optimizer, cfg: ScheduleConfig, o: OptimConfig, h: Horizon) -> Schedule:
    peak = _or(cfg.max_lr, o.lr)
    sched = lr_scheduler.OneCycleLR(
        opt,
        # Each parameter group peaks at its own share (backbone factor, layer decay).
        max_lr=[peak * g.get("lr_scale", 1.0) for g in opt.param_groups],
        total_steps=max(1, h.total_updates),
        pct_start=_or(cfg.pct_start, 0.3),
    )
    return Schedule(sched, "step")


def warmup_cosine_factor(
    step: int, warmup: int, total: int, start_factor: float, min_factor: float
) -> float:
    """LR multiplier at update ``step``.

    Linear from ``start_factor`` to 1 over ``warmup`` updates, then a cosine from 1 down
    to ``min_factor`` at ``total`` updates.
    """
    if warmup > 0 and step < warmup:
        return start_factor + (1.0 - start_factor) * step / warmup
    decay = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _WarmupCosine:
    """Picklable-free LR lambda (its numbers are in the scheduler's own state)."""

    def __init__(self, warmup: int, total: int, start: float, min_factor: float) -> None:
        self.warmup, self.total, self.start, self.min_factor = warmup, total, start, min_factor

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(step, self.warmup, self.total, self.start, self.min_factor)


class _Phased:
    """Two warmup-cosine schedules back to back: the head-only phase, then the whole model's.

    fastai's ``fine_tune``: the head trains on a warmup and decay of its own; at the
    unfreeze the LR warms up again (the backbone's optimizer state starts empty there)
    and decays over the remaining updates. Only numbers are kept (LambdaLR saves this
    object's ``__dict__`` in the checkpoint, which loads with ``weights_only=True``).
    """

    def __init__(self, boundary: int, first: _WarmupCosine, second: _WarmupCosine) -> None:
        self.boundary = boundary
        self.first = [first.warmup, first.total, first.start, first.min_factor]
        self.second = [second.warmup, second.total, second.start, second.min_factor]

    def __call__(self, step: int) -> float:
        if step < self.boundary:
            return warmup_cosine_factor(step, *self.first)
        return warmup_cosine_factor(step - self.boundary, *self.second)


def _warmup_updates(cfg: ScheduleConfig, h: Horizon, epochs: int) -> int:
    total = max(1, epochs * h.updates_per_epoch)
    if cfg.warmup_epochs is None:
        # One epoch of warmup, but never more than a quarter of a short run.
        return min(h.updates_per_epoch, total // 4)
    warmup = round(cfg.warmup_epochs * h.updates_per_epoch)
    if warmup >= total:
        raise ConfigError(
            f"schedule.warmup_epochs={cfg.warmup_epochs} covers the whole run "
            f"({epochs} epochs{' after the head-only phase' if h.head_epochs else ''}); "
            "lower it or raise train.epochs."
        )
    return warmup


@register_schedule("warmup_cosine", ("warmup_epochs", "warmup_start_factor", "min_lr"))
def _warmup_cosine(opt: Optimizer, cfg: ScheduleConfig, o: OptimConfig, h: Horizon) -> Schedule:
    start, floor = _or(cfg.warmup_start_factor, 0.01), _or(cfg.min_lr, 0.0) / o.lr
    full = h.epochs - h.head_epochs
    fn: Callable[[int], float] = _WarmupCosine(
        _warmup_updates(cfg, h, full), max(1, full * h.updates_per_epoch), start, floor
    )
    if h.head_epochs:
        # The head's phase takes the default warmup; schedule.warmup_epochs sets the
        # whole model's, which is the one that matters (its optimizer state starts empty).
        head_cfg = cfg.model_copy(update={"warmup_epochs": None})
        head_total = max(1, h.head_epochs * h.updates_per_epoch)
        first = _WarmupCosine(_warmup_updates(head_cfg, h, h.head_epochs), head_total, start, floor)
        fn = _Phased(head_total, first, fn)  # type: ignore[arg-type]
    return Schedule(lr_scheduler.LambdaLR(opt, fn), "step")
