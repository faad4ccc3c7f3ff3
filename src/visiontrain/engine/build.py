"""Assemble a run from a resolved config: data, model, task, optimizer, trainer, callbacks.

Everything that can fail on bad input (data, model, option checks) is built before the
run directory is created, so a refused command leaves nothing behind that looks valid.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from visiontrain.config import Config, OptimConfig
from visiontrain.data import DataBundle, build_data
from visiontrain.data.device_augment import check_augment_on
from visiontrain.data.loaders import build_loader, check_sampler
from visiontrain.engine.callbacks import Callback, Checkpointer, EarlyStopping
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.engine.distributed import Dist, current
from visiontrain.engine.ema import ModelEma
from visiontrain.engine.lr_find import resolve_lr_find, write_lr_find
from visiontrain.engine.optim import build_optimizer
from visiontrain.engine.precision import Precision
from visiontrain.engine.schedules import Horizon, build_schedule
from visiontrain.engine.seed import sample_seed, seed_everything, set_deterministic
from visiontrain.engine.signals import StopFlag
from visiontrain.engine.trainer import Loaders, Trainer
from visiontrain.engine.wrap import TrainModel, convert_sync_bn, enable_activation_checkpointing
from visiontrain.errors import ConfigError, UserError, did_you_mean
from visiontrain.io import atomic_write_json, atomic_write_text
from visiontrain.models import create_model
from visiontrain.models.init import init_weights
from visiontrain.tasks import Task, build_task
from visiontrain.tasks.base import task_class
from visiontrain.tracking.envinfo import environment
from visiontrain.tracking.jsonl import JsonlLogger
from visiontrain.tracking.progress import ProgressPrinter, choose_mode
from visiontrain.tracking.tensorboard import TensorBoardLogger


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use auto or cpu.")
    if name == "cuda":
        # Under torchrun each process owns GPU LOCAL_RANK (set by distributed_session).
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def set_cpu_threads(device: torch.device, num_workers: int) -> None:
    """Give the compute threads the cores the loader workers leave free.

    OpenMP's thread team waits at a barrier after every parallel op; when a loader worker
    holds one of its cores, each op stalls until that thread is scheduled again. On a
    2-core machine with one busy worker this made small convolutions 50x slower. An
    explicit OMP_NUM_THREADS is respected.
    """
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    # Several processes on one machine (torchrun) share its cores.
    cores = (os.cpu_count() or 1) // current().local_world_size
    torch.set_num_threads(max(1, cores - num_workers))


def build_model(cfg: Config, bundle: DataBundle, device: torch.device) -> nn.Module:
    """The configured model, initialised, on ``device``."""
    m = cfg.model
    model = create_model(
        m.name,
        num_classes=bundle.num_outputs,
        in_chans=bundle.in_channels,
        pretrained=m.pretrained,
        task=cfg.task,
        image_size=bundle.image_size,
        encoder=m.encoder,
        dropout=m.dropout,
        drop_path=m.drop_path,
        width=m.width,
        depth=m.depth,
        norm=m.norm,
    )
    init_weights(model, m.init)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class RunPlan:
    """Where a run lives and what it resumes from."""

    run_dir: Path
    resume_from: Path | None


def plan_run(cfg: Config) -> RunPlan:
    """Resolve ``run.dir``/``run.name``/``run.resume`` into a folder and a checkpoint."""
    name = cfg.run.name or f"{cfg.task}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.run.dir).expanduser() / name
    resume = cfg.run.resume
    if resume is None:
        if cfg.run.name is None:
            base, n = run_dir, 1
            while run_dir.exists():
                run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
        elif (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists():
            raise UserError(
                f"run directory {run_dir} already holds a run. Continue it with "
                "run.resume=auto, or choose another run.name."
            )
        return RunPlan(run_dir, None)
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        return RunPlan(run_dir, last if last.is_file() else None)
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise UserError(
            f"run.resume={resume}: no checkpoint at {path}. Pass a .pt file, a run "
            "directory, or run.resume=auto."
        )
    if path.parent.name == "checkpoints":
        run_dir = path.parent.parent
    return RunPlan(run_dir, path)


def resolve_auto_workers(cfg: Config, bundle: DataBundle, device: torch.device) -> None:
    """Replace ``data.num_workers=auto`` in ``cfg`` by a measured count; note the choice."""
    from visiontrain.bench import resolve_num_workers  # bench builds loaders: import late

    note = resolve_num_workers(cfg, bundle, device)
    if note is not None:
        bundle.notes.append(note)


def tool_dir(cfg: Config, prefix: str) -> Path:
    """Output folder of a tool verb: ``run.dir/run.name``, else a new timestamped one.

    The default name is ``<prefix>-<data>-<timestamp>``, made unique with a counter.
    """
    if cfg.run.name:
        return Path(cfg.run.dir).expanduser() / cfg.run.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.run.dir).expanduser() / f"{prefix}-{cfg.data.name}-{stamp}"
    folder, n = base, 1
    while folder.exists():
        folder, n = base.with_name(f"{base.name}-{n}"), n + 1
    return folder


def build_loaders(cfg: Config, bundle: DataBundle, device: torch.device) -> Loaders:
    """Train, val and test loaders with the run's seed (``num_workers=auto`` resolved first)."""
    resolve_auto_workers(cfg, bundle, device)
    pin = cfg.data.pin_memory if cfg.data.pin_memory is not None else device.type == "cuda"
    dist = current()
    kw: dict[str, Any] = {
        "seed": cfg.train.seed,
        "pin_memory": pin,
        "task": cfg.task,
        "rank": dist.rank,
        "world_size": dist.world_size,
    }
    return Loaders(
        train=build_loader(bundle.train, bundle, cfg.data, train=True, **kw),
        val=build_loader(bundle.val, bundle, cfg.data, train=False, **kw),
        test=(
            build_loader(bundle.test, bundle, cfg.data, train=False, **kw)
            if bundle.test is not None
            else None
        ),
    )


