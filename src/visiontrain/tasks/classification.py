"""Image classification: the configured loss, accuracy, macro F1, per-class P/R/F1.

With two classes the task also keeps the positive-class scores of an evaluation, so that
val gives a precision-recall curve and average precision, and ``train.threshold`` can
be chosen on val and applied to test and to ``predict``.
"""

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
from visiontrain.engine.distributed import Dist
from visiontrain.errors import ConfigError
from visiontrain.losses import Loss, LossContext, build_loss
from visiontrain.tasks.base import Task, register_task
from visiontrain.tasks.calibration import CalibrationStats, fit_temperature, nll
from visiontrain.tasks.thresholds import (
    average_precision,
    choose_threshold,
    fixed_or_auto,
    pr_curve_summary,
)


def probabilities(output: torch.Tensor, activation: str) -> torch.Tensor:
    """Class probabilities from logits: softmax, or per-class sigmoid for one-vs-rest losses."""
    return torch.sigmoid(output) if activation == "sigmoid" else torch.softmax(output, dim=1)


def calibrated_probabilities(outputs: torch.Tensor, task_state: dict[str, Any]) -> torch.Tensor:
    """Probabilities as a trained run gives them: its activation, through its temperature.

    The temperature is 1 when none was fitted, or when an exported graph applied it inside.
    """
    logits = outputs.float() / float(task_state.get("temperature", 1.0))
    return probabilities(logits, task_state.get("activation", "softmax"))


