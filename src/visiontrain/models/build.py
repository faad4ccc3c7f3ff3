"""A model from the config: a registered name or a user's own module, initialised, on a device."""

from __future__ import annotations

import torch
from torch import nn

from visiontrain.config import Config
from visiontrain.data.sources import DataBundle
from visiontrain.errors import ConfigError
from visiontrain.models import create_model
from visiontrain.models.init import init_weights
from visiontrain.models.registry import external_model

# ``model.name`` of a run that trained a user's own module: the prefix and its class name.
USER_MODEL_PREFIX = "custom:"


def user_model_name(model: nn.Module) -> str:
    """The ``model.name`` a run records for a user's own module."""
    return f"{USER_MODEL_PREFIX}{type(model).__name__}"


def user_model_class(name: str) -> str | None:
    """The class name of a user's module from a recorded ``model.name``, else None."""
    return name[len(USER_MODEL_PREFIX) :] if name.startswith(USER_MODEL_PREFIX) else None


# Options that shape a registered model; a user's own module is already built.
_SHAPE_KEYS = ("pretrained", "dropout", "drop_path", "width", "depth", "norm", "encoder")


def build_model(
    cfg: Config, bundle: DataBundle, device: torch.device, model: nn.Module | None = None
) -> nn.Module:
    """The configured model (or the user's ``model``), initialised, on ``device``.

    Args:
        cfg: The resolved config (``model.*``, ``train.channels_last``).
        bundle: The data (class count, channels, image size of a registered model).
        device: Where the model goes.
        model: A user's own module, used as it is: ``model.init`` (default: keep its own
            initialisation) and ``channels_last`` still apply.

    Raises:
        ConfigError: a ``model.*`` option that shapes a registered model was set for a
            user's own module (it would be ignored).
    """
    m = cfg.model
    if model is not None:
        # Compared with the defaults (not fields_set): a config round-tripped through a
        # dict (a checkpoint, vt.resolve_config) marks every key as set.
        defaults = type(m).model_fields
        shaping = [k for k in _SHAPE_KEYS if getattr(m, k) != defaults[k].default]
        if shaping:
            keys = ", ".join(f"model.{k}" for k in shaping)
            raise ConfigError(
                f"{keys} set, but your own {type(model).__name__} is used as built: options "
                "that shape a registered model would be ignored. Remove them (or build them "
                "into your module)."
            )
    else:
        model = create_model(
            m.name,
            num_classes=bundle.num_outputs,
            in_chans=bundle.in_channels,
            # A timm or torchvision classifier's pretrained weights are read from the
            # library's cache by start_weights (models/weights.py), which reports them.
            pretrained=m.pretrained and external_model(m.name) is None,
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
    if m.freeze_bn:
        model = freeze_batch_norm(model)
    return place(model, cfg, device)


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """``model.freeze_bn``: every BatchNorm2d becomes a FrozenBatchNorm2d (timm's converter).

    Its statistics and affine parameters become buffers: they neither train nor move
    with small batches, and the state-dict keys stay those of BatchNorm (less
    ``num_batches_tracked``), so weights load either way.

    Raises:
        ConfigError: the model has no BatchNorm2d layer (the option would do nothing).
    """
    from timm.layers import freeze_batch_norm_2d

    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if norms == 0:
        raise ConfigError(
            f"model.freeze_bn=true, but {type(model).__name__} has no BatchNorm layer to "
            "freeze (it normalises otherwise). Remove the key."
        )
    return freeze_batch_norm_2d(model)


def place(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """``model`` on ``device``, in ``channels_last`` when ``train.channels_last`` asks."""
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
