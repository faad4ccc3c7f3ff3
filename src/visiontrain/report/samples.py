"""Bounded inference on validation images with the best checkpoint, for per-image figures.

Only the first ``limit`` validation images are run (the val loader does not shuffle, so a
rebuilt report shows the same images), which keeps a report to seconds on a CPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from visiontrain.data.sources import DataBundle
from visiontrain.errors import UserError
from visiontrain.report.rundata import RunData


@dataclass
class SampleSource:
    """What a report draws its per-image figures with when the run is in this process.

    Attributes:
        model: A module of the run's architecture (a copy receives the best weights).
        bundle: The run's data, when the config alone cannot rebuild it (Datasets).
    """

    model: nn.Module | None = None
    bundle: DataBundle | None = None


@dataclass
class Samples:
    """Validation images with their targets and the model's outputs, one entry per image.

    Attributes:
        images: uint8 CHW tensors as the model saw them (before normalisation).
        targets: The loader's target per image (class index, values, box dict, mask).
        outputs: The task's ``infer`` output per image, on the CPU.
        names: Class names (classification, detection, segmentation) or target names.
        task_state: The checkpoint's task state (threshold, activation, target scaling).
        total: Images in the val split (``len(images)`` may be fewer).
    """

    images: list[torch.Tensor]
    targets: list[Any]
    outputs: list[Any]
    names: list[str]
    task_state: dict[str, Any]
    total: int


def _unbatch(value: Any) -> list[Any]:
    """One CPU item per image from a batch tensor or a list of per-image dicts."""
    if isinstance(value, torch.Tensor):
        return list(value.detach().float().cpu() if value.is_floating_point() else value.cpu())
    return [
        {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in item.items()}
        if isinstance(item, dict)
        else item
        for item in value
    ]


def collect_samples(run: RunData, limit: int, source: SampleSource | None = None) -> Samples:
    """Run the best checkpoint on the first ``limit`` validation images.

    Args:
        run: The run (its ``checkpoints/best.pt`` and its data are used).
        limit: Most images to run.
        source: The run's module and data when they are at hand (a user's own).

    Raises:
        UserError: No best checkpoint, or the data cannot be built (moved, deleted).
    """
    from visiontrain.data import build_data
    from visiontrain.data.pipeline import build_loaders
    from visiontrain.engine.evaluate import infer_batches
    from visiontrain.engine.precision import Precision
    from visiontrain.predict import load_trained
    from visiontrain.tasks import build_task

    if not run.best_checkpoint.exists():
        raise UserError(f"{run.best_checkpoint} does not exist")
    source = source or SampleSource()
    own = copy.deepcopy(source.model) if source.model is not None else None
    loaded = load_trained(run.best_checkpoint, model=own)
    cfg = loaded.cfg
    # In-process loading: worker processes would cost more to start than a few hundred
    # images take to decode.
    data_cfg = cfg.data.model_copy(update={"num_workers": 0, "persistent_workers": False})
    cfg = cfg.model_copy(update={"data": data_cfg})
    bundle = source.bundle if source.bundle is not None else build_data(cfg.data, cfg.task)
    if bundle.val is None:
        raise UserError(f"data source {cfg.data.name} has no val split")
    task = build_task(cfg, bundle, loaded.device)
    task.load_state_dict(loaded.state.get("task_state") or {})
    loader = build_loaders(cfg, bundle, loaded.device).val
    images: list[torch.Tensor] = []
    targets: list[Any] = []
    outputs: list[Any] = []

    def collect(batch: dict[str, Any], out: Any) -> bool:
        images.extend(batch["image"].cpu())
        targets.extend(_unbatch(batch["target"]))
        outputs.extend(_unbatch(out))
        return len(images) >= limit

    # The evaluation loop of training (engine.evaluate): the run's precision and layout.
    precision = Precision(cfg.train.precision, loaded.device)
    infer_batches(loaded.model, loader, task, loaded.prep, precision, collect)
    return Samples(
        images=images[:limit],
        targets=targets[:limit],
        outputs=outputs[:limit],
        names=loaded.target_names or loaded.class_names,
        task_state=dict(loaded.state.get("task_state") or {}),
        total=len(bundle.val),
    )
