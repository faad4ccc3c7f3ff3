"""``visiontrain doctor``: a preflight of a config's data, model and training step.

Each check is a function registered with :func:`register_check`; it receives a shared
:class:`DoctorContext` (config, built parts, console, cached data scan) and returns
:class:`Finding` objects, each with a level (ok | warning | error), numbers as evidence
and a fix. Checks run in registration order; one that raises becomes an error finding
naming the exception, and the others still run. Every check that runs or trains the model
works on a deep copy, so ``parts.model`` leaves the doctor exactly as it came in.

The checks follow the usual "recipe for training neural networks" order: look at the data
(balance, duplicates/leakage, unreadable files, sizes), then the model at init, then
whether one batch can be overfit, the gradients, the learning rate, the evaluation path,
the input pipeline's speed and mixed precision.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from visiontrain.config import Config
from visiontrain.data.loaders import AugmentedDataset, collate
from visiontrain.data.pipeline import build_loaders
from visiontrain.data.sources import FileSplit, Split, SubsetSplit
from visiontrain.engine.evaluate import infer_batches
from visiontrain.engine.optim import build_optimizer
from visiontrain.engine.parts import Parts, build_parts, build_prep, build_step, buildable_optim
from visiontrain.engine.precision import Precision
from visiontrain.engine.step import BatchPrep, Step
from visiontrain.errors import EXIT_FAILURE, EXIT_OK, DataError
from visiontrain.io import atomic_write_json
from visiontrain.registry import Registry

Level = Literal["ok", "warning", "error"]
LEVELS: tuple[Level, ...] = ("ok", "warning", "error")

# Hashing and decoding every image of a large folder would take longer than the doctor's
# one-minute budget; a cap per split keeps it bounded and the report says when it applied.
SCAN_CAP = 20_000
IMBALANCE_WARN = 10.0
OVERFIT_SAMPLES = 16
OVERFIT_STEPS = 150
OVERFIT_LR = 3e-3
OVERFIT_TARGET = 0.1
GRAD_STEPS = 3
GRAD_VANISH = 1e-7
GRAD_EXPLODE = 1e3
LR_STEPS = 40
LR_START = 1e-6
LR_END = 10.0
LOADER_STEPS = 20
LOADER_BUDGET_S = 5.0
LOADER_WAIT_SHARE = 0.3
ACT_VANISH = 1e-3
ACT_EXPLODE = 100.0
BN_MIN_BATCH = 8


@dataclass
class Finding:
    """One result of a check.

    Attributes:
        name: The check's name (``data.class_balance``).
        level: ``ok``, ``warning`` or ``error``.
        message: What was found, in one or two sentences.
        evidence: The numbers behind the message (JSON-able).
        fix: What to change, with the config keys; empty for ``ok``.
    """

    name: str
    level: Level
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "level": self.level,
            "message": self.message,
            "evidence": _jsonable(self.evidence),
            "fix": self.fix,
        }


@dataclass
class SplitScan:
    """What decoding (up to :data:`SCAN_CAP`) samples of one split found."""

    total: int
    scanned: int
    hashes: dict[str, list[int]] = field(default_factory=dict)
    unreadable: list[tuple[int, str]] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    bad_labels: list[tuple[int, Any]] = field(default_factory=list)


@dataclass
class DoctorContext:
    """What every check may use; expensive shared work is computed once, lazily."""

    cfg: Config
    parts: Parts
    console: Console
    _scan: dict[str, SplitScan] | None = None
    _batch: dict[str, Any] | None = None
    _prep: BatchPrep | None = None

    @property
    def task(self) -> str:
        """The config's task name."""
        return self.cfg.task

    def splits(self) -> dict[str, Split]:
        """The bundle's splits by name (test only when the source has one)."""
        b = self.parts.bundle
        out = {"train": b.train, "val": b.val}
        if b.test is not None:
            out["test"] = b.test
        return out

    def model_copy(self) -> nn.Module:
        """A deep copy of the model: checks train and evaluate it, never the original."""
        return copy.deepcopy(self.parts.model)

    @property
    def prep(self) -> BatchPrep:
        """The run's batch preparation (engine.step): normalisation, layout, augmentation."""
        if self._prep is None:
            self._prep = build_prep(self.cfg, self.parts.bundle, self.parts.device)
        return self._prep

    def step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision | None = None,
    ) -> Step:
        """The training step as ``train`` runs it, on a check's model copy and optimizer."""
        return build_step(self.cfg, self.parts, model, optimizer, precision)

    def train_batch(self) -> dict[str, Any]:
        """The first readable training batch (uint8 images, as the loader gives it)."""
        if self._batch is None:
            loader = build_loaders(self.cfg, self.parts.bundle, self.parts.device).train
            for batch in loader:
                if batch["image"] is not None:
                    self._batch = batch
                    break
            else:
                raise DataError("no training batch could be read (every sample was skipped).")
        return self._batch

    def scan(self) -> dict[str, SplitScan]:
        """Decode, hash and measure the samples of every split (capped), once."""
        if self._scan is None:
            self._scan = {name: _scan_split(self, split) for name, split in self.splits().items()}
        return self._scan


