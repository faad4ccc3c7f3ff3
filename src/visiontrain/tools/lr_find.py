"""The LR range test (Smith 2015, "Cyclical Learning Rates"; fastai's ``lr_find``).

The learning rate grows exponentially from ``start`` to ``end``, one optimizer update per
step, while the training loss is recorded and smoothed with a bias-corrected EMA. The
test stops once the smoothed loss exceeds ``diverge`` times its minimum. The suggestion
is the LR where the smoothed loss falls fastest per decade of LR, before its minimum;
``min_loss_lr_div10`` (the LR of the minimum over ten) is the other common rule.

* :func:`range_test` is the generic core: it drives any ``step_fn(lr) -> loss``.
* :func:`find_lr` builds a config's data, task, model and optimizer as ``train`` does
  and runs the test through ``task.forward``/``task.loss``, exactly like
  ``Trainer.train_step`` (precision autocast, uint8 normaliser, accumulation, clipping).
  Weights, optimizer state and RNG states are restored afterwards, so nothing leaks into
  a following run.
* ``optim.lr=find`` in a train config runs the test first (:func:`resolve_lr_find`) and
  trains with the suggestion; ``visiontrain lr-find`` (:func:`cmd_lr_find`) only tests.
"""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader

from visiontrain.config import Config
from visiontrain.engine.optim import build_optimizer
from visiontrain.engine.parts import Parts, build_parts, build_step, buildable_optim
from visiontrain.errors import EXIT_OK, DataError, UserError
from visiontrain.io import atomic_write, atomic_write_json
from visiontrain.rundir import LR_FIND_JSON, LR_FIND_PNG
from visiontrain.seed import capture_rng, restore_rng

DEFAULT_START = 1e-7
DEFAULT_END = 10.0
DEFAULT_STEPS = 100
MIN_STEPS = 5
STEEPEST = "steepest descent"


