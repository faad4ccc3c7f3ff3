"""Image classification: cross entropy / BCE, accuracy, macro F1, per-class P/R/F1."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from visiontrain.config import Config
from visiontrain.data.sources import DataBundle
from visiontrain.losses import build_loss, class_weights
from visiontrain.tasks.base import Task, register_task


@register_task("classification")
class ClassificationTask(Task):
    """One label per image out of ``num_classes``."""

    name = "classification"

    def __init__(self, cfg: Config, bundle: DataBundle, device: torch.device) -> None:
        super().__init__(cfg, bundle, device)
        n = bundle.num_classes
        counts = torch.bincount(torch.as_tensor(bundle.train.labels), minlength=n)
        self.class_counts = counts
        self.weights = class_weights(cfg.loss.class_weights, counts)
        self.loss_fn = build_loss(cfg.loss, "classification", n, self.weights)
        self.metrics = MetricCollection(
            {
                "accuracy": MulticlassAccuracy(n, average="micro"),
                "macro_f1": MulticlassF1Score(n, average="macro"),
                "precision": MulticlassPrecision(n, average=None),
                "recall": MulticlassRecall(n, average=None),
                "f1": MulticlassF1Score(n, average=None),
                "confusion": MulticlassConfusionMatrix(n),
            }
        ).to(device)
        self._loss_sum = torch.zeros((), device=device)
        self._count = torch.zeros((), device=device, dtype=torch.long)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: D102
        return {"loss": self.loss_fn(output, target)}

    def reset_metrics(self) -> None:  # noqa: D102
        self.metrics.reset()
        self._loss_sum.zero_()
        self._count.zero_()

    def update_metrics(self, output: torch.Tensor, target: torch.Tensor) -> None:  # noqa: D102
        # Sum, not mean, so that the last (smaller) batch weighs by its size.
        self._loss_sum += self.loss_fn(output, target).detach() * target.shape[0]
        self._count += target.shape[0]
        self.metrics.update(output.argmax(dim=1), target)

    def compute_metrics(self) -> dict[str, Any]:  # noqa: D102
        values = self.metrics.compute()
        confusion = values["confusion"].long().cpu()
        support = confusion.sum(dim=1)
        names = self.bundle.class_names
        per_class = {
            name: {
                "precision": float(values["precision"][i]),
                "recall": float(values["recall"][i]),
                "f1": float(values["f1"][i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        }
        count = int(self._count)
        return {
            "loss": float(self._loss_sum) / max(count, 1),
            "accuracy": float(values["accuracy"]),
            "macro_f1": float(values["macro_f1"]),
            "per_class": per_class,
            "confusion_matrix": confusion.tolist(),
            "samples": count,
        }

    def metric_names(self) -> list[str]:  # noqa: D102
        names = ["val/loss", "val/accuracy", "val/macro_f1"]
        for cls in self.bundle.class_names:
            names += [f"val/{m}/{cls}" for m in ("precision", "recall", "f1")]
        return names

    def summary_info(self) -> dict[str, Any]:  # noqa: D102
        return {
            "class_names": self.bundle.class_names,
            "train_class_counts": self.class_counts.tolist(),
            "class_weights": None if self.weights is None else self.weights.tolist(),
        }
