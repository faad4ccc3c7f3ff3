"""Assemble a run from a resolved config: data, model, task, optimizer, trainer, callbacks.

Everything that can fail on bad input (data, model, option checks) is built before the
run directory is created, so a refused command leaves nothing behind that looks valid.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from visiontrain.config import (
    Config,
    build_config,
    flatten_keys,
    parse_overrides,
    read_yaml,
    resume_changes,
    set_values,
)
from visiontrain.data import build_data
from visiontrain.data.pipeline import build_loaders
from visiontrain.data.user import SOURCE_NAME, DatasetSource
from visiontrain.engine.autobatch import batch_from_checkpoint
from visiontrain.engine.callbacks import Callback, Checkpointer, EarlyStopping
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.engine.distributed import (
    Dist,
    current,
    distributed_session,
    refuse_distributed,
)
from visiontrain.engine.ema import ModelEma
from visiontrain.engine.evaluate import evaluate as evaluate_loop
from visiontrain.engine.fsdp import apply_fsdp, check_fsdp
from visiontrain.engine.parts import build_parts, buildable_optim, updates_per_epoch
from visiontrain.engine.precision import Precision
from visiontrain.engine.restore import Loaded, load_trained
from visiontrain.engine.schedules import Horizon, build_schedule
from visiontrain.engine.sharded import read_state
from visiontrain.engine.signals import StopFlag, graceful_stop
from visiontrain.engine.trainer import Trainer
from visiontrain.engine.wrap import TrainModel
from visiontrain.errors import ConfigError, RunError, UserError
from visiontrain.export.artifact import Exported
from visiontrain.io import atomic_write_json, atomic_write_text
from visiontrain.models.build import user_model_name
from visiontrain.predict import load_for_predict, predict_images
from visiontrain.report import write_report
from visiontrain.report.samples import SampleSource
from visiontrain.rundir import (
    BEST_CHECKPOINT,
    BEST_SHARDED,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    ENV_FILE,
    LAST_CHECKPOINT,
    LAST_SHARDED,
    METRICS_FILE,
    SUMMARY_FILE,
    TB_DIR,
    is_sharded,
    plan_run,
    tool_dir,
)
from visiontrain.tasks import build_task
from visiontrain.tools.lr_find import resolve_lr_find, write_lr_find
from visiontrain.tools.profile import PROFILE_DIR, ProfileDone, ProfileWindow
from visiontrain.tracking.envinfo import environment
from visiontrain.tracking.jsonl import JsonlLogger
from visiontrain.tracking.progress import ProgressPrinter, choose_mode
from visiontrain.tracking.tensorboard import TensorBoardLogger


def assemble(
    cfg: Config,
    console: Console,
    stop_flag: StopFlag | None = None,
    check_only: bool = False,
    model: nn.Module | None = None,
    data: DatasetSource | None = None,
    callbacks: Sequence[Callback] = (),
    profile_into: Path | None = None,
    profile_title: str | None = None,
) -> Trainer | None:
    """Build everything for ``visiontrain train``; with ``check_only`` stop before writing.

    With ``optim.lr=find`` the LR range test runs on the built parts (not with
    ``check_only``), ``cfg.optim.lr`` becomes its suggestion, and the test's
    ``lr_find.json``/``lr_find.png`` go into the run directory.

    Args:
        cfg: The resolved config; ``model.name``/``data.name`` are recorded for a user's
            own module and Datasets.
        console: Where notes and progress go.
        stop_flag: Set by SIGINT/SIGTERM; the trainer saves and stops.
        check_only: Build and check everything, write nothing, return None.
        model: A user's own ``nn.Module`` instead of ``model.name``.
        data: A user's Datasets (``vt.data.from_datasets``) instead of ``data.name``.
        callbacks: A user's callbacks, run after the built-in ones.
        profile_into: ``visiontrain profile``: the folder for the ``train.profile_steps``
            window's files, and the run ends with the window (:class:`ProfileDone`);
            None writes them to ``<run>/profile/`` and trains on.
        profile_title: What the window's printout calls it.
    """
    user_callbacks = _check_callbacks(callbacks)
    if model is not None:
        cfg.model.name = user_model_name(model)
    if data is not None:
        cfg.data.name = SOURCE_NAME
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
    check_fsdp(cfg)
    resume_state = None
    if plan.resume_from is not None and cfg.data.batch_size == "auto":
        # The run's batch was fixed when it started: a new search could answer otherwise
        # (another GPU, another process count), and the resume would train another run.
        resume_state = dist.run_on_main(lambda: _read_resume(plan.resume_from))
        cfg.data.batch_size = batch_from_checkpoint(resume_state, plan.resume_from)
    parts = build_parts(cfg, model, data, start_from_weights=plan.resume_from is None)
    device, bundle, task, model = parts.device, parts.bundle, parts.task, parts.model
    optimizer, loaders = parts.optimizer, parts.loaders
    horizon = Horizon(
        epochs=cfg.train.epochs,
        updates_per_epoch=updates_per_epoch(cfg, loaders),
        head_epochs=cfg.train.freeze_epochs,
    )
    schedule = build_schedule(optimizer, cfg.schedule, buildable_optim(cfg.optim), horizon)
    precision = Precision(cfg.train.precision, device)
    if resume_state is None and plan.resume_from is not None:
        resume_state = dist.run_on_main(lambda: _read_resume(plan.resume_from))
    changes: list[tuple[str, Any, Any]] = []
    if resume_state is not None:
        changes = _check_resume_config(resume_state, cfg, plan.resume_from)
    if not check_only and resume_state is not None:
        done = dist.run_on_main(lambda: _finished(resume_state, cfg, plan.run_dir))
        if done is not None:
            raise RunFinished(plan.run_dir, done)
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
        (run_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    resume_step = resume_state["counters"]["global_step"] if resume_state else None
    if resume_state is None and cfg.run.resume == "auto" and (run_dir / METRICS_FILE).exists():
        resume_step = -1  # a run that died before its first checkpoint: start its log anew
    checkpointer = Checkpointer(
        run_dir / CHECKPOINTS_DIR,
        cfg.run.keep_last,
        cfg.run.save_every_steps,
        dist.is_main,
        cfg.run.save_every_minutes,
        cfg.run.async_save,
        sharded=cfg.train.strategy == "fsdp",
    )
    callbacks: list[Callback] = []
    if dist.is_main:  # one writer of logs and one progress display per job
        callbacks.append(JsonlLogger(run_dir / METRICS_FILE, resume_step))
        if "tensorboard" in cfg.run.loggers:
            purge = None if resume_step is None else resume_step + 1
            callbacks.append(TensorBoardLogger(run_dir / TB_DIR, purge))
        if mlflow_logger is not None:
            callbacks.append(mlflow_logger)
        callbacks.append(ProgressPrinter(choose_mode(cfg.train.progress), console))
    if cfg.train.early_stopping.patience:
        es = cfg.train.early_stopping
        callbacks.append(EarlyStopping(es.patience, es.min_delta))
    callbacks.extend(user_callbacks)
    window = cfg.train.profile_window()
    if window is not None and dist.is_main:
        # Last, so that every other callback's work falls inside the profiled steps.
        callbacks.append(
            ProfileWindow(
                *window,
                profile_into or run_dir / PROFILE_DIR,
                console,
                stop_at_end=profile_into is not None,
                title=profile_title,
            )
        )
    # The EMA's copy is taken from the plain module; under FSDP both are then sharded alike.
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema else None
    fsdp = cfg.train.strategy == "fsdp"
    if fsdp and dist.enabled:
        parts.notes.append(
            apply_fsdp(
                model,
                optimizer,
                ema.module if ema is not None else None,
                cfg.train.precision,
                dist,
                device,
            )
        )
    elif fsdp:
        parts.notes.append(
            "train.strategy=fsdp in one process: nothing to shard, the model trains whole; "
            "checkpoints are sharded folders (checkpoints/last.dcp/), which any number of "
            "processes resumes"
        )
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
        train_model=TrainModel(
            model, dist, device, cfg.train.compile, _say(console, dist), sharded=fsdp
        ),
        ema=ema,
        dist=dist,
        freeze=parts.freeze,
        weights_info=[r.to_dict() for r in parts.weights],
    )
    if schedule.interval == "metric":
        schedule.scheduler.mode = trainer.monitor_mode
        schedule.scheduler._init_is_better(  # torch keeps the mode's comparator private
            mode=trainer.monitor_mode,
            threshold=schedule.scheduler.threshold,
            threshold_mode=schedule.scheduler.threshold_mode,
        )
    say = _say(console, dist)
    for key, was, now in changes:
        say(f"note: resumed with {key} changed: {was!r} -> {now!r}")
    if resume_state is not None:
        trainer.load_state(resume_state, plan.resume_from)
        say(
            f"resuming from {plan.resume_from} (epoch {trainer.epochs_done + 1}, batch "
            f"{trainer.batch_in_epoch}, step {trainer.global_step})"
        )
    if dist.is_main:
        atomic_write_text(run_dir / CONFIG_FILE, cfg.to_yaml())
        atomic_write_json(run_dir / ENV_FILE, environment(device, dist.world_size))
        if lr_test is not None:
            write_lr_find(lr_test, run_dir)
    if cfg.train.precision == "fp16" and device.type == "cpu":
        # Kept runnable (a CPU rehearsal of a GPU config, the GradScaler path in tests),
        # but never silently: measured in docs/benchmarks.md.
        parts.notes.append(FP16_ON_CPU)
    if dist.enabled:
        parts.notes.append(
            f"{'FSDP' if fsdp else 'DDP'}: {dist.world_size} processes ({dist.backend}), "
            f"{cfg.data.batch_size} images "
            f"per process per step: global batch {cfg.data.batch_size * dist.world_size}"
            + (f" x {cfg.train.accumulate} accumulated" if cfg.train.accumulate > 1 else "")
        )
    for note in [*bundle.notes, *task.describe(), *parts.notes]:
        say(f"note: {note}")
    return trainer


FP16_ON_CPU = (
    "train.precision=fp16 on the CPU: float16 autocast with GradScaler is a CUDA mode and "
    "runs about 10x slower than fp32 here (42 vs 405 img/s measured, defects/simple_cnn, "
    "one thread); use train.precision=bf16 (630 img/s) or 32 on the CPU"
)


def _read_resume(path: Path) -> dict[str, Any]:
    """A checkpoint's state to resume from; of a sharded folder, its ``state.pt``.

    Each rank reads its shards of a sharded checkpoint later, in ``Trainer.load_state``.
    """
    return read_state(path) if is_sharded(path) else load_checkpoint(path)


def _check_resume_config(
    state: dict[str, Any], cfg: Config, path: Path | None
) -> list[tuple[str, Any, Any]]:
    """The allowed config changes of a resume; a change that would alter the run is refused.

    Raises:
        ConfigError: naming each key the checkpoint fixes, with both values.
    """
    fixed, allowed = resume_changes(state.get("config") or {}, cfg)
    if fixed:
        listed = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in fixed)
        raise ConfigError(
            f"resuming from {path} with a config that changes the run ({listed}). These are "
            "fixed by the checkpoint: resume with its values (its config.yaml), or start a "
            "new run (another run.name). A resume may change only train.epochs, logging, "
            "saving, the data's location and loading, and speed options."
        )
    return allowed


class RunFinished(Exception):  # noqa: N818 - not an error: the run needs no more work
    """A resumed run had already finished; nothing was trained or written.

    Attributes:
        run_dir: The run directory.
        summary: Its ``summary.json``.
    """

    def __init__(self, run_dir: Path, summary: dict[str, Any]) -> None:
        super().__init__(f"{run_dir} already finished")
        self.run_dir, self.summary = run_dir, summary


def _finished(state: dict[str, Any], cfg: Config, run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that already ended where ``state`` stands, else None.

    A run has finished when its ``summary.json`` was written after the checkpoint's last
    update (same global step) and ``train.epochs`` was not raised since.
    """
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a damaged summary: train on, and write it again
    planned = int(state.get("config", {}).get("train", {}).get("epochs", cfg.train.epochs))
    same_step = summary.get("global_step") == state["counters"]["global_step"]
    return summary if same_step and cfg.train.epochs <= planned else None