@dataclass
class LRFindResult:
    """The outcome of one range test.

    Attributes:
        lrs: LR of each recorded step.
        losses: Raw training loss of each recorded step.
        smoothed: Bias-corrected EMA of ``losses``.
        suggestion: LR at the steepest descent of ``smoothed`` w.r.t. log10(lr).
        suggestion_rule: How ``suggestion`` was chosen (``steepest descent``, or the
            min-loss/10 fallback when the curve is too short to have a slope).
        min_loss_lr_div10: LR at the minimum of ``smoothed``, divided by ten.
        stopped_early: Whether the test stopped before reaching ``end``.
        reason: Why the test ended.
        last_lr: LR of the last update attempted (a non-finite loss is not recorded).
        start: First LR of the sweep.
        end: Last LR the sweep would reach.
        steps: Updates the sweep would take.
        config: The resolved config the test ran with (``find_lr`` fills it).
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    suggestion_rule: str
    min_loss_lr_div10: float
    stopped_early: bool
    reason: str
    last_lr: float
    start: float
    end: float
    steps: int
    config: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)

    def summary(self) -> str:
        """One line for the terminal: the suggestion, the other rule, how the test ended."""
        rule = STEEPEST if self.suggestion_rule == STEEPEST else "min-loss/10 fallback"
        ending = (
            f"stopped at lr {self.last_lr:.2g} ({self.reason})"
            if self.stopped_early
            else f"reached the end lr {self.last_lr:.2g} without diverging"
        )
        return (
            f"suggested lr {self.suggestion:.1e} ({rule}); "
            f"min-loss/10 {self.min_loss_lr_div10:.1e}; {ending}"
        )


def check_sweep(start: float, end: float, steps: int) -> None:
    """Refuse a sweep that cannot run: non-positive or reversed bounds, too few steps.

    Raises:
        UserError: with the option names and the fix.
    """
    if not (math.isfinite(start) and math.isfinite(end)) or start <= 0 or end <= 0:
        raise UserError(
            f"--start {start:g} and --end {end:g} must be positive, finite learning rates "
            f"(defaults {DEFAULT_START:g} and {DEFAULT_END:g})."
        )
    if start >= end:
        raise UserError(
            f"--start {start:g} must be below --end {end:g}: the test raises the LR from "
            "start to end."
        )
    if steps < MIN_STEPS:
        raise UserError(
            f"--steps {steps} is too few to see a loss curve; use at least {MIN_STEPS} "
            f"(default {DEFAULT_STEPS})."
        )


def sweep_lrs(start: float, end: float, steps: int) -> list[float]:
    """``steps`` LRs growing geometrically from ``start`` to ``end`` (both included)."""
    ratio = end / start
    return [start * ratio ** (i / (steps - 1)) for i in range(steps)]


def suggest(lrs: list[float], smoothed: list[float], skip: int) -> tuple[float, str]:
    """The LR where ``smoothed`` falls fastest per decade, before its minimum.

    Args:
        lrs: The recorded LRs.
        smoothed: The smoothed losses at those LRs.
        skip: Leading points to ignore; the EMA is still settling there.

    Returns:
        The suggested LR and the rule that chose it.
    """
    best = int(np.argmin(smoothed))
    lo = skip if best - skip >= 2 else 0  # a short curve keeps its first points
    if best - lo < 2:
        # Fewer than three points before the minimum have no meaningful slope.
        return lrs[best] / 10.0, "min-loss/10 (the loss did not fall long enough for a slope)"
    x = np.log10(np.asarray(lrs[lo : best + 1]))
    y = np.asarray(smoothed[lo : best + 1])
    slope = np.gradient(y, x)
    return float(lrs[lo + int(np.argmin(slope))]), STEEPEST


def range_test(
    step_fn: Callable[[float], torch.Tensor],
    start: float,
    end: float,
    steps: int,
    smoothing: float = 0.98,
    diverge: float = 4.0,
) -> LRFindResult:
    """Run the LR range test on any training step.

    Args:
        step_fn: ``step_fn(lr)`` sets the LR, runs one optimizer update on the next batch
            and returns that batch's loss (a tensor, on any device, or a float).
        start: First LR.
        end: Last LR, reached after ``steps`` updates unless the loss diverges first.
        steps: Number of updates.
        smoothing: EMA factor of the loss (0 disables smoothing).
        diverge: Stop once the smoothed loss exceeds this multiple of its minimum.

    Returns:
        The curve, the suggestion and how the test ended.

    Raises:
        UserError: for a sweep that cannot run (see :func:`check_sweep`).
    """
    check_sweep(start, end, steps)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing={smoothing} must lie in [0, 1)")
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg, lowest = 0.0, math.inf
    stopped, reason, last_lr = False, "reached the end lr", start
    for lr in sweep_lrs(start, end, steps):
        last_lr = lr
        # The one host sync per step: the stop decision needs the value.
        loss = float(step_fn(lr))
        if not math.isfinite(loss):
            stopped, reason = True, "loss not finite"
            break
        avg = smoothing * avg + (1.0 - smoothing) * loss
        smooth = avg / (1.0 - smoothing ** (len(lrs) + 1))  # bias correction of the EMA
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(smooth)
        lowest = min(lowest, smooth)
        # A ratio test needs a positive minimum; losses here are non-negative in practice.
        if lowest > 0 and smooth > diverge * lowest:
            stopped, reason = True, "loss diverged"
            break
    if not lrs:
        raise UserError(
            f"the loss was not finite at the first lr {start:g}; the model or data produce "
            "NaN/inf before any update. Check the data and the loss, or lower --start."
        )
    suggestion, rule = suggest(lrs, smoothed, skip=max(1, min(10, steps // 10)))
    best = int(np.argmin(smoothed))
    return LRFindResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggestion=suggestion,
        suggestion_rule=rule,
        min_loss_lr_div10=lrs[best] / 10.0,
        stopped_early=stopped,
        reason=reason,
        last_lr=last_lr,
        start=start,
        end=end,
        steps=steps,
    )


def _cycle(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """Batches of ``loader`` epoch after epoch (a range test may outlast one epoch)."""
    sampler = loader.batch_sampler
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        seen = False
        for batch in loader:
            if batch["image"] is None:  # every file of the batch was skipped (on_error=skip)
                continue
            seen = True
            yield batch
        if not seen:
            raise DataError(
                "every training batch was skipped as unreadable; the range test has no data. "
                "Check data.root (or set data.on_error=raise to see the first bad file)."
            )


def _step_fn(
    cfg: Config, parts: Parts, optimizer: torch.optim.Optimizer, batches: Iterator[dict[str, Any]]
) -> Callable[[float], torch.Tensor]:
    """One training update (``engine.step``, as ``train`` runs it) at a given LR."""
    step = build_step(cfg, parts, optimizer=optimizer)
    base = optimizer.param_groups[0]["lr"]
    # Param groups with their own LRs keep their ratio to the first group's.
    ratios = [group["lr"] / base for group in optimizer.param_groups]
    count = itertools.count()

    def run(lr: float) -> torch.Tensor:
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio
        # One update = `train.accumulate` micro-batches, so the LR fits the effective batch.
        loss, _ = step.train_update(batches, cfg.train.accumulate, next(count))
        return loss

    return run


def run_on_parts(
    cfg: Config,
    parts: Parts,
    optimizer: torch.optim.Optimizer,
    start: float = DEFAULT_START,
    end: float = DEFAULT_END,
    steps: int = DEFAULT_STEPS,
) -> LRFindResult:
    """Run the range test on built parts; weights, optimizer and RNGs are restored after.

    Args:
        cfg: The resolved config (train options: precision, accumulation, clipping).
        parts: Built by :func:`visiontrain.api.build_parts`.
        optimizer: The optimizer to drive (its LRs are overwritten during the test).
        start: First LR.
        end: Last LR.
        steps: Number of updates.

    Returns:
        The result, with ``config`` set to ``cfg``.
    """
    from visiontrain.data.pipeline import build_loaders

    check_sweep(start, end, steps)
    model = parts.model
    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    rng = capture_rng()
    was_training = model.training
    # A loader of its own: the run's loaders (and their workers) stay untouched.
    loader = build_loaders(cfg, parts.bundle, parts.device).train
    batches = _cycle(loader)
    try:
        model.train()
        result = range_test(_step_fn(cfg, parts, optimizer, batches), start, end, steps)
    finally:
        batches.close()
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        restore_rng(rng)
    result.config = cfg.to_dict()
    return result


def find_lr(
    cfg: Config,
    console: Console,
    start: float = DEFAULT_START,
    end: float = DEFAULT_END,
    steps: int = DEFAULT_STEPS,
) -> LRFindResult:
    """Build what ``train`` would build from ``cfg`` and run the range test on it.

    Args:
        cfg: The resolved config; ``optim.lr`` only sets the ratio between param groups.
        console: Where the data notes are printed.
        start: First LR.
        end: Last LR.
        steps: Number of updates.

    Returns:
        The result; the global RNG states are as they were before the call.
    """
    check_sweep(start, end, steps)
    # build_parts seeds every RNG from train.seed; the caller's streams come back after.
    rng = capture_rng()
    try:
        parts = build_parts(cfg)
        for note in parts.bundle.notes:
            console.print(f"note: {note}", highlight=False)
        return run_on_parts(cfg, parts, parts.optimizer, start, end, steps)
    finally:
        restore_rng(rng)


def resolve_lr_find(cfg: Config, parts: Parts, console: Console) -> LRFindResult:
    """Resolve ``optim.lr=find``: test, then set ``cfg.optim.lr`` and a fresh optimizer.

    The test drives an optimizer of its own and restores the weights and RNGs, so the run
    that follows starts exactly as one given ``optim.lr=<suggestion>`` would.

    Args:
        cfg: The config with ``optim.lr=find``; its ``optim.lr`` is set to the suggestion.
        parts: The run's parts; ``parts.optimizer`` is replaced by one at the suggestion.
        console: Where the summary is printed.

    Returns:
        The test's result (for ``lr_find.json``/``lr_find.png`` in the run directory).
    """
    console.print(
        f"optim.lr=find: LR range test, {DEFAULT_STEPS} updates from {DEFAULT_START:g} "
        f"to {DEFAULT_END:g}",
        highlight=False,
    )
    # A scheduler was attached to parts.optimizer for the checks (it may move LRs and
    # momenta); the test needs the optimizer as configured.
    probe = build_optimizer(buildable_optim(cfg.optim), parts.model)
    result = run_on_parts(cfg, parts, probe, DEFAULT_START, DEFAULT_END, DEFAULT_STEPS)
    cfg.optim.lr = result.suggestion
    parts.optimizer = build_optimizer(cfg.optim, parts.model)
    console.print(f"lr-find: {result.summary()}", highlight=False)
    console.print(f"training with optim.lr={result.suggestion:.6g}", highlight=False)
    return result


def plot_png(result: LRFindResult) -> bytes:
    """Loss vs LR (log x): raw and smoothed curves, the suggestion marked."""
    # The object API with the Agg canvas: no pyplot state, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="C0", alpha=0.3, lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed loss")
    ax.axvline(
        result.suggestion,
        color="C3",
        ls="--",
        label=f"suggestion {result.suggestion:.1e} ({result.suggestion_rule})",
    )
    ax.axvline(
        result.min_loss_lr_div10,
        color="C2",
        ls=":",
        label=f"min-loss/10 {result.min_loss_lr_div10:.1e}",
    )
    ax.set_xscale("log")
    # A diverging tail would squash the useful part of the curve; cap the view above it.
    best = int(np.argmin(result.smoothed))
    top = max(result.smoothed[: best + 1])
    bottom = min(min(result.losses), min(result.smoothed))
    if top > bottom:
        pad = 0.1 * (top - bottom)
        ax.set_ylim(bottom - pad, top + 3 * pad)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_lr_find(result: LRFindResult, folder: Path) -> None:
    """Write ``lr_find.json`` and ``lr_find.png`` into ``folder``, each atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / LR_FIND_JSON, result.to_dict())
    png = plot_png(result)
    atomic_write(folder / LR_FIND_PNG, lambda fh: fh.write(png))


