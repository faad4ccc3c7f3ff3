"""Predictions from a run, a checkpoint or an exported artifact (``predict``, ``vt.load``).

An exported artifact (``model.pt2`` / ``model.onnx`` from ``visiontrain export``) takes
uint8 NCHW images with the normalisation inside; the ``model.json`` beside it says how
images are fitted, the class names and the task state, so ``predict`` gives the same rows
as with the checkpoint (see docs/export.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontrain.data.images import LOADER_SKIP, decode_file
from visiontrain.data.transforms import build_transform, fit_square
from visiontrain.data.user import to_uint8_chw
from visiontrain.engine.restore import Loaded, load_trained
from visiontrain.errors import DataError, UserError
from visiontrain.export.artifact import Exported, exported_outputs, is_artifact, load_exported


def load_for_predict(target: str | Path, model: nn.Module | None = None) -> Loaded | Exported:
    """A run directory, checkpoint, or exported ``.pt2`` / ``.onnx`` artifact.

    Args:
        target: What to load.
        model: The module for a checkpoint of a user's own module.
    """
    return load_exported(target) if is_artifact(target) else load_trained(target, model=model)


# What predict takes instead of the loaders' data.on_error=skip.
_PREDICT_HINT = "on_error='skip' (predict --on-error skip) to predict the other images"


def _image(item: Any, channels: int) -> torch.Tensor:
    """A uint8 CHW tensor from a path, a PIL image, a numpy array or a tensor."""
    if isinstance(item, str | Path):
        try:
            return decode_file(Path(item), channels)
        except DataError as exc:
            raise DataError(str(exc).replace(LOADER_SKIP, _PREDICT_HINT)) from None
    if channels == 1 and getattr(item, "ndim", 0) == 3 and 3 in (item.shape[0], item.shape[-1]):
        # An RGB array or tensor for a grey model: the luma a file decodes to.
        from torchvision.transforms.v2.functional import rgb_to_grayscale

        rgb = to_uint8_chw(item, 3, f"the image given ({type(item).__name__})")
        return rgb_to_grayscale(rgb)
    return to_uint8_chw(item, channels, f"the image given ({type(item).__name__})")


@torch.inference_mode()
def predict_outputs(
    loaded: Loaded | Exported,
    images: list[Any],
    batch_size: int = 32,
    errors: dict[int, str] | None = None,
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
        errors: When given, an unreadable image is skipped and its message stored here
            under its index (its output is None); otherwise it raises.

    Raises:
        DataError: an unreadable image (without ``errors``), naming the file.
    """
    from visiontrain.tasks.base import task_class

    task = task_class(loaded.task)
    size = loaded.image_size
    transform = (
        None
        if task.whole_image
        else build_transform("none", size, loaded.in_channels, False, False)
    )
    outputs: list[Any] = [None] * len(images)
    for i in range(0, len(images), batch_size):
        batch, kept = [], []
        for j, item in enumerate(images[i : i + batch_size], start=i):
            try:
                batch.append(_image(item, loaded.in_channels))
            except DataError as exc:
                if errors is None:
                    raise
                errors[j] = str(exc)
                continue
            kept.append(j)
        if not batch:
            continue
        sizes = [tuple(im.shape[-2:]) for im in batch]
        if task.whole_image:
            batch = [fit_square(im, size) for im in batch]
        elif transform is not None:
            batch = [transform(im) for im in batch]
        if isinstance(loaded, Exported):
            out = exported_outputs(loaded, torch.stack(batch))
        else:
            out = task.infer(loaded.model, loaded.prep(torch.stack(batch)))
        for j, item in zip(kept, task.to_file_frame(out, sizes, size), strict=True):
            outputs[j] = item
    return outputs


