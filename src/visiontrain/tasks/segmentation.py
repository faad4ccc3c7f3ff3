"""Semantic segmentation: per-pixel classes, the losses module's Dice/CE, mIoU and Dice.

Masks carry class indices with 255 for pixels that no loss or metric sees (unlabelled,
or the padding of a resized image).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from visiontrain.config import Config
from visiontrain.data.sources import DataBundle
from visiontrain.engine.distributed import Dist
from visiontrain.errors import ConfigError
from visiontrain.losses import LossContext, build_loss
from visiontrain.tasks.base import Task, register_task
from visiontrain.tasks.metrics import SegmentationMetrics
from visiontrain.tasks.thresholds import fixed_or_auto

IGNORE = 255


@register_task("segmentation")
class SegmentationTask(Task):
    """A class per pixel; metrics per-class IoU, mIoU, Dice, pixel accuracy."""

    name = "segmentation"
    whole_image = True

    @staticmethod
    def to_file_frame(  # noqa: D102
        out: torch.Tensor, sizes: list[tuple[int, int]], size: int
    ) -> list[torch.Tensor]:
        items = []
        for logits, (h, w) in zip(out, sizes, strict=True):
            scale = size / max(h, w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            crop = logits[None, :, :nh, :nw].float()
            items.append(F.interpolate(crop, size=(h, w), mode="bilinear")[0].cpu())
        return items

    @staticmethod
    def predictions(  # noqa: D102
        outputs: list[torch.Tensor], task_state: dict[str, Any], names: list[str], top_k: int
    ) -> list[dict[str, Any]]:
        rows = []
        for logits in outputs:
            mask = logits.argmax(dim=0) if logits.shape[0] > 1 else (logits[0] >= 0).long()
            counts = torch.bincount(mask.flatten(), minlength=len(names))
            total = max(int(mask.numel()), 1)
            rows.append(
                {
                    "mask": mask.to(torch.uint8),
                    "classes": {
                        names[i]: round(int(c) / total, 5) for i, c in enumerate(counts) if c > 0
                    },
                }
            )
        return rows

    def __init__(self, cfg: Config, bundle: DataBundle, device: torch.device) -> None:
        super().__init__(cfg, bundle, device)
        if not fixed_or_auto(cfg.train.threshold):
            raise ConfigError(
                "train.threshold applies to binary classification; segmentation predicts "
                "the most probable class per pixel. Remove train.threshold."
            )
        n = bundle.num_classes
        self.class_counts = (
            self._pixel_counts()
            if cfg.loss.class_weights
            in (
                "balanced",
                "effective",
            )
            else None
        )
        self.loss_fn = build_loss(cfg.loss, LossContext("segmentation", n, self.class_counts))
        self.metrics = SegmentationMetrics(n, bundle.class_names, device, ignore_index=IGNORE)
        self._loss_sum = torch.zeros((), device=device)
        self._count = torch.zeros((), device=device, dtype=torch.long)

    def _pixel_counts(self) -> torch.Tensor:
        """Training pixels per class (for balanced weights), from up to 200 masks."""
        split = self.bundle.train
        n = self.bundle.num_classes
        counts = torch.zeros(n, dtype=torch.long)
        step = max(1, len(split) // 200)
        for i in range(0, len(split), step):
            mask = split.load(i)[1].flatten()
            counts += torch.bincount(mask[mask != IGNORE], minlength=n)[:n]
        return counts

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: D102
        return {"loss": self.loss_fn(output, target)}

    def reset_metrics(self) -> None:  # noqa: D102
        self.metrics.reset()
        self._loss_sum.zero_()
        self._count.zero_()

    def update_metrics(self, output: torch.Tensor, target: torch.Tensor) -> None:  # noqa: D102
        self._loss_sum += self.loss_fn(output, target).detach() * target.shape[0]
        self._count += target.shape[0]
        self.metrics.update(output, target)

    def sync_metrics(self, dist: Dist) -> None:  # noqa: D102
        dist.sum_(self._loss_sum)
        dist.sum_(self._count)
        self.metrics.sync(dist.sum_)

    def compute_metrics(self) -> dict[str, Any]:  # noqa: D102
        metrics = self.metrics.compute()
        count = int(self._count)
        return {"loss": float(self._loss_sum) / max(count, 1), **metrics, "samples": count}

    def metric_names(self) -> list[str]:  # noqa: D102
        names = ["val/loss", "val/miou", "val/dice", "val/pixel_accuracy"]
        for cls in self.bundle.class_names:
            names += [f"val/iou/{cls}", f"val/dice/{cls}"]
        return names

    def describe(self) -> list[str]:  # noqa: D102
        info = ", ".join(
            f"{k} {v}" for k, v in self.loss_fn.info.items() if v not in (None, 0, 0.0)
        )
        return [f"loss {self.loss_fn.name}: {info}"]

    def summary_info(self) -> dict[str, Any]:  # noqa: D102
        return {
            "class_names": self.bundle.class_names,
            "loss": {"name": self.loss_fn.name, **self.loss_fn.info},
        }

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"activation": self.loss_fn.activation}