def output_dir(cfg: Config) -> Path:
    """``run.dir/run.name``, or ``run.dir/lr-find-<task>-<data>-<timestamp>``."""
    from visiontrain.rundir import tool_dir

    return tool_dir(cfg, f"lr-find-{cfg.task}")


def cmd_lr_find(args: argparse.Namespace, console: Console) -> int:
    """``visiontrain lr-find``: run the range test, write its files, print the folder last."""
    from visiontrain.config import load_tool_config

    check_sweep(args.start, args.end, args.steps)
    cfg = load_tool_config(args.items, "lr-find", "tests from the model's initial weights")
    result = find_lr(cfg, console, args.start, args.end, args.steps)
    folder = output_dir(cfg)
    write_lr_find(result, folder)
    console.print(result.summary(), highlight=False)
    print(folder, flush=True)
    return EXIT_OK


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``lr-find`` sub-command to the CLI's sub-parsers.

    Args:
        sub: The object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The ``lr-find`` parser.
    """
    p = sub.add_parser(
        "lr-find",
        help="LR range test: suggest a learning rate for a config",
        description="The LR range test (Smith 2015; fastai's lr_find): build the config's "
        "data, model and optimizer as `train` would, raise the LR exponentially from --start "
        "to --end over --steps updates, and stop when the smoothed loss diverges. Writes "
        "lr_find.json and lr_find.png to run.dir/run.name (default "
        "lr-find-<task>-<data>-<timestamp>); the last line printed is that folder. "
        "`optim.lr=find` in `visiontrain train` runs the same test and trains with its "
        "suggestion.",
        epilog="Example: visiontrain lr-find configs/defects.yaml optim.name=sgd --steps 200",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument(
        "--start", type=float, default=DEFAULT_START, help=f"first LR (default {DEFAULT_START:g})"
    )
    p.add_argument(
        "--end", type=float, default=DEFAULT_END, help=f"last LR (default {DEFAULT_END:g})"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"optimizer updates (default {DEFAULT_STEPS}; at least {MIN_STEPS}); the "
        "training data repeats when an epoch has fewer batches",
    )
    p.set_defaults(func=cmd_lr_find)
    return p
