"""Exponential moving average of the weights, evaluated and checkpointed with the run."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEma:
    """A copy of the model whose weights trail the trained ones: ``e ← d·e + (1-d)·w``.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (as in
    TensorFlow's and timm's EMA), so an early evaluation is not dominated by the random
    initialisation. Buffers (BatchNorm statistics) are copied, not averaged. The update is
    one ``torch._foreach_lerp_`` on the device: no host sync.

    Args:
        model: the trained module (not a DDP or compile wrapper).
        decay: the decay once warmed up (``train.ema_decay``).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = [p for p in self.module.parameters() if p.is_floating_point()]
        live = [p.detach() for p in model.parameters() if p.is_floating_point()]
        torch._foreach_lerp_(ema, live, 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers(), strict=True):
            e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and the update count."""
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
