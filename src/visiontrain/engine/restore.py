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
from visiontrain.engine.sharded import read_sharded
from visiontrain.engine.step import BatchPrep
from visiontrain.errors import CheckpointError, UserError
from visiontrain.models.build import build_model, freeze_batch_norm, place, user_model_class
from visiontrain.rundir import (
    BEST_CHECKPOINT,
    BEST_SHARDED,
    CHECKPOINTS_DIR,
    LAST_CHECKPOINT,
    LAST_SHARDED,
    is_sharded,
)


def resolve_checkpoint(target: str | Path) -> Path:
    """A run directory means its ``checkpoints/best.pt`` (else ``last.pt``).

    A run trained with ``train.strategy=fsdp`` has ``best.dcp/`` and ``last.dcp/``
    folders instead; such a folder may also be given itself.
    """
    path = Path(target).expanduser()
    if path.is_dir() and not is_sharded(path):
        for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
            if (path / CHECKPOINTS_DIR / name).is_file():
                return path / CHECKPOINTS_DIR / name
        for name in (BEST_SHARDED, LAST_SHARDED):
            if is_sharded(path / CHECKPOINTS_DIR / name):
                return path / CHECKPOINTS_DIR / name
        raise UserError(f"{path} holds no checkpoints/best.pt or last.pt; is it a run directory?")
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist. Pass a run directory (the last line `visiontrain train` "
            "prints) or a checkpoint file such as RUN/checkpoints/best.pt."
        )
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


def load_trained(
    target: str | Path, overrides: list[str] | None = None, model: nn.Module | None = None
) -> Loaded:
    """Rebuild the model of a checkpoint and load its weights (weights_only, verified).

    Args:
        target: A run directory (its best.pt, else last.pt) or a checkpoint file (or a
            sharded checkpoint's ``.dcp`` folder).
        overrides: ``key=value`` changes to the checkpoint's config (``data.root=...``).
        model: The module to load the weights into; required for a checkpoint of a
            user's own module (its class is not something a checkpoint can rebuild).

    Raises:
        CheckpointError: the file is missing, damaged or foreign, a user's module is
            needed but not given, or the weights do not fit the module.
    """
    path = resolve_checkpoint(target)
    # A sharded checkpoint (train.strategy=fsdp) is read whole, in this one process.
    state = read_sharded(path) if is_sharded(path) else load_checkpoint(path)
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
    own = user_model_class(cfg.model.name)
    if model is None and own is not None:
        raise CheckpointError(
            f"checkpoint {path} holds the weights of your own module {own}, which a "
            f"checkpoint cannot rebuild; pass one built as for training: "
            f"vt.load({str(target)!r}, model={own}(...))."
        )
    if model is not None:
        if cfg.model.freeze_bn:  # trained with FrozenBatchNorm2d: the same keys, as built
            model = freeze_batch_norm(model)
        model = place(model, cfg, device)  # its weights come from the checkpoint below
    else:
        cfg_model = cfg.model_copy(
            update={"model": cfg.model.model_copy(update={"pretrained": False})}
        )
        model = build_model(cfg_model, shell, device)
    try:
        model.load_state_dict(eval_weights(state))
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit model {own or cfg.model.name} "
            f"({_mismatch(exc)})."
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


def _mismatch(exc: RuntimeError) -> str:
    """The first lines of a ``load_state_dict`` error: its heading and the first key."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return " ".join(lines[:2])[:400]
