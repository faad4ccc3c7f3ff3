"""Predictions from a run, a checkpoint or an exported artifact (``predict``, ``vt.load``).

An exported artifact (``model.pt2`` / ``model.onnx`` from ``visiontrain export``) takes
uint8 NCHW images with the normalisation inside; the ``model.json`` beside it says how
images are fitted, the class names and the task state, so ``predict`` gives the same rows
as with the checkpoint (see docs/export.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontrain.data.images import decode_file
from visiontrain.data.transforms import build_transform, fit_square
from visiontrain.data.user import to_uint8_chw
from visiontrain.engine.restore import Loaded, load_trained
from visiontrain.export.artifact import Exported, exported_outputs, is_artifact, load_exported


def load_for_predict(target: str | Path, model: nn.Module | None = None) -> Loaded | Exported:
    """A run directory, checkpoint, or exported ``.pt2`` / ``.onnx`` artifact.

    Args:
        target: What to load.
        model: The module for a checkpoint of a user's own module.
    """
    return load_exported(target) if is_artifact(target) else load_trained(target, model=model)


def _image(item: Any, channels: int) -> torch.Tensor:
    """A uint8 CHW tensor from a path, a PIL image, a numpy array or a tensor."""
    if isinstance(item, str | Path):
        return decode_file(Path(item), channels)
    if channels == 1 and getattr(item, "ndim", 0) == 3 and 3 in (item.shape[0], item.shape[-1]):
        # An RGB array or tensor for a grey model: the luma a file decodes to.
        from torchvision.transforms.v2.functional import rgb_to_grayscale

        rgb = to_uint8_chw(item, 3, f"the image given ({type(item).__name__})")
        return rgb_to_grayscale(rgb)
    return to_uint8_chw(item, channels, f"the image given ({type(item).__name__})")


@torch.inference_mode()
def predict_outputs(
    loaded: Loaded | Exported, images: list[Any], batch_size: int = 32
) -> list[Any]:
    """The model's output for each image, in the image's own pixel frame.

    Classification and regression: the centre-cropped image as at evaluation, one output
    row per image. Detection and segmentation (``whole_image`` tasks): the whole image,
    longer side resized to the working size and padded to a square as the loader does;
    the task maps its outputs back to the image's pixels (:meth:`Task.to_file_frame`).

    Args:
        loaded: A checkpoint's model or an exported artifact.
        images: Image files, PIL images, numpy arrays (HWC) or uint8 tensors (CHW).
        batch_size: Images per forward.
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
    for i in range(0, len(images), batch_size):
        batch = [_image(item, loaded.in_channels) for item in images[i : i + batch_size]]
        sizes = [tuple(im.shape[-2:]) for im in batch]
        if task.whole_image:
            batch = [fit_square(im, size) for im in batch]
        elif transform is not None:
            batch = [transform(im) for im in batch]
        if isinstance(loaded, Exported):
            out = exported_outputs(loaded, torch.stack(batch))
        else:
            out = task.infer(loaded.model, loaded.prep(torch.stack(batch)))
        outputs.extend(task.to_file_frame(out, sizes, size))
    return outputs


def predict_images(
    loaded: Loaded | Exported,
    images: list[Any],
    top_k: int = 1,
    score_threshold: float | None = None,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """One row per image: its file (or index) and the task's prediction.

    The rows ``visiontrain predict`` prints, with the threshold chosen at training.

    Args:
        loaded: A checkpoint's model or an exported artifact.
        images: Image files, PIL images, numpy arrays (HWC) or uint8 tensors (CHW).
        top_k: Classification: also rank the ``k`` best classes.
        score_threshold: Detection: keep boxes scoring at least this.
        batch_size: Images per forward.
    """
    from visiontrain.tasks.base import task_class

    if not images:
        return []
    outputs = predict_outputs(loaded, images, batch_size)
    task_state = dict(loaded.task_state)
    if score_threshold is not None:
        task_state["score_threshold"] = score_threshold
    names = loaded.target_names or loaded.class_names
    rows = task_class(loaded.task).predictions(outputs, task_state, names, top_k)
    return [
        {"file": str(item)} | row if isinstance(item, str | Path) else {"index": i} | row
        for i, (item, row) in enumerate(zip(images, rows, strict=True))
    ]


def predict_files(
    loaded: Loaded | Exported,
    paths: list[Path],
    top_k: int = 1,
    score_threshold: float | None = None,
) -> list[dict[str, Any]]:
    """One row per image file: its path and the task's prediction (``visiontrain predict``)."""
    return predict_images(loaded, list(paths), top_k, score_threshold)


def write_masks(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Save each predicted mask as a PNG of class indices; the row keeps its path."""
    from PIL import Image

    from visiontrain.io import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        path = out_dir / f"{Path(row['file']).stem}.png"
        image = Image.fromarray(row["mask"].numpy())
        atomic_write(path, lambda fh, image=image: image.save(fh, format="PNG"))
        row["mask"] = str(path)


def draw_boxes(rows: list[dict[str, Any]], out_dir: Path, names: list[str]) -> None:
    """Save each image with its detections drawn and labelled."""
    import torch
    from torchvision.io import write_png
    from torchvision.utils import draw_bounding_boxes

    from visiontrain.data.images import decode_file

    out_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        image = decode_file(Path(row["file"]), 3)
        dets = row["detections"]
        if dets:
            boxes = torch.tensor([d["box"] for d in dets], dtype=torch.float32)
            labels = [f"{d['class']} {d['score']:.2f}" for d in dets]
            image = draw_bounding_boxes(image, boxes, labels, width=2)
        write_png(image, str(out_dir / f"{Path(row['file']).stem}.png"))
