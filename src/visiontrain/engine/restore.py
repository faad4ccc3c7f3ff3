"""A checkpoint back into the model it trained, in eval mode (eval, predict, export, report)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontrain.config import Config, build_config
from visiontrain.data.sources import DataBundle
from visiontrain.data.transforms import Normalizer
from visiontrain.engine.checkpoint import eval_weights, load_checkpoint
from visiontrain.engine.step import BatchPrep
from visiontrain.errors import CheckpointError, UserError
from visiontrain.models.build import build_model


def resolve_checkpoint(target: str | Path) -> Path:
    """A run directory means its ``checkpoints/best.pt`` (else ``last.pt``)."""
    path = Path(target).expanduser()
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise UserError(f"{path} holds no checkpoints/best.pt or last.pt; is it a run directory?")
    return path


@dataclass
class Loaded:
    """A model in eval mode with what is needed to feed it."""

    cfg: Config
    model: nn.Module
    state: dict[str, Any]
    class_names: list[str]
    target_names: list[str]
    normalizer: Normalizer
    image_size: int
    in_channels: int
    device: torch.device

    @property
    def task(self) -> str:
        """The task the model was trained for (``classification``, ``detection`` ...)."""
        return self.cfg.task

    @property
    def task_state(self) -> dict[str, Any]:
        """What predictions need besides the outputs (threshold, target scaling)."""
        return dict(self.state.get("task_state") or {})

    @property
    def prep(self) -> BatchPrep:
        """The batch preparation of the run's evaluation (normalisation, channels_last)."""
        return BatchPrep(self.device, self.normalizer, self.cfg.train.channels_last)


def load_trained(target: str | Path, overrides: list[str] | None = None) -> Loaded:
    """Rebuild the model of a checkpoint and load its weights (weights_only, verified)."""
    path = resolve_checkpoint(target)
    state = load_checkpoint(path)
    try:
        cfg = build_config(state["config"], overrides or [], source=f"config inside {path}")
        data = state["data"]
        names = list(data["class_names"])
        targets = list(data.get("target_names", []))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} lacks its data description ({exc}).") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shell = DataBundle(
        train=None,
        val=None,
        test=None,
        class_names=names,  # type: ignore[arg-type]
        target_names=targets,
        in_channels=data["in_channels"],
        image_size=data["image_size"],
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
    )
    cfg_model = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": False})})
    model = build_model(cfg_model, shell, device)
    try:
        model.load_state_dict(eval_weights(state))
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit model {cfg.model.name} "
            f"({str(exc).splitlines()[0]})."
        ) from None
    model.eval()
    return Loaded(
        cfg,
        model,
        state,
        names,
        targets,
        Normalizer(shell.mean, shell.std).to(device),
        data["image_size"],
        data["in_channels"],
        device,
    )