def predict_images(
    loaded: Loaded | Exported,
    images: list[Any],
    top_k: int = 1,
    score_threshold: float | None = None,
    batch_size: int = 32,
    on_error: str = "raise",
) -> list[dict[str, Any]]:
    """One row per image: its file (or index) and the task's prediction.

    The rows ``visiontrain predict`` prints, with the threshold chosen at training.

    Args:
        loaded: A checkpoint's model or an exported artifact.
        images: Image files, PIL images, numpy arrays (HWC) or uint8 tensors (CHW).
        top_k: Classification: also rank the ``k`` best classes.
        score_threshold: Detection: keep boxes scoring at least this.
        batch_size: Images per forward.
        on_error: ``raise`` stops at an unreadable image; ``skip`` gives it a row with its
            ``error`` instead of a prediction.
    """
    from visiontrain.tasks.base import task_class

    if on_error not in ("raise", "skip"):
        raise UserError(f"on_error={on_error!r}: use 'raise' or 'skip'.")
    if not images:
        return []
    errors: dict[int, str] | None = {} if on_error == "skip" else None
    outputs = predict_outputs(loaded, images, batch_size, errors)
    task_state = dict(loaded.task_state)
    if score_threshold is not None:
        task_state["score_threshold"] = score_threshold
    names = loaded.target_names or loaded.class_names
    good = [i for i, out in enumerate(outputs) if out is not None]
    predicted = task_class(loaded.task).predictions(
        [outputs[i] for i in good], task_state, names, top_k
    )
    rows: list[dict[str, Any]] = [{"error": (errors or {}).get(i, "")} for i in range(len(images))]
    for i, row in zip(good, predicted, strict=True):
        rows[i] = row
    return [
        {"file": str(item)} | row if isinstance(item, str | Path) else {"index": i} | row
        for i, (item, row) in enumerate(zip(images, rows, strict=True))
    ]


def predict_files(
    loaded: Loaded | Exported,
    paths: list[Path],
    top_k: int = 1,
    score_threshold: float | None = None,
    on_error: str = "raise",
) -> list[dict[str, Any]]:
    """One row per image file: its path and the task's prediction (``visiontrain predict``)."""
    return predict_images(loaded, list(paths), top_k, score_threshold, on_error=on_error)


def output_paths(files: list[str], out_dir: Path) -> dict[str, Path]:
    """A distinct ``.png`` under ``out_dir`` for every input file, by its relative path.

    Inputs keep their folders below the deepest folder they share, so ``a/000.png`` and
    ``b/000.png`` become ``out/a/000.png`` and ``out/b/000.png``; two files that differ only
    in their suffix (``x.jpg``, ``x.png``) keep it (``x.jpg.png``). The same file given twice
    maps to one output.
    """
    resolved = {f: Path(f).resolve() for f in files}
    parents = [str(r.parent) for r in resolved.values()]
    common = Path(os.path.commonpath(parents)) if parents else Path()
    out: dict[str, Path] = {}
    taken: dict[Path, Path] = {}
    for file, real in resolved.items():
        rel = real.relative_to(common)
        path = out_dir / rel.with_suffix(".png")
        if taken.get(path, real) != real:
            path = out_dir / rel.with_name(rel.name + ".png")
        taken[path] = real
        out[file] = path
    return out


def write_masks(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Save each predicted mask as a PNG of class indices; the row names its file."""
    from PIL import Image

    from visiontrain.io import atomic_write

    rows = [row for row in rows if "error" not in row]  # unreadable: nothing to write
    paths = output_paths([row["file"] for row in rows], out_dir)
    for row in rows:
        path = paths[row["file"]]
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(row["mask"].numpy())
        atomic_write(path, lambda fh, image=image: image.save(fh, format="PNG"))
        row["mask"] = str(path)


def draw_boxes(rows: list[dict[str, Any]], out_dir: Path, names: list[str]) -> None:
    """Save each image with its detections drawn and labelled; the row names its file."""
    from torchvision.io import encode_png
    from torchvision.utils import draw_bounding_boxes

    from visiontrain.io import atomic_write

    rows = [row for row in rows if "error" not in row]  # unreadable: nothing to draw
    paths = output_paths([row["file"] for row in rows], out_dir)
    for row in rows:
        image = decode_file(Path(row["file"]), 3)
        dets = row["detections"]
        if dets:
            boxes = torch.tensor([d["box"] for d in dets], dtype=torch.float32)
            labels = [f"{d['class']} {d['score']:.2f}" for d in dets]
            image = draw_bounding_boxes(image, boxes, labels, width=2)
        path = paths[row["file"]]
        path.parent.mkdir(parents=True, exist_ok=True)
        png = encode_png(image).numpy().tobytes()
        atomic_write(path, lambda fh, png=png: fh.write(png))
        row["drawn"] = str(path)