def _check_callbacks(callbacks: Sequence[Callback]) -> list[Callback]:
    """A user's callbacks, each a :class:`Callback` with a name of its own.

    The name keys the callback's state in every checkpoint, so two callbacks may not share
    one; a callback that keeps the base class's name is named after its class.

    Raises:
        ConfigError: an object that is not a Callback, or two with the same name.
    """
    out: list[Callback] = []
    seen = {"checkpointer", "jsonl", "tensorboard", "mlflow", "progress", "early_stopping"}
    seen.add(ProfileWindow.name)
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise ConfigError(
                f"callbacks: {cb!r} is a {type(cb).__name__}; pass instances of a subclass of "
                "vt.Callback (override the hooks you need: on_fit_start, on_log, on_update, "
                "on_epoch_end, on_fit_end)."
            )
        if cb.name == Callback.name:
            cb.name = type(cb).__name__
        if cb.name in seen:
            raise ConfigError(
                f"callbacks: two callbacks are named {cb.name!r}; the name keys each one's "
                "state in the checkpoint. Give each class its own `name`."
            )
        seen.add(cb.name)
        out.append(cb)
    return out


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
            # A user's own module or Datasets cannot be rebuilt from the run directory:
            # hand them over (the report loads best.pt into a copy of the module).
            source = SampleSource(
                trainer.model if trainer.user_model else None,
                trainer.bundle if trainer.cfg.data.name == SOURCE_NAME else None,
            )
            write_report(trainer.run_dir, source=source)
    finally:
        trainer.train_model.close()  # before the process group goes (TrainModel.close)
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
        "best_epoch": None if ck.best_epoch is None else ck.best_epoch + 1,  # 1-based
        "best_step": ck.best_step,
        "best_score": ck.best_score,
        "epochs_run": trainer.epochs_done,
        "global_step": trainer.global_step,
        "stopped_early": bool(es and es.stopped_epoch is not None),
        "metrics": {k: v for k, v in trainer.results.items() if k in ("val", "test")},
        **trainer.task.summary_info(),
        "weights": trainer.weights_info,
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
        atomic_write_json(trainer.run_dir / SUMMARY_FILE, summary)
    return summary