def check_monitor(cfg: Config, task: Task) -> None:
    """Refuse a ``train.monitor`` the task cannot compute, before any training."""
    names = task.metric_names()
    if cfg.train.monitor not in names:
        tip = did_you_mean(cfg.train.monitor, names)
        raise ConfigError(
            f"train.monitor={cfg.train.monitor} is not a validation metric{tip} "
            f"Choose one of: {', '.join(names)}."
        )


# The range test sets the LR of every group itself, so until `optim.lr=find` is resolved the
# optimizer (and a --check schedule) are built with this stand-in, which nothing trains with.
LR_FIND_STAND_IN = 1e-3


def buildable_optim(cfg: OptimConfig) -> OptimConfig:
    """``cfg`` itself, or a copy with the stand-in number while ``lr`` is still ``find``."""
    if cfg.lr != "find":
        return cfg
    return cfg.model_copy(update={"lr": LR_FIND_STAND_IN})


@dataclass
class Parts:
    """What a run trains with, built from the config before any run directory exists."""

    device: torch.device
    bundle: DataBundle
    task: Task
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loaders: Loaders
    notes: list[str]


def build_parts(cfg: Config) -> Parts:
    """Seed, then build data, task, model, optimizer and loaders (no schedule, nothing written).

    Shared by ``train`` and ``lr-find`` so that both see the same initial weights and the
    same batches for the same config.
    """
    set_deterministic(cfg.train.deterministic)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    if cfg.data.num_workers != "auto":
        set_cpu_threads(device, cfg.data.num_workers)
    task_class(cfg.task)  # an unknown task is named before any data is read
    check_sampler(cfg.data, cfg.task)
    check_augment_on(cfg.data.augment_on, cfg.data.augment, cfg.task)
    bundle = build_data(cfg.data, cfg.task)
    if cfg.data.num_workers == "auto":
        # Resolved once, here: everything after this (threads, loaders, config.yaml, the
        # checkpoint's config) sees the measured integer.
        resolve_auto_workers(cfg, bundle, device)
        set_cpu_threads(device, cfg.data.num_workers)
    task = build_task(cfg, bundle, device)
    check_monitor(cfg, task)
    model = build_model(cfg, bundle, device)
    notes: list[str] = []
    dist = current()
    if cfg.train.sync_bn:
        model, note = convert_sync_bn(model, dist, device)
        notes.append(note)
    if cfg.train.activation_checkpointing:
        notes.append(enable_activation_checkpointing(model, cfg.model.name))
    optimizer = build_optimizer(buildable_optim(cfg.optim), model)
    loaders = build_loaders(cfg, bundle, device)
    if dist.rank > 0:
        # Same initial weights on every rank (seeded alike above; DDP broadcasts rank 0's
        # anyway), but each rank its own dropout and drop-path stream, repeatable per run.
        seed_everything(sample_seed(cfg.train.seed, 0, dist.rank) % 2**63)
    return Parts(device, bundle, task, model, optimizer, loaders, notes)


