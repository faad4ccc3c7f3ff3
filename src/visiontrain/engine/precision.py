"""Mixed precision: autocast context and (for fp16) a GradScaler."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from visiontrain.errors import ConfigError

_DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Everything the loop needs to run at ``train.precision``."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.name = precision
        self.dtype = _DTYPES[precision]
        self.device_type = device.type
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                "train.precision=bf16 but this GPU has no bfloat16 support; use fp16 or 32."
            )
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self) -> Any:
        """Context manager that runs the forward pass at the chosen precision."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)
