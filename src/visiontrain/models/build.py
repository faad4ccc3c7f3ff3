"""A model from the config: a registered name or a user's own module, initialised, on a device."""

from __future__ import annotations

import torch
from torch import nn

from visiontrain.config import Config
from visiontrain.data.sources import DataBundle
from visiontrain.models import create_model
from visiontrain.models.init import init_weights


def build_model(cfg: Config, bundle: DataBundle, device: torch.device) -> nn.Module:
    """The configured model, initialised, on ``device``."""
    m = cfg.model
    model = create_model(
        m.name,
        num_classes=bundle.num_outputs,
        in_chans=bundle.in_channels,
        pretrained=m.pretrained,
        task=cfg.task,
        image_size=bundle.image_size,
        encoder=m.encoder,
        dropout=m.dropout,
        drop_path=m.drop_path,
        width=m.width,
        depth=m.depth,
        norm=m.norm,
    )
    init_weights(model, m.init)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
