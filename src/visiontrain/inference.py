"""Load a trained model for ``eval`` and ``predict``: a run, a checkpoint, or an export.

An exported artifact (``model.pt2`` / ``model.onnx`` from ``visiontrain export``) takes
uint8 NCHW images with the normalisation inside; the ``model.json`` beside it says how
images are fitted, the class names and the task state, so ``predict`` gives the same rows
as with the checkpoint (see docs/export.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
from visiontrain.engine.checkpoint import eval_weights, load_checkpoint
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

    @property
    def task(self) -> str:
        """The task the model was trained for (``classification``, ``detection`` ...)."""
        return self.cfg.task

    @property
    def task_state(self) -> dict[str, Any]:
        """What predictions need besides the outputs (threshold, target scaling)."""
        return dict(self.state.get("task_state") or {})


# ----------------------------------------------------------------------------- exports

ARTIFACT_SUFFIXES = (".pt2", ".onnx")
META_FILE = "model.json"
META_FORMAT = "visiontrain-export"
Runner = Callable[[torch.Tensor], Any]


def is_artifact(target: str | Path) -> bool:
    """Whether ``target`` names an exported model file rather than a run or checkpoint."""
    return Path(target).suffix.lower() in ARTIFACT_SUFFIXES


def load_runner(path: str | Path) -> Runner:
    """Load an exported artifact; the callable maps a uint8 NCHW batch to its outputs.

    Outputs are CPU tensors, or a tuple of them for several outputs (detection).

    Raises:
        UserError: the file is missing, truncated or not an artifact of its suffix.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"exported model {path} does not exist; run `visiontrain export` first.")
    fix = "Export it again with `visiontrain export RUN --format " + path.suffix[1:] + "`."
    if path.suffix.lower() == ".pt2":
        try:
            module = torch.export.load(str(path)).module()
        except Exception as exc:  # zip, pickle and graph errors all mean an unusable file
            raise UserError(
                f"{path} is truncated or not a torch.export archive ({_first_line(exc)}). {fix}"
            ) from None

        def run_pt2(images: torch.Tensor) -> Any:
            with torch.inference_mode():
                return module(images.cpu())

        return run_pt2
    if path.suffix.lower() == ".onnx":
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf classes
            raise UserError(
                f"{path} is truncated or not an ONNX model ({_first_line(exc)}). {fix}"
            ) from None
        name = session.get_inputs()[0].name

        def run_onnx(images: torch.Tensor) -> Any:
            outs = [torch.from_numpy(o) for o in session.run(None, {name: images.cpu().numpy()})]
            return outs[0] if len(outs) == 1 else tuple(outs)

        return run_onnx
    raise UserError(f"{path}: exported models end in .pt2 or .onnx.")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def read_meta(artifact: str | Path) -> dict[str, Any]:
    """The ``model.json`` beside an exported artifact.

    Raises:
        UserError: it is missing or not a visiontrain export description.
    """
    path = Path(artifact).parent / META_FILE
    if not path.is_file():
        raise UserError(
            f"{path} is missing: an exported model needs the model.json that `visiontrain "
            f"export` writes beside it (image size, normalisation, class names). Copy it next "
            f"to {Path(artifact).name}, or export again."
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{path} is not readable JSON ({_first_line(exc)}); export again."
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise UserError(f"{path} is not a visiontrain export description (no format entry).")
    return meta


@dataclass
class Exported:
    """An exported artifact with its ``model.json``, ready for ``predict``."""

    path: Path
    meta: dict[str, Any]
    run: Runner
    task: str
    class_names: list[str]
    target_names: list[str]
    task_state: dict[str, Any]
    image_size: int
    in_channels: int
    batch: int | None  # the one batch size the artifact takes, None when dynamic
    # Detection: raw head outputs to detections (visiontrain.export.DetectionPost).
    postprocess: Callable[[tuple[torch.Tensor, ...]], list[dict[str, torch.Tensor]]] | None = None


def load_exported(path: str | Path) -> Exported:
    """Load an exported artifact and its ``model.json`` (see docs/export.md)."""
    path = Path(path).expanduser()
    meta = read_meta(path)
    entry = (meta.get("artifacts") or {}).get(path.name)
    if entry is None:
        raise UserError(
            f"{path.parent / META_FILE} does not describe {path.name} (it lists "
            f"{', '.join(meta.get('artifacts') or {}) or 'nothing'}); export again into this "
            "folder, or keep each artifact with its own model.json."
        )
    run = load_runner(path)
    postprocess = None
    if meta["task"] == "detection":
        from visiontrain.export import DetectionPost

        if not isinstance(meta.get("detection"), dict):
            raise UserError(
                f"{path.parent / META_FILE} has no `detection` entry (anchors and "
                "post-processing parameters); export again with this visiontrain."
            )
        postprocess = DetectionPost.from_folder(meta["detection"], path.parent)
    task_state = dict(meta.get("task_state") or {})
    targets = list(meta.get("target_names") or [])
    if meta["task"] == "regression":
        # The artifact de-standardises inside, so the rows need the identity scaling.
        task_state.update(target_mean=[0.0] * len(targets), target_std=[1.0] * len(targets))
    return Exported(
        path,
        meta,
        run,
        meta["task"],
        list(meta.get("class_names") or []),
        targets,
        task_state,
        int(meta["input"]["height"]),
        int(meta["input"]["channels"]),
        entry["batch"] if isinstance(entry["batch"], int) else None,
        postprocess,
    )


def load_for_predict(target: str | Path) -> Loaded | Exported:
    """A run directory, checkpoint, or exported ``.pt2`` / ``.onnx`` artifact."""
    return load_exported(target) if is_artifact(target) else load_trained(target)


def exported_outputs(exported: Exported, images: torch.Tensor) -> Any:
    """Run an artifact on a uint8 batch, shaped as the task's ``infer`` returns it.

    A fixed-batch artifact runs image by image. Detection artifacts return the head's raw
    outputs; the Python post-processing (score filter, NMS) turns them into the task's
    list of dicts, as the eager detector would.
    """
    if exported.postprocess is not None:
        if exported.batch is None:
            return exported.postprocess(tuple(exported.run(images)))
        dets = []
        for i in range(len(images)):
            dets.extend(exported.postprocess(tuple(exported.run(images[i : i + 1]))))
        return dets
    if exported.batch is None:
        return exported.run(images).float()
    return torch.cat([exported.run(images[i : i + 1]).float() for i in range(len(images))])


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
            out = task.infer(loaded.model, loaded.normalizer(torch.stack(images).to(loaded.device)))
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
