"""Multi-label classification: each image carries a set of labels, a 0/1 row over the classes.

Every class has its own sigmoid; the loss is ``bce_with_logits`` (the default), ``focal``
(its sigmoid form) or ``asl`` (the asymmetric loss). An evaluation keeps every image's
logits and label row on the device; under DDP the ranks exchange them (``sync_metrics``),
so the metrics are computed once, on the whole split, equal to a one-process evaluation:

- ``map``: the mean over classes of the average precision (the area under the class's
  precision-recall curve, as scikit-learn computes it), over the classes that have a
  positive image in the split (AP means nothing without one: its per-class ``ap`` is NaN);
- ``micro_f1`` (every (image, class) decision pooled), ``macro_f1`` (the mean of the
  per-class F1), ``subset_accuracy`` (the whole set right), ``hamming_loss`` (the share of
  wrong (image, class) decisions);
- per class: precision, recall, F1, AP, support (positive images) and the threshold used;
- ``cooccurrence``: how many images carry each pair of labels (the diagonal: each label);
- ``ece`` / ``mce`` / ``brier`` over all (image, class) pairs, each a two-outcome forecast.

Class c is predicted when its probability reaches ``thresholds[c]``. ``train.threshold``
sets them: a number applies to every class; ``best_f1``, ``recall>=x`` and
``precision>=x`` are chosen per class on val with the best weights after training
(:func:`~visiontrain.tasks.thresholds.choose_threshold` on each class's scores). They go
into the checkpoint's task state, so ``eval``, ``predict`` and exported artifacts
(model.json) apply the same ones. ``train.calibrate=temperature`` fits one temperature for
all the sigmoid logits first (the BCE of ``logits / T`` on val); thresholds are chosen on
the calibrated probabilities.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MultilabelAveragePrecision,
    MultilabelExactMatch,
    MultilabelF1Score,
    MultilabelHammingDistance,
    MultilabelPrecision,
    MultilabelRecall,
)

from visiontrain.config import Config
from visiontrain.data.sources import DataBundle
from visiontrain.engine.distributed import Dist
from visiontrain.errors import DataError
from visiontrain.losses import LossContext, build_loss
from visiontrain.tasks.base import Task, register_task
from visiontrain.tasks.calibration import CalibrationStats, fit_temperature, nll
from visiontrain.tasks.classification import describe_loss
from visiontrain.tasks.thresholds import choose_threshold, pr_curve_summary


def label_probabilities(outputs: torch.Tensor, task_state: dict[str, Any]) -> torch.Tensor:
    """Per-class probabilities as a trained run gives them: sigmoid of logits / temperature.

    The temperature is 1 when none was fitted, or when an exported graph applied it inside.
    """
    return torch.sigmoid(outputs.float() / float(task_state.get("temperature", 1.0)))


def decide(probs: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """The predicted label sets as a bool (N, C) matrix: ``probs[:, c] >= thresholds[c]``."""
    return probs >= torch.as_tensor(thresholds, dtype=probs.dtype, device=probs.device)


def label_counts(labels: Any, num_classes: int) -> torch.Tensor | None:
    """Images carrying each label in a split's (N, C) 0/1 label matrix; None without one.

    Raises:
        DataError: the split's targets are not one row of ``num_classes`` per image.
    """
    if labels is None:
        return None
    if labels.ndim != 2 or labels.shape[1] != num_classes:
        raise DataError(
            f"task=multilabel takes one 0/1 row of {num_classes} labels per image; the "
            f"training targets have shape {tuple(labels.shape)}. Use a source that gives "
            "label sets (defects with data.defect_classes=multilabel, imagefolder with a "
            "labels.csv, coco)."
        )
    return torch.as_tensor((labels >= 0.5).sum(axis=0), dtype=torch.long)


@register_task("multilabel")
class MultilabelTask(Task):
    """Any subset of ``num_classes`` labels per image."""

    name = "multilabel"
    temperature_scaling = True
    # The thresholds (and the temperature) are settled on val after training, and the
    # pass records each class's val precision and recall at them for summary.json.
    calibrates = True

    @staticmethod
    def predictions(  # noqa: D102
        outputs: list[torch.Tensor], task_state: dict[str, Any], names: list[str], top_k: int
    ) -> list[dict[str, Any]]:
        return predictions(outputs, task_state, names)

    def __init__(self, cfg: Config, bundle: DataBundle, device: torch.device) -> None:
        super().__init__(cfg, bundle, device)
        n = bundle.num_classes
        labels = bundle.train.labels
        self.label_counts = label_counts(labels, n)
        self.train_images = None if labels is None else len(labels)
        ctx = LossContext("multilabel", n, self.label_counts, self.train_images)
        self.loss_fn = build_loss(cfg.loss, ctx)
        self.temperature = 1.0
        self.fits_temperature = cfg.train.calibrate == "temperature"
        self.calibration_info: dict[str, Any] | None = None
        self.calibration = CalibrationStats(device)
        rule = cfg.train.threshold
        # A rule to tune keeps 0.5 until calibrate() has chosen per-class thresholds.
        self.thresholds = [rule if isinstance(rule, float) else 0.5] * n
        self.threshold_info: dict[str, Any] | None = None
        # sync_on_compute off: sync_metrics gathers the per-sample state itself.
        kw = {"sync_on_compute": False}
        self.metrics = MetricCollection(
            {
                "micro_f1": MultilabelF1Score(n, average="micro", **kw),
                "macro_f1": MultilabelF1Score(n, average="macro", **kw),
                "precision": MultilabelPrecision(n, average=None, **kw),
                "recall": MultilabelRecall(n, average=None, **kw),
                "f1": MultilabelF1Score(n, average=None, **kw),
                "subset_accuracy": MultilabelExactMatch(n, **kw),
                "hamming_loss": MultilabelHammingDistance(n, average="micro", **kw),
            }
        ).to(device)
        # Exact (thresholds=None): every score is a threshold, as scikit-learn's AP.
        self.average_precision = MultilabelAveragePrecision(
            n, average=None, thresholds=None, **kw
        ).to(device)
        self._loss_sum = torch.zeros((), device=device)
        self._count = torch.zeros((), device=device, dtype=torch.long)
        self._logits: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: D102
        return {"loss": self.loss_fn(output, target)}

    def reset_metrics(self) -> None:  # noqa: D102
        self._loss_sum.zero_()
        self._count.zero_()
        self._logits, self._targets = [], []

    def update_metrics(self, output: torch.Tensor, target: torch.Tensor) -> None:  # noqa: D102
        # Sum, not mean, so that the last (smaller) batch weighs by its size.
        self._loss_sum += self.loss_fn(output, target).detach() * target.shape[0]
        self._count += target.shape[0]
        # Raw logits, not decisions: thresholds and the temperature may still change.
        self._logits.append(output.detach().float())
        self._targets.append(target.detach().float())

    def sync_metrics(self, dist: Dist) -> None:  # noqa: D102
        dist.sum_(self._loss_sum)
        dist.sum_(self._count)
        logits, targets = self._stacked()
        self._logits = [dist.gather_rows(logits)]
        self._targets = [dist.gather_rows(targets)]

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluation's logits and float 0/1 targets so far, (N, C) each."""
        if not self._logits:
            n = self.bundle.num_classes
            empty = torch.empty((0, n), device=self._loss_sum.device)
            return empty, empty.clone()
        return torch.cat(self._logits), torch.cat(self._targets)

    def compute_metrics(self) -> dict[str, Any]:  # noqa: D102
        logits, soft = self._stacked()
        targets = (soft >= 0.5).long()
        probs = torch.sigmoid(logits / self.temperature)
        names = self.bundle.class_names
        count = int(self._count)
        if count == 0:
            return {"loss": 0.0, "samples": 0}
        self.metrics.reset()
        self.metrics.update(decide(probs, self.thresholds).long(), targets)
        values = self.metrics.compute()
        support = targets.sum(dim=0).cpu()
        self.average_precision.reset()
        self.average_precision.update(probs, targets)
        with warnings.catch_warnings():
            # A class without a positive image: its AP is NaN below, not torchmetrics' 0.
            warnings.filterwarnings("ignore", message=".*No positive samples")
            ap = self.average_precision.compute().cpu()
        ap = torch.where(support > 0, ap, torch.full_like(ap, float("nan")))
        scored = ap[support > 0]
        per_class = {
            name: {
                "precision": float(values["precision"][c]),
                "recall": float(values["recall"][c]),
                "f1": float(values["f1"][c]),
                "ap": float(ap[c]),
                "support": int(support[c]),
                "threshold": round(float(self.thresholds[c]), 6),
            }
            for c, name in enumerate(names)
        }
        return {
            "loss": float(self._loss_sum) / count,
            "map": float(scored.mean()) if len(scored) else float("nan"),
            "micro_f1": float(values["micro_f1"]),
            "macro_f1": float(values["macro_f1"]),
            "subset_accuracy": float(values["subset_accuracy"]),
            "hamming_loss": float(values["hamming_loss"]),
            **self._calibration(probs, targets),
            "per_class": per_class,
            "cooccurrence": (targets.T @ targets).cpu().tolist(),
            "samples": count,
        }

    def _calibration(self, probs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        """ECE, MCE, Brier and the reliability table over all (image, class) pairs."""
        p = probs.flatten()
        self.calibration.reset()
        # Each pair is a two-outcome forecast: (P(absent), P(present)) against the truth.
        self.calibration.update(torch.stack([1 - p, p], dim=1), targets.flatten())
        stats = self.calibration.compute()
        # The stats sum the squared error over both outcomes, 2 (p - y)^2; the multi-label
        # Brier score is the mean of (p - y)^2 over pairs.
        stats["brier"] /= 2
        return stats

    def calibrate(self) -> dict[str, Any] | None:
        """Fit the temperature, then choose the per-class thresholds, on the last (val) pass."""
        logits, soft = self._stacked()
        if len(logits) == 0:
            return None
        info: dict[str, Any] = {}
        if self.fits_temperature:
            info.update(self._fit_temperature(logits, (soft >= 0.5).float()))
        info.update(self._choose_thresholds(logits, (soft >= 0.5).long()))
        return info

    def _fit_temperature(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        before = self._calibration(torch.sigmoid(logits / self.temperature), targets.long())
        nll_before = float(nll(logits / self.temperature, targets, "sigmoid"))
        fit = fit_temperature(logits, targets, "sigmoid")
        self.temperature = fit.temperature
        after = self._calibration(torch.sigmoid(logits / self.temperature), targets.long())
        self.calibration_info = {
            "method": "temperature",
            "temperature": round(self.temperature, 6),
            "val_ece_before": before["ece"],
            "val_ece_after": after["ece"],
            "val_nll_before": nll_before,
            "val_nll_after": float(nll(logits / self.temperature, targets, "sigmoid")),
            "val_brier_before": before["brier"],
            "val_brier_after": after["brier"],
            **({"note": fit.note} if fit.note else {}),
        }
        return {"temperature": self.temperature, "calibration": self.calibration_info}

    def _choose_thresholds(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        rule = self.cfg.train.threshold
        probs = torch.sigmoid(logits / self.temperature).cpu()
        targets = targets.cpu()
        per_class: dict[str, Any] = {}
        for c, name in enumerate(self.bundle.class_names):
            scores, truth = probs[:, c], targets[:, c]
            choice = choose_threshold(scores, truth, rule)
            self.thresholds[c] = choice.threshold
            entry = choice.to_dict()
            del entry["rule"]  # one rule for all classes, kept once below
            curve = pr_curve_summary(scores, truth)
            if curve is not None:
                entry["pr_curve"] = curve
            per_class[name] = entry
        self.threshold_info = {"rule": str(rule), "per_class": per_class}
        return {"thresholds": dict(zip(self.bundle.class_names, self.thresholds, strict=True))}

    def metric_names(self) -> list[str]:  # noqa: D102
        names = [
            "val/loss",
            "val/map",
            "val/micro_f1",
            "val/macro_f1",
            "val/subset_accuracy",
            "val/hamming_loss",
        ]
        for cls in self.bundle.class_names:
            names += [f"val/{m}/{cls}" for m in ("precision", "recall", "f1", "ap")]
        return names

    def describe(self) -> list[str]:  # noqa: D102
        names = self.bundle.class_names
        lines = []
        if self.label_counts is not None:
            counts = ", ".join(
                f"{c} {int(k)}" for c, k in zip(names, self.label_counts, strict=True)
            )
            lines.append(f"train images per label: {counts} (of {self.train_images} images)")
        lines += describe_loss(self.loss_fn, names)
        rule = self.cfg.train.threshold
        if not isinstance(rule, float):
            lines.append(f"thresholds: {rule} per class, chosen on val after training")
        elif rule != 0.5:
            lines.append(f"threshold: {rule} for every class")
        return lines

    def summary_info(self) -> dict[str, Any]:  # noqa: D102
        info = self.loss_fn.info
        return {
            "class_names": self.bundle.class_names,
            "train_label_counts": None if self.label_counts is None else self.label_counts.tolist(),
            "train_images": self.train_images,
            "loss": {"name": self.loss_fn.name, **info},
            "class_weights": info.get("class_weights"),
            "threshold": self.threshold_info,
            "calibration": self.calibration_info,
        }

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "activation": "sigmoid",
            "thresholds": [float(t) for t in self.thresholds],
            "temperature": self.temperature,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        thresholds = state.get("thresholds")
        if isinstance(thresholds, list) and len(thresholds) == len(self.thresholds):
            self.thresholds = [float(t) for t in thresholds]
        self.temperature = float(state.get("temperature", 1.0))


def predictions(
    outputs: list[torch.Tensor], task_state: dict[str, Any], names: list[str]
) -> list[dict[str, Any]]:
    """Per-image rows: the predicted label set and every class's probability."""
    probs = label_probabilities(torch.stack(outputs), task_state)
    chosen = decide(probs, task_state.get("thresholds") or [0.5] * len(names))
    return [
        {
            "labels": [name for c, name in enumerate(names) if bool(chosen[n, c])],
            "probabilities": {name: round(float(probs[n, c]), 6) for c, name in enumerate(names)},
        }
        for n in range(len(probs))
    ]
