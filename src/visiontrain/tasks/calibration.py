"""How far predicted probabilities are from observed frequencies, and temperature scaling.

Every classification evaluation reports the expected calibration error (ECE: the
confidence of the predicted class against its accuracy, over 15 equal-width bins,
weighted by the bins' sizes; Guo et al. 2017), the maximum calibration error (MCE: the
worst non-empty bin) and the Brier score (the mean squared distance between the
probability vector and the one-hot truth, summed over classes). The sums behind them are
kept on the device and are additive, so DDP ranks just add them.

``train.calibrate=temperature`` fits one temperature ``T`` on the validation logits of the
best weights (LBFGS on the negative log-likelihood of ``logits / T``); ``T > 1`` softens
an over-confident model. Dividing logits by a positive number never changes their
argmax, so decisions stay as trained; only the probabilities move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

BINS = 15


class CalibrationStats:
    """Per-bin sums of confidence and accuracy, and the Brier sum, on the device."""

    def __init__(self, device: torch.device, bins: int = BINS) -> None:
        self.bins = bins
        # Rows: count, confidence sum, correct count, per bin; float64 for exact sums.
        self.table = torch.zeros((3, bins), dtype=torch.float64, device=device)
        self.brier = torch.zeros((), dtype=torch.float64, device=device)

    def reset(self) -> None:
        """Forget every sample."""
        self.table.zero_()
        self.brier.zero_()

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``probs`` (N, C) and int64 class indices (N,)."""
        conf, pred = probs.max(dim=1)
        correct = (pred == target).double()
        index = (conf * self.bins).long().clamp(max=self.bins - 1)
        ones = torch.ones_like(correct)
        self.table[0].index_add_(0, index, ones)
        self.table[1].index_add_(0, index, conf.double())
        self.table[2].index_add_(0, index, correct)
        truth = F.one_hot(target, probs.shape[1]).to(probs.dtype)
        self.brier += ((probs - truth) ** 2).sum().double()

    def tensors(self) -> list[torch.Tensor]:
        """The state to sum over DDP ranks, in place."""
        return [self.table, self.brier]

    def compute(self) -> dict[str, Any]:
        """``ece``, ``mce``, ``brier`` and the reliability table (one host sync)."""
        table, brier = self.table.cpu(), float(self.brier)
        count, conf, correct = table
        n = float(count.sum())
        filled = count > 0
        gap = (correct[filled] - conf[filled]).abs() / count[filled]

        def per_bin(sums: torch.Tensor) -> list[float | None]:
            return [round(float(v / k), 6) if k else None for v, k in zip(sums, count, strict=True)]

        return {
            "ece": float((gap * count[filled]).sum() / n) if n else 0.0,
            "mce": float(gap.max()) if bool(filled.any()) else 0.0,
            "brier": brier / n if n else 0.0,
            "reliability": {
                "bins": self.bins,
                "count": [int(c) for c in count],
                "confidence": [
                    round(float(c / k), 6) if k else None for c, k in zip(conf, count, strict=True)
                ],
                "accuracy": [
                    round(float(a / k), 6) if k else None
                    for a, k in zip(correct, count, strict=True)
                ],
            },
        }


def nll(logits: torch.Tensor, target: torch.Tensor, activation: str) -> torch.Tensor:
    """The negative log-likelihood the model's probabilities give the truth, per sample mean.

    A float ``target`` of the logits' shape is a multi-label 0/1 row per sample (sigmoid).
    """
    if activation == "sigmoid":
        truth = target.float() if target.is_floating_point() else F.one_hot(target, logits.shape[1])
        return F.binary_cross_entropy_with_logits(logits, truth.float())
    return F.cross_entropy(logits, target)


# The temperature is searched within [e^-3, e^3] (0.05 to 20). A val set the model
# classifies perfectly has no finite optimum (its NLL falls as T -> 0), so the search
# ends at the bound; such a T says nothing about the model, and T = 1 is kept.
LOG_T_BOUND = 3.0


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature, or 1 with the reason the fit was not used."""

    temperature: float
    note: str | None = None


def separated(logits: torch.Tensor, target: torch.Tensor, activation: str) -> bool:
    """Whether every sample is decided right, so the NLL of ``logits / T`` falls as T -> 0."""
    if activation == "sigmoid":
        truth = target.bool() if target.ndim == 2 else F.one_hot(target, logits.shape[1]).bool()
        return bool(((logits > 0) == truth).all())
    return bool((logits.argmax(dim=1) == target).all())


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, activation: str) -> TemperatureFit:
    """The temperature that minimises the NLL of ``logits / T`` (LBFGS, ``T`` bounded).

    ``log T = 3 tanh(u)`` is optimised over ``u``: positive and bounded to
    [e^-3, e^3] without a constraint. An optimum at the bound is no optimum (the NLL was
    still falling there: typically every val image is classified right), so ``T = 1``
    is kept and the fit says why.

    Args:
        logits: float (N, C) validation logits of the best weights.
        target: int64 class indices (N,), or 0/1 rows (N, C) for multilabel.
        activation: ``softmax`` or ``sigmoid`` (one-vs-rest losses, multilabel).
    """
    logits, target = logits.detach().float().cpu(), target.detach().cpu()
    if separated(logits, target, activation):
        return TemperatureFit(
            1.0,
            "every val image is classified right, so the val NLL falls without end as "
            "T -> 0 and no temperature calibrates this model on this val set: T = 1 is "
            "kept. A larger or harder val set (data.val_split) gives one that means something.",
        )
    u = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([u], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def log_temperature() -> torch.Tensor:
        return LOG_T_BOUND * torch.tanh(u)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll(logits / log_temperature().exp(), target, activation)
        loss.backward()
        return loss

    opt.step(closure)
    log_t = float(log_temperature().detach())
    if abs(log_t) >= LOG_T_BOUND - 0.01:
        return TemperatureFit(
            1.0,
            f"the val NLL is lowest at T = {math.exp(log_t):.3g}, the search's bound, so "
            "no temperature in range calibrates this model on this val set: T = 1 is kept.",
        )
    return TemperatureFit(math.exp(log_t))