# ----------------------------------------------------------------------------- public API


@dataclass
class TrainResult:
    """What a finished training run left behind.

    Attributes:
        run_dir: The run directory (``config.yaml``, ``metrics.jsonl``, checkpoints ...).
        summary: The contents of ``summary.json`` (best epoch, metrics per split ...).
        best_checkpoint: ``checkpoints/best.pt`` when a best epoch was saved.
        last_checkpoint: ``checkpoints/last.pt``.
        rank: This process's rank under torchrun (0 alone); rank 0 wrote the files.
    """

    run_dir: Path
    summary: dict[str, Any]
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    rank: int = 0

    @property
    def metrics(self) -> dict[str, Any]:
        """Final metrics per split: ``{"val": {...}, "test": {...}}``."""
        return self.summary["metrics"]


ConfigLike = Config | Mapping[str, Any] | str | Path | None


def resolve_config(
    config: ConfigLike = None, overrides: Sequence[str] = (), keys: Mapping[str, Any] | None = None
) -> Config:
    """A validated :class:`Config` from a YAML path, a dict or a Config, plus changes.

    Example:
        >>> import visiontrain as vt
        >>> cfg = vt.resolve_config(None, ["optim.lr=3e-4"], {"train": {"epochs": 2}})
        >>> cfg.optim.lr, cfg.train.epochs
        (0.0003, 2)

    Args:
        config: A YAML file, a raw config tree (``{"optim": {"lr": 3e-4}}``), a
            :class:`Config` (copied, never changed), or None for the defaults.
        overrides: Dotted ``key=value`` strings, as on the command line.
        keys: Sections or keys as Python values: ``{"train": {"epochs": 2}}``,
            ``{"task": "regression"}``; they apply after ``overrides``.

    Raises:
        ConfigError: an unknown key (with the nearest valid one), a wrong type or value.
    """
    if isinstance(config, Config):
        if not overrides and not keys:
            return config.model_copy(deep=True)
        tree, source = config.to_dict(), "the Config given"
    elif isinstance(config, Mapping):
        tree, source = dict(config), "the dict given"
    elif config is None:
        tree, source = {}, "the arguments"
    else:
        tree, source = read_yaml(config), f"{config} + overrides"
    if not keys:
        return build_config(tree, overrides, source)
    # Overrides, then keyword keys (which win), into one tree validated once.
    tree = set_values(tree, dict(parse_overrides(overrides)))
    return build_config(set_values(tree, flatten_keys(keys)), (), f"{source} + keyword arguments")


