"""Assemble a run from a resolved config: data, model, task, optimizer, trainer, callbacks.

Everything that can fail on bad input (data, model, option checks) is built before the
run directory is created, so a refused command leaves nothing behind that looks valid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

from visiontrain.config import Config
from visiontrain.engine.callbacks import Callback, Checkpointer, EarlyStopping
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.engine.distributed import Dist, current
from visiontrain.engine.ema import ModelEma
from visiontrain.engine.parts import build_parts, buildable_optim
from visiontrain.engine.precision import Precision
from visiontrain.engine.schedules import Horizon, build_schedule
from visiontrain.engine.signals import StopFlag
from visiontrain.engine.trainer import Trainer
from visiontrain.engine.wrap import TrainModel
from visiontrain.errors import ConfigError
from visiontrain.io import atomic_write_json, atomic_write_text
from visiontrain.rundir import plan_run
from visiontrain.tools.lr_find import resolve_lr_find, write_lr_find
from visiontrain.tracking.envinfo import environment
from visiontrain.tracking.jsonl import JsonlLogger
from visiontrain.tracking.progress import ProgressPrinter, choose_mode
from visiontrain.tracking.tensorboard import TensorBoardLogger


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