def build_trainer(
    cfg: Config, console: Console, stop_flag: StopFlag | None = None, check_only: bool = False
) -> Trainer | None:
    """Build everything for ``visiontrain train``; with ``check_only`` stop before writing.

    With ``optim.lr=find`` the LR range test runs on the built parts (not with
    ``check_only``), ``cfg.optim.lr`` becomes its suggestion, and the test's
    ``lr_find.json``/``lr_find.png`` go into the run directory.
    """
    dist = current()
    # Rank 0 names the run and finds what to resume; the others take its answer (their
    # clocks and disks may differ).
    plan = dist.run_on_main(lambda: plan_run(cfg))
    if dist.enabled and cfg.optim.lr == "find":
        raise ConfigError(
            "optim.lr=find runs the range test in one process; under torchrun run "
            "`visiontrain lr-find` first and pass its suggestion as optim.lr."
        )
    if cfg.optim.lr == "find" and plan.resume_from is not None:
        raise ConfigError(
            f"optim.lr=find with a resumed run ({plan.resume_from}): the run's learning rate "
            "is already fixed. Pass the number from its config.yaml as optim.lr."
        )
    parts = build_parts(cfg)
    device, bundle, task, model = parts.device, parts.bundle, parts.task, parts.model
    optimizer, loaders = parts.optimizer, parts.loaders
    horizon = Horizon(
        epochs=cfg.train.epochs,
        updates_per_epoch=math.ceil(len(loaders.train.batch_sampler) / cfg.train.accumulate),
    )
    schedule = build_schedule(optimizer, cfg.schedule, buildable_optim(cfg.optim), horizon)
    precision = Precision(cfg.train.precision, device)
    resume_state = (
        dist.run_on_main(lambda: load_checkpoint(plan.resume_from)) if plan.resume_from else None
    )
    from visiontrain.tracking.mlflow import build_mlflow_logger

    # Before the run folder exists: a missing MLflow or a store that cannot open stops here
    # (--check opens no store: a new SQLite store would be a file written).
    mlflow_logger = (
        build_mlflow_logger(cfg, plan.run_dir, connect=not check_only) if dist.is_main else None
    )
    if check_only:
        return None
    lr_test = None
    if cfg.optim.lr == "find":
        # Everything above was checked with a stand-in LR; measure the real one, then build
        # the optimizer and schedule the run trains with from it.
        lr_test = resolve_lr_find(cfg, parts, console)
        optimizer = parts.optimizer
        schedule = build_schedule(optimizer, cfg.schedule, cfg.optim, horizon)

    run_dir = plan.run_dir
    if dist.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    resume_step = resume_state["counters"]["global_step"] if resume_state else None
    if resume_state is None and cfg.run.resume == "auto" and (run_dir / "metrics.jsonl").exists():
        resume_step = -1  # a run that died before its first checkpoint: start its log anew
    checkpointer = Checkpointer(
        run_dir / "checkpoints",
        cfg.run.keep_last,
        cfg.run.save_every_steps,
        dist.is_main,
        cfg.run.save_every_minutes,
    )
    callbacks: list[Callback] = []
    if dist.is_main:  # one writer of logs and one progress display per job
        callbacks.append(JsonlLogger(run_dir / "metrics.jsonl", resume_step))
        if "tensorboard" in cfg.run.loggers:
            purge = None if resume_step is None else resume_step + 1
            callbacks.append(TensorBoardLogger(run_dir / "tb", purge))
        if mlflow_logger is not None:
            callbacks.append(mlflow_logger)
        callbacks.append(ProgressPrinter(choose_mode(cfg.train.progress), console))
    if cfg.train.early_stopping.patience:
        es = cfg.train.early_stopping
        callbacks.append(EarlyStopping(es.patience, es.min_delta))
    trainer = Trainer(
        cfg=cfg,
        run_dir=run_dir,
        bundle=bundle,
        model=model,
        task=task,
        optimizer=optimizer,
        schedule=schedule,
        precision=precision,
        device=device,
        loaders=loaders,
        horizon=horizon,
        checkpointer=checkpointer,
        callbacks=callbacks,
        console=console,
        stop_flag=stop_flag,
        train_model=TrainModel(model, dist, device, cfg.train.compile, _say(console, dist)),
        ema=ModelEma(model, cfg.train.ema_decay) if cfg.train.ema else None,
        dist=dist,
    )
    if schedule.interval == "metric":
        schedule.scheduler.mode = trainer.monitor_mode
        schedule.scheduler._init_is_better(  # torch keeps the mode's comparator private
            mode=trainer.monitor_mode,
            threshold=schedule.scheduler.threshold,
            threshold_mode=schedule.scheduler.threshold_mode,
        )
    say = _say(console, dist)
    if resume_state is not None:
        trainer.load_state(resume_state, plan.resume_from)
        say(
            f"resuming from {plan.resume_from} (epoch {trainer.epochs_done + 1}, batch "
            f"{trainer.batch_in_epoch}, step {trainer.global_step})"
        )
    if dist.is_main:
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        atomic_write_json(run_dir / "env.json", environment(device, dist.world_size))
        if lr_test is not None:
            write_lr_find(lr_test, run_dir)
    if dist.enabled:
        parts.notes.append(
            f"DDP: {dist.world_size} processes ({dist.backend}), {cfg.data.batch_size} images "
            f"per process per step: global batch {cfg.data.batch_size * dist.world_size}"
            + (f" x {cfg.train.accumulate} accumulated" if cfg.train.accumulate > 1 else "")
        )
    for note in [*bundle.notes, *task.describe(), *parts.notes]:
        say(f"note: {note}")
    return trainer