def refuse_tune_keys(overrides: Sequence[str]) -> None:
    """Refuse ``tune.*`` overrides on a training run: they configure ``visiontrain tune``.

    Raises:
        ConfigError: naming the keys.
    """
    tune_keys = [o.partition("=")[0] for o in overrides if o.startswith("tune.")]
    if tune_keys:
        # A YAML may carry a tune: section for `visiontrain tune`; on train's command line
        # such a key would change nothing.
        raise ConfigError(
            f"{', '.join(tune_keys)} configure `visiontrain tune`; train does not read them. "
            "Run `visiontrain tune` with them, or drop them."
        )


class Run:
    """A training run of a config and, optionally, a user's own model, data and callbacks.

    Made by :func:`build_trainer`; :meth:`fit` trains it. Nothing is built or written
    until then, and everything that can fail on bad input fails before the run directory
    exists.
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module | None = None,
        data: DatasetSource | None = None,
        callbacks: Sequence[Callback] = (),
        console: Console | None = None,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(
                f"model= takes a torch.nn.Module; got a {type(model).__name__}. Pass an "
                "instance (MyNet(...)), or leave it out and set model.name."
            )
        if data is not None and not isinstance(data, DatasetSource):
            raise ConfigError(
                f"data= takes what vt.data.from_datasets(train, val, ...) returns; got a "
                f"{type(data).__name__}."
            )
        self.cfg, self.model, self.data = cfg, model, data
        self.callbacks = _check_callbacks(callbacks)
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.trainer: Trainer | None = None

    def check(self) -> None:
        """Build and check data, model, optimizer and schedule; train and write nothing."""
        assemble(
            self.cfg.model_copy(deep=True),
            self.console,
            check_only=True,
            model=self.model,
            data=self.data,
            callbacks=self.callbacks,
        )

    def fit(self) -> TrainResult:
        """Train (or continue, with ``run.resume``), write the summary and the report.

        SIGINT/SIGTERM save ``last.pt`` and raise :class:`~visiontrain.errors.Interrupted`
        (its ``exit_code`` is 130/143); under ``torchrun`` every process calls ``fit``.

        Raises:
            UserError: bad input (config, data, checkpoint), before anything is written.
            RunError: the run could not go on (disk full, a loader worker died, NaN).
            Interrupted: stopped by a signal after saving.
        """
        start = time.perf_counter()
        cfg = self.cfg.model_copy(deep=True)
        with graceful_stop() as flag, distributed_session(cfg.train.device) as dist:
            try:
                trainer = assemble(
                    cfg,
                    self.console,
                    flag,
                    model=self.model,
                    data=self.data,
                    callbacks=self.callbacks,
                )
            except RunFinished as done:
                if dist.is_main:
                    self.console.print(
                        f"{done.run_dir} already finished ({done.summary.get('epochs_run')} "
                        f"epochs, step {done.summary.get('global_step')}); nothing to do. "
                        "Raise train.epochs to train on.",
                        highlight=False,
                    )
                return self._result(done.run_dir, done.summary, dist.rank)
            assert trainer is not None
            self.trainer = trainer
            summary = fit_and_summarise(trainer, start, report=cfg.run.report)
        return self._result(trainer.run_dir, summary, trainer.dist.rank)

    @staticmethod
    def _result(run_dir: Path, summary: dict[str, Any], rank: int) -> TrainResult:
        folder = run_dir / CHECKPOINTS_DIR
        best, last = folder / BEST_CHECKPOINT, folder / LAST_CHECKPOINT
        if not last.is_file() and is_sharded(folder / LAST_SHARDED):  # train.strategy=fsdp
            best, last = folder / BEST_SHARDED, folder / LAST_SHARDED
        return TrainResult(
            run_dir,
            summary,
            best if best.is_file() or is_sharded(best) else None,
            last if last.is_file() or is_sharded(last) else None,
            rank,
        )


def build_trainer(
    cfg: ConfigLike = None,
    model: nn.Module | None = None,
    data: DatasetSource | None = None,
    callbacks: Sequence[Callback] = (),
    *,
    console: Console | None = None,
) -> Run:
    """A training run of ``cfg`` with, optionally, your own model, data and callbacks.

    Everything ``visiontrain train`` does applies to them: initialisation
    (``model.init``), channels_last, compile, EMA, DDP under torchrun, resume
    (``run.resume=auto``), SIGTERM, logs, checkpoints, thresholds and the report.

    Example:
        >>> import torch, visiontrain as vt
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
        >>> run = vt.build_trainer({"train": {"epochs": 1}}, model=net)
        >>> isinstance(run, vt.Run)
        True

    Args:
        cfg: A YAML path, a config dict or a :class:`Config` (see :func:`resolve_config`).
        model: Your own ``nn.Module`` (not registered): it must return ``(batch, classes)``
            logits (classification) or ``(batch, targets)`` values (regression), or what
            torchvision's detectors/segmenters return for those tasks.
        data: Your own Datasets, from :func:`visiontrain.data.from_datasets`.
        callbacks: Instances of :class:`Callback` subclasses; each hook receives the
            trainer.
        console: Where progress and notes are printed (default: the terminal).

    Returns:
        A :class:`Run`; call ``.fit()``.
    """
    return Run(resolve_config(cfg), model, data, callbacks, console)


def train(
    config: ConfigLike = None,
    *overrides: str,
    model: nn.Module | Mapping[str, Any] | None = None,
    data: DatasetSource | Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    **keys: Any,
) -> TrainResult:
    """Train a model, as ``visiontrain train [CONFIG.yaml] [key=value ...]`` does.

    Example:
        >>> import visiontrain as vt
        >>> result = vt.train(None, "data.train_size=64", "data.val_size=32",  # doctest: +SKIP
        ...                   train={"epochs": 1}, run={"dir": "runs"})
        >>> result.summary["metrics"]["val"]["macro_f1"]  # doctest: +SKIP

    Args:
        config: A YAML path, a config dict, a :class:`Config`, or None (the defaults:
            the embedded defects data).
        *overrides: Dotted ``key=value`` strings.
        model: Your own module instead of ``model.name`` (see :func:`build_trainer`), or
            the ``model`` config section as a dict.
        data: Your own Datasets instead of ``data.name``, or the ``data`` section as a
            dict (``data={"batch_size": 32}``).
        callbacks: Extra :class:`Callback` instances.
        **keys: Sections as dicts (``train={"epochs": 2}``) or top-level keys
            (``task="regression"``).

    Returns:
        The run directory, ``summary.json``'s contents and the checkpoints.

    Raises:
        ConfigError, DataError, CheckpointError: bad input, with the message the CLI
            prints; nothing is written.
        RunError: the run could not go on.
        Interrupted: stopped by SIGINT/SIGTERM after saving ``last.pt``.
    """
    refuse_tune_keys(overrides)
    if "tune" in keys:
        raise ConfigError(
            "tune= configures `visiontrain tune`; train does not read it. Drop it, or run "
            "the search with `visiontrain tune`."
        )
    # data= and model= are a user's Datasets and module, or (as dicts) config sections.
    if isinstance(data, Mapping):
        keys["data"], data = data, None
    if isinstance(model, Mapping):
        keys["model"], model = model, None
    cfg = resolve_config(config, overrides, keys)
    return Run(cfg, model, data, callbacks).fit()


@dataclass
class ProfileResult:
    """What ``visiontrain profile`` measured and where it wrote it.

    Attributes:
        folder: Holds ``trace.json`` (Chrome trace), ``tb/`` (TensorBoard profile),
            ``profile.json`` (these numbers) and ``run/`` (the profiled run's config.yaml
            and logs).
        report: ``profile.json``'s contents: ``step_ms``, ``samples_per_s``, ``phases``
            (``name``, ``label``, ``ms`` and ``share`` per step), ``top_operators``,
            ``flops``, on CUDA ``cuda`` (memory, kernels), and ``advice``.
    """

    folder: Path
    report: dict[str, Any]

    @property
    def advice(self) -> list[dict[str, Any]]:
        """Each finding with its fix (``rule``, ``finding``, ``fix``, ``keys``)."""
        return self.report["advice"]


def profile(
    config: ConfigLike = None,
    *overrides: str,
    warmup: int = 3,
    steps: int = 10,
    out: str | Path | None = None,
    model: nn.Module | None = None,
    data: DatasetSource | None = None,
    console: Console | None = None,
    **keys: Any,
) -> ProfileResult:
    """Where a training step's time goes, as ``visiontrain profile`` prints it.

    Builds the run as :func:`train` does and trains ``warmup`` updates, then ``steps``
    updates under ``torch.profiler`` (the trainer's own steps: loader, batch preparation,
    forward, backward, update, logging), prints the breakdown, the top operators,
    samples/s (on CUDA memory and MFU) and advice, and stops.

    Example:
        >>> result = vt.profile(None, "data.num_workers=0", steps=5)  # doctest: +SKIP
        >>> [(p["name"], round(p["share"], 2)) for p in result.report["phases"]]  # doctest: +SKIP

    Args:
        config: A YAML path, a config dict, a :class:`Config`, or None (the defaults).
        *overrides: Dotted ``key=value`` strings.
        warmup: Updates before the measured ones (compilation, caches, allocator).
        steps: Updates measured (at least 1).
        out: The output folder; default ``run.dir/run.name``, else
            ``run.dir/profile-<data>-<timestamp>``. It must be new or empty.
        model: Your own module instead of ``model.name`` (see :func:`build_trainer`).
        data: Your own Datasets instead of ``data.name``.
        console: Where the breakdown is printed (default: the terminal).
        **keys: Sections as dicts (``train={"precision": "bf16"}``).

    Returns:
        The output folder and ``profile.json``'s numbers.

    Raises:
        ConfigError: a bad key or value, ``steps`` below 1, ``warmup`` below 0,
            ``run.resume`` or ``train.profile_steps`` set, an ``out`` folder in use.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps {steps}: measure at least 1 step, such as --steps 10.")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"--warmup {warmup}: use 0 or more warm-up steps, such as --warmup 3.")
    refuse_distributed("profile")
    refuse_tune_keys(overrides)
    cfg = resolve_config(config, overrides, keys)
    if cfg.run.resume is not None:
        raise ConfigError(
            f"run.resume={cfg.run.resume} has no meaning for profile, which profiles a fresh "
            "build of the config. Remove run.resume."
        )
    if cfg.train.profile_steps is not None:
        raise ConfigError(
            f"train.profile_steps={cfg.train.profile_steps} profiles a window of `visiontrain "
            "train`; profile takes --warmup and --steps instead. Remove train.profile_steps."
        )
    folder = Path(out).expanduser() if out is not None else tool_dir(cfg, "profile")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(
            f"the output folder {folder} (--out, or run.dir/run.name) already holds files; "
            "profile writes trace.json, tb/, profile.json and run/ into a new or empty "
            "folder. Choose another."
        )
    cfg.run.dir, cfg.run.name = str(folder), "run"
    cfg.train.profile_steps = f"{warmup}:{warmup + steps}"
    # Long enough for the warm-up, the window and (CUDA) one update to count FLOPs on.
    cfg.train.min_updates = max(cfg.train.min_updates or 0, warmup + steps + 1)
    console = console or Console(highlight=False, soft_wrap=True)
    with graceful_stop() as flag:
        trainer = assemble(
            cfg,
            console,
            flag,
            model=model,
            data=data,
            profile_into=folder,
            profile_title=f"visiontrain profile --warmup {warmup} --steps {steps}",
        )
        assert trainer is not None
        try:
            trainer.fit()
        except ProfileDone:
            pass
        finally:
            for cb in trainer.callbacks:
                cb.close()
    window = next(cb for cb in trainer.callbacks if isinstance(cb, ProfileWindow))
    if window.report is None:
        raise RunError(
            f"the run ended (early stopping?) before step {warmup + steps}; nothing was "
            "profiled. Lower --warmup/--steps or turn train.early_stopping off."
        )
    return ProfileResult(folder, window.report)


