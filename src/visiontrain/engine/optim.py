"""Optimizer registry with weight-decay parameter groups.

Norm-layer weights and biases (every parameter with fewer than two dimensions) get no
weight decay unless ``optim.decay_norm_bias=true``: decaying them only fights the
normalisation and rarely helps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from visiontrain.config import OptimConfig, refuse_unused
from visiontrain.errors import ConfigError
from visiontrain.registry import Registry


@dataclass(frozen=True)
class _Entry:
    build: Callable[..., torch.optim.Optimizer]
    uses: frozenset[str]
    defaults: dict[str, Any]


_OPTIMIZERS: Registry[_Entry] = Registry("optimizer", key="optim.name")


def register_optimizer(
    name: str, uses: tuple[str, ...] = (), **defaults: Any
) -> Callable[[Callable[..., torch.optim.Optimizer]], Callable[..., torch.optim.Optimizer]]:
    """Register ``fn(params, lr, weight_decay, **options)`` under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    return _OPTIMIZERS.decorator(name, lambda fn: _Entry(fn, frozenset(uses), defaults))


def _lamb(params: Any, **kw: Any) -> torch.optim.Optimizer:
    from timm.optim import Lamb

    return Lamb(params, **kw)


register_optimizer("sgd", ("momentum", "nesterov"), momentum=0.9, nesterov=False)(torch.optim.SGD)
register_optimizer("adam", ("betas", "eps"))(torch.optim.Adam)
register_optimizer("adamw", ("betas", "eps"))(torch.optim.AdamW)
register_optimizer("rmsprop", ("momentum", "eps"), momentum=0.0)(torch.optim.RMSprop)
register_optimizer("radam", ("betas", "eps"))(torch.optim.RAdam)
register_optimizer("lamb", ("betas", "eps"))(_lamb)


def list_optimizers() -> list[str]:
    """Registered optimizer names."""
    return _OPTIMIZERS.names()


def param_groups(model: nn.Module, weight_decay: float, decay_norm_bias: bool) -> list[dict]:
    """Two groups: decayed weights, and undecayed norm weights and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if decay_norm_bias or p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Build ``optim.name`` over the model's parameter groups.

    Raises:
        ConfigError: the name is unknown, an ``optim.*`` key it ignores is set, or
            ``optim.nesterov`` is set without momentum.
    """
    entry = _OPTIMIZERS.get(cfg.name)
    refuse_unused(cfg, "optim", entry.uses, f"optimizer {cfg.name}")
    options = dict(entry.defaults)
    for key in entry.uses:
        value = getattr(cfg, key)
        if value is not None:
            options[key] = value
    if options.get("nesterov") and not options.get("momentum"):
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0.")
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_bias)
    return entry.build(groups, lr=cfg.lr, **options)
