"""Load a trained model from a run or checkpoint, for ``eval`` and ``predict``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontrain.config import Config, build_config
from visiontrain.data.images import decode_file
from visiontrain.data.sources import DataBundle
from visiontrain.data.transforms import Normalizer, build_transform, fit_square
from visiontrain.engine.build import build_model
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.errors import CheckpointError, UserError


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
        model.load_state_dict(state["model"])
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


@torch.inference_mode()
def predict_outputs(loaded: Loaded, paths: list[Path], batch_size: int = 32) -> list[Any]:
    """The model's output for each image file, in the file's own pixel frame.

    Classification and regression: the centre-cropped image as at evaluation, one output
    row per image. Detection and segmentation (``whole_image`` tasks): the whole image,
    longer side resized to the working size and padded to a square as the loader does;
    the task maps its outputs back to the file's pixels (:meth:`Task.to_file_frame`).
    """
    from visiontrain.tasks.base import task_class

    task = task_class(loaded.cfg.task)
    size = loaded.image_size
    transform = (
        None
        if task.whole_image
        else build_transform("none", size, loaded.in_channels, False, False)
    )
    outputs: list[Any] = []
    for i in range(0, len(paths), batch_size):
        images = [decode_file(p, loaded.in_channels) for p in paths[i : i + batch_size]]
        sizes = [tuple(im.shape[-2:]) for im in images]
        if task.whole_image:
            images = [fit_square(im, size) for im in images]
        elif transform is not None:
            images = [transform(im) for im in images]
        x = loaded.normalizer(torch.stack(images).to(loaded.device))
        outputs.extend(task.to_file_frame(task.infer(loaded.model, x), sizes, size))
    return outputs


def predict_files(
    loaded: Loaded, paths: list[Path], top_k: int = 1, score_threshold: float | None = None
) -> list[dict[str, Any]]:
    """One row per image: its file and the task's prediction (with the saved threshold)."""
    from visiontrain.tasks.base import task_class

    if not paths:
        return []
    outputs = predict_outputs(loaded, paths)
    task_state = dict(loaded.state.get("task_state") or {})
    if score_threshold is not None:
        task_state["score_threshold"] = score_threshold
    names = loaded.target_names or loaded.class_names
    rows = task_class(loaded.cfg.task).predictions(outputs, task_state, names, top_k)
    return [{"file": str(p), **row} for p, row in zip(paths, rows, strict=True)]
