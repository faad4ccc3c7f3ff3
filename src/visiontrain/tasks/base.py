"""The task interface the trainer talks to, and the task registry.

The trainer never knows which task it runs: a task turns a batch and the model's output
into ``{"loss": ..., **parts}``, keeps device-side metric state, and computes a metrics
dict once per evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from visiontrain.config import Config
from visiontrain.data.sources import DataBundle
from visiontrain.engine.distributed import Dist
from visiontrain.errors import ConfigError
from visiontrain.registry import Registry


class Task:
    """Base class: loss for training, metric state for evaluation."""

    name = "task"
    # Whether calibrate() tunes something on val after training (set per instance).
    calibrates = False
    # Whether the task fits train.calibrate=temperature (class probabilities to calibrate).
    temperature_scaling = False
    # Whether the model sees the whole image fitted to a square (boxes, masks) rather than
    # the centre crop of classification.
    whole_image = False

    def __init__(self, cfg: Config, bundle: DataBundle, device: torch.device) -> None:
        self.cfg, self.bundle, self.device = cfg, bundle, device

    @staticmethod
    def predictions(
        outputs: list[Any], task_state: dict[str, Any], names: list[str], top_k: int
    ) -> list[dict[str, Any]]:
        """Rows for ``predict`` from raw model outputs and the checkpoint's task state.

        Args:
            outputs: the model's output for each image (:meth:`infer`, one item per image).
            task_state: :meth:`state_dict` as saved in the checkpoint.
            names: class names (classification) or target names (regression).
            top_k: how many ranked alternatives to list, where that means something.
        """
        raise NotImplementedError

    def forward(self, model: nn.Module, images: torch.Tensor, target: Any) -> Any:
        """The model's training output for a normalised batch (a detector takes targets)."""
        return model(images)

    @staticmethod
    def to_file_frame(out: Any, sizes: list[tuple[int, int]], size: int) -> list[Any]:
        """Split a batch of :meth:`infer` outputs into one CPU item per image file.

        Whole-image tasks also undo the fit to a ``size`` square (``sizes`` are the
        files' own H, W); per-image outputs need no mapping.
        """
        return list(out.float().cpu())

    @staticmethod
    def infer(model: nn.Module, images: torch.Tensor) -> Any:
        """The model's evaluation output, as :meth:`update_metrics` and ``predict`` take it."""
        return model(images).float()

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
        # `val/mae/area_pct`: the metric is the part after the split, not the leaf.
        parts = metric.split("/")
        name = parts[1] if len(parts) > 1 else parts[0]
        return "min" if "loss" in name or name in ("mae", "rmse", "mse") else "max"

    def calibrate(self) -> dict[str, Any] | None:
        """Tune post-processing on the last evaluation (val), e.g. a decision threshold.

        Returns:
            What was chosen, for summary.json, or None when the task tunes nothing.
        """
        return None

    def sync_metrics(self, dist: Dist) -> None:
        """Merge every DDP rank's metric state, so that each rank computes the same numbers.

        Each rank evaluated a disjoint shard (no padding); after this call
        :meth:`compute_metrics` on any rank equals a single-process evaluation.
        """
        raise NotImplementedError(f"task {self.name} cannot evaluate across processes")

    def describe(self) -> list[str]:
        """Lines printed at the start of training: the weights and sampling in force."""
        return []

    def summary_info(self) -> dict[str, Any]:
        """Task facts worth putting in summary.json and checkpoints."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What inference needs besides the weights (thresholds, target scaling)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (from a checkpoint)."""


TaskFactory = Callable[[Config, DataBundle, torch.device], Task]
_TASKS: Registry[TaskFactory] = Registry("task", key="task")


def register_task(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Register a task class under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    return _TASKS.decorator(name)


def task_class(name: str) -> TaskFactory:
    """The registered task class for ``task=name``.

    Raises:
        ConfigError: no task is registered under ``name``.
    """
    from visiontrain.tasks import (  # noqa: F401  (they register themselves)
        classification,
        detection,
        multilabel,
        regression,
        segmentation,
    )

    return _TASKS.get(name)


def build_task(cfg: Config, bundle: DataBundle, device: torch.device) -> Task:
    """Build the task named by ``task``.

    Raises:
        ConfigError: ``train.calibrate`` for a task without class probabilities.
    """
    cls = task_class(cfg.task)
    if cfg.train.calibrate != "none" and not cls.temperature_scaling:
        raise ConfigError(
            f"train.calibrate={cfg.train.calibrate} calibrates class probabilities; task "
            f"{cfg.task} has none to calibrate. Remove the key."
        )
    return cls(cfg, bundle, device)
