"""The one evaluation loop: eval mode, inference mode, the run's precision, exact under DDP.

The trainer's validation and test, ``visiontrain eval``, the report's sample grid and the
doctor's eval check all run batches through :func:`infer_batches`; metrics come from
:func:`evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from visiontrain.engine.distributed import Dist
from visiontrain.engine.precision import Precision
from visiontrain.engine.step import Batch, BatchPrep
from visiontrain.tasks.base import Task

# Called with each batch and the model's outputs for it; returning True stops the loop.
OnBatch = Callable[[Batch, Any], bool | None]


def infer_batches(
    model: nn.Module,
    loader: DataLoader,
    task: Task,
    prep: BatchPrep,
    precision: Precision,
    on_batch: OnBatch,
    skipped: set[str] | None = None,
) -> None:
    """Run ``task.infer`` on every readable batch of ``loader`` in eval and inference mode.

    The model is left in the mode it was in.

    Args:
        model: The module to evaluate (the plain module or its EMA, never a DDP wrapper).
        loader: An evaluation loader (no shuffling).
        task: Runs the model (``task.infer``).
        prep: The same batch preparation as training (device, normalisation, layout).
        precision: The run's autocast.
        on_batch: Receives each batch and its outputs; True stops early.
        skipped: Collects the files a batch reports as unreadable (``data.on_error=skip``).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                if batch["skipped"] and skipped is not None:
                    skipped.update(batch["skipped"])
                if batch["image"] is None:
                    continue
                x = prep(batch["image"])
                with precision.autocast():
                    out = task.infer(model, x)
                if on_batch(batch, out):
                    break
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    task: Task,
    prep: BatchPrep,
    precision: Precision,
    dist: Dist | None = None,
    skipped: set[str] | None = None,
) -> dict[str, Any]:
    """The task's metrics of ``model`` on one split.

    Under DDP each rank evaluates its own shard (the loader strides without padding) and
    the task merges the metric states, so every rank computes the numbers of the whole
    split, equal to a one-process evaluation.

    Args:
        model: The module to evaluate.
        loader: The split's evaluation loader.
        task: Computes outputs and metrics.
        prep: Batch preparation.
        precision: The run's autocast.
        dist: The process group; metric states are merged across ranks when enabled.
        skipped: Collects unreadable files.

    Returns:
        The task's metrics (``loss``, ``accuracy``, ``per_class``, ``map`` ...).
    """
    task.reset_metrics()

    def update(batch: Batch, out: Any) -> None:
        task.update_metrics(out, prep.target(batch["target"]))

    infer_batches(model, loader, task, prep, precision, update, skipped)
    if dist is not None and dist.enabled:
        # Each rank saw its own samples once; after this every rank holds the metric
        # state of the whole split, so all compute the same numbers.
        task.sync_metrics(dist)
    return task.compute_metrics()
