"""Measure the configured data loader and mixed precision, and pick settings from the numbers.

* ``visiontrain bench loader`` times the run's real training loader (:func:`build_loader`
  with its transforms and collate) over worker counts, pinning and prefetch depth, and
  recommends the fastest setting, preferring fewer workers when within 5% of the best.
* ``visiontrain bench amp`` times one optimizer step of the real model through the task's
  ``forward``/``loss`` at precision 32, bf16 and fp16; on CUDA also the peak memory and
  the largest batch that fits.
* ``data.num_workers=auto`` (:func:`resolve_num_workers`) runs a short version of the
  loader measurement at build time and writes the chosen integer into the config.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from visiontrain.config import Config
from visiontrain.data.workers import (
    WITHIN,
    WORKER_CANDIDATES,
    loader_grid,
    measure_loader,
    recommend,
)
from visiontrain.engine.step import Step
from visiontrain.errors import EXIT_OK, UserError
from visiontrain.io import atomic_write, atomic_write_json

DEFAULT_BATCHES = 30
WARMUP_BATCHES = 3
DEFAULT_STEPS = 20
AMP_WARMUP_STEPS = 3
PRECISIONS = ("32", "bf16", "fp16")
# The batch-size search doubles up to this; beyond it the answer stops guiding a choice
# and the search itself would take minutes.
MAX_BATCH = 4096


def output_dir(cfg: Config, kind: str) -> Path:
    """``run.dir/run.name``, or ``run.dir/bench-<kind>-<data>-<timestamp>``."""
    from visiontrain.rundir import tool_dir

    return tool_dir(cfg, f"bench-{kind}")


def loader_plot(rows: list[dict[str, Any]], chosen: dict[str, Any]) -> bytes:
    """PNG bar chart of images/s per setting, the recommended one highlighted."""
    import io

    # The object API with the Agg canvas: no pyplot state, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 0.6 + 0.35 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    labels = [r["label"] for r in rows]
    colors = ["C2" if r is chosen else "C0" for r in rows]
    ax.barh(labels, [r["images_per_s"] for r in rows], color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("images/s (training loader)")
    ax.set_title(f"recommended: {chosen['label']}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _load(args: argparse.Namespace) -> Config:
    from visiontrain.config import load_tool_config

    return load_tool_config(args.items, "bench", "measures a fresh build of the config")


def cmd_bench_loader(args: argparse.Namespace, console: Console) -> int:
    """``visiontrain bench loader``: sweep loader settings, write the table, plot and JSON."""
    from visiontrain.data import build_data
    from visiontrain.engine.parts import resolve_device
    from visiontrain.seed import seed_everything

    if args.batches < 1:
        raise UserError(f"--batches {args.batches}: time at least 1 batch per setting.")
    cfg = _load(args)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    bundle = build_data(cfg.data, cfg.task)
    cuda = device.type == "cuda"
    settings, skipped = loader_grid(WORKER_CANDIDATES, cuda)
    console.print(
        f"measuring {len(settings)} loader settings, {WARMUP_BATCHES} warm-up + "
        f"{args.batches} timed batches each (data.num_workers, data.pin_memory and "
        "data.prefetch_factor are swept, not read from the config)",
        highlight=False,
    )
    rows = [measure_loader(cfg, bundle, device, s, args.batches, WARMUP_BATCHES) for s in settings]
    chosen = recommend(rows)
    cpus = os.cpu_count() or 1
    notes = []
    if skipped:
        notes.append(
            f"skipped num_workers {', '.join(map(str, skipped))}: more than the {cpus} CPUs"
        )
    if not cuda:
        notes.append("pin_memory: not applicable on CPU (pinning speeds host→GPU copies); off")

    table = Table(title=f"training loader, {cfg.data.name}, batch {cfg.data.batch_size}")
    for col in ("workers", "pin", "prefetch", "batches/s", "images/s", ""):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["num_workers"]),
            "on" if r["pin_memory"] else "off",
            "-" if r["prefetch_factor"] is None else str(r["prefetch_factor"]),
            f"{r['batches_per_s']:.1f}",
            f"{r['images_per_s']:.0f}",
            "recommended" if r is chosen else "",
        )
    console.print(table)
    for note in notes:
        console.print(f"note: {note}", highlight=False)
    overrides = f"data.num_workers={chosen['num_workers']}"
    if cuda:
        overrides += f" data.pin_memory={str(chosen['pin_memory']).lower()}"
    if chosen["prefetch_factor"] is not None:
        overrides += f" data.prefetch_factor={chosen['prefetch_factor']}"
    console.print(f"recommended: {overrides}", highlight=False)

    folder = output_dir(cfg, "loader")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        folder / "bench_loader.json",
        {
            "data": cfg.data.name,
            "batch_size": cfg.data.batch_size,
            "device": str(device),
            "cpu_count": cpus,
            "warmup_batches": WARMUP_BATCHES,
            "timed_batches": args.batches,
            "rows": rows,
            "skipped_num_workers": skipped,
            "pin_memory_applicable": cuda,
            "notes": notes,
            "recommended": chosen,
            "recommended_overrides": overrides,
        },
    )
    png = loader_plot(rows, chosen)
    atomic_write(folder / "bench_loader.png", lambda fh: fh.write(png))
    print(folder, flush=True)
    return EXIT_OK


def _not_applicable(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` cannot be measured on ``device``, or None."""
    if precision == "fp16" and device.type != "cuda":
        return "fp16 autocast with loss scaling is a CUDA feature; not applicable on CPU"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16 support"
    return None


