"""One registry of model builders: ``@register_model(name)``, ``create_model(name, ...)``.

Names resolve in order: registered builders, then ``timm:NAME``/``torchvision:NAME`` (or a
bare timm or torchvision classification model name). Options left ``None`` are dropped
so the builder's default applies; an option a model cannot honour is an error, never
silently ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from visiontrain.errors import ConfigError
from visiontrain.registry import Registry

ModelBuilder = Callable[..., nn.Module]


@dataclass(frozen=True)
class _ModelEntry:
    build: ModelBuilder
    tasks: frozenset[str]


_MODELS: Registry[_ModelEntry] = Registry("model", key="model.name")
# Tasks whose builders also get the working image size (detectors size their transforms
# and anchors with it).
SIZED_TASKS = frozenset({"detection", "segmentation"})


def register_model(
    name: str, tasks: tuple[str, ...] = ("classification", "multilabel", "regression")
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder ``fn(num_classes, in_chans, **options) -> nn.Module``.

    Builders for detection and segmentation also receive ``image_size``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    return _MODELS.decorator(name, lambda fn: _ModelEntry(fn, frozenset(tasks)))


def list_models(task: str | None = None) -> list[str]:
    """Registered (built-in) model names, optionally for one task.

    For classification and regression, timm and torchvision names also resolve.
    """
    _import_builtin()
    return [n for n, e in _MODELS.items() if task is None or task in e.tasks]


def _import_builtin() -> None:
    from visiontrain.models import dense, simple_cnn  # noqa: F401


def _timm(
    name: str,
    num_classes: int,
    in_chans: int,
    pretrained: bool,
    dropout: float | None = None,
    drop_path: float | None = None,
    **rest: Any,
) -> nn.Module:
    import timm

    _refuse(rest, f"timm model {name}")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if dropout is not None:
        kwargs["drop_rate"] = dropout
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"timm model {name} does not accept these options: {exc}") from None


def _torchvision(
    name: str,
    num_classes: int,
    in_chans: int,
    pretrained: bool,
    dropout: float | None = None,
    drop_path: float | None = None,
    **rest: Any,
) -> nn.Module:
    import torchvision

    _refuse(rest, f"torchvision model {name}")
    if drop_path is not None:
        raise ConfigError(
            f"torchvision model {name} has no drop-path option; use a timm model "
            "(e.g. model.name=resnet18 resolves through timm) or unset model.drop_path."
        )
    if pretrained:
        raise ConfigError(
            "model.pretrained=true with a torchvision model needs its ImageNet head; use the "
            "timm model of the same name, which swaps the head for your class count."
        )
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if dropout is not None:
        kwargs["dropout"] = dropout
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"torchvision model {name} does not accept these options ({exc}); unset "
            "model.dropout or use a timm model."
        ) from None
    if in_chans != 3:
        model = _GreyToRGB(model, in_chans)
    return model


class _GreyToRGB(nn.Module):
    """torchvision models expect 3 channels; repeat a single channel rather than refuse."""

    def __init__(self, model: nn.Module, in_chans: int) -> None:
        super().__init__()
        if in_chans != 1:
            raise ConfigError(
                f"torchvision models take 3 input channels, the data has {in_chans}; "
                "use a timm model (it adapts in_chans)."
            )
        self.model = model

    def forward(self, x):
        return self.model(x.expand(-1, 3, -1, -1))


def _refuse(opts: dict[str, Any], owner: str) -> None:
    left = {k: v for k, v in opts.items() if v is not None}
    if left:
        keys = ", ".join(f"`model.{k}`" for k in sorted(left))
        raise ConfigError(f"{keys} set, but {owner} does not use it. Remove the key.")


def _refuse_unknown(name: str, builder: ModelBuilder, opts: dict[str, Any]) -> None:
    """Refuse options the builder has no parameter for (instead of a TypeError)."""
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    _refuse({k: v for k, v in opts.items() if k not in params}, f"model {name}")


def external_model(name: str) -> tuple[str, str] | None:
    """Resolve a name to ("timm"|"torchvision", model name), or None for a registered one."""
    _import_builtin()
    if _MODELS.find(name) is not None:
        return None
    return _external(name)


def _external(name: str) -> tuple[str, str] | None:
    """Resolve a name to ("timm"|"torchvision", model name), or None."""
    prefix, sep, rest = name.partition(":")
    if sep:
        if prefix not in ("timm", "torchvision"):
            return None
        return prefix, rest
    import timm

    if timm.is_model(name):
        return "timm", name
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return "torchvision", name
    return None


def _external_names() -> list[str]:
    """The classification model names of timm and torchvision (for suggestions)."""
    import timm
    import torchvision

    return [*timm.list_models(), *torchvision.models.list_models(module=torchvision.models)]


def create_model(
    name: str,
    num_classes: int,
    in_chans: int,
    pretrained: bool = False,
    task: str = "classification",
    image_size: int | None = None,
    **options: Any,
) -> nn.Module:
    """Build a model by name; ``None`` options are dropped so builder defaults apply."""
    _import_builtin()
    opts = {k: v for k, v in options.items() if v is not None}
    entry = _MODELS.find(name)
    if entry is not None:
        if task not in entry.tasks:
            raise ConfigError(
                f"model {name} is not a {task} model (it serves "
                f"{', '.join(sorted(entry.tasks))}); for task {task} use "
                f"{', '.join(list_models(task)) or 'a timm/torchvision name'}."
            )
        if task in SIZED_TASKS:
            return entry.build(
                num_classes=num_classes,
                in_chans=in_chans,
                pretrained=pretrained,
                image_size=image_size,
                **opts,
            )
        if pretrained:
            raise ConfigError(
                f"model {name} has no pretrained weights; set model.pretrained=false."
            )
        _refuse_unknown(name, entry.build, opts)
        return entry.build(num_classes=num_classes, in_chans=in_chans, **opts)
    if task in SIZED_TASKS:
        # Only registered builders serve these tasks: suggest among that task's models.
        raise _MODELS.unknown(name, among=list_models(task), kind=f"{task} model")
    resolved = _external(name)
    if resolved is None:
        raise _MODELS.unknown(
            name,
            # Suggest among everything that would serve this task: built-ins, timm's and
            # torchvision's classifiers (`resnet181` → `resnet18`).
            among=[*list_models(task), *_external_names()],
            tail=f"Use a built-in ({', '.join(list_models(task))}), a timm name (e.g. "
            "resnet18, `timm:convnext_atto`) or `torchvision:NAME`.",
        )
    lib, real = resolved
    builder = _timm if lib == "timm" else _torchvision
    return builder(real, num_classes, in_chans, pretrained, **opts)
