"""``visiontrain export``: a run's best weights as ``.pt2``, ``.onnx`` or ``.safetensors``.

Each ``--format`` is an entry of :data:`FORMATS`: its writer and the options it has no
use for (refused, not ignored).

The graph formats (pt2, onnx) export a module that takes what a deployment has in hand:
uint8 images, NCHW, already fitted to the working size (centre crop, or letterbox for
whole-image tasks). The normalisation (and, for regression, the de-standardisation of the
targets) is inside, so the artifact's outputs are what ``predict`` turns into rows.
Detection (one-stage: FCOS, RetinaNet) exports the network only: its outputs are the
head's raw tensors, and the data-dependent post-processing (score filter, NMS) runs in
Python with the anchors and parameters stored beside the artifact (:class:`DetectionPost`).
Nothing is declared done before a fresh Python process has loaded the file and matched
the eager model on real validation images (:mod:`visiontrain.export.check`).

safetensors writes the weights the run evaluates with (the EMA under ``train.ema``) and
nothing else; it is read back and compared bit for bit with the checkpoint's.

``model.json`` beside any artifact says how to prepare images and read the outputs, and
holds the run's config (docs/export.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save as save_safetensors
from torch import nn

from visiontrain.engine.checkpoint import eval_weights, read_safetensors
from visiontrain.engine.restore import Loaded, load_trained, resolve_checkpoint
from visiontrain.errors import EXIT_FAILURE, EXIT_OK, UserError
from visiontrain.export.artifact import (
    EXPORT_AGAIN,
    META_FILE,
    _merge,
    artifact_entry,
    checkpoint_epoch,
    describe,
    is_artifact,
    read_meta,
)
from visiontrain.io import atomic_write, atomic_write_json
from visiontrain.rundir import CHECKPOINTS_DIR
from visiontrain.version import __version__

DEFAULT_TOLERANCE = 1e-4
DEFAULT_LATENCY_RUNS = 20
# Enough images to exercise every output unit; few enough for a quick check.
CHECK_IMAGES = 64
LATENCY_BATCHES = (1, 32)


class ExportModule(nn.Module):
    """What is exported: uint8 NCHW images in, the task's outputs out.

    Classification and multilabel: logits. Regression: values in the targets' own units.
    Segmentation: logits per pixel at the working size. Detection has its own:
    :class:`DetectionNetwork`.
    """

    def __init__(self, loaded: Loaded) -> None:
        super().__init__()
        self.model = loaded.model
        self.normalizer = loaded.normalizer
        self.task = loaded.task
        state = loaded.task_state
        # The model learnt standardised targets; the artifact answers in the data's units.
        regress = self.task == "regression"
        mean = torch.tensor(state["target_mean"] if regress else [0.0], dtype=torch.float32)
        std = torch.tensor(state["target_std"] if regress else [1.0], dtype=torch.float32)
        self.register_buffer("target_mean", mean, persistent=False)
        self.register_buffer("target_std", std, persistent=False)
        # train.calibrate=temperature: the artifact's logits are the calibrated ones.
        self.temperature = float(state.get("temperature", 1.0))

    def forward(self, images: torch.Tensor) -> Any:  # noqa: D102
        out = self.model(self.normalizer(images)).float()
        if self.task == "regression":
            out = out * self.target_std + self.target_mean
        elif self.task in ("classification", "multilabel") and self.temperature != 1.0:
            out = out / self.temperature
        return out


# ----------------------------------------------------------------------------- detection
#
# torchvision's one-stage detectors (FCOS, RetinaNet) end in score filtering, top-k and
# NMS, whose output sizes depend on the data: torch.export either refuses them or bakes
# in assertions about how many boxes survive. The standard deployment split exports the
# network (normalisation, backbone, FPN, head) with fixed-shape outputs and keeps the
# post-processing in Python, where torchvision's own code runs it (:class:`DetectionPost`).

ANCHORS_FILE = "anchors.pt"
# The head outputs of each one-stage architecture, in the artifact's output order.
HEAD_OUTPUTS = {
    "fcos": ("cls_logits", "bbox_regression", "bbox_ctrness"),
    "retinanet": ("cls_logits", "bbox_regression"),
}
# Data labels are 0-based; the detectors reserve 0 for the background (tasks/detection.py).
LABEL_OFFSET = 1


def detector_architecture(model: nn.Module) -> str:
    """``fcos`` or ``retinanet``: the one-stage detectors whose network exports.

    Raises:
        UserError: any other detector (Faster R-CNN, SSD), with the reason and what to do.
    """
    from torchvision.models.detection import FCOS, RetinaNet

    if isinstance(model, FCOS):
        return "fcos"
    if isinstance(model, RetinaNet):
        return "retinanet"
    raise UserError(_DETECTION_LIMITS.format(model=type(model).__name__))


class DetectionNetwork(nn.Module):
    """The exportable part of a one-stage detector: uint8 images in, raw head outputs out.

    Does what the detector's ``GeneralizedRCNNTransform`` does at the working size (its
    normalisation and the zero padding to ``size_divisible``; the resize is a no-op there,
    which :func:`detection_spec` verifies), then backbone, FPN and head. Every output has
    a fixed shape ``[N, anchors, k]``, the head's outputs concatenated over FPN levels.
    """

    def __init__(self, model: nn.Module, normalizer: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.normalizer = normalizer
        self.architecture = detector_architecture(model)
        self.output_names = HEAD_OUTPUTS[self.architecture]
        transform = model.transform
        self.size_divisible = int(transform.size_divisible)
        mean = torch.tensor(transform.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(transform.image_std, dtype=torch.float32)[:, None, None]
        self.register_buffer("det_mean", mean, persistent=False)
        self.register_buffer("det_std", std, persistent=False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised and padded as the detector's transform batches them."""
        x = (self.normalizer(images) - self.det_mean) / self.det_std
        h, w = x.shape[-2:]
        d = self.size_divisible
        # batch_images pads right and bottom with zeros up to a multiple of the stride.
        return nn.functional.pad(x, (0, -w % d, 0, -h % d))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: D102
        features = list(self.model.backbone(self.prepare(images)).values())
        head = self.model.head(features)
        return tuple(head[name] for name in self.output_names)