def evaluate(
    target: str | Path,
    split: str = "test",
    *overrides: str,
    model: nn.Module | None = None,
    data: DatasetSource | None = None,
    coco_results: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of a trained run's best weights on one split, as ``visiontrain eval`` gives.

    Example:
        >>> vt.evaluate("runs/defects-1", "test")["macro_f1"]  # doctest: +SKIP

    Args:
        target: A run directory (its best.pt) or a checkpoint.
        split: ``train``, ``val`` or ``test``.
        *overrides: ``key=value`` changes to the run's config (``data.root=...``).
        model: For a checkpoint of your own module: an instance to load the weights into.
        data: For a run trained on Python Datasets: the same ``vt.data.from_datasets``.
        coco_results: Detection: also write the split's detections as COCO results JSON.

    Raises:
        UserError: the data's classes differ from the checkpoint's, the split does not
            exist, a run of Python Datasets without ``data=``, or ``coco_results`` for a
            model that does not detect.
    """
    loaded = load_trained(target, list(overrides), model=model)
    cfg = loaded.cfg
    if data is None and cfg.data.name == SOURCE_NAME:
        raise UserError(
            f"{target} was trained on Python Datasets (vt.data.from_datasets), which a "
            "checkpoint cannot rebuild; evaluate it in Python: vt.evaluate(run, split, "
            "model=..., data=vt.data.from_datasets(...))."
        )
    bundle = data.build(cfg.data, cfg.task) if data is not None else build_data(cfg.data, cfg.task)
    if (bundle.class_names, bundle.target_names) != (loaded.class_names, loaded.target_names):
        have = bundle.class_names or bundle.target_names
        want = loaded.class_names or loaded.target_names
        raise UserError(
            f"the data's classes or targets {have} differ from the checkpoint's {want}; "
            "evaluate on data with the same classes."
        )
    if split not in ("train", "val", "test"):
        raise UserError(f"split={split!r}: choose train, val or test.")
    if getattr(bundle, split) is None:
        raise UserError(f"data source {cfg.data.name} has no {split} split.")
    task = build_task(cfg, bundle, loaded.device)
    task.load_state_dict(loaded.task_state)
    if coco_results and task.name != "detection":
        raise UserError(f"coco results are detections; {target} is a {task.name} model.")
    loader = getattr(build_loaders(cfg, bundle, loaded.device), split)
    precision = Precision(cfg.train.precision, loaded.device)
    metrics = evaluate_loop(loaded.model, loader, task, loaded.prep, precision)
    if coco_results:
        atomic_write_json(Path(coco_results), task.coco_results())
    return metrics


class Predictor:
    """A trained model ready to predict: from a run, a checkpoint or an exported artifact.

    Made by :func:`load`. ``predict`` answers as ``visiontrain predict`` does.
    """

    def __init__(self, loaded: Loaded | Exported) -> None:
        self.loaded = loaded

    @property
    def task(self) -> str:
        """``classification``, ``regression``, ``detection`` or ``segmentation``."""
        return self.loaded.task

    @property
    def class_names(self) -> list[str]:
        """The class names, in index order (empty for regression)."""
        return list(self.loaded.class_names)

    @property
    def model(self) -> nn.Module | None:
        """The module in eval mode (None for an exported artifact)."""
        return getattr(self.loaded, "model", None)

    def predict(
        self,
        images: Any,
        top_k: int = 1,
        score_threshold: float | None = None,
        batch_size: int = 32,
    ) -> list[dict[str, Any]]:
        """Predictions for images, one dict per image, as ``visiontrain predict`` gives.

        Example:
            >>> predictor = vt.load("runs/defects-1")  # doctest: +SKIP
            >>> predictor.predict(["a.png", "b.png"])[0]["prediction"]  # doctest: +SKIP
            'ok'

        Args:
            images: One image or a list: file paths, PIL images, numpy arrays (HWC) or
                uint8 tensors (CHW).
            top_k: Classification: also rank the ``k`` best classes.
            score_threshold: Detection: keep boxes scoring at least this (default 0.5).
            batch_size: Images per forward.

        Returns:
            Per image: ``file`` (for paths) or ``index``, and the task's prediction
            (``prediction``/``probability``, values, ``detections``, or ``mask``).
        """
        items = images if isinstance(images, list | tuple) else [images]
        return predict_images(self.loaded, list(items), top_k, score_threshold, batch_size)


def load(target: str | Path, model: nn.Module | None = None) -> Predictor:
    """A predictor from a run, a checkpoint, or an export (``.pt2``/``.onnx``/``.safetensors``).

    Example:
        >>> import visiontrain as vt
        >>> vt.load("runs/defects-1").predict("photo.png")  # doctest: +SKIP

    Args:
        target: A run directory (its best.pt), a ``.pt`` checkpoint, or an exported
            artifact with its ``model.json`` beside it (the file, the ``model.json`` or the
            export folder when it holds one artifact).
        model: For a checkpoint of your own module: an instance built as for training,
            which receives the weights.

    Raises:
        CheckpointError: missing or damaged file, or your module is needed and not given.
        UserError: an artifact without its model.json.
    """
    return Predictor(load_for_predict(target, model))
