"""Decision thresholds for binary classification, chosen on validation scores.

``train.threshold`` is a fixed number, ``best_f1`` (the threshold that maximises F1 on the
precision-recall curve) or a target such as ``recall>=0.9`` (the highest threshold whose
recall reaches 0.9, which keeps the most precision) or ``precision>=0.95`` (the lowest
threshold whose precision reaches 0.95, which keeps the most recall). A sample is
positive when its score is at or above the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics.functional.classification import (
    binary_average_precision,
    binary_precision_recall_curve,
)

from visiontrain.config import THRESHOLD_TARGET


@dataclass
class ThresholdChoice:
    """The chosen threshold and the evidence for it."""

    threshold: float
    rule: str
    precision: float
    recall: float
    f1: float
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for summary.json."""
        return {
            "threshold": self.threshold,
            "rule": self.rule,
            "val_precision": self.precision,
            "val_recall": self.recall,
            "val_f1": self.f1,
            "note": self.note,
        }


def pr_curve(
    scores: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact precision-recall curve: ``precision[i]``, ``recall[i]`` at ``thresholds[i]``.

    The curve's last point (precision 1, recall 0, no threshold) is dropped so that the
    three tensors align.
    """
    precision, recall, thresholds = binary_precision_recall_curve(
        scores.float(), targets.long(), thresholds=None
    )
    return precision[:-1], recall[:-1], thresholds


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Area under the precision-recall curve (step-wise, as scikit-learn computes it)."""
    if int(targets.sum()) == 0:
        return float("nan")
    return float(binary_average_precision(scores.float(), targets.long(), thresholds=None))


def _f1(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return torch.where(p + r > 0, 2 * p * r / (p + r).clamp(min=1e-12), torch.zeros_like(p))


# `train.threshold=auto` (the default): best_f1 where the task has thresholds to choose.
AUTO = "auto"


def fixed_or_auto(rule: float | str) -> bool:
    """Whether ``train.threshold`` asks for nothing a task without thresholds would ignore."""
    return rule in (0.5, AUTO)


def choose_threshold(
    scores: torch.Tensor, targets: torch.Tensor, rule: float | str
) -> ThresholdChoice:
    """Pick the decision threshold that ``rule`` asks for on these validation scores.

    Args:
        scores: positive-class probabilities, shape (N,).
        targets: 0/1 labels, shape (N,).
        rule: a fixed threshold, ``best_f1``, ``recall>=X`` or ``precision>=X``.

    Returns:
        The threshold with the val precision, recall and F1 it gives.
    """
    scores, targets = scores.detach().float().cpu(), targets.detach().long().cpu()
    if rule == AUTO:
        rule = "best_f1"
    if isinstance(rule, float):
        return _at(scores, targets, rule, "fixed", None)
    if int(targets.sum()) == 0 or int(targets.sum()) == len(targets):
        return _at(scores, targets, 0.5, str(rule), "val has a single class: threshold kept at 0.5")
    precision, recall, thresholds = pr_curve(scores, targets)
    if rule == "best_f1":
        i = int(torch.argmax(_f1(precision, recall)))
        return _at(scores, targets, float(thresholds[i]), rule, None)
    match = THRESHOLD_TARGET.fullmatch(rule)
    if match is None:
        raise ValueError(f"unknown threshold rule {rule!r}")
    metric, level = match.group(1), float(match.group(2))
    if metric == "recall":
        ok = torch.nonzero(recall >= level).flatten()
        # Thresholds ascend: the last one that still reaches the recall keeps most precision.
        i = int(ok[-1]) if len(ok) else 0
    else:
        ok = torch.nonzero(precision >= level).flatten()
        i = int(ok[0]) if len(ok) else int(torch.argmax(precision))
    note = None if len(ok) else f"no threshold reaches {rule} on val; used the closest"
    return _at(scores, targets, float(thresholds[i]), rule, note)


def _at(
    scores: torch.Tensor, targets: torch.Tensor, threshold: float, rule: str, note: str | None
) -> ThresholdChoice:
    pred = scores >= threshold
    tp = int((pred & (targets == 1)).sum())
    fp = int((pred & (targets == 0)).sum())
    fn = int((~pred & (targets == 1)).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return ThresholdChoice(threshold, rule, p, r, f1, note)


# At most this many points of a PR curve go into summary.json.
PR_POINTS = 200


def pr_curve_summary(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, list[float]] | None:
    """The PR curve for summary.json, thinned to about :data:`PR_POINTS` points.

    None when the targets hold a single class (no curve to draw).
    """
    if not 0 < int(targets.sum()) < len(targets):
        return None
    precision, recall, thresholds = pr_curve(scores, targets)
    step = max(1, len(thresholds) // PR_POINTS)
    return {
        "precision": [round(float(v), 5) for v in precision[::step]],
        "recall": [round(float(v), 5) for v in recall[::step]],
        "thresholds": [round(float(v), 6) for v in thresholds[::step]],
    }
