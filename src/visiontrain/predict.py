"""Load a trained model for ``eval`` and ``predict``: a run, a checkpoint, or an export.

An exported artifact (``model.pt2`` / ``model.onnx`` from ``visiontrain export``) takes
uint8 NCHW images with the normalisation inside; the ``model.json`` beside it says how
images are fitted, the class names and the task state, so ``predict`` gives the same rows
as with the checkpoint (see docs/export.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from visiontrain.data.images import decode_file
from visiontrain.data.transforms import build_transform, fit_square
from visiontrain.engine.restore import Loaded, load_trained
from visiontrain.export.artifact import Exported, exported_outputs, is_artifact, load_exported

# ----------------------------------------------------------------------------- exports


def load_for_predict(target: str | Path) -> Loaded | Exported:
    """A run directory, checkpoint, or exported ``.pt2`` / ``.onnx`` artifact."""
    return load_exported(target) if is_artifact(target) else load_trained(target)


@torch.inference_mode()
def predict_outputs(
    loaded: Loaded | Exported, paths: list[Path], batch_size: int = 32
) -> list[Any]:
    """The model's output for each image file, in the file's own pixel frame.

    Classification and regression: the centre-cropped image as at evaluation, one output
    row per image. Detection and segmentation (``whole_image`` tasks): the whole image,
    longer side resized to the working size and padded to a square as the loader does;
    the task maps its outputs back to the file's pixels (:meth:`Task.to_file_frame`).
    """
    from visiontrain.tasks.base import task_class

    task = task_class(loaded.task)
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
        if isinstance(loaded, Exported):
            out = exported_outputs(loaded, torch.stack(images))
        else:
            out = task.infer(loaded.model, loaded.prep(torch.stack(images)))
        outputs.extend(task.to_file_frame(out, sizes, size))
    return outputs


def predict_files(
    loaded: Loaded | Exported,
    paths: list[Path],
    top_k: int = 1,
    score_threshold: float | None = None,
) -> list[dict[str, Any]]:
    """One row per image: its file and the task's prediction (with the saved threshold)."""
    from visiontrain.tasks.base import task_class

    if not paths:
        return []
    outputs = predict_outputs(loaded, paths)
    task_state = dict(loaded.task_state)
    if score_threshold is not None:
        task_state["score_threshold"] = score_threshold
    names = loaded.target_names or loaded.class_names
    rows = task_class(loaded.task).predictions(outputs, task_state, names, top_k)
    return [{"file": str(p), **row} for p, row in zip(paths, rows, strict=True)]