def _repeat(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """A loader batch of ``n`` samples made by cycling through one real batch."""
    x, y = batch["image"], batch["target"]
    idx = torch.arange(n) % len(x)
    # Detection targets are a list of dicts, one per image.
    y = y[idx.to(y.device)] if isinstance(y, torch.Tensor) else [y[i] for i in idx.tolist()]
    return {"image": x[idx.to(x.device)], "target": y, "skipped": []}


def cmd_bench_amp(args: argparse.Namespace, console: Console) -> int:
    """``visiontrain bench amp``: step time per precision; on CUDA memory and max batch."""
    from visiontrain.engine.optim import build_optimizer
    from visiontrain.engine.parts import build_parts, build_step, buildable_optim
    from visiontrain.engine.precision import Precision

    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: time at least 1 step per precision.")
    cfg = _load(args)
    parts = build_parts(cfg)
    device, model = parts.device, parts.model
    cuda = device.type == "cuda"
    batch = next(b for b in parts.loaders.train if b["image"] is not None)
    size = len(batch["image"])
    initial = copy.deepcopy(model.state_dict())
    model.train()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(train_step: Step, b: dict[str, Any]) -> None:
        # One whole update as training runs it (engine.step): the batch preparation,
        # train.accumulate micro-batches, autocast, the scaled backward, clipping.
        train_step.train_update(itertools.repeat(b), cfg.train.accumulate)

    rows: list[dict[str, Any]] = []
    for name in PRECISIONS:
        reason = _not_applicable(name, device)
        if reason:
            rows.append({"precision": name, "applicable": False, "reason": reason})
            continue
        # Every precision starts from the same weights and a fresh optimizer.
        model.load_state_dict(initial)
        optimizer = build_optimizer(buildable_optim(cfg.optim), model)
        train_step = build_step(cfg, parts, optimizer=optimizer, precision=Precision(name, device))
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(AMP_WARMUP_STEPS):
            step(train_step, batch)
        times = []
        for _ in range(args.steps):
            sync()
            t0 = time.perf_counter()
            step(train_step, batch)
            sync()
            times.append(time.perf_counter() - t0)
        row: dict[str, Any] = {
            "precision": name,
            "applicable": True,
            "batch_size": size,
            "median_step_ms": round(statistics.median(times) * 1e3, 4),
        }
        if cuda:
            row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            row["max_batch"], row["max_batch_capped"] = _largest_batch(
                lambda b, s=train_step: step(s, b), batch, sync
            )
        rows.append(row)
    model.load_state_dict(initial)
    base = next(r for r in rows if r["precision"] == "32")["median_step_ms"]
    for r in rows:
        if r["applicable"]:
            r["speedup_vs_32"] = round(base / r["median_step_ms"], 3)

    table = Table(title=f"train step, {cfg.model.name} on {cfg.data.name}, {device}")
    columns = ["precision", "batch", "median step ms", "speedup vs 32"]
    if cuda:
        columns += ["peak MiB", "largest batch"]
    for col in columns:
        table.add_column(col, justify="left" if col == "precision" else "right")
    for r in rows:
        if not r["applicable"]:
            # The reason is printed as a note below the table.
            table.add_row(r["precision"], *["n/a"] * (len(columns) - 1))
            continue
        cells = [
            r["precision"],
            str(r["batch_size"]),
            f"{r['median_step_ms']:.2f}",
            f"{r['speedup_vs_32']:.2f}x",
        ]
        if cuda:
            cap = "+" if r["max_batch_capped"] else ""
            cells += [f"{r['peak_memory_mb']:.0f}", f"{r['max_batch']}{cap}"]
        table.add_row(*cells)
    console.print(table)
    notes = [f"median of {args.steps} steps after {AMP_WARMUP_STEPS} warm-up steps"]
    if not cuda:
        notes.append("on CPU only step time is reported: no GPU memory to measure")
    else:
        notes.append(
            f"largest batch: doubling from {size} until out of memory, capped at {MAX_BATCH}"
        )
    for r in rows:
        if not r["applicable"]:
            notes.append(f"{r['precision']}: {r['reason']}")
    for note in notes:
        console.print(f"note: {note}", highlight=False)

    folder = output_dir(cfg, "amp")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        folder / "bench_amp.json",
        {
            "data": cfg.data.name,
            "model": cfg.model.name,
            "task": cfg.task,
            "device": str(device),
            "steps": args.steps,
            "warmup_steps": AMP_WARMUP_STEPS,
            "rows": rows,
            "notes": notes,
        },
    )
    print(folder, flush=True)
    return EXIT_OK


