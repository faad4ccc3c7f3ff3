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
from visiontrain.models.heads import HeadSplit, find_head
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


def param_groups(
    model: nn.Module,
    weight_decay: float,
    decay_norm_bias: bool,
    lr: float = 1.0,
    head: HeadSplit | None = None,
    backbone_lr_factor: float | None = None,
    layer_decay: float | None = None,
) -> list[dict]:
    """Named parameter groups, each with its own ``lr`` (``lr_scale`` x ``lr``).

    Without transfer options: ``decay`` (weights) and ``no_decay`` (norm weights and
    biases, unless ``decay_norm_bias``). ``backbone_lr_factor`` splits each into ``head_*``
    at ``lr`` and ``backbone_*`` at the factor times ``lr``; ``layer_decay`` groups by
    timm's layer ids (``layer_<k>_*`` at ``layer_decay^(L-1-k)``, the head the last layer),
    times the backbone factor outside the head. Head groups come first: tools that move
    every group's LR together (the LR range test) read the head's as the run's LR.
    Parameters with ``requires_grad=False`` (``model.freeze``) are left out.

    Raises:
        ConfigError: ``layer_decay`` for a model without timm's ``group_matcher``.
    """
    layer_of: dict[str, int] = {}
    layers = 1
    if layer_decay is not None:
        layer_of, layers = _layer_ids(model)
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = decay_norm_bias or p.ndim > 1
        scale, part = 1.0, ""
        in_head = head is not None and head.is_head(name)
        if layer_decay is not None:
            # timm puts the classifier in the last layer; a head found otherwise joins it.
            layer = layers - 1 if in_head else layer_of.get(name, layers - 1)
            part += f"layer_{layer}_"
            scale *= layer_decay ** (layers - 1 - layer)
        if backbone_lr_factor is not None:
            part += "head_" if in_head else "backbone_"
            scale *= 1.0 if in_head else backbone_lr_factor
        key = part + ("decay" if decay else "no_decay")
        group = groups.setdefault(
            key,
            {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr": lr * scale,
                "lr_scale": scale,
                "name": key,
                "head": in_head,
            },
        )
        group["params"].append(p)
    ordered = sorted(groups.values(), key=lambda g: (not g["head"], -g["lr_scale"]))
    for g in ordered:
        del g["head"]
    return ordered


def _layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Timm's layer id of every parameter (``group_matcher``), and the number of layers.

    Raises:
        ConfigError: the model has no ``group_matcher`` (not a timm model).
    """
    if not hasattr(model, "group_matcher"):
        raise ConfigError(
            f"optim.layer_decay: {type(model).__name__} has no timm group_matcher, so its "
            "layers have no order to decay along. Use a timm model (model.name=resnet18, "
            "convnext_atto, vit_tiny_patch16_224 ...) or optim.backbone_lr_factor instead."
        )
    from timm.models import group_parameters

    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    return layer_of, max(layer_of.values()) + 1


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Build ``optim.name`` over the model's parameter groups.

    Raises:
        ConfigError: the name is unknown, an ``optim.*`` key it ignores is set, or
            ``optim.nesterov`` is set without momentum.
    """
    entry = _OPTIMIZERS.get(cfg.name)
    refuse_unused(cfg, "optim", entry.uses | TRANSFER_KEYS, f"optimizer {cfg.name}")
    options = dict(entry.defaults)
    for key in entry.uses:
        value = getattr(cfg, key)
        if value is not None:
            options[key] = value
    if options.get("nesterov") and not options.get("momentum"):
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0.")
    head = find_head(model) if cfg.backbone_lr_factor or cfg.layer_decay else None
    groups = param_groups(
        model,
        cfg.weight_decay,
        cfg.decay_norm_bias,
        float(cfg.lr),
        head,
        cfg.backbone_lr_factor,
        cfg.layer_decay,
    )
    if not groups:
        raise ConfigError(
            f"every parameter of {type(model).__name__} is frozen (model.freeze): nothing "
            "would train. Freeze fewer modules."
        )
    return entry.build(groups, lr=cfg.lr, **options)


# Keys every optimizer honours: they shape the parameter groups, not the update rule.
TRANSFER_KEYS = frozenset({"backbone_lr_factor", "layer_decay"})