def _say(console: Console, dist: Dist) -> Callable[[str], None]:
    """Print a line for the user from rank 0 only."""

    def say(message: str) -> None:
        if dist.is_main:
            console.print(message, highlight=False)

    return say


def fit_and_summarise(trainer: Trainer, start: float, report: bool = False) -> dict[str, Any]:
    """Train, write summary.json (and report.html), then close every callback.

    The callbacks close last (also when training raises), so that a logger uploading the
    run's files at close (MLflow) finds the summary and the report.

    Args:
        trainer: a built trainer.
        start: ``time.perf_counter()`` when the command started, for the total time.
        report: write ``report.html`` and ``plots/`` (rank 0; ``tune`` trials do not).
    """
    try:
        trainer.fit()
        summary = write_summary(trainer, time.perf_counter() - start)
        if report and trainer.dist.is_main:
            from visiontrain.report import write_report

            write_report(trainer.run_dir)
    finally:
        for cb in trainer.callbacks:
            cb.close()
    return summary


def write_summary(trainer: Trainer, wall_seconds: float) -> dict[str, Any]:
    """Write ``summary.json`` for a finished run and return it."""
    ck = trainer.checkpointer
    es = next((cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping)), None)
    summary = {
        "run_dir": str(trainer.run_dir),
        "task": trainer.task.name,
        "monitor": trainer.cfg.train.monitor,
        "monitor_mode": trainer.monitor_mode,
        "best_epoch": ck.best_epoch,
        "best_step": ck.best_step,
        "best_score": ck.best_score,
        "epochs_run": trainer.epochs_done,
        "global_step": trainer.global_step,
        "stopped_early": bool(es and es.stopped_epoch is not None),
        "metrics": {k: v for k, v in trainer.results.items() if k in ("val", "test")},
        **trainer.task.summary_info(),
        "skipped_files": {"count": len(trainer.skipped), "files": sorted(trainer.skipped)},
        "nan": {
            "policy": trainer.nan.policy,
            "skipped_updates": trainer.nan.skips,
            "rollbacks": trainer.nan.rollbacks,
            "batches_passed_over": len(trainer.nan.pass_over),
            "amp_skipped_steps": trainer.amp_skipped,
        },
        "timings": {
            "total_s": round(wall_seconds, 3),
            "train_s": round(trainer.timings["train_s"], 3),
            "eval_s": round(trainer.timings["eval_s"], 3),
        },
        "device": str(trainer.device),
        "world_size": trainer.dist.world_size,
        "precision": trainer.cfg.train.precision,
    }
    if trainer.dist.is_main:
        atomic_write_json(trainer.run_dir / "summary.json", summary)
    return summary