def detection_spec(
    network: DetectionNetwork, images: torch.Tensor
) -> tuple[dict[str, Any], torch.Tensor]:
    """The post-processing description for ``model.json`` and the anchors of one image.

    Anchors depend only on the image and feature-map sizes, fixed at the working size, so
    they are computed once here with the detector's own anchor generator.

    Raises:
        UserError: the detector's transform resizes at the working size (so the exported
            network would see other pixels than the eager model does).
    """
    from torchvision.models.detection.image_list import ImageList

    model = network.model
    example = images[:1]
    size = tuple(example.shape[-2:])
    with torch.inference_mode():
        listed, _ = model.transform(list(network.normalizer(example)))
        mine = network.prepare(example)
        if (
            listed.image_sizes != [size]
            or listed.tensors.shape != mine.shape
            or not bool(torch.allclose(listed.tensors, mine, atol=1e-6))
        ):
            raise UserError(
                f"the detector's transform resizes {size[0]}x{size[1]} images to "
                f"{listed.image_sizes[0]} (min_size {model.transform.min_size}, max_size "
                f"{model.transform.max_size}); the exported network takes the working size "
                "unchanged. Train with a detector built for the data's image size."
            )
        features = list(model.backbone(mine).values())
        anchors = model.anchor_generator(ImageList(mine, [size]), features)[0]
        outs = network(example)
        shapes = {n: ["N", *t.shape[1:]] for n, t in zip(network.output_names, outs, strict=True)}
        per_level = [int(f.shape[-2] * f.shape[-1]) for f in features]
        cells = sum(per_level)
        # RetinaNet has several anchors per location; FCOS one.
        per_level = [n * (len(anchors) // cells) for n in per_level]
    coder = model.box_coder
    if network.architecture == "fcos":
        box_coder = {"name": "BoxLinearCoder", "normalize_by_size": coder.normalize_by_size}
    else:
        box_coder = {
            "name": "BoxCoder",
            "weights": list(coder.weights),
            "bbox_xform_clip": coder.bbox_xform_clip,
        }
    spec = {
        "architecture": network.architecture,
        "outputs": list(network.output_names),
        "output_shapes": shapes,
        "image_size": list(size),
        "num_anchors_per_level": per_level,
        "anchors": {"file": ANCHORS_FILE, "shape": list(anchors.shape), "sha256": None},
        "box_coder": box_coder,
        "score_thresh": float(model.score_thresh),
        "nms_thresh": float(model.nms_thresh),
        "detections_per_img": int(model.detections_per_img),
        "topk_candidates": int(model.topk_candidates),
        "label_offset": LABEL_OFFSET,
    }
    return spec, anchors.float().contiguous().clone()


def export_module(loaded: Loaded) -> nn.Module:
    """What is exported for the loaded model, in eval mode (see the module docstring)."""
    if loaded.task == "detection":
        return DetectionNetwork(loaded.model, loaded.normalizer).eval()
    return ExportModule(loaded).eval()


def eager_outputs(module: nn.Module, loaded: Loaded, images: torch.Tensor) -> Any:
    """The reference: the eager module on the check images.

    Detection: ``{"raw": head outputs, "detections": [(boxes, scores, labels), ...]}``,
    the detections from the eager detector itself (``task.infer``, the path ``predict
    RUN`` takes), so the check also proves the Python post-processing reproduces them.
    """
    from visiontrain.tasks.detection import DetectionTask

    with torch.inference_mode():
        if isinstance(module, DetectionNetwork):
            raw = tuple(t.clone() for t in module(images))
            dets = DetectionTask.infer(loaded.model, loaded.normalizer(images))
            return {
                "raw": raw,
                "detections": [(d["boxes"], d["scores"], d["labels"]) for d in dets],
            }
        return module(images).clone()


def check_images(loaded: Loaded, limit: int = CHECK_IMAGES) -> torch.Tensor:
    """Up to ``limit`` validation images, preprocessed as the eval loader does (uint8)."""
    from visiontrain.data import build_data
    from visiontrain.data.pipeline import build_loaders

    cfg = loaded.cfg
    bundle = build_data(cfg.data, cfg.task)
    if bundle.val is None:
        raise UserError(f"data source {cfg.data.name} has no val split to check the export on.")
    cpu = torch.device("cpu")
    batches: list[torch.Tensor] = []
    count = 0
    for batch in build_loaders(cfg, bundle, cpu).val:
        if batch["image"] is None:
            continue
        batches.append(batch["image"].cpu())
        count += len(batches[-1])
        if count >= limit:
            break
    if not batches:
        raise UserError(f"the val split of {cfg.data.name} has no readable image to check with.")
    images = torch.cat(batches)[:limit]
    if images.dtype != torch.uint8:
        raise UserError(f"the val loader gives {images.dtype} images; the export takes uint8.")
    return images.contiguous()


def export_artifact(
    module: nn.Module, example: torch.Tensor, fmt: str, path: Path, dynamic: bool
) -> None:
    """Trace ``module`` and write the artifact atomically to ``path``."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    # A batch of 2 in the example: torch.export specialises a size of 1 to a constant.
    example = example[:2] if dynamic else example[:1]
    if dynamic and len(example) < 2:
        example = example.repeat(2, 1, 1, 1)
    shapes = ({0: batch},) if dynamic else None
    with warnings.catch_warnings():
        # torch.export / the ONNX exporter warn about their own internals (deprecated
        # pytree classes, ...): nothing a user can act on, so kept out of the output.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        _trace(module, example, fmt, path, shapes)


def _trace(
    module: nn.Module, example: torch.Tensor, fmt: str, path: Path, shapes: tuple | None
) -> None:
    """Trace and write one artifact (see :func:`export_artifact`)."""
    if fmt == "pt2":
        program = torch.export.export(module, (example,), dynamic_shapes=shapes)
        atomic_write(path, lambda fh: torch.export.save(program, fh))
        return
    outputs = list(getattr(module, "output_names", ["output"]))
    onnx_program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        input_names=["images"],
        output_names=outputs,
        dynamic_shapes=shapes,
        verbose=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / path.name
        onnx_program.save(str(staged))
        if any(p.name != path.name for p in Path(tmp).iterdir()):
            raise UserError("the model's weights went to external ONNX data files; not supported.")
        atomic_write(path, lambda fh: fh.write(staged.read_bytes()))


def fresh_process_check(
    artifact: Path,
    images: torch.Tensor,
    expected: Any,
    tolerance: float,
    fixed_batch: bool,
    latency_runs: int,
    detection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run :mod:`visiontrain.export.check` in a new process; its result dict.

    ``detection`` (the ``model.json`` entry) makes the child post-process the artifact's
    outputs with the anchors file beside it and compare the detections too.

    Raises:
        UserError: the artifact cannot be read (exit 2 of the child).
    """
    with tempfile.TemporaryDirectory() as tmp:
        inputs, refs, result = (Path(tmp) / n for n in ("inputs.pt", "expected.pt", "r.json"))
        torch.save(images, inputs)
        torch.save(expected, refs)
        extra = []
        if detection is not None:
            spec = Path(tmp) / "detection.json"
            spec.write_text(json.dumps(detection))
            extra.append(f"--detection={spec}")
        cmd = [
            sys.executable,
            "-m",
            "visiontrain.export.check",
            str(artifact),
            f"--inputs={inputs}",
            f"--expected={refs}",
            f"--result={result}",
            f"--tolerance={tolerance}",
            f"--latency-runs={latency_runs}",
            f"--batch-sizes={','.join(map(str, LATENCY_BATCHES))}",
            *(["--fixed-batch"] if fixed_batch else []),
            *extra,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode == 2:
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
            raise UserError((lines[-1] if lines else proc.stderr.strip())[len("error: ") :])
        if result.is_file():
            return json.loads(result.read_text())
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return {"passed": False, "max_abs_diff": float("inf"), "scale": 1.0, "reason": tail}


def eager_latency(module: nn.Module, images: torch.Tensor, runs: int) -> dict[str, float]:
    """Median ms per batch of the eager module (detection: the network, as exported)."""
    from visiontrain.export.check import median_ms

    out = {}
    with torch.inference_mode():
        for bs in LATENCY_BATCHES:
            x = images.repeat(-(-bs // len(images)), 1, 1, 1)[:bs].contiguous()
            out[str(bs)] = median_ms(lambda x=x: module(x), runs)
    return out


def latency_table(eager: dict[str, float], exported: dict[str, float], fmt: str) -> Table:
    """Median ms per batch and images/s, eager vs exported."""
    table = Table(title="latency (CPU, median of runs)")
    for col in ("batch", "eager ms", "eager img/s", f"{fmt} ms", f"{fmt} img/s", "speedup"):
        table.add_column(col, justify="right")
    for bs, ms in eager.items():
        ex = exported.get(bs)
        n = int(bs)
        table.add_row(
            bs,
            f"{ms:.2f}",
            f"{n / ms * 1000:.0f}",
            f"{ex:.2f}" if ex else "-",
            f"{n / ex * 1000:.0f}" if ex else "-",
            f"{ms / ex:.2f}x" if ex else "-",
        )
    return table


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    """Export (or with ``--verify``, re-check) a run's best weights; see the module docstring.

    The format (``--format``, or with ``--verify`` the one ``model.json`` records) picks
    its writer from :data:`FORMATS`; an option that means nothing for it is refused.
    """
    if is_artifact(args.target):
        raise UserError(
            f"{args.target} is already an exported model; pass the run or checkpoint, and "
            f"the artifact with --verify {args.target} to check it again."
        )
    ckpt = resolve_checkpoint(args.target)
    if args.verify:
        artifact = Path(args.verify)
        fmt = str(artifact_entry(read_meta(artifact), artifact).get("format"))
    else:
        fmt = args.format
        out_dir = Path(args.out) if args.out else _run_dir(ckpt) / "export"
        artifact = out_dir / f"model.{fmt}"
    spec = FORMATS.get(fmt)
    if spec is None:
        raise UserError(
            f"{artifact.parent / META_FILE} records {artifact.name} as format {fmt!r}, which "
            f"this visiontrain does not export ({', '.join(FORMATS)}); export again."
        )
    spec.refuse_unused(args, fmt)
    loaded = load_trained(ckpt)
    loaded.state["_path"] = str(ckpt)
    return spec.write(args, loaded, artifact, console)


def _export_graph(
    args: argparse.Namespace, loaded: Loaded, artifact: Path, console: Console
) -> int:
    """pt2 / onnx: trace, write, and check in a fresh process against the eager model."""
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    latency_runs = DEFAULT_LATENCY_RUNS if args.latency_runs is None else args.latency_runs
    # Refuse a two-stage detector before reading any image.
    module = export_module(loaded)
    detection: dict[str, Any] | None = None
    if args.verify:
        meta = read_meta(artifact)
        entry = artifact_entry(meta, artifact)
        fmt, dynamic = entry["format"], entry["batch"] == "dynamic"
        # The stored post-processing is what predict uses, so that is what is verified.
        detection = meta.get("detection") if loaded.task == "detection" else None
        if loaded.task == "detection" and not isinstance(detection, dict):
            raise UserError(f"{artifact.parent / META_FILE} has no `detection` entry; export again")
    else:
        fmt, dynamic = args.format, args.dynamic_batch
    images = check_images(loaded)
    expected = eager_outputs(module, loaded, images)
    if loaded.task == "detection" and not args.verify:
        assert isinstance(module, DetectionNetwork)
        detection = _write_anchors(module, images, artifact.parent)
    if not args.verify:
        start = time.perf_counter()
        export_artifact(module, images, fmt, artifact, dynamic)
        console.print(
            f"exported {loaded.cfg.model.name} ({loaded.task}) to {artifact} "
            f"[{artifact.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s]",
            highlight=False,
        )
    result = fresh_process_check(
        artifact, images, expected, tolerance, not dynamic, latency_runs, detection
    )
    line = (
        f"check (fresh process, {len(images)} val images): max abs diff "
        f"{result['max_abs_diff']:.3g}, allowed {tolerance:g} x {result['scale']:.3g}"
    )
    if detection is not None and "boxes" in result:
        line += (
            f"; after post-processing {result['boxes']} detections, labels equal, box diff "
            f"{result['box_diff']:.3g}, score diff {result['score_diff']:.3g}"
        )
    if not result["passed"]:
        why = f" ({result['reason']})" if result.get("reason") else ""
        return _failed(line, f"{artifact} does not reproduce the eager model{why}", artifact, args)
    console.print(f"{line}: OK", highlight=False)
    if not args.verify:
        meta = describe(loaded, fmt, artifact, dynamic, detection)
        check = {k: result[k] for k in ("images", "max_abs_diff", "tolerance", "scale")}
        if detection is not None:
            check.update({k: result[k] for k in ("boxes", "box_diff", "score_diff")})
        meta["artifacts"][artifact.name]["check"] = check
        _write_meta(artifact, meta, console)
    if latency_runs > 0 and "latency_ms" in result:
        eager = eager_latency(module, images, latency_runs)
        console.print(latency_table(eager, result["latency_ms"], fmt))
        if not dynamic:
            console.print(
                "batch 32 of a fixed-batch artifact is 32 calls of batch 1; "
                "--dynamic-batch exports a batch axis",
                highlight=False,
            )
    print(artifact, flush=True)
    return EXIT_OK


# ------------------------------------------------------------------------ safetensors
#
# The weights alone, for whoever rebuilds the network (vt.load does, from model.json's
# config). There is no program whose numbers could drift from the eager model's, so the
# check is that the file reads back bit for bit as the checkpoint's weights.


def checkpoint_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a run evaluates with, each in contiguous CPU memory of its own.

    :func:`~visiontrain.engine.checkpoint.eval_weights` (the EMA when the run had
    ``train.ema``) under the plain ``state_dict`` keys: checkpoints hold the unwrapped
    module's, never a DDP or compile prefix. safetensors refuses tensors that share
    storage (tied weights) or are not contiguous (``channels_last``), hence the clones.

    Raises:
        UserError: an entry is not a tensor (a module's extra state), which a
            safetensors file cannot hold.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in eval_weights(state).items():
        if not isinstance(value, torch.Tensor):
            raise UserError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; a "
                "safetensors file holds tensors only. Export pt2 or onnx instead."
            )
        out[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    return out


def bitwise_mismatch(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> str | None:
    """How ``got`` differs from ``want`` (keys, dtype, shape or any bit), or None."""
    if got.keys() != want.keys():
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        return f"keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, w in want.items():
        g = got[key]
        if g.dtype != w.dtype or g.shape != w.shape:
            return (
                f"{key} is {g.dtype} {tuple(g.shape)}, the checkpoint's {w.dtype} {tuple(w.shape)}"
            )
        # Compared as bytes: torch.equal would call a NaN unequal to itself.
        if not torch.equal(_as_bytes(g), _as_bytes(w)):
            return f"{key} differs from the checkpoint's"
    return None


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def weights_metadata(loaded: Loaded, which: str) -> dict[str, str]:
    """The safetensors header metadata (str to str): the weights described without model.json."""
    ckpt = Path(loaded.state["_path"])
    return {
        "format": "pt",  # the framework tag Hugging Face loaders look for
        "visiontrain": __version__,
        "run": _run_dir(ckpt).name,
        "checkpoint": ckpt.name,
        "epoch": str(checkpoint_epoch(loaded.state)),
        "task": loaded.task,
        "model": loaded.cfg.model.name,
        "weights": which,
        "config": json.dumps(loaded.cfg.to_dict()),
    }


def _export_safetensors(
    args: argparse.Namespace, loaded: Loaded, artifact: Path, console: Console
) -> int:
    """safetensors: the eval weights written, then read back and compared bit for bit."""
    weights = checkpoint_weights(loaded.state)
    which = "ema" if loaded.state.get("ema") else "model"
    label = "EMA weights (train.ema)" if which == "ema" else "weights"
    if not args.verify:
        start = time.perf_counter()
        # safetensors.torch.save is save_file's serialiser, returning the bytes, so the
        # file goes through the same atomic write as every artifact.
        blob = save_safetensors(weights, weights_metadata(loaded, which))
        atomic_write(artifact, lambda fh: fh.write(blob))
        console.print(
            f"exported {loaded.cfg.model.name} ({loaded.task}) {label} to {artifact} "
            f"[{len(weights)} tensors, {artifact.stat().st_size / 1e6:.1f} MB, "
            f"{time.perf_counter() - start:.1f} s]",
            highlight=False,
        )
    got = read_safetensors(artifact, str(artifact), EXPORT_AGAIN)
    line = f"check (safetensors load_file, bitwise): {len(got)} tensors"
    mismatch = bitwise_mismatch(got, weights)
    if mismatch is not None:
        return _failed(
            f"{line}, {mismatch}", f"{artifact} does not hold the run's {label}", artifact, args
        )
    console.print(f"{line} equal to the checkpoint's {label}: OK", highlight=False)
    if not args.verify:
        meta = describe(loaded, "safetensors", artifact, dynamic=False, weights=which)
        meta["artifacts"][artifact.name]["check"] = {"tensors": len(got), "bitwise_equal": True}
        _write_meta(artifact, meta, console)
    print(artifact, flush=True)
    return EXIT_OK


def _failed(line: str, what: str, artifact: Path, args: argparse.Namespace) -> int:
    """Print a failed check; a fresh export is removed (nothing was exported). Exit 1."""
    print(f"{line}: FAILED", flush=True)
    print(
        f"error: {what}. "
        + ("It was removed; nothing was exported." if not args.verify else "Export again."),
        file=sys.stderr,
        flush=True,
    )
    if not args.verify:
        with contextlib.suppress(OSError):
            artifact.unlink()
    return EXIT_FAILURE


def _write_meta(artifact: Path, meta: dict[str, Any], console: Console) -> None:
    """Write ``model.json`` beside ``artifact``, keeping the folder's other artifacts."""
    path = artifact.parent / META_FILE
    atomic_write_json(path, _merge(path, meta))
    console.print(f"wrote {path}", highlight=False)


def _write_anchors(network: DetectionNetwork, images: torch.Tensor, folder: Path) -> dict:
    """Write ``anchors.pt`` into ``folder``; the ``detection`` entry with its sha256.

    Written before the check, which loads it from there as ``predict`` will. The file is
    the same for every artifact of one checkpoint, so a pt2 and an onnx export share it.
    """
    spec, anchors = detection_spec(network, images)
    path = folder / spec["anchors"]["file"]
    atomic_write(path, lambda fh: torch.save(anchors, fh))
    spec["anchors"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return spec


_DETECTION_LIMITS = (
    "{model} does not export: only the one-stage detectors (FCOS, RetinaNet: fcos_tiny, "
    "fcos_resnet50_fpn, retinanet_resnet50_fpn_v2) do. Their network exports and the "
    "post-processing (score filter, NMS) stays in Python. A two-stage detector such as "
    "Faster R-CNN runs NMS on the region proposals between its two stages, so its second "
    "stage has a data-dependent input size that torch.export cannot trace (RoI pooling "
    "guards on the number of proposals); SSD resizes to its own 320 px input. Train an "
    "fcos_tiny or retinanet model to export, export the checkpoint's backbone yourself, "
    "or predict with the run or checkpoint (docs/export.md)"
)


def _run_dir(ckpt: Path) -> Path:
    """The run directory of ``run/checkpoints/x.pt``, else the checkpoint's folder."""
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS_DIR else ckpt.parent


@dataclass(frozen=True)
class Format:
    """One ``--format``: its writer, a line for ``--help``, and the options it has no use for.

    Attributes:
        write: Writes the artifact and checks it (or with ``--verify`` only checks it);
            returns the exit code.
        summary: What the format is, for ``--help``.
        unused: Option (argparse ``dest``) -> why it means nothing for this format; given
            anyway, it is refused with exit 2 rather than silently ignored.
    """

    write: Callable[[argparse.Namespace, Loaded, Path, Console], int]
    summary: str
    unused: dict[str, str] = field(default_factory=dict)

    def refuse_unused(self, args: argparse.Namespace, name: str) -> None:
        """Raise for the first option given that this format has no use for.

        Raises:
            UserError: naming the option, the format and why.
        """
        for dest, why in self.unused.items():
            value = getattr(args, dest, None)
            # Not given: argparse's None or False. 0 (no timing, tolerance 0) asks for
            # nothing the format lacks either.
            if value is None or value is False or value == 0:
                continue
            flag = "--" + dest.replace("_", "-")
            raise UserError(f"{flag} does not apply to --format {name}: {why}. Drop {flag}.")


FORMATS: dict[str, Format] = {
    "pt2": Format(_export_graph, "torch.export program (.pt2)"),
    "onnx": Format(_export_graph, "ONNX graph from the dynamo exporter (.onnx)"),
    "safetensors": Format(
        _export_safetensors,
        "the eval weights alone (.safetensors; EMA when trained with train.ema)",
        unused={
            "dynamic_batch": "a weights file has no batch axis; the model rebuilt from it "
            "takes any batch",
            "tolerance": "its check is bitwise equality with the checkpoint's weights",
            "latency_runs": "a weights file is not a program to time",
        },
    ),
}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``export`` sub-command to the CLI's sub-parsers.

    Args:
        sub: The object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The ``export`` parser.
    """
    formats = "; ".join(f"{name}: {spec.summary}" for name, spec in FORMATS.items())
    p = sub.add_parser(
        "export",
        help="export a run's best weights to .pt2, .onnx or .safetensors, verified",
        description="Export the best checkpoint (eval mode) with torch.export (pt2) or the "
        "dynamo ONNX exporter (onnx), or its weights alone (safetensors). A pt2/onnx "
        "artifact takes uint8 NCHW images fitted to the working size, normalisation inside; "
        "a fresh process loads the file and compares it with the eager model on validation "
        "images, and a mismatch exits 1 and removes the file. A safetensors file is read "
        "back and compared bit for bit with the checkpoint's weights. model.json beside "
        "any of them gives the preprocessing, class names, task state and config.",
        epilog="Example: visiontrain export runs/defects-1 --format onnx --dynamic-batch; "
        "then visiontrain predict runs/defects-1/export/model.onnx images/",
    )
    p.add_argument("target", metavar="RUN_OR_CKPT")
    p.add_argument("--format", choices=list(FORMATS), default="pt2", help=formats)
    p.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="pt2/onnx: export a batch axis of any size (default: batch 1)",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/export)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="pt2/onnx: largest |exported - eager| allowed, relative to max(1, max|eager|) "
        f"({DEFAULT_TOLERANCE:g})",
    )
    p.add_argument(
        "--verify",
        metavar="ARTIFACT",
        help="do not export: check an existing artifact (with its model.json) against RUN",
    )
    p.add_argument(
        "--latency-runs",
        type=int,
        default=None,
        help="pt2/onnx: timed runs per batch size for the latency table; 0 skips it "
        f"({DEFAULT_LATENCY_RUNS})",
    )
    p.set_defaults(func=cmd_export)
    return p
