"""A run's initial weights: read from disk or a library's cache, loaded, reported.

Sources (``model.weights``, ``model.backbone_weights``, the file ``model.pretrained``
resolves to): a visiontrain run directory or checkpoint (its evaluated weights: the EMA
when the run had ``train.ema``), an export folder holding ``model.safetensors``, a plain
state dict in ``.pt``/``.pth``/``.bin`` as timm and torchvision save them (read with
``torch.load(weights_only=True)``: a pickle that would run code is refused, never run),
or a ``.safetensors`` file (never unpickled). Matching and loading is
:mod:`visiontrain.models.weights`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontrain.config import Config
from visiontrain.engine.checkpoint import (
    FORMAT,
    eval_weights,
    load_checkpoint,
    read_safetensors,
    read_torch_file,
)
from visiontrain.errors import CheckpointError, ConfigError
from visiontrain.models.init import init_weights
from visiontrain.models.pretrained import PRETRAINED_FILES
from visiontrain.models.registry import external_model
from visiontrain.models.weights import (
    WeightsReport,
    WeightsSource,
    load_backbone_weights,
    load_weights,
)
from visiontrain.rundir import BEST_CHECKPOINT, CHECKPOINTS_DIR, LAST_CHECKPOINT

# Wrapper prefixes stripped from a state dict's keys: DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Nested state dicts in training checkpoints, in timm's order of preference (EMA first).
_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# An export folder's weights (``visiontrain export --format safetensors``).
EXPORTED_WEIGHTS = "model.safetensors"


def start_weights(cfg: Config, model: nn.Module) -> list[WeightsReport]:
    """Load the run's initial weights into ``model``; one report per source.

    In order: ``model.pretrained`` for a timm/torchvision classifier (the library's cached
    ImageNet file), ``model.weights`` (the whole model), ``model.backbone_weights`` (its
    backbone or encoder). Called when a run starts, never on a resume (the checkpoint
    holds the weights).

    Raises:
        CheckpointError: a weights file is missing, damaged or unsafe.
        ConfigError: the weights do not fit the model.
    """
    m = cfg.model
    loads: list[tuple[str, Callable[[], WeightsReport]]] = []
    external = external_model(m.name) if m.pretrained else None
    if external is not None:
        lib, real = external

        def pretrained() -> WeightsReport:
            path = PRETRAINED_FILES[lib](real)
            return load_weights(model, read_weights(path, "model.pretrained"), "model.pretrained")

        loads.append(("model.pretrained", pretrained))
    if m.weights:
        weights = m.weights
        loads.append(("model.weights", lambda: load_weights(model, read_weights(weights))))
    if m.backbone_weights:
        if cfg.task not in ("detection", "segmentation"):
            raise ConfigError(
                "model.backbone_weights is for detectors and segmenters (a classifier's "
                f"weights into their backbone); for task {cfg.task} use model.weights."
            )
        path = m.backbone_weights
        loads.append(
            (
                "model.backbone_weights",
                lambda: load_backbone_weights(model, read_weights(path, "model.backbone_weights")),
            )
        )
    reports = []
    for _, load in loads:
        report = load()
        if m.init != "default":
            # model.init ran before the weights: it now holds only where nothing loaded.
            _reinit(model, report, m.init)
        reports.append(report)
    return reports


def _reinit(model: nn.Module, report: WeightsReport, scheme: str) -> None:
    """Apply ``model.init`` to the modules whose weights did not come from the file."""
    fresh = {k.rsplit(".", 1)[0] for k in [*report.reinitialised, *report.missing]}
    prefix = f"{report.module}." if report.module else ""
    for name, module in model.named_modules():
        if name.removeprefix(prefix) in fresh or name in fresh:
            init_weights(module, scheme)


def read_weights(target: str | Path, key: str = "model.weights") -> WeightsSource:
    """Read a weights source (see the module docstring) without running any pickled code.

    Args:
        target: A run directory, export folder, checkpoint, state dict or safetensors file.
        key: The config key that named it, for messages.

    Raises:
        CheckpointError: the path is missing, unreadable, truncated, holds objects a safe
            load may not create, or holds no tensors.
    """
    path = Path(target).expanduser()
    if path.is_dir():
        path = _file_in_folder(path, key)
    if not path.is_file():
        raise CheckpointError(
            f"{key}={target}: no such file or folder. Pass a run directory, a checkpoint "
            "(RUN/checkpoints/best.pt), a state dict (.pt/.pth) or a .safetensors file."
        )
    if path.suffix == ".safetensors":
        return WeightsSource(path, "safetensors file", read_safetensors(path, f"{key}={path}"))
    return _read_torch(path, key)


def _file_in_folder(folder: Path, key: str) -> Path:
    for candidate in (
        folder / CHECKPOINTS_DIR / BEST_CHECKPOINT,
        folder / CHECKPOINTS_DIR / LAST_CHECKPOINT,
        folder / EXPORTED_WEIGHTS,
    ):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"{key}={folder} is a folder without checkpoints/best.pt, checkpoints/last.pt or "
        f"{EXPORTED_WEIGHTS}. Pass a run directory, an export folder or a weights file."
    )


def _read_torch(path: Path, key: str) -> WeightsSource:
    obj = read_torch_file(
        path,
        f"{key}={path}",
        not_torch=f"{key}={path} is not a PyTorch file (neither a zip archive nor a pickle). "
        "Pass a .pt/.pth state dict, a .safetensors file or a visiontrain checkpoint.",
        refused_fix="If you trust its origin, save its plain state dict "
        "(torch.save(model.state_dict(), 'weights.pt')) or a .safetensors file and pass that.",
        truncated_fix="Copy it again or pass another weights file.",
    )
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _from_checkpoint(path)
    kind = "state dict"
    if isinstance(obj, dict):
        for nested in _NESTED_KEYS:
            if isinstance(obj.get(nested), dict):
                obj, kind = obj[nested], f"state dict (its `{nested}` entry)"
                break
    state = _tensors_only(obj)
    if not state:
        raise CheckpointError(
            f"{key}={path} holds no weight tensors (a {type(obj).__name__}); pass a state "
            "dict: torch.save(model.state_dict(), path)."
        )
    return WeightsSource(path, f"{kind} ({path.suffix or 'no suffix'})", state)


def _from_checkpoint(path: Path) -> WeightsSource:
    """A visiontrain checkpoint, verified by its content hash; its evaluated weights."""
    state = load_checkpoint(path)
    ema = bool(state.get("ema"))
    kind = "visiontrain checkpoint" + (" (EMA weights)" if ema else "")
    return WeightsSource(path, kind, _tensors_only(eval_weights(state)))


def _tensors_only(obj: Any) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        return {}
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(k, str) and isinstance(v, torch.Tensor):
            for prefix in _WRAPPER_PREFIXES:
                while k.startswith(prefix):
                    k = k[len(prefix) :]
            out[k] = v
    return out
