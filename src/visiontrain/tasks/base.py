"""The task interface the trainer talks to, and the task registry.

The trainer never knows which task it runs: a task turns a batch and the model's output
into ``{"loss": ..., **parts}``, keeps device-side metric state, and computes a metrics
dict once per evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from visiontrain.config import Config
from visiontrain.data.sources import DataBundle
from visiontrain.errors import ConfigError, did_you_mean


class Task:
    """Base class: loss for training, metric state for evaluation."""

    name = "task"

    def __init__(self, cfg: Config, bundle: DataBundle, device: torch.device) -> None:
        self.cfg, self.bundle, self.device = cfg, bundle, device

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training objective: ``{"loss": scalar, **parts}``."""
        raise NotImplementedError

    def reset_metrics(self) -> None:
        """Start a new evaluation."""
        raise NotImplementedError

    def update_metrics(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch to the metric state (on the device, no host sync)."""
        raise NotImplementedError

    def compute_metrics(self) -> dict[str, Any]:
        """Metrics of the evaluation so far, as JSON-able values."""
        raise NotImplementedError

    def metric_names(self) -> list[str]:
        """The keys ``train.monitor`` may name, e.g. ``val/loss``."""
        return ["val/loss"]

    def monitor_mode(self, metric: str) -> str:
        """``min`` for losses and errors, ``max`` otherwise."""
        leaf = metric.rsplit("/", 1)[-1]
        return "min" if "loss" in leaf or leaf in ("mae", "rmse") else "max"

    def summary_info(self) -> dict[str, Any]:
        """Task facts worth putting in summary.json and checkpoints."""
        return {}


TaskFactory = Callable[[Config, DataBundle, torch.device], Task]
_TASKS: dict[str, TaskFactory] = {}


def register_task(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Register a task class under ``name``."""

    def deco(cls: TaskFactory) -> TaskFactory:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        _TASKS[name] = cls
        return cls

    return deco


def build_task(cfg: Config, bundle: DataBundle, device: torch.device) -> Task:
    """Build the task named by ``task``."""
    from visiontrain.tasks import classification  # noqa: F401  (registers itself)

    factory = _TASKS.get(cfg.task)
    if factory is None:
        tip = did_you_mean(cfg.task, list(_TASKS))
        raise ConfigError(
            f"unknown task `task={cfg.task}`{tip} Known: {', '.join(sorted(_TASKS))}."
        )
    return factory(cfg, bundle, device)
