"""The ``model.json`` format of an exported artifact, written and read here only.

A graph artifact (``model.pt2`` / ``model.onnx`` from ``visiontrain export``) takes uint8
NCHW images with the normalisation inside; a weights artifact (``model.safetensors``) is
the network's ``state_dict``, rebuilt for prediction from the config in ``model.json``.
The ``model.json`` beside either says how images are fitted, the class names, the task
state and the run's config, so ``predict`` gives the same rows as with the checkpoint
(see docs/export.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from visiontrain.config import build_config
from visiontrain.data.sources import DataBundle
from visiontrain.data.transforms import Normalizer
from visiontrain.engine.checkpoint import read_safetensors
from visiontrain.engine.restore import Loaded
from visiontrain.errors import UserError
from visiontrain.models.build import build_model, user_model_class
from visiontrain.rundir import CHECKPOINTS_DIR

# What to do about a damaged safetensors export.
EXPORT_AGAIN = "Export it again with `visiontrain export RUN --format safetensors`."

# The formats whose file holds the weights alone, not a traced program.
WEIGHTS_FORMATS = ("safetensors",)

ARTIFACT_SUFFIXES = (".pt2", ".onnx", ".safetensors")


META_FILE = "model.json"


META_FORMAT = "visiontrain-export"


Runner = Callable[[torch.Tensor], Any]


def is_artifact(target: str | Path) -> bool:
    """Whether ``target`` names an export rather than a run or checkpoint.

    An export is an artifact file, its ``model.json``, or the folder holding them (a
    folder with a ``model.json`` and no ``checkpoints/``: a run directory has those).
    """
    path = Path(target).expanduser()
    if path.suffix.lower() in ARTIFACT_SUFFIXES or path.name == META_FILE:
        return True
    return path.is_dir() and (path / META_FILE).is_file() and not (path / CHECKPOINTS_DIR).is_dir()


def artifact_path(target: str | Path) -> Path:
    """The artifact file ``target`` means: itself, or the one its ``model.json`` lists.

    Raises:
        UserError: the ``model.json`` is missing, or lists no artifact or several (then
            the file to load has to be named).
    """
    path = Path(target).expanduser()
    if path.suffix.lower() in ARTIFACT_SUFFIXES:
        return path
    folder = path if path.is_dir() else path.parent
    # read_meta takes an artifact's path and reads the model.json beside it.
    names = sorted(read_meta(folder / META_FILE).get("artifacts") or {})
    if len(names) != 1:
        listed = ", ".join(str(folder / n) for n in names) or "no artifact"
        raise UserError(
            f"{folder / META_FILE} describes {listed}; pass the artifact file to load "
            "rather than its folder or model.json."
        )
    return folder / names[0]


def _pt2_runner(path: Path, fix: str) -> Runner:
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


def _onnx_runner(path: Path, fix: str) -> Runner:
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


# The graph artifacts, by suffix: each loads its file into a Runner.
_RUNNERS: dict[str, Callable[[Path, str], Runner]] = {".pt2": _pt2_runner, ".onnx": _onnx_runner}


def load_runner(path: str | Path) -> Runner:
    """Load a graph artifact; the callable maps a uint8 NCHW batch to its outputs.

    Outputs are CPU tensors, or a tuple of them for several outputs (detection).

    Raises:
        UserError: the file is missing, truncated or not an artifact of its suffix, or
            it holds weights alone (``.safetensors``: :func:`load_exported` rebuilds it).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"exported model {path} does not exist; run `visiontrain export` first.")
    loader = _RUNNERS.get(path.suffix.lower())
    if loader is None:
        raise UserError(
            f"{path}: a program to run is a .pt2 or .onnx export"
            + (
                "; a .safetensors file holds weights, which load_exported rebuilds the model for."
                if path.suffix.lower() == ".safetensors"
                else "."
            )
        )
    fix = f"Export it again with `visiontrain export RUN --format {path.suffix[1:]}`."
    return loader(path, fix)


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