CheckFn = Callable[[DoctorContext], list[Finding]]
# Run in registration order; `doctor --check NAME` picks some.
_CHECKS: Registry[CheckFn] = Registry("doctor check", "--check")


def register_check(name: str) -> Callable[[CheckFn], CheckFn]:
    """Register a doctor check under ``name``; checks run in registration order.

    Args:
        name: Dotted name shown in the report (``area.what``).
    """
    return _CHECKS.decorator(name)


def list_checks() -> list[str]:
    """Registered check names, in the order they run."""
    return list(_CHECKS)


def _not_applicable(name: str, task: str, why: str = "") -> list[Finding]:
    more = f" ({why})" if why else ""
    return [Finding(name, "ok", f"not applicable to task {task}{more}", {"task": task})]


def _jsonable(value: Any) -> Any:
    """Numbers from numpy/torch and tuples as plain JSON types; non-finite floats as text."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _base_split(split: Split) -> Split:
    while isinstance(split, SubsetSplit):
        split = split.base
    return split


def _is_file_based(split: Split) -> bool:
    # Generated arrays (and binary datasets held as arrays) have one size by construction.
    from visiontrain.data.coco import CocoSplit
    from visiontrain.data.masks import MaskSplit

    return isinstance(_base_split(split), FileSplit | MaskSplit | CocoSplit)


def _scan_split(ctx: DoctorContext, split: Split) -> SplitScan:
    n = len(split)
    scan = SplitScan(total=n, scanned=min(n, SCAN_CAP))
    classes = ctx.parts.bundle.num_classes if ctx.task == "classification" else 0
    for i in range(scan.scanned):
        try:
            image, target = split.load_decoded(i)  # sizes and pixels as in the file
        except DataError as exc:
            scan.unreadable.append((i, str(exc)))
            continue
        pixels = image.contiguous()
        digest = hashlib.sha1(pixels.numpy().tobytes())
        digest.update(repr(tuple(pixels.shape)).encode())  # same bytes, other shape: not equal
        scan.hashes.setdefault(digest.hexdigest(), []).append(i)
        scan.sizes.append((int(image.shape[-2]), int(image.shape[-1])))
        if classes and isinstance(target, int) and not 0 <= target < classes:
            scan.bad_labels.append((i, target))
    return scan


# ---------------------------------------------------------------------------------- data


@register_check("data.class_balance")
def check_class_balance(ctx: DoctorContext) -> list[Finding]:
    """Class counts per split and the max/min imbalance ratio on train."""
    name = "data.class_balance"
    if ctx.task != "classification":
        return _not_applicable(name, ctx.task, "no per-image class labels")
    classes = ctx.parts.bundle.class_names
    counts: dict[str, dict[str, int]] = {}
    for split_name, split in ctx.splits().items():
        labels = split.labels
        if labels is None or labels.ndim != 1:
            continue
        valid = labels[(labels >= 0) & (labels < len(classes))]
        bins = np.bincount(valid, minlength=len(classes))
        counts[split_name] = {c: int(k) for c, k in zip(classes, bins, strict=True)}
    train = counts.get("train", {})
    lo, hi = min(train.values(), default=0), max(train.values(), default=0)
    ratio = hi / lo if lo else math.inf
    evidence = {"counts": counts, "train_imbalance_ratio": ratio}
    fix = (
        "Weight the loss (loss.class_weights=effective), use loss.name=focal, or draw classes "
        "evenly (data.sampler=weighted); judge the run by macro_f1 and per-class recall."
    )
    if lo == 0:
        empty = [c for c, k in train.items() if k == 0]
        return [
            Finding(
                name,
                "error",
                f"class(es) {', '.join(empty)} have no training samples; the model can never "
                "learn to predict them.",
                evidence,
                "Add training images of those classes or remove the classes from the data.",
            )
        ]
    if ratio > IMBALANCE_WARN:
        return [
            Finding(
                name,
                "warning",
                f"training classes are imbalanced {ratio:.1f}:1 (largest/smallest); a plain "
                "loss learns to predict the majority class.",
                evidence,
                fix,
            )
        ]
    return [Finding(name, "ok", f"train imbalance ratio {ratio:.1f}:1", evidence)]


@register_check("data.duplicates")
def check_duplicates(ctx: DoctorContext) -> list[Finding]:
    """Identical decoded images across splits (leakage) and within train."""
    name = "data.duplicates"
    scans = ctx.scan()
    splits = ctx.splits()
    capped = {s: sc.scanned for s, sc in scans.items() if sc.scanned < sc.total}
    owner: dict[str, list[tuple[str, int]]] = {}
    for split_name, sc in scans.items():
        for digest, idx in sc.hashes.items():
            owner.setdefault(digest, []).extend((split_name, i) for i in idx)
    cross_pairs: dict[str, int] = {}
    examples: list[str] = []
    for entries in owner.values():
        names = sorted({s for s, _ in entries})
        if len(names) < 2:
            continue
        key = "/".join(names)
        cross_pairs[key] = cross_pairs.get(key, 0) + 1
        if len(examples) < 5:
            examples.append(" = ".join(splits[s].describe(i) for s, i in entries[:3]))
    train_dups = sum(len(idx) - 1 for idx in scans["train"].hashes.values() if len(idx) > 1)
    evidence: dict[str, Any] = {
        "scanned": {s: sc.scanned for s, sc in scans.items()},
        "cross_split_duplicate_images": cross_pairs,
        "train_internal_duplicates": train_dups,
        "examples": examples,
    }
    note = f" (hashed only the first {SCAN_CAP} images of {', '.join(capped)})" if capped else ""
    findings = []
    if cross_pairs:
        total = sum(cross_pairs.values())
        findings.append(
            Finding(
                name,
                "error",
                f"{total} image(s) appear in more than one split ({cross_pairs}): the "
                f"evaluation scores them after training on them (leakage){note}.",
                evidence,
                "Remove each duplicate from all but one split (see the examples), or "
                "de-duplicate the folder before splitting.",
            )
        )
    if train_dups:
        train_examples = [
            " = ".join(splits["train"].describe(i) for i in idx[:3])
            for idx in scans["train"].hashes.values()
            if len(idx) > 1
        ][:5]
        findings.append(
            Finding(
                name,
                "warning",
                f"{train_dups} duplicate image(s) within train: they weigh more in the loss{note}.",
                {**evidence, "train_examples": train_examples},
                "Remove the extra copies unless the over-weighting is intended.",
            )
        )
    if not findings:
        findings.append(Finding(name, "ok", f"no duplicate images{note}", evidence))
    return findings


@register_check("data.readable")
def check_readable(ctx: DoctorContext) -> list[Finding]:
    """Unreadable files per split, and class labels inside ``[0, num_classes)``."""
    name = "data.readable"
    scans = ctx.scan()
    splits = ctx.splits()
    unreadable = {s: len(sc.unreadable) for s, sc in scans.items()}
    examples = [
        f"{splits[s].describe(i)}: {msg}" for s, sc in scans.items() for i, msg in sc.unreadable
    ][:5]
    findings = []
    if any(unreadable.values()):
        on_error = ctx.cfg.data.on_error
        findings.append(
            Finding(
                name,
                "error" if on_error == "raise" else "warning",
                f"{sum(unreadable.values())} file(s) cannot be decoded "
                f"(data.on_error={on_error}: "
                f"{'training stops at the first' if on_error == 'raise' else 'they are skipped'}).",
                {"unreadable": unreadable, "examples": examples},
                "Delete or re-encode the files listed, or set data.on_error=skip to train "
                "without them.",
            )
        )
    if ctx.task == "classification":
        classes = ctx.parts.bundle.num_classes
        bad: dict[str, int] = {}
        for s, split in splits.items():
            labels = split.labels
            n_bad = 0 if labels is None else int(((labels < 0) | (labels >= classes)).sum())
            n_bad = max(n_bad, len(scans[s].bad_labels))
            if n_bad:
                bad[s] = n_bad
        if bad:
            findings.append(
                Finding(
                    name,
                    "error",
                    f"labels outside [0, {classes}) in {bad}: cross-entropy fails or trains "
                    "on the wrong class.",
                    {"out_of_range": bad, "num_classes": classes},
                    "Fix the label files/folder names so that every label is one of the "
                    f"{classes} classes.",
                )
            )
    if not findings:
        findings.append(
            Finding(
                name,
                "ok",
                "every scanned sample decodes"
                + (" and every label is a valid class" if ctx.task == "classification" else ""),
                {"scanned": {s: sc.scanned for s, sc in scans.items()}},
            )
        )
    return findings


@register_check("data.image_sizes")
def check_image_sizes(ctx: DoctorContext) -> list[Finding]:
    """Decoded sizes (min/median/max) of file-based splits against ``data.image_size``."""
    name = "data.image_sizes"
    if not _is_file_based(ctx.parts.bundle.train):
        return [
            Finding(
                name,
                "ok",
                "not applicable: the images are generated or held as one array (one size)",
                {"image_size": ctx.parts.bundle.image_size},
            )
        ]
    working = ctx.parts.bundle.image_size
    sizes = [min(h, w) for sc in ctx.scan().values() for h, w in sc.sizes]
    if not sizes:
        return [Finding(name, "ok", "no decodable images to measure", {})]
    smaller = sum(s < working for s in sizes) / len(sizes)
    evidence = {
        "shorter_side_min": min(sizes),
        "shorter_side_median": statistics.median(sizes),
        "shorter_side_max": max(sizes),
        "image_size": working,
        "share_smaller_than_image_size": round(smaller, 3),
        "measured": len(sizes),
    }
    if smaller > 0.5:
        return [
            Finding(
                name,
                "warning",
                f"{smaller:.0%} of the images are smaller than data.image_size={working}: "
                "they are upsampled, which costs compute and adds no detail.",
                evidence,
                f"Set data.image_size near the median shorter side ({statistics.median(sizes):g}).",
            )
        ]
    return [Finding(name, "ok", f"median shorter side {statistics.median(sizes):g}", evidence)]


# --------------------------------------------------------------------------------- model


_ACT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@register_check("model.init")
def check_model_init(ctx: DoctorContext) -> list[Finding]:
    """Activation std through depth on a real batch, parameter count, BatchNorm batch size."""
    name = "model.init"
    model = ctx.model_copy()
    model.train()  # the statistics training starts from: BatchNorm on batch statistics
    stats: list[tuple[str, float, float]] = []

    def hook(label: str) -> Callable[..., None]:
        def record(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                o = out.detach().float()
                stats.append((label, float(o.mean()), float(o.std())))

        return record

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, _ACT_LAYERS)
    ]
    batch = ctx.train_batch()
    x, y = ctx.prep(batch["image"]), ctx.prep.target(batch["target"])
    try:
        with torch.no_grad():
            ctx.parts.task.forward(model, x, y)
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    evidence: dict[str, Any] = {
        "parameters": params,
        "trainable_parameters": trainable,
        "layers_measured": len(stats),
    }
    findings: list[Finding] = []
    if stats:
        first = stats[0][2]
        rel = [s / first if first > 0 else math.inf for _, _, s in stats]
        evidence["activation_std"] = {
            "first": first,
            "last": stats[-1][2],
            "min_relative": min(rel),
            "max_relative": max(rel),
        }
        evidence["layers"] = [
            {"layer": n, "mean": round(m, 6), "std": s}
            for n, m, s in stats[:: max(1, len(stats) // 20)]
        ]
        vanish = [stats[i][0] for i, r in enumerate(rel) if r < ACT_VANISH]
        explode = [stats[i][0] for i, r in enumerate(rel) if r > ACT_EXPLODE]
        if vanish:
            findings.append(
                Finding(
                    name,
                    "warning",
                    f"activations vanish through depth: std falls below {ACT_VANISH:g}x the "
                    f"first layer's in {len(vanish)} layer(s), first at {vanish[0]} "
                    f"(min {min(rel):.2e}x).",
                    evidence,
                    "Use an init matched to the activation (model.init=kaiming for ReLU), add "
                    "normalisation (model.norm=batch|group|layer) or residual connections.",
                )
            )
        if explode:
            findings.append(
                Finding(
                    name,
                    "warning",
                    f"activations explode through depth: std grows above {ACT_EXPLODE:g}x the "
                    f"first layer's in {len(explode)} layer(s), first at {explode[0]} "
                    f"(max {max(rel):.2e}x).",
                    evidence,
                    "Use a smaller-gain init (model.init=kaiming or lecun) or add "
                    "normalisation layers (model.norm=batch|group|layer).",
                )
            )
    has_bn = any(isinstance(m, _BATCH_NORMS) for m in model.modules())
    batch = ctx.cfg.data.batch_size
    if has_bn and batch < BN_MIN_BATCH:
        findings.append(
            Finding(
                name,
                "warning",
                f"BatchNorm with {batch} samples per device batch: its batch statistics are "
                "noisy and differ from the running statistics used at evaluation.",
                {**evidence, "batch_size": batch},
                f"Use model.norm=group or model.norm=layer, or data.batch_size>={BN_MIN_BATCH}.",
            )
        )
    if not findings:
        findings.append(
            Finding(
                name,
                "ok",
                f"{params:,} parameters; activation std stays within "
                f"[{ACT_VANISH:g}, {ACT_EXPLODE:g}]x of the first layer's",
                evidence,
            )
        )
    return findings


# --------------------------------------------------------------------------------- train


@register_check("train.overfit_one_batch")
def check_overfit(ctx: DoctorContext) -> list[Finding]:
    """A copy of the model must drive the loss of one small batch close to zero."""
    name = "train.overfit_one_batch"
    if ctx.task == "detection":
        return _not_applicable(name, ctx.task, "a detector needs far more steps than a preflight")
    model = ctx.model_copy()
    model.train()
    frozen = sum(1 for p in model.parameters() if not p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return [
            Finding(
                name,
                "error",
                "every parameter has requires_grad=False: nothing can train.",
                {"frozen_tensors": frozen},
                "Unfreeze the parameters (check the model builder and any freezing code).",
            )
        ]
    # Adam at a fixed, moderate LR, independent of optim.*: this isolates "can the model
    # and loss learn these labels" from the LR question, which train.learning_rate asks.
    opt = torch.optim.Adam(params, lr=OVERFIT_LR)
    step = ctx.step(model, opt)
    dataset = _train_dataset(ctx)
    n = min(ctx.cfg.data.batch_size, OVERFIT_SAMPLES, len(dataset))
    indices = list(range(n))
    losses: list[float] = []
    for _ in range(OVERFIT_STEPS):
        # The same samples are loaded again every step (same augmentation seed): a label
        # that is not a function of its image (misaligned, reshuffled) cannot be learned.
        batch = collate([dataset[(0, i)] for i in indices])
        if batch["image"] is None:
            raise DataError("the samples of the overfit batch could not be read.")
        # The training step itself; batch 0 of epoch 0 each time, so device augmentation
        # draws the same crops too.
        loss = step.forward_backward(batch)["loss"]
        step.update()
        value = float(loss)
        losses.append(value)
        if not math.isfinite(value):
            break
        if value < OVERFIT_TARGET * losses[0] or value < 1e-3:
            break
    start, best, last = losses[0], min(losses), losses[-1]
    evidence = {
        "samples": n,
        "steps": len(losses),
        "lr": OVERFIT_LR,
        "optimizer": "adam",
        "loss_start": start,
        "loss_min": best,
        "loss_last": last,
        "loss_curve": [round(v, 5) for v in losses[:: max(1, len(losses) // 10)]],
        "frozen_tensors": frozen,
    }
    reached = math.isfinite(last) and (last < OVERFIT_TARGET * start or last < 1e-3)
    if reached:
        return [
            Finding(
                name,
                "ok",
                f"loss of {n} samples fell from {start:.4g} to {last:.4g} in {len(losses)} steps",
                evidence,
            )
        ]
    return [
        Finding(
            name,
            "error",
            f"could not overfit {n} samples: loss {start:.4g} → {last:.4g} (min {best:.4g}) in "
            f"{len(losses)} Adam steps at lr {OVERFIT_LR:g}; a model that cannot memorise one "
            f"batch will not learn the data set.",
            evidence,
            "Likely causes: labels misaligned with images (a shuffle applied to one but not the "
            f"other, or labels read per call); frozen parameters ({frozen} tensors with "
            "requires_grad=False); a loss that does not match the targets (loss.name, class "
            "indices vs one-hot); a model too small or wrongly wired (model.width/depth).",
        )
    ]


def _config_lr(ctx: DoctorContext) -> float | None:
    lr = ctx.cfg.optim.lr
    return None if lr == "find" else float(lr)


def _train_dataset(ctx: DoctorContext) -> AugmentedDataset:
    loader = build_loaders(ctx.cfg, ctx.parts.bundle, ctx.parts.device).train
    return loader.dataset


def _layer_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


@register_check("train.gradients")
def check_gradients(ctx: DoctorContext) -> list[Finding]:
    """Global and per-layer gradient norms over the first updates with the configured optimizer."""
    name = "train.gradients"
    model = ctx.model_copy()
    model.train()
    opt = build_optimizer(buildable_optim(ctx.cfg.optim), model)
    step = ctx.step(model, opt)
    scaler = step.precision.scaler
    accumulate = ctx.cfg.train.accumulate
    loader = build_loaders(ctx.cfg, ctx.parts.bundle, ctx.parts.device).train
    global_norms: list[float] = []
    per_layer: dict[str, float] = {}
    non_finite: set[str] = set()
    no_grad = 0
    batches = _batches(loader)
    try:
        for update in range(GRAD_STEPS):
            # The micro-batches of one training update, then its gradients before the step.
            for i in range(accumulate):
                step.forward_backward(
                    next(batches), 1.0 / accumulate, True, 0, update * accumulate + i
                )
            # fp16 gradients carry GradScaler's scale until the update unscales them.
            unscale = 1.0 / scaler.get_scale() if scaler.is_enabled() else 1.0
            sq: dict[str, float] = {}
            no_grad = 0
            for pname, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    no_grad += 1
                    continue
                norm = float(p.grad.detach().float().norm()) * unscale
                layer = _layer_of(pname)
                if not math.isfinite(norm):
                    non_finite.add(layer)
                sq[layer] = sq.get(layer, 0.0) + norm * norm
            for layer, s in sq.items():
                per_layer[layer] = max(per_layer.get(layer, 0.0), math.sqrt(s))
            global_norms.append(math.sqrt(sum(sq.values())))
            step.update()
    finally:
        batches.close()
    top = sorted(per_layer.items(), key=lambda kv: -kv[1] if math.isfinite(kv[1]) else -math.inf)
    finite = {k: v for k, v in per_layer.items() if math.isfinite(v)}
    vanishing = sorted(k for k, v in finite.items() if v < GRAD_VANISH)
    evidence = {
        "steps": len(global_norms),
        "global_norm": global_norms,
        "top_layers": [{"layer": k, "grad_norm": v} for k, v in top[:5]],
        "smallest_layers": [
            {"layer": k, "grad_norm": v}
            for k, v in sorted(finite.items(), key=lambda kv: kv[1])[:5]
        ],
        "params_without_grad": no_grad,
    }
    findings = []
    if non_finite or not all(math.isfinite(g) for g in global_norms):
        findings.append(
            Finding(
                name,
                "error",
                f"non-finite gradients in {len(non_finite)} layer(s) "
                f"({', '.join(sorted(non_finite)[:5])}) within {len(global_norms)} updates.",
                evidence,
                "Lower optim.lr, clip (train.grad_clip_norm=1.0), check the data for NaN/inf "
                "and the loss for log(0).",
            )
        )
    elif max(global_norms) > GRAD_EXPLODE:
        findings.append(
            Finding(
                name,
                "warning",
                f"exploding gradients: global norm up to {max(global_norms):.3g} "
                f"(> {GRAD_EXPLODE:g}); largest in {top[0][0]}.",
                evidence,
                "Clip gradients (train.grad_clip_norm=1.0), lower optim.lr, or add normalisation.",
            )
        )
    if vanishing:
        findings.append(
            Finding(
                name,
                "warning",
                f"vanishing gradients: {len(vanishing)} layer(s) below {GRAD_VANISH:g} "
                f"({', '.join(vanishing[:5])}); they barely train.",
                evidence,
                "Use model.init=kaiming for ReLU nets, add normalisation or residual "
                "connections, or check for saturated activations.",
            )
        )
    if not findings:
        findings.append(
            Finding(
                name,
                "ok",
                f"global grad norm {min(global_norms):.3g}..{max(global_norms):.3g} over "
                f"{len(global_norms)} updates",
                evidence,
            )
        )
    return findings


def _batches(loader: Any) -> Iterator[dict[str, Any]]:
    """Readable batches of ``loader``, repeating it as often as needed."""
    while True:
        got = False
        for batch in loader:
            if batch["image"] is not None:
                got = True
                yield batch
        if not got:
            raise DataError("no training batch could be read (every sample was skipped).")


@register_check("train.learning_rate")
def check_learning_rate(ctx: DoctorContext) -> list[Finding]:
    """A short LR range test on a copy; the configured LR against divergence and suggestion."""
    from visiontrain.tools.lr_find import run_on_parts

    name = "train.learning_rate"
    model = ctx.model_copy()
    probe = build_optimizer(buildable_optim(ctx.cfg.optim), model)
    parts = dataclasses.replace(ctx.parts, model=model, optimizer=probe)
    result = run_on_parts(ctx.cfg, parts, probe, LR_START, LR_END, LR_STEPS)
    diverged = result.stopped_early
    lr = _config_lr(ctx)
    evidence = {
        "configured_lr": ctx.cfg.optim.lr,
        "suggestion": result.suggestion,
        "suggestion_rule": result.suggestion_rule,
        "min_loss_lr_div10": result.min_loss_lr_div10,
        "diverged_at_lr": result.last_lr if diverged else None,
        "ended": result.reason,
        "steps": len(result.lrs),
        "sweep": [LR_START, LR_END],
    }
    fix = (
        f"Set optim.lr near {max(result.suggestion, result.min_loss_lr_div10):.2g} (or "
        "optim.lr=find to measure it with a full-length test at train time)."
    )
    if lr is None:
        return [
            Finding(
                name,
                "ok",
                f"optim.lr=find; a short test suggests {result.suggestion:.2g}",
                evidence,
            )
        ]
    if diverged and lr >= result.last_lr:
        return [
            Finding(
                name,
                "error",
                f"optim.lr={lr:g} is at or above the LR where the loss diverged "
                f"({result.last_lr:.2g}, {result.reason}).",
                evidence,
                fix,
            )
        ]
    # A 40-step curve is short: its steepest descent can sit at the very start of the sweep
    # while the EMA settles. The larger of the two usual rules is the safer yardstick.
    reference = max(result.suggestion, result.min_loss_lr_div10)
    evidence["reference_lr"] = reference
    if lr > 10 * reference:
        return [
            Finding(
                name,
                "warning",
                f"optim.lr={lr:g} is more than 10x what the range test suggests "
                f"({reference:.2g}: the larger of steepest descent and min-loss/10).",
                evidence,
                fix,
            )
        ]
    return [
        Finding(
            name,
            "ok",
            f"optim.lr={lr:g}; the range test suggests {result.suggestion:.2g}",
            evidence,
        )
    ]


# ---------------------------------------------------------------------------------- eval


def _same(a: Any, b: Any) -> bool:
    """Exactly equal outputs: tensors, or lists/dicts of them (a detector's output)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@register_check("eval.mode")
def check_eval_mode(ctx: DoctorContext) -> list[Finding]:
    """The evaluation path must be in eval mode, deterministic, and leave buffers alone."""
    name = "eval.mode"
    model = ctx.model_copy()
    batch = ctx.train_batch()
    before = {k: v.detach().clone() for k, v in model.named_buffers()}
    precision = Precision(ctx.cfg.train.precision, ctx.parts.device)
    model.eval()
    not_eval_after_eval = [n or "(model)" for n, m in model.named_modules() if m.training]
    outputs: list[Any] = []
    training_during: list[str] = []

    def record(_batch: dict[str, Any], out: Any) -> None:
        outputs.append(out)
        if not training_during:
            training_during.extend(n or "(model)" for n, m in model.named_modules() if m.training)

    # The evaluation loop itself (engine.evaluate), over the same batch twice.
    infer_batches(model, [batch, batch], ctx.parts.task, ctx.prep, precision, record)
    first, second = outputs
    changed = [
        k
        for k, v in model.named_buffers()
        if k in before and (v.shape != before[k].shape or not torch.equal(v, before[k]))
    ]
    same = _same(first, second)
    evidence = {
        "modules_in_train_mode_after_eval": not_eval_after_eval[:10],
        "modules_in_train_mode_after_forward": training_during[:10],
        "buffers_changed": changed[:10],
        "buffers_checked": len(before),
        "outputs_identical": same,
    }
    problems = []
    if not_eval_after_eval:
        problems.append(f"{len(not_eval_after_eval)} module(s) stay in train mode after eval()")
    if training_during:
        problems.append(
            f"the forward switches {len(training_during)} module(s) back to train mode "
            f"({', '.join(training_during[:3])})"
        )
    if changed:
        problems.append(f"evaluation changed {len(changed)} buffer(s) ({', '.join(changed[:3])})")
    if not same:
        problems.append("two evaluation forwards of the same batch differ")
    if problems:
        return [
            Finding(
                name,
                "error",
                "; ".join(problems) + ": validation scores are noisy and BatchNorm statistics "
                "drift with every evaluation.",
                evidence,
                "Do not call self.train() (or set .training) inside forward; keep dropout and "
                "BatchNorm behaviour tied to module.training; do not update buffers in eval.",
            )
        ]
    return [
        Finding(
            name,
            "ok",
            f"eval mode holds, outputs repeat exactly, {len(before)} buffers unchanged",
            evidence,
        )
    ]


# ----------------------------------------------------------------------------- pipeline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@register_check("data.loader_speed")
def check_loader_speed(ctx: DoctorContext) -> list[Finding]:
    """Time spent waiting for batches vs computing training steps (a short run on a copy)."""
    name = "data.loader_speed"
    device = ctx.parts.device
    model = ctx.model_copy()
    model.train()
    opt = build_optimizer(buildable_optim(ctx.cfg.optim), model)
    step = ctx.step(model, opt)
    accumulate = ctx.cfg.train.accumulate
    loader = build_loaders(ctx.cfg, ctx.parts.bundle, device).train
    waits: list[float] = []
    computes: list[float] = []
    batches = _batches(loader)
    started = time.perf_counter()
    try:
        # The first batch pays for worker start-up and lazy init: measured but not counted.
        for i in range(LOADER_STEPS + 1):
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            # Training's own micro-batch and, every train.accumulate batches, its update.
            last = (i + 1) % accumulate == 0
            step.forward_backward(batch, 1.0 / accumulate, last, 0, i)
            if last:
                step.update()
            _sync(device)  # without it CUDA time would hide in the next wait
            t2 = time.perf_counter()
            if i:
                waits.append(t1 - t0)
                computes.append(t2 - t1)
            if i >= 3 and time.perf_counter() - started > LOADER_BUDGET_S:
                break
    finally:
        batches.close()
    wait, compute = sum(waits), sum(computes)
    share = wait / (wait + compute) if wait + compute > 0 else 0.0
    evidence = {
        "batches_timed": len(waits),
        "wait_ms_per_batch": round(1000 * wait / max(1, len(waits)), 3),
        "compute_ms_per_batch": round(1000 * compute / max(1, len(computes)), 3),
        "wait_share": round(share, 3),
        "num_workers": ctx.cfg.data.num_workers,
        "pin_memory": loader.pin_memory,
    }
    if share > LOADER_WAIT_SHARE:
        return [
            Finding(
                name,
                "warning",
                f"the step waits for data {share:.0%} of the time "
                f"({evidence['wait_ms_per_batch']} ms/batch waiting vs "
                f"{evidence['compute_ms_per_batch']} ms/batch computing).",
                evidence,
                "Raise data.num_workers (now "
                f"{ctx.cfg.data.num_workers}), keep data.pin_memory=true on GPU, use lighter "
                "augmentation (data.augment) or pre-resize/cache the images.",
            )
        ]
    return [
        Finding(
            name,
            "ok",
            f"waiting for data {share:.0%} of the step time",
            evidence,
        )
    ]


@register_check("precision")
def check_precision(ctx: DoctorContext) -> list[Finding]:
    """One step under bf16 autocast (CPU, CUDA) and fp16 + GradScaler (CUDA): all finite."""
    name = "precision"
    device = ctx.parts.device
    batch = ctx.train_batch()
    findings = []
    modes: list[tuple[str, torch.dtype]] = [("bf16", torch.bfloat16)]
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            modes = []
            findings.append(Finding(f"{name}.bf16", "ok", "not applicable: no bf16 on this GPU"))
        modes.append(("fp16", torch.float16))
    else:
        findings.append(
            Finding(
                f"{name}.fp16",
                "ok",
                "not applicable on CPU (fp16 with GradScaler is a CUDA mode)",
                {"device": str(device)},
            )
        )
    for mode, _dtype in modes:
        model = ctx.model_copy()
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        step = ctx.step(model, opt, Precision(mode, device))
        loss_value, grads_finite, tries = math.nan, False, 0
        # fp16's first scale (65536) may overflow; the scaler then halves it and skips the
        # step, which is normal. Only gradients that stay non-finite are a fault.
        while tries < 5:
            tries += 1
            loss_value = float(step.forward_backward(batch)["loss"].float())
            if not math.isfinite(loss_value):
                opt.zero_grad(set_to_none=True)
                break
            result = step.update(want_norm=True)
            grads_finite = result.grad_norm is None or bool(torch.isfinite(result.grad_norm))
            if grads_finite or mode != "fp16":
                break
        evidence = {
            "device": str(device),
            "loss": loss_value,
            "grads_finite": grads_finite,
            "tries": tries,
        }
        if math.isfinite(loss_value) and grads_finite:
            findings.append(
                Finding(f"{name}.{mode}", "ok", f"{mode} step: loss {loss_value:.4g}", evidence)
            )
        else:
            what = "loss" if not math.isfinite(loss_value) else "gradients"
            findings.append(
                Finding(
                    f"{name}.{mode}",
                    "error",
                    f"one {mode} step gives non-finite {what} on {device.type}.",
                    evidence,
                    "Train with train.precision=32 (or bf16 instead of fp16); look for ops that "
                    "overflow in half precision (exp, large sums) and keep them in float32.",
                )
            )
    return findings


# -------------------------------------------------------------------------------- runner


def run_doctor(
    cfg: Config,
    console: Console,
    checks: list[str] | None = None,
    parts: Parts | None = None,
) -> list[Finding]:
    """Run the registered checks (or the named ones) and return their findings.

    Args:
        cfg: The resolved config.
        console: Where progress lines go.
        checks: Names of the checks to run (in registry order); None runs all.
        parts: Built parts to check; None builds them from ``cfg`` as ``train`` would.

    Returns:
        The findings, in check order.

    Raises:
        ConfigError: for an unknown check name (and anything ``build_parts`` raises).
    """
    names = list_checks()
    if checks is not None:
        for c in checks:
            _CHECKS.get(c)  # an unknown name is refused with the nearest one
        names = [n for n in names if n in checks]
    if parts is None:
        parts = build_parts(cfg)
    ctx = DoctorContext(cfg, parts, console)
    findings: list[Finding] = []
    for name in names:
        start = time.perf_counter()
        try:
            found = _CHECKS.get(name)(ctx)
        except Exception as exc:  # one broken check must not hide the others' findings
            found = [
                Finding(
                    name,
                    "error",
                    f"the check failed with {type(exc).__name__}: {exc}",
                    {"exception": type(exc).__name__},
                    "Fix the cause named in the message; run `visiontrain train` on the same "
                    "config to see the full traceback.",
                )
            ]
        seconds = time.perf_counter() - start
        for f in found:
            f.evidence.setdefault("check_seconds", round(seconds, 3))
        findings.extend(found)
    return findings


def output_dir(cfg: Config) -> Path:
    """``run.dir/run.name``, or ``run.dir/doctor-<task>-<data>-<timestamp>``."""
    from visiontrain.rundir import tool_dir

    return tool_dir(cfg, f"doctor-{cfg.task}")


_STYLE = {"ok": "green", "warning": "yellow", "error": "bold red"}


def _rounded(value: Any) -> Any:
    """Floats to 4 significant digits for the terminal; doctor.json keeps them whole."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _evidence_text(evidence: dict[str, Any], limit: int = 160) -> str:
    parts = []
    for k, v in evidence.items():
        if k in ("layers", "loss_curve", "check_seconds"):
            continue
        parts.append(f"{k}={_rounded(_jsonable(v))}")
    text = "; ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def print_report(findings: list[Finding], console: Console) -> None:
    """A table of the findings: level, check, and the message with its fix and evidence."""
    table = Table(title="visiontrain doctor", show_lines=True)
    # Level and check name never wrap, so that they stay greppable in a narrow terminal.
    table.add_column("level", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("finding", overflow="fold")
    for f in findings:
        text = escape(f.message)
        if f.fix:
            text += f"\n[bold]fix:[/] {escape(f.fix)}"
        evidence = _evidence_text(f.evidence)
        if evidence:
            text += f"\n[dim]{escape(evidence)}[/]"
        table.add_row(f"[{_STYLE[f.level]}]{f.level}[/]", f.name, text)
    console.print(table)
    counts = {lvl: sum(f.level == lvl for f in findings) for lvl in LEVELS}
    console.print(
        f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['ok']} ok",
        highlight=False,
    )


def write_report(findings: list[Finding], cfg: Config, device: torch.device, folder: Path) -> Path:
    """Write ``doctor.json`` (atomically) into ``folder`` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "doctor.json"
    counts = {lvl: sum(f.level == lvl for f in findings) for lvl in LEVELS}
    atomic_write_json(
        path,
        {
            "counts": counts,
            "device": str(device),
            "findings": [f.to_dict() for f in findings],
            "config": cfg.to_dict(),
        },
    )
    return path


def cmd_doctor(args: argparse.Namespace, console: Console) -> int:
    """``visiontrain doctor``: run the checks, print the report, write doctor.json."""
    from visiontrain.config import load_tool_config

    cfg = load_tool_config(args.items, "doctor", "checks a fresh build of the config")
    checks = None
    if args.check:
        checks = [c.strip() for item in args.check for c in item.split(",") if c.strip()]
    parts = build_parts(cfg)
    for note in parts.bundle.notes:
        console.print(f"note: {note}", highlight=False)
    findings = run_doctor(cfg, console, checks, parts)
    folder = output_dir(cfg)
    write_report(findings, cfg, parts.device, folder)
    print_report(findings, console)
    print(folder, flush=True)
    return EXIT_FAILURE if any(f.level == "error" for f in findings) else EXIT_OK


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``doctor`` sub-command to the CLI's sub-parsers.

    Args:
        sub: The object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The ``doctor`` parser.
    """
    p = sub.add_parser(
        "doctor",
        help="preflight: check data, model, training step, eval path, loader and precision",
        description="Build the config's data and model as `train` would and run named checks: "
        f"{', '.join(list_checks())}. Each finding has a level (ok, warning, error), the "
        "numbers behind it and a fix. Writes doctor.json to run.dir/run.name (default "
        "doctor-<task>-<data>-<timestamp>); the last line printed is that folder. Exit 1 "
        "when any finding is an error.",
        epilog="Example: visiontrain doctor configs/defects.yaml optim.lr=0.5 "
        "--check train.learning_rate",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this check (repeatable, or comma-separated); default: all",
    )
    p.set_defaults(func=cmd_doctor)
    return p
