"""What every doctor check shares: findings, the context, the registry, thresholds."""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from rich.console import Console
from torch import nn

from visiontrain.config import Config
from visiontrain.data.pipeline import build_loaders
from visiontrain.data.sources import FileSplit, Split, SubsetSplit
from visiontrain.engine.parts import Parts, build_prep, build_step
from visiontrain.engine.precision import Precision
from visiontrain.engine.step import BatchPrep, Step
from visiontrain.errors import DataError
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