def _largest_batch(
    step: Callable[[dict[str, Any]], None],
    batch: dict[str, Any],
    sync: Callable[[], None],
) -> tuple[int | None, bool]:
    """Double the batch from ``len(x)`` until a step runs out of CUDA memory.

    Returns:
        The largest batch that ran (None if even ``len(x)`` did not), and whether the
        search stopped at :data:`MAX_BATCH` rather than at an out-of-memory error.
    """
    size, fits = len(batch["image"]), None
    while size <= MAX_BATCH:
        big = _repeat(batch, size)
        oom = False
        try:
            step(big)
            sync()
        except torch.OutOfMemoryError:
            oom = True
        # Free the failed attempt's tensors before the next, larger one is allocated.
        del big
        torch.cuda.empty_cache()
        if oom:
            return fits, False
        fits, size = size, size * 2
    return fits, True


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command (``bench loader``, ``bench amp``) to the CLI.

    Args:
        sub: The object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The ``bench`` parser.
    """
    p = sub.add_parser(
        "bench",
        help="measure the data loader or mixed precision for a config",
        description="Measure a config's training loader (`bench loader`) or its train step "
        "at each precision (`bench amp`). Results go to run.dir/run.name (default "
        "bench-<what>-<data>-<timestamp>); the last line printed is that folder.",
    )
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    q = what.add_parser(
        "loader",
        help="images/s of the training loader per workers/pinning/prefetch setting",
        description="Time the training loader `train` builds (transforms and collate "
        f"included) for num_workers in {WORKER_CANDIDATES} up to the CPU count, pin_memory "
        "on/off (CUDA only), and prefetch_factor 2/4 (with workers), after "
        f"{WARMUP_BATCHES} warm-up batches each. Writes bench_loader.json and "
        f"bench_loader.png; recommends the fastest setting, fewer workers within {WITHIN:.0%}.",
        epilog="Example: visiontrain bench loader configs/imagefolder.yaml data.root=./pets",
    )
    q.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    q.add_argument(
        "--batches",
        type=int,
        default=DEFAULT_BATCHES,
        help=f"timed batches per setting (default {DEFAULT_BATCHES})",
    )
    q.set_defaults(func=cmd_bench_loader)
    q = what.add_parser(
        "amp",
        help="train-step time per precision (32, bf16, fp16); GPU memory and max batch",
        description="Time forward, backward and optimizer step of the config's model "
        "through its task at precision 32, bf16 and fp16 (fp16 on CUDA only): median over "
        f"--steps after {AMP_WARMUP_STEPS} warm-up steps, speedup against 32. On CUDA also "
        "peak memory and the largest batch that fits (doubling until out of memory, capped "
        f"at {MAX_BATCH}). train.precision is swept, not read. Writes bench_amp.json.",
        epilog="Example: visiontrain bench amp configs/defects.yaml --steps 50",
    )
    q.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    q.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"timed steps per precision (default {DEFAULT_STEPS})",
    )
    q.set_defaults(func=cmd_bench_amp)
    return p
