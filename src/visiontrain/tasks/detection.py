"""Object detection: the detector's own losses, COCO mAP through pycocotools.

A torchvision detector returns its loss dict in training mode and its detections in
evaluation mode, so the task passes targets to the model when training, sums the terms
(``loss.term_weights`` scales each one) and logs every term. Data labels are 0-based;
the detectors reserve 0 for the background, so labels are shifted by one on the way in
and back on the way out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from visiontrain.config import Config, refuse_unused
from visiontrain.data.sources import DataBundle
from visiontrain.engine.distributed import Dist
from visiontrain.errors import CheckpointError, ConfigError
from visiontrain.tasks.base import Task, register_task
from visiontrain.tasks.metrics import DetectionMetrics
from visiontrain.tasks.thresholds import fixed_or_auto

Detections = list[dict[str, torch.Tensor]]


def _shift(targets: Detections, by: int) -> Detections:
    return [{**t, "labels": t["labels"] + by} for t in targets]


@register_task("detection")
class DetectionTask(Task):
    """Boxes and classes per image; metrics mAP@[.5:.95], mAP@.5, mAP@.75, per-class AP."""

    name = "detection"
    whole_image = True

    @staticmethod
    def predictions(  # noqa: D102
        outputs: Detections, task_state: dict[str, Any], names: list[str], top_k: int
    ) -> list[dict[str, Any]]:
        threshold = task_state.get("score_threshold", 0.5)
        ids = [int(i) for i in task_state.get("category_ids") or range(1, len(names) + 1)]
        rows = []
        for det in outputs:
            keep = det["scores"] >= threshold
            rows.append(
                {
                    "detections": [
                        {
                            "class": names[int(label)],
                            "category_id": ids[int(label)],
                            "score": round(float(score), 5),
                            "box": [round(float(v), 2) for v in box],
                        }
                        for box, score, label in zip(
                            det["boxes"][keep],
                            det["scores"][keep],
                            det["labels"][keep],
                            strict=True,
                        )
                    ]
                }
            )
        return rows

    def __init__(self, cfg: Config, bundle: DataBundle, device: torch.device) -> None:
        super().__init__(cfg, bundle, device)
        if cfg.loss.name != "detector":
            raise ConfigError(
                "task=detection trains with the detector's own losses; "
                f"`loss.name={cfg.loss.name}` does not apply. Remove loss.name (or set "
                "loss.name=detector) and weigh the terms with "
                "loss.term_weights={loss_classifier: 1.0, ...}."
            )
        refuse_unused(cfg.loss, "loss", {"term_weights"}, "the detector's loss")
        if cfg.loss.class_weights != "none" or cfg.loss.label_smoothing > 0:
            raise ConfigError(
                "loss.class_weights and loss.label_smoothing do not apply to a detector's "
                "losses; remove them."
            )
        if not fixed_or_auto(cfg.train.threshold):
            raise ConfigError(
                "train.threshold applies to binary classification; for detection use "
                "`visiontrain predict --score-threshold`."
            )
        self.term_weights = dict(cfg.loss.term_weights or {})
        self._checked_terms = False
        # The dataset's own category ids (COCO's), else 1..K; stored with the run through
        # state_dict, so every later evaluation and export writes the same ids.
        self.category_ids = list(bundle.category_ids) or list(range(1, len(bundle.class_names) + 1))
        self.ids_from_dataset = bool(bundle.category_ids)
        self.metrics = DetectionMetrics(bundle.class_names, device, self.category_ids)

    def forward(self, model: nn.Module, images: torch.Tensor, target: Any) -> Any:  # noqa: D102
        return model(list(images), _shift(target, 1))

    @staticmethod
    def to_file_frame(  # noqa: D102
        out: Detections, sizes: list[tuple[int, int]], size: int
    ) -> list[dict[str, torch.Tensor]]:
        items = []
        for det, (h, w) in zip(out, sizes, strict=True):
            boxes = det["boxes"].cpu() / (size / max(h, w))
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            items.append({**{k: v.cpu() for k, v in det.items()}, "boxes": boxes})
        return items

    @staticmethod
    def infer(model: nn.Module, images: torch.Tensor) -> Any:  # noqa: D102
        return _shift(
            [
                {k: v.float() if k != "labels" else v for k, v in d.items()}
                for d in model(list(images))
            ],
            -1,
        )

    def loss(self, output: dict[str, torch.Tensor], target: Any) -> dict[str, torch.Tensor]:  # noqa: D102
        if not self._checked_terms:
            unknown = sorted(set(self.term_weights) - set(output))
            if unknown:
                raise ConfigError(
                    f"loss.term_weights names {unknown}, but this detector's loss terms are "
                    f"{sorted(output)}. Use those names."
                )
            self._checked_terms = True
        parts = {k: v.float() * self.term_weights.get(k, 1.0) for k, v in output.items()}
        return {"loss": sum(parts.values()), **parts}

    def reset_metrics(self) -> None:  # noqa: D102
        self.metrics.reset()

    def update_metrics(self, output: Detections, target: Any) -> None:  # noqa: D102
        self.metrics.update(output, target)

    def sync_metrics(self, dist: Dist) -> None:  # noqa: D102
        self.metrics.sync(dist.gather)

    def compute_metrics(self) -> dict[str, Any]:  # noqa: D102
        metrics = self.metrics.compute()
        metrics["samples"] = metrics.pop("images", 0)
        return metrics

    def metric_names(self) -> list[str]:  # noqa: D102
        names = ["val/map", "val/map_50", "val/map_75", "val/mar_100"]
        for cls in self.bundle.class_names:
            names += [f"val/ap/{cls}", f"val/ap_50/{cls}"]
        return names

    def describe(self) -> list[str]:  # noqa: D102
        weights = ", ".join(f"{k} {v:g}" for k, v in self.term_weights.items())
        return [f"detector loss: sum of its terms{' weighted ' + weights if weights else ''}"]

    def summary_info(self) -> dict[str, Any]:  # noqa: D102
        return {
            "class_names": self.bundle.class_names,
            "loss": {"name": "detector", "term_weights": self.term_weights or None},
        }

    def coco_results(self) -> list[dict[str, Any]]:
        """The last evaluation's detections as COCO results JSON entries (dataset ids)."""
        return self.metrics.coco_results()

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "category_ids": list(self.category_ids),
            "category_ids_from": "dataset" if self.ids_from_dataset else "index + 1",
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        ids = state.get("category_ids")
        if ids is None:  # a checkpoint from before ids were stored: 1..K, as it wrote them
            return
        ids = [int(i) for i in ids]
        if self.ids_from_dataset and ids != self.category_ids:
            raise CheckpointError(
                f"the data's category ids {self.category_ids} differ from the checkpoint's "
                f"{ids} for the classes {self.bundle.class_names}; evaluate on annotations "
                "with the categories the model was trained on."
            )
        self.category_ids = ids
        self.ids_from_dataset = state.get("category_ids_from") == "dataset"
        self.metrics.category_ids = list(ids)