def decide(probs: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Predicted classes: argmax, or for two classes ``P(class 1) >= threshold``."""
    if threshold is not None and probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).long()
    return probs.argmax(dim=1)


def describe_loss(loss: Loss, names: list[str]) -> list[str]:
    """Lines naming the loss options in force, per class where they are per class."""
    lines = []
    for key, values in loss.info.items():
        if isinstance(values, list) and len(values) == len(names):
            pairs = ", ".join(f"{c} {v:.4g}" for c, v in zip(names, values, strict=True))
            lines.append(f"loss {loss.name}: {key} {pairs}")
        elif values not in (None, 0, 0.0):  # unset options are not "in force"
            lines.append(f"loss {loss.name}: {key} {values}")
    return lines


@register_task("classification")
class ClassificationTask(Task):
    """One label per image out of ``num_classes``."""

    name = "classification"
    temperature_scaling = True

    @staticmethod
    def predictions(  # noqa: D102
        outputs: list[torch.Tensor], task_state: dict[str, Any], names: list[str], top_k: int
    ) -> list[dict[str, Any]]:
        return predictions(outputs, task_state, names, top_k)

    def __init__(self, cfg: Config, bundle: DataBundle, device: torch.device) -> None:
        super().__init__(cfg, bundle, device)
        n = bundle.num_classes
        counts = torch.bincount(torch.as_tensor(bundle.train.labels), minlength=n)
        self.class_counts = counts
        self.loss_fn = build_loss(cfg.loss, LossContext("classification", n, counts))
        self.binary = n == 2
        # train.calibrate=temperature: one temperature fitted on val after training.
        self.temperature = 1.0
        self.fits_temperature = cfg.train.calibrate == "temperature"
        self.calibration_info: dict[str, Any] | None = None
        self.calibration = CalibrationStats(device)
        # Binary: the PR curve and the threshold come from val with the best weights.
        self.calibrates = self.binary or self.fits_temperature
        rule = cfg.train.threshold
        if not self.binary and not fixed_or_auto(rule):
            raise ConfigError(
                f"train.threshold applies to binary classification; this data has {n} "
                "classes, where the prediction is the most probable class. Remove "
                "train.threshold."
            )
        self.threshold: float | None = 0.5 if self.binary else None
        self.threshold_info: dict[str, Any] | None = None
        # sync_on_compute off: under DDP the task gathers its own per-sample state
        # (sync_metrics), so torchmetrics must not add the ranks' counts a second time.
        kw = {"sync_on_compute": False}
        self.metrics = MetricCollection(
            {
                "accuracy": MulticlassAccuracy(n, average="micro", **kw),
                "macro_f1": MulticlassF1Score(n, average="macro", **kw),
                "precision": MulticlassPrecision(n, average=None, **kw),
                "recall": MulticlassRecall(n, average=None, **kw),
                "f1": MulticlassF1Score(n, average=None, **kw),
                "confusion": MulticlassConfusionMatrix(n, **kw),
            }
        ).to(device)
        self._loss_sum = torch.zeros((), device=device)
        self._count = torch.zeros((), device=device, dtype=torch.long)
        self._scores: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._logits: list[torch.Tensor] = []

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: D102
        return {"loss": self.loss_fn(output, target)}

    def reset_metrics(self) -> None:  # noqa: D102
        self.metrics.reset()
        self._loss_sum.zero_()
        self._count.zero_()
        self._scores, self._targets, self._logits = [], [], []
        self._preds: list[torch.Tensor] = []
        self.calibration.reset()

    def update_metrics(self, output: torch.Tensor, target: torch.Tensor) -> None:  # noqa: D102
        # Sum, not mean, so that the last (smaller) batch weighs by its size.
        self._loss_sum += self.loss_fn(output, target).detach() * target.shape[0]
        self._count += target.shape[0]
        probs = probabilities(output.float() / self.temperature, self.loss_fn.activation)
        self.calibration.update(probs, target)
        if self.fits_temperature:
            self._logits.append(output.detach().float())
        if self.binary:
            # Scores stay on the device; thresholds are applied once, in compute_metrics.
            self._scores.append(probs[:, 1])
            self._targets.append(target)
        else:
            # Softmax and sigmoid are monotonic: the argmax of the logits is the decision.
            # Kept per sample (one int each) so that DDP ranks can exchange them.
            self._preds.append(output.argmax(dim=1))
            self._targets.append(target)

    def sync_metrics(self, dist: Dist) -> None:  # noqa: D102
        dist.sum_(self._loss_sum)
        dist.sum_(self._count)
        for t in self.calibration.tensors():
            dist.sum_(t)
        if self.fits_temperature:
            mine = torch.cat(self._logits) if self._logits else self._empty(torch.float32)
            self._logits = [dist.gather_rows(mine)]
        dtype = torch.float32 if self.binary else torch.long
        mine = self._scores if self.binary else self._preds
        values = dist.gather_rows(torch.cat(mine) if mine else self._empty(dtype))
        targets = dist.gather_rows(
            torch.cat(self._targets) if self._targets else self._empty(torch.long)
        )
        self._targets = [targets]
        if self.binary:
            self._scores = [values]
        else:
            self._preds = [values]

    def _empty(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(0, dtype=dtype, device=self._loss_sum.device)

    def compute_metrics(self) -> dict[str, Any]:  # noqa: D102
        extra: dict[str, Any] = {}
        if not self.binary and self._preds:
            self.metrics.reset()
            self.metrics.update(torch.cat(self._preds), torch.cat(self._targets))
        if self.binary and self._scores:
            scores, targets = torch.cat(self._scores), torch.cat(self._targets)
            self.metrics.reset()
            self.metrics.update((scores >= self.threshold).long(), targets)
            extra = {
                "average_precision": average_precision(scores, targets),
                "threshold": self.threshold,
            }
        values = self.metrics.compute()
        confusion = values["confusion"].long().cpu()
        support = confusion.sum(dim=1)
        per_class = {
            name: {
                "precision": float(values["precision"][i]),
                "recall": float(values["recall"][i]),
                "f1": float(values["f1"][i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(self.bundle.class_names)
        }
        count = int(self._count)
        return {
            "loss": float(self._loss_sum) / max(count, 1),
            "accuracy": float(values["accuracy"]),
            "macro_f1": float(values["macro_f1"]),
            **extra,
            **self.calibration.compute(),
            "per_class": per_class,
            "confusion_matrix": confusion.tolist(),
            "samples": count,
        }

    def calibrate(self) -> dict[str, Any] | None:
        """Fit the temperature, then choose ``train.threshold``, on the last (val) evaluation.

        The threshold is chosen on the calibrated probabilities, as predictions use them.
        """
        info: dict[str, Any] = {}
        if self.fits_temperature and self._logits:
            info.update(self._fit_temperature())
        threshold = self._choose_threshold()
        if threshold is not None:
            info.update(threshold)
        return info or None

    def _fit_temperature(self) -> dict[str, Any]:
        logits, targets = torch.cat(self._logits), torch.cat(self._targets)
        activation = self.loss_fn.activation
        before = self.calibration.compute()
        nll_before = float(nll(logits, targets, activation))
        fit = fit_temperature(logits, targets, activation)
        self.temperature = fit.temperature
        # The pass's statistics and binary scores again, through the new temperature.
        probs = probabilities(logits / self.temperature, activation)
        self.calibration.reset()
        self.calibration.update(probs, targets)
        if self.binary:
            self._scores = [probs[:, 1]]
            self._targets = [targets]
        after = self.calibration.compute()
        self.calibration_info = {
            "method": "temperature",
            "temperature": round(self.temperature, 6),
            "val_ece_before": before["ece"],
            "val_ece_after": after["ece"],
            "val_nll_before": nll_before,
            "val_nll_after": float(nll(logits / self.temperature, targets, activation)),
            "val_brier_before": before["brier"],
            "val_brier_after": after["brier"],
            **({"note": fit.note} if fit.note else {}),
        }
        return {"temperature": self.temperature, "calibration": self.calibration_info}

    def _choose_threshold(self) -> dict[str, Any] | None:
        if not self.binary or not self._scores:
            return None
        scores, targets = torch.cat(self._scores).cpu(), torch.cat(self._targets).cpu()
        choice = choose_threshold(scores, targets, self.cfg.train.threshold)
        self.threshold = choice.threshold
        info = choice.to_dict()
        curve = pr_curve_summary(scores, targets)
        if curve is not None:
            info["pr_curve"] = curve
            info["average_precision"] = average_precision(scores, targets)
        self.threshold_info = info
        return info

    def metric_names(self) -> list[str]:  # noqa: D102
        names = ["val/loss", "val/accuracy", "val/macro_f1"]
        if self.binary:
            names.append("val/average_precision")
        for cls in self.bundle.class_names:
            names += [f"val/{m}/{cls}" for m in ("precision", "recall", "f1")]
        return names

    def describe(self) -> list[str]:  # noqa: D102
        names = self.bundle.class_names
        counts = ", ".join(f"{c} {int(n)}" for c, n in zip(names, self.class_counts, strict=True))
        lines = [f"train class counts: {counts}", *describe_loss(self.loss_fn, names)]
        sampler = self.sampler_info()
        if sampler["name"] == "weighted":
            per = ", ".join(
                f"{c} {p:.3g}" for c, p in zip(names, sampler["class_probability"], strict=True)
            )
            lines.append(
                f"weighted sampler: {sampler['epoch_samples']} draws per epoch with "
                f"replacement; class draw probability {per}"
            )
        if self.binary and self.cfg.train.threshold != 0.5:
            # auto: best_f1 on val (the default; configs/defects_baseline.yaml fixes 0.5)
            lines.append(f"threshold: {self.cfg.train.threshold}, chosen on val after training")
        return lines

    def sampler_info(self) -> dict[str, Any]:
        """The training sampler in force: its name, epoch length and class draw odds."""
        data = self.cfg.data
        n = int(self.class_counts.sum())
        if data.sampler != "weighted":
            probs = (self.class_counts.double() / max(n, 1)).tolist()
            return {"name": "random", "epoch_samples": n, "class_probability": probs}
        present = (self.class_counts > 0).double()
        probs = (present / present.sum()).tolist()
        return {
            "name": "weighted",
            "epoch_samples": data.epoch_samples or n,
            "class_probability": probs,
        }

    def summary_info(self) -> dict[str, Any]:  # noqa: D102
        info = self.loss_fn.info
        return {
            "class_names": self.bundle.class_names,
            "train_class_counts": self.class_counts.tolist(),
            "loss": {"name": self.loss_fn.name, **info},
            "class_weights": info.get("class_weights"),
            "sampler": self.sampler_info(),
            "threshold": self.threshold_info,
            "calibration": self.calibration_info,
        }

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "activation": self.loss_fn.activation,
            "threshold": self.threshold,
            "temperature": self.temperature,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        if self.binary and state.get("threshold") is not None:
            self.threshold = float(state["threshold"])
        self.temperature = float(state.get("temperature", 1.0))


def predictions(
    outputs: list[torch.Tensor], task_state: dict[str, Any], names: list[str], top_k: int
) -> list[dict[str, Any]]:
    """Per-image prediction rows: the decided class, its probability and the top k."""
    probs = calibrated_probabilities(torch.stack(outputs), task_state)
    chosen = decide(probs, task_state.get("threshold"))
    k = min(top_k, len(names))
    top_p, top_i = probs.topk(k, dim=1)
    return [
        {
            "prediction": names[int(chosen[n])],
            "probability": round(float(probs[n, chosen[n]]), 6),
            "top": [
                {"class": names[int(i)], "probability": round(float(p), 6)}
                for p, i in zip(top_p[n], top_i[n], strict=True)
            ],
        }
        for n in range(len(probs))
    ]
