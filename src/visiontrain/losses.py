"""Loss registry: ``loss.name`` → a callable ``(logits, target) -> scalar``.

Only what torch lacks is written here; cross entropy and BCE are torch's own, configured
(label smoothing, class weights) rather than rewritten.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from visiontrain.config import LossConfig
from visiontrain.errors import ConfigError, did_you_mean

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LossBuilder = Callable[[LossConfig, int, "torch.Tensor | None"], LossFn]

_LOSSES: dict[str, tuple[LossBuilder, frozenset[str]]] = {}


def register_loss(name: str, tasks: tuple[str, ...]) -> Callable[[LossBuilder], LossBuilder]:
    """Register a loss builder ``fn(cfg, num_classes, class_weights) -> loss_fn``."""

    def deco(fn: LossBuilder) -> LossBuilder:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        _LOSSES[name] = (fn, frozenset(tasks))
        return fn

    return deco


def build_loss(
    cfg: LossConfig, task: str, num_classes: int, class_weights: torch.Tensor | None
) -> LossFn:
    """Build the loss named by ``loss.name`` for ``task``."""
    entry = _LOSSES.get(cfg.name)
    names = sorted(n for n, (_, t) in _LOSSES.items() if task in t)
    if entry is None:
        tip = did_you_mean(cfg.name, names)
        raise ConfigError(
            f"unknown loss `loss.name={cfg.name}`{tip} For task {task}: {', '.join(names)}."
        )
    builder, tasks = entry
    if task not in tasks:
        raise ConfigError(
            f"loss `{cfg.name}` does not apply to task {task}; choose one of {', '.join(names)}."
        )
    return builder(cfg, num_classes, class_weights)


@register_loss("cross_entropy", tasks=("classification",))
def _cross_entropy(cfg: LossConfig, num_classes: int, weights: torch.Tensor | None) -> LossFn:
    smoothing = cfg.label_smoothing

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = weights.to(logits.device) if weights is not None else None
        return F.cross_entropy(logits.float(), target, weight=w, label_smoothing=smoothing)

    return loss


@register_loss("bce_with_logits", tasks=("classification",))
def _bce(cfg: LossConfig, num_classes: int, weights: torch.Tensor | None) -> LossFn:
    """One-vs-rest BCE on C logits; a class index target becomes a (smoothed) one-hot row."""
    smoothing = cfg.label_smoothing

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 1:
            target = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        target = target.float() * (1.0 - smoothing) + 0.5 * smoothing
        w = weights.to(logits.device) if weights is not None else None
        return F.binary_cross_entropy_with_logits(logits.float(), target, weight=w)

    return loss


def class_weights(spec: str | list[float], counts: torch.Tensor) -> torch.Tensor | None:
    """Per-class loss weights from ``loss.class_weights``.

    Args:
        spec: ``none``, ``balanced`` (inverse frequency, mean 1) or an explicit list.
        counts: training samples per class.

    """
    n = len(counts)
    if spec == "none":
        return None
    if spec == "balanced":
        inv = counts.sum() / (n * counts.clamp(min=1).double())
        return (inv / inv.mean()).float()
    if len(spec) != n:
        raise ConfigError(
            f"loss.class_weights has {len(spec)} weights but the data has {n} classes; "
            "give one weight per class, in class order."
        )
    return torch.tensor(spec, dtype=torch.float32)