def artifact_entry(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``artifacts`` entry of ``model.json`` for the file ``path``.

    Raises:
        UserError: ``model.json`` does not list that file.
    """
    entry = (meta.get("artifacts") or {}).get(path.name)
    if not isinstance(entry, dict):
        raise UserError(
            f"{path.parent / META_FILE} does not describe {path.name} (it lists "
            f"{', '.join(meta.get('artifacts') or {}) or 'nothing'}); export again into this "
            "folder, or keep each artifact with its own model.json."
        )
    return entry


def load_exported(path: str | Path) -> Exported | Loaded:
    """Load an export and its ``model.json`` for ``predict`` (see docs/export.md).

    Args:
        path: The artifact file, its ``model.json``, or their folder (when it holds one
            artifact).

    Returns:
        For a graph artifact (pt2, onnx) the program with its description; for a weights
        artifact (safetensors) the model rebuilt from the config and loaded with the
        file's weights, as a run's checkpoint loads.
    """
    path = artifact_path(path)
    meta = read_meta(path)
    entry = artifact_entry(meta, path)
    if entry.get("format") in WEIGHTS_FORMATS:
        return load_weights(path, meta)
    run = load_runner(path)
    postprocess = None
    if meta["task"] == "detection":
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
    if "temperature" in task_state:
        # The graph divides its logits by the run's temperature itself (ExportModule).
        task_state["calibrated_inside"] = task_state.pop("temperature")
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


def load_weights(path: Path, meta: dict[str, Any]) -> Loaded:
    """The model of a weights artifact: rebuilt from ``meta``'s config, loaded from ``path``.

    Built from the description alone: ``model.pretrained`` off and ``model.weights`` /
    ``model.backbone_weights`` cleared, so nothing is downloaded or read but the file.

    Raises:
        UserError: ``model.json`` has no config, the config names your own module (which
            a description cannot rebuild), or the file is unreadable or does not fit.
    """
    where = path.parent / META_FILE
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"{where} has no `config` entry to rebuild the model from; export again.")
    cfg = build_config(meta["config"], source=f"config in {where}")
    own = user_model_class(cfg.model.name)
    if own is not None:
        raise UserError(
            f"{path} holds the weights of your own module {own}, which model.json cannot "
            f"rebuild: load them into one yourself (module.load_state_dict("
            f"safetensors.torch.load_file({str(path)!r}))), or predict from the run with "
            f"vt.load(RUN, model={own}(...))."
        )
    # Only the keys this config has: model.weights / backbone_weights are newer options.
    off = {"pretrained": False, "weights": None, "backbone_weights": None}
    fields = type(cfg.model).model_fields
    update = {k: v for k, v in off.items() if k in fields}
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=update)})
    prep = meta["preprocessing"]
    shell = DataBundle(
        train=None,
        val=None,
        test=None,
        class_names=list(meta.get("class_names") or []),
        target_names=list(meta.get("target_names") or []),
        in_channels=int(prep["channels"]),
        image_size=int(prep["image_size"]),
        mean=tuple(prep["mean"]),
        std=tuple(prep["std"]),
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg, shell, device)
    weights = read_safetensors(path, str(path), EXPORT_AGAIN)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(
            f"{path}: weights do not fit model {cfg.model.name} built from {where} "
            f"({_first_line(exc)}); export again."
        ) from None
    model.eval()
    return Loaded(
        cfg,
        model,
        {"task_state": dict(meta.get("task_state") or {}), "_path": str(path)},
        shell.class_names,
        shell.target_names,
        Normalizer(shell.mean, shell.std).to(device),
        shell.image_size,
        shell.in_channels,
        device,
    )


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


class DetectionPost:
    """The post-processing of a detection artifact: raw head outputs to detections.

    Runs torchvision's own ``postprocess_detections`` of the architecture (score filter,
    top-k per level, box decoding, clipping, batched NMS) with the stored anchors and
    parameters, so the detections equal the eager model's.

    Args:
        spec: The ``detection`` entry of ``model.json``.
        anchors: ``[anchors, 4]`` tensor of one image (``anchors.pt``).
    """

    def __init__(self, spec: dict[str, Any], anchors: torch.Tensor) -> None:
        from torchvision.models.detection import FCOS, RetinaNet
        from torchvision.models.detection import _utils as det_utils

        self.spec = spec
        self.per_level = [int(n) for n in spec["num_anchors_per_level"]]
        if anchors.shape != (sum(self.per_level), 4):
            raise UserError(
                f"anchors {tuple(anchors.shape)} do not match num_anchors_per_level "
                f"(total {sum(self.per_level)}); export again."
            )
        self.anchors = list(anchors.split(self.per_level))
        self.image_size = (int(spec["image_size"][0]), int(spec["image_size"][1]))
        coder = spec["box_coder"]
        # postprocess_detections reads only these attributes of the detector.
        self.box_coder = (
            det_utils.BoxLinearCoder(normalize_by_size=bool(coder["normalize_by_size"]))
            if coder["name"] == "BoxLinearCoder"
            else det_utils.BoxCoder(
                tuple(coder["weights"]), bbox_xform_clip=float(coder["bbox_xform_clip"])
            )
        )
        self.score_thresh = float(spec["score_thresh"])
        self.nms_thresh = float(spec["nms_thresh"])
        self.detections_per_img = int(spec["detections_per_img"])
        self.topk_candidates = int(spec["topk_candidates"])
        self._postprocess = {"fcos": FCOS, "retinanet": RetinaNet}[
            spec["architecture"]
        ].postprocess_detections

    @classmethod
    def from_folder(cls, spec: dict[str, Any], folder: Path) -> DetectionPost:
        """Load ``spec``'s anchors file from ``folder``, checking its sha256.

        Raises:
            UserError: the anchors file is missing, changed or unreadable.
        """
        path = folder / spec["anchors"]["file"]
        if not path.is_file():
            raise UserError(
                f"{path} is missing: a detection artifact needs the anchors file that "
                "`visiontrain export` writes beside it. Copy it along, or export again."
            )
        data = path.read_bytes()
        want = spec["anchors"].get("sha256")
        if want and hashlib.sha256(data).hexdigest() != want:
            raise UserError(f"{path} does not match the sha256 in model.json; export again.")
        try:
            anchors = torch.load(path, weights_only=True)
        except Exception as exc:  # zip and pickle errors alike mean an unusable file
            raise UserError(f"{path} is not a torch tensor file ({exc}); export again.") from None
        if not isinstance(anchors, torch.Tensor):
            raise UserError(f"{path} holds no tensor; export again.")
        return cls(spec, anchors)

    def __call__(self, outputs: tuple[torch.Tensor, ...]) -> list[dict[str, torch.Tensor]]:
        """Detections per image from the artifact's outputs (a batch).

        Returns:
            Per image ``boxes`` float32 [K, 4] (x1 y1 x2 y2, pixels of the fitted square),
            ``scores`` float32 [K] and ``labels`` int64 [K], 0-based class indices.
        """
        named = dict(zip(self.spec["outputs"], outputs, strict=True))
        n = len(outputs[0])
        split = {k: list(v.float().split(self.per_level, dim=1)) for k, v in named.items()}
        with torch.inference_mode():
            dets = self._postprocess(self, split, [self.anchors] * n, [self.image_size] * n)
        offset = int(self.spec["label_offset"])
        return [
            {
                "boxes": d["boxes"].float(),
                "scores": d["scores"].float(),
                "labels": d["labels"] - offset,
            }
            for d in dets
        ]


def detection_postprocess(
    outputs: tuple[torch.Tensor, ...], model_json: str | Path
) -> list[dict[str, torch.Tensor]]:
    """Detections from a detection artifact's outputs, as ``visiontrain predict`` makes them.

    Args:
        outputs: What the artifact returned for a batch of fitted uint8 images.
        model_json: The ``model.json`` beside the artifact (``anchors.pt`` next to it).

    Returns:
        One dict per image: ``boxes`` [K, 4] x1 y1 x2 y2 in the fitted square's pixels,
        ``scores`` [K], ``labels`` [K] 0-based indices into ``class_names``.
    """
    path = Path(model_json)
    meta = json.loads(path.read_text())
    if "detection" not in meta:
        raise UserError(f"{path} does not describe a detection artifact.")
    return DetectionPost.from_folder(meta["detection"], path.parent)(tuple(outputs))


def _categories(loaded: Loaded) -> dict[str, Any]:
    """Detection: the category id of each class, and where the ids come from."""
    if loaded.task != "detection":
        return {}
    state = loaded.task_state
    ids = state.get("category_ids") or list(range(1, len(loaded.class_names) + 1))
    from_dataset = state.get("category_ids_from") == "dataset"
    return {
        "categories": [
            {"id": int(i), "name": n} for i, n in zip(ids, loaded.class_names, strict=True)
        ],
        "category_ids": (
            "the dataset's own ids (its annotation file)"
            if from_dataset
            else "1..K in class order: the source has no category ids"
        ),
    }


def checkpoint_epoch(state: dict[str, Any]) -> int | None:
    """The epochs a checkpoint had completed (its ``counters``), None when it does not say."""
    done = (state.get("counters") or {}).get("epochs_done")
    return int(done) if done is not None else None


def describe(
    loaded: Loaded,
    fmt: str,
    artifact: Path,
    dynamic: bool,
    detection: dict[str, Any] | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    """The ``model.json`` contract: how to feed the artifact and read what it returns.

    Args:
        loaded: The checkpoint the artifact was made from.
        fmt: The artifact's format (``pt2``, ``onnx``, ``safetensors``).
        artifact: The artifact file, already written (its sha256 is recorded).
        dynamic: A graph artifact with a batch axis of any size (else batch 1).
        detection: The detection post-processing entry (detection graph artifacts).
        weights: A weights artifact: which of the checkpoint's weights it holds (``ema``
            or ``model``); its entry then says how to use them instead of a batch size.
    """
    from visiontrain.tasks.base import task_class
    from visiontrain.version import __version__

    norm = loaded.normalizer
    # The Normalizer keeps scale = 1/(255 std) and shift = -mean/std; undo for the record.
    std = (1.0 / (norm.scale.flatten() * 255.0)).tolist()
    mean = (-norm.shift.flatten() * torch.tensor(std)).tolist()
    whole = task_class(loaded.task).whole_image
    size = loaded.image_size
    outputs = {
        "classification": "output: float32 [N, classes] logits; probabilities by "
        f"{loaded.task_state.get('activation', 'softmax')}"
        + (
            f" (calibrated: already divided by the run's temperature "
            f"{loaded.task_state['temperature']:.6g})"
            if loaded.task_state.get("temperature", 1.0) != 1.0
            else ""
        ),
        "multilabel": "output: float32 [N, classes] logits; class c is present when "
        "sigmoid(logit_c) >= task_state.thresholds[c]"
        + (
            f" (calibrated: already divided by the run's temperature "
            f"{loaded.task_state['temperature']:.6g})"
            if loaded.task_state.get("temperature", 1.0) != 1.0
            else ""
        ),
        "regression": "output: float32 [N, targets] values in the targets' own units "
        "(de-standardised inside)",
        "segmentation": f"output: float32 [N, classes, {size}, {size}] logits per pixel of the "
        "fitted square; crop the padding and resize back to the file",
        "detection": "the detector head's raw outputs, fixed shapes, levels concatenated: "
        + ", ".join(
            f"{n}: float32 [{', '.join(map(str, s))}]"
            for n, s in (detection or {}).get("output_shapes", {}).items()
        )
        + "; detections by the Python post-processing described under `detection` "
        "(visiontrain.export.detection_postprocess)",
    }
    entry: dict[str, Any] = {"format": fmt}
    if weights is None:
        entry["batch"] = "dynamic" if dynamic else 1
    else:
        # The top-level input/output describe the graph artifacts; the weights are the
        # bare network, so their use is spelt out in their own entry.
        entry["weights"] = weights
        entry["usage"] = (
            "state_dict of the network that `config` builds (visiontrain rebuilds it: "
            "vt.load on this file); it takes float NCHW images normalised as preprocessing "
            "says, (x / 255 - mean) / std, and returns outputs before the task's "
            "post-processing (regression: standardised, * task_state.target_std + "
            "target_mean; detection: the torchvision detector's own output)"
        )
    entry["sha256"] = hashlib.sha256(artifact.read_bytes()).hexdigest()
    return {
        "format": META_FORMAT,
        "version": 1,
        # One entry per artifact in the folder: a pt2 and an onnx export share the rest.
        "artifacts": {artifact.name: entry},
        "task": loaded.task,
        "class_names": loaded.class_names,
        "target_names": loaded.target_names,
        **_categories(loaded),
        "task_state": loaded.task_state,
        "input": {
            "name": "images",
            "dtype": "uint8",
            "layout": "NCHW",
            "channels": loaded.in_channels,
            "height": size,
            "width": size,
            "range": "0..255",
            "batch": "see artifacts.<file>.batch: 1, or dynamic",
            "normalisation": "inside the model: (x / 255 - mean) / std",
        },
        "preprocessing": {
            "image_size": size,
            "channels": loaded.in_channels,
            "color": "RGB" if loaded.in_channels == 3 else "grayscale",
            "fit": "fit_square" if whole else "center_crop",
            "how": (
                "longer side resized to image_size (aspect kept, antialiased), padded with 0 "
                "right and bottom to a square"
                if whole
                else "shorter side resized to image_size (antialiased), then the centre "
                "image_size x image_size square"
            ),
            "mean": mean,
            "std": std,
        },
        # A detector's head outputs are a graph export's; its weights come without them.
        "output": (
            outputs[loaded.task]
            if detection is not None or loaded.task != "detection"
            else f"no graph artifact: see artifacts.{artifact.name}.usage"
        ),
        **({"detection": detection} if detection else {}),
        "source": {
            "checkpoint": str(loaded.state.get("_path", "")),
            "model": loaded.cfg.model.name,
            "epoch": checkpoint_epoch(loaded.state),
        },
        # The run's resolved config: what a weights artifact is rebuilt from.
        "config": loaded.cfg.to_dict(),
        "versions": {"visiontrain": __version__, "torch": torch.__version__},
    }


def _merge(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` plus the entries of other artifacts an existing model.json lists.

    Kept only when they come from the same checkpoint and their files are unchanged, so
    that model.json never vouches for an artifact of other weights.
    """
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return meta
    if old.get("source") != meta["source"]:
        return meta
    for name, entry in (old.get("artifacts") or {}).items():
        file = path.parent / name
        if name in meta["artifacts"] or not file.is_file():
            continue
        if hashlib.sha256(file.read_bytes()).hexdigest() == entry.get("sha256"):
            meta["artifacts"][name] = entry
            if "detection" in old and "detection" not in meta:
                # A weights export has no post-processing entry; the kept graph artifact
                # of the same checkpoint still needs its own (and its output line).
                meta.update(detection=old["detection"], output=old.get("output"))
    meta["artifacts"] = dict(sorted(meta["artifacts"].items()))
    return meta
