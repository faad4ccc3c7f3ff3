"""Weight initialisation schemes for conv and linear layers (biases zeroed)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def _kaiming(w: torch.Tensor) -> None:
    nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")


def _xavier(w: torch.Tensor) -> None:
    nn.init.xavier_uniform_(w)


def _lecun(w: torch.Tensor) -> None:
    fan_in = nn.init._calculate_fan_in_and_fan_out(w)[0]
    nn.init.normal_(w, 0.0, 1.0 / math.sqrt(fan_in))


def _gpt(w: torch.Tensor) -> None:
    nn.init.normal_(w, 0.0, 0.02)


INIT_SCHEMES: dict[str, Callable[[torch.Tensor], None]] = {
    "kaiming": _kaiming,
    "xavier": _xavier,
    "lecun": _lecun,
    "gpt": _gpt,
}


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str) -> None:
    """Apply ``scheme`` to every conv and linear weight; ``default`` keeps the builder's."""
    if scheme == "default":
        return
    fn = INIT_SCHEMES[scheme]
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            fn(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
