"""The training loop: ``fit`` → ``train_epoch`` → ``train_step`` / ``evaluate``.

The loop never reads a value back from the device between log intervals: losses are
summed on the device and read once per ``train.log_every`` updates. Everything stateful
goes into one checkpoint, so a run resumes at the exact batch where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader

from visiontrain.config import Config
from visiontrain.data.loaders import LoaderFaultError, worker_fault
from visiontrain.data.pipeline import Loaders
from visiontrain.data.sources import DataBundle
from visiontrain.engine.callbacks import Callback, Checkpointer
from visiontrain.engine.distributed import Dist, current
from visiontrain.engine.ema import ModelEma
from visiontrain.engine.evaluate import evaluate
from visiontrain.engine.freeze import FreezePhase
from visiontrain.engine.fsdp import gathered
from visiontrain.engine.nan_policy import CAUSES, NanGuard, Rollback
from visiontrain.engine.parts import build_prep
from visiontrain.engine.precision import Precision
from visiontrain.engine.schedules import Horizon, Schedule
from visiontrain.engine.sharded import load_sharded, named_optimizer_state
from visiontrain.engine.signals import StopFlag
from visiontrain.engine.step import Step
from visiontrain.engine.wrap import TrainModel
from visiontrain.errors import (
    EXIT_SIGTERM,
    CheckpointError,
    ConfigError,
    Interrupted,
    RunError,
)
from visiontrain.headline import HEADLINE_ORDER
from visiontrain.models.build import user_model_class
from visiontrain.seed import capture_rng, restore_rng, sample_seed, seed_everything
from visiontrain.tasks.base import Task


@dataclass
class _TrainAccum:
    """Running training statistics; the interval loss stays on the device."""

    interval_loss: torch.Tensor
    interval_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    interval_batches: int = 0
    interval_samples: int = 0
    interval_start: float = field(default_factory=time.perf_counter)
    epoch_loss: float = 0.0
    epoch_batches: int = 0
    epoch_samples: int = 0
    epoch_seconds: float = 0.0
    # Throughput counts only this process's work and time: never checkpointed, so a
    # resume does not divide the samples of the previous process by the new one's time.
    rate_samples: int = 0
    epoch_rate_samples: int = 0
    epoch_rate_seconds: float = 0.0


class Trainer:
    """Runs one training job described by a resolved :class:`Config`."""

    def __init__(
        self,
        *,
        cfg: Config,
        run_dir: Path,
        bundle: DataBundle,
        model: nn.Module,
        task: Task,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        precision: Precision,
        device: torch.device,
        loaders: Loaders,
        horizon: Horizon,
        checkpointer: Checkpointer,
        callbacks: list[Callback],
        console: Console,
        stop_flag: StopFlag | None = None,
        train_model: TrainModel | None = None,
        ema: ModelEma | None = None,
        dist: Dist | None = None,
        freeze: FreezePhase | None = None,
        weights_info: list[dict[str, Any]] | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.bundle = cfg, run_dir, bundle
        self.freeze = freeze
        # What model.weights/pretrained loaded when the run started (kept across resumes).
        self.weights_info = list(weights_info or [])
        self.dist = dist if dist is not None else current()
        # Training steps run through DDP/compile; evaluation and checkpoints use the plain
        # module (or its EMA), whose parameter names never carry a wrapper's prefix.
        self.train_model = train_model or TrainModel(model, self.dist, device, False, print)
        self.ema = ema
        self.model, self.task, self.optimizer = model, task, optimizer
        self.schedule, self.precision, self.device = schedule, precision, device
        self.loaders, self.horizon = loaders, horizon
        self.checkpointer = checkpointer
        self.callbacks = [checkpointer, *callbacks]
        self._console = console
        self.stop_flag = stop_flag if stop_flag is not None else StopFlag()
        self.prep = build_prep(cfg, bundle, device, self.dist.rank)
        mode = cfg.train.monitor_mode
        self.monitor_mode = task.monitor_mode(cfg.train.monitor) if mode == "auto" else mode
        # Counters: the checkpoint's notion of "where are we".
        self.epochs_done = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        # Per-epoch flags read by callbacks.
        self.at_epoch_end = False
        self.evaluated_this_epoch = False
        self.improved = False
        self.should_stop = False
        self.monitor_value: float | None = None
        self.last_lr = optimizer.param_groups[0]["lr"]
        self.last_lrs = self._group_lrs()
        self.skipped: set[str] = set()
        self.results: dict[str, dict[str, Any]] = {}
        self.timings = {"train_s": 0.0, "eval_s": 0.0}
        self._grad_norm: torch.Tensor | None = None
        self._accum = _TrainAccum(torch.zeros((), device=device))
        t = cfg.train
        self.nan = NanGuard(t.on_nan, t.max_nan_skips, t.max_rollbacks, t.nan_lr_factor)
        # The one implementation of a training update (engine/step.py).
        self.step = Step(
            model,
            task,
            optimizer,
            precision,
            self.prep,
            train_model=self.train_model,
            grad_clip_norm=t.grad_clip_norm,
            grad_clip_value=t.grad_clip_value,
            ema=ema,
            schedule=schedule,
            check_finite=self.nan.checks_every_update,
            dist=self.dist,
        )
        # The (epoch, batch) pairs of the current accumulation group; read at the update.
        self._group_batches: list[tuple[int, int]] = []
        self.amp_skipped = 0
        self._fit_start = time.perf_counter()
        # Seconds the run had already run before this process resumed it: record times
        # continue across resumes.
        self._time_offset = 0.0

    # ------------------------------------------------------------------ public API

    def fit(self) -> dict[str, Any]:
        """Train for ``train.epochs`` (from where a resume left off), then test the best weights.

        A loader fault (a worker killed or stuck past ``data.timeout``) saves ``last.pt``
        when the run stands between two updates, then ends the run with the fault.
        """
        try:
            results = self._fit_or_fault()
        except BaseException:
            # Whatever ends the run waits for the checkpoint in flight (run.async_save),
            # without hiding the cause behind a write error.
            with contextlib.suppress(Exception):
                self.checkpointer.flush()
            raise
        self.checkpointer.flush()
        return results

    def _fit_or_fault(self) -> dict[str, Any]:
        try:
            return self._fit()
        except LoaderFaultError as exc:
            raise RunError(f"{exc} {self._save_after_fault()}") from None
        except (RuntimeError, ConnectionResetError, EOFError) as exc:
            # A worker's death is reported by a SIGCHLD handler, which raises wherever the
            # main thread is — possibly inside an optimizer step — so nothing is saved.
            fault = worker_fault(exc, self.cfg.data.timeout)
            if fault is None:
                raise
            raise RunError(
                f"{fault} The last periodic checkpoint is kept; resume with run.resume=auto."
            ) from None

    def _save_after_fault(self) -> str:
        if self.dist.enabled:
            # Saving gathers every rank's state; a rank whose loader died cannot join.
            return "Under DDP the last periodic checkpoint is kept; resume with run.resume=auto."
        if self.batch_in_epoch % self.cfg.train.accumulate:
            return (
                "It stopped inside an accumulation group, so the last periodic checkpoint is "
                "kept; resume with run.resume=auto."
            )
        path = self.checkpointer.save_last(self, wait=True)
        return f"Saved {path} at step {self.global_step}; resume with run.resume=auto."

    def _fit(self) -> dict[str, Any]:
        self._fire("on_fit_start")
        if self.nan.checks_every_update and not self.checkpointer.exists(
            self.checkpointer.last_path
        ):
            # A rollback needs a good state to return to, also in the first epoch.
            self.checkpointer.save_last(self)
        while True:
            try:
                self._epochs()
                break
            except Rollback:
                continue  # the state was reloaded: go on from its epoch and batch
        self._restore_best()
        self._calibrate()
        if self.loaders.test is not None:
            self.results["test"] = self.evaluate(self.loaders.test, "test")
        self._fire("on_fit_end")
        return self.results

    def _epochs(self) -> None:
        for epoch in range(self.epochs_done, self.cfg.train.epochs):
            self.epoch = epoch
            self.evaluated_this_epoch = self.improved = False
            self._set_phase(epoch)
            self.train_epoch()
            if (epoch + 1) % self.cfg.train.eval_every == 0 or epoch + 1 == self.cfg.train.epochs:
                with record_function("vt/eval"):
                    self._validate()
            if self.schedule.interval == "epoch":
                self.schedule.scheduler.step()
            self.epochs_done, self.batch_in_epoch = epoch + 1, 0
            self._fire("on_epoch_end")
            self._check_stop()
            if self.should_stop:
                break

    def train_epoch(self) -> None:
        """One pass over the training loader, from ``batch_in_epoch`` on."""
        self.model.train()
        sampler = self.loaders.train.batch_sampler
        n_batches = len(sampler)
        sampler.set_epoch(self.epoch, self.batch_in_epoch)
        accumulate = self.cfg.train.accumulate
        start = time.perf_counter()
        self._accum.interval_start = start
        batches = iter(self.loaders.train)
        while True:
            # The wait for the next batch, named for the profiler (train.profile_steps,
            # `visiontrain profile`): a loader-bound step shows as such.
            with record_function("vt/loader_wait"):
                batch = next(batches, None)
            if batch is None:
                break
            i = self.batch_in_epoch
            group_start = i - i % accumulate
            # A short remainder at the epoch's end still updates, averaged over its own size.
            group_len = min(accumulate, n_batches - group_start)
            updates_now = i + 1 - group_start == group_len
            if batch["skipped"]:
                self.skipped.update(batch["skipped"])
            # A batch that made the loss non-finite before a rollback is passed over.
            if batch["image"] is not None and (self.epoch, i) not in self.nan.pass_over:
                self.train_step(batch, 1.0 / group_len, sync=updates_now)
                self._group_batches.append((self.epoch, i))
            self.batch_in_epoch += 1
            if updates_now:
                self.at_epoch_end = self.batch_in_epoch == n_batches
                self._update()
                log_due = self.global_step % self.cfg.train.log_every == 0 or self.at_epoch_end
                if log_due:
                    with record_function("vt/logging"):
                        self._log_train()
                self._fire("on_update")
                # Under DDP the ranks agree on stopping at log steps only: one tiny
                # all-reduce per log interval instead of one per update.
                self._check_stop(sync_point=log_due)
        seconds = time.perf_counter() - start
        self._accum.epoch_seconds += seconds
        self._accum.epoch_rate_seconds += seconds
        self.timings["train_s"] += time.perf_counter() - start
        self._log_train_epoch()

    def train_step(self, batch: dict[str, Any], scale: float, sync: bool = True) -> None:
        """Forward and backward of one micro-batch; the loss stays on the device.

        Args:
            batch: the collated batch.
            scale: the micro-batch's share of the update (1 / accumulation group size).
            sync: whether an update follows; DDP all-reduces gradients only then.
        """
        losses = self.step.forward_backward(batch, scale, sync, self.epoch, self.batch_in_epoch)
        loss = losses["loss"]
        acc = self._accum
        if self.nan.checks_every_update:
            # A dropped update's loss stays out of the logged mean.
            loss = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))
        acc.interval_loss += loss
        for name, part in losses.items():
            if name != "loss":
                # Each term of a composite loss (a detector's) is summed on the device too.
                acc.interval_parts[name] = acc.interval_parts.get(name, 0) + part
        acc.interval_batches += 1
        acc.interval_samples += len(batch["image"])
        acc.rate_samples += len(batch["image"])

    def evaluate(self, loader: DataLoader, split: str, emit: bool = True) -> dict[str, Any]:
        """Metrics of the current weights on one split (engine/evaluate.py)."""
        start = time.perf_counter()
        model = self.eval_model
        # DDP keeps parameters equal, but each rank's last forward updated its own BatchNorm
        # statistics: evaluate (and checkpoint) rank 0's, on every rank.
        self.dist.broadcast_module(model, buffers_only=True)
        # Under FSDP the ranks may run different numbers of batches: gathered once, the
        # forwards need no collective (engine/fsdp.py).
        with gathered(model):
            metrics = evaluate(
                model, loader, self.task, self.prep, self.precision, self.dist, self.skipped
            )
        self.timings["eval_s"] += time.perf_counter() - start
        if emit:
            self._emit({"split": split, "kind": "eval", **metrics})
        return metrics

    @property
    def user_model(self) -> bool:
        """Whether the model is a user's own module (``vt.build_trainer(model=...)``)."""
        return user_model_class(self.cfg.model.name) is not None

    @property
    def eval_model(self) -> nn.Module:
        """The weights evaluated and kept as best: the EMA when ``train.ema`` is on."""
        return self.ema.module if self.ema is not None else self.model

    def console(self, message: str) -> None:
        """Print a line for the user (through the progress bar's console); rank 0 only."""
        if self.cfg.train.progress != "none" and self.dist.is_main:
            self._console.print(message, highlight=False)

    # ------------------------------------------------------------------ internals

    def _update(self) -> None:
        """Apply the accumulated gradients (``Step.update``); count the real updates.

        An update that does not happen — non-finite under ``train.on_nan=skip|rollback``,
        or skipped by fp16's GradScaler — advances neither the schedule, the EMA nor
        ``global_step``: the scheduler's step count equals the real updates.
        """
        batches, self._group_batches = self._group_batches, []
        if not batches:  # every micro-batch of the group was passed over
            self.optimizer.zero_grad(set_to_none=True)
            return
        log_due = (self.global_step + 1) % self.cfg.train.log_every == 0 or self.at_epoch_end
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        if self.last_lrs is not None:
            self.last_lrs = self._group_lrs()
        result = self.step.update(want_norm=log_due, decide=lambda ok: self._decide(ok, batches))
        if result.grad_norm is not None:
            self._grad_norm = result.grad_norm
        if result.outcome == "rollback":
            self._rollback()
        if result.outcome == "amp_skipped":
            self.amp_skipped += 1
        if result.stepped:
            self.global_step += 1

    def _decide(self, finite: bool, batches: list[tuple[int, int]]) -> str:
        """The NaN policy's answer for an update over ``batches``; says so when it drops one."""
        decision = self.nan.decide(finite, batches)
        if decision != "step":
            self.console(
                f"step {self.global_step + 1} (epoch {self.epoch + 1}): non-finite loss or "
                f"gradients; update skipped ({self.nan.in_a_row} in a row, {self.nan.skips} "
                "in all)"
            )
        return decision

    def _rollback(self) -> None:
        """Reload last.pt, lower the LR, pass over the offending batches, restart there."""
        if not self.nan.can_roll_back():
            raise RunError(
                f"the loss or gradients are not finite at step {self.global_step + 1} (epoch "
                f"{self.epoch + 1}, batch {self.batch_in_epoch}): {self.nan.in_a_row} updates "
                f"in a row after {self.nan.rollbacks} rollbacks (train.max_rollbacks="
                f"{self.nan.max_rollbacks}). {CAUSES} checkpoints/last.pt holds the last good "
                "weights."
            )
        path = self.checkpointer.last_path
        self.checkpointer.flush()  # the last good state may still be on its way to disk
        self.nan.start_rollback()
        kept = self.nan.state_dict()
        state = self.dist.run_on_main(lambda: self.checkpointer.read(path))
        self.load_state(state, path)
        self.nan.load_state_dict(kept)
        self.nan.scale_lr(self.optimizer, self.schedule.scheduler)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.step.reset()
        self._group_batches = []
        self._emit({"split": "train", "kind": "rollback", "rollbacks": self.nan.rollbacks,
                    "lr": self.last_lr, "passed_over": len(self.nan.pass_over)})  # fmt: skip
        self.console(
            f"rollback {self.nan.rollbacks}/{self.nan.max_rollbacks}: reloaded {path} (step "
            f"{self.global_step}), learning rate x{self.nan.lr_factor} (now "
            f"{self.last_lr:.3g}), {len(self.nan.pass_over)} batches passed over"
        )
        raise Rollback

    def _log_train(self) -> None:
        acc = self._accum
        now = time.perf_counter()
        counts = torch.tensor(
            [acc.interval_batches, acc.interval_samples, acc.rate_samples],
            dtype=acc.interval_loss.dtype,
            device=acc.interval_loss.device,
        )
        stacked = torch.stack([acc.interval_loss, *acc.interval_parts.values()])
        # Under DDP the logged loss is the mean over every rank's batches (one all-reduce).
        stacked = self.dist.sum_(torch.cat([stacked, counts]))
        # The one host sync per log interval: the loss and every loss term read together.
        *sums, n_batches, n_samples, n_rate = stacked.tolist()
        batches = max(n_batches, 1)
        loss_sum = sums[0]
        if not math.isfinite(loss_sum) and self.nan.policy == "raise":
            raise RunError(
                f"the training loss became {loss_sum / batches} in the updates up to step "
                f"{self.global_step} (epoch {self.epoch + 1}). {CAUSES} No checkpoint was "
                "written after it; set train.on_nan=skip or rollback to continue past such "
                "updates."
            )
        acc.epoch_loss += loss_sum
        acc.epoch_batches += int(n_batches)
        acc.epoch_samples += int(n_samples)
        parts = {
            f"loss_{k}": v / batches for k, v in zip(acc.interval_parts, sums[1:], strict=True)
        }
        record = {
            "split": "train",
            "kind": "train_step",
            "loss": loss_sum / batches,
            **parts,
            "lr": self.last_lr,
            **({"lr_groups": dict(self.last_lrs)} if self.last_lrs else {}),
            "grad_norm": None if self._grad_norm is None else float(self._grad_norm),
            "samples_per_s": n_rate / max(now - acc.interval_start, 1e-9),
        }
        if self.nan.checks_every_update:
            record["skipped_updates"] = self.nan.interval_skips
            self.nan.interval_skips = 0
        if self.precision.scaler.is_enabled():
            record["amp_skipped_steps"] = self.amp_skipped
        acc.interval_loss.zero_()
        acc.interval_parts = {}
        acc.interval_batches = acc.interval_samples = 0
        acc.epoch_rate_samples += int(n_rate)
        acc.rate_samples = 0
        acc.interval_start = now
        self._emit(record)

    def _log_train_epoch(self) -> None:
        acc = self._accum
        self._emit(
            {
                "split": "train",
                "kind": "train_epoch",
                "loss": acc.epoch_loss / max(acc.epoch_batches, 1),
                "lr": self.last_lr,
                "samples_per_s": acc.epoch_rate_samples / max(acc.epoch_rate_seconds, 1e-9),
                "samples": acc.epoch_samples,
            }
        )
        acc.epoch_loss, acc.epoch_batches, acc.epoch_samples, acc.epoch_seconds = 0.0, 0, 0, 0.0
        acc.epoch_rate_samples, acc.epoch_rate_seconds = 0, 0.0

    def _validate(self) -> None:
        metrics = self.evaluate(self.loaders.val, "val")
        try:
            self.monitor_value = monitored(metrics, self.cfg.train.monitor)
        except KeyError:
            raise ConfigError(
                f"train.monitor={self.cfg.train.monitor} is not a validation metric; use one "
                f"of {', '.join(self.task.metric_names())}."
            ) from None
        self.evaluated_this_epoch = True
        if self.schedule.interval == "metric":
            self.schedule.scheduler.step(self.monitor_value)
        self.results["val_last"] = metrics

    def _restore_best(self) -> None:
        best = self.checkpointer.best_path
        self.checkpointer.flush()  # the last epoch's files, under run.async_save
        if self.checkpointer.sharded:
            # Every rank reads its own shards of the best weights (shared disk).
            if self.checkpointer.best_epoch is not None and self.dist.run_on_main(
                lambda: self.checkpointer.exists(best)
            ):
                state = self.dist.run_on_main(lambda: self.checkpointer.read(best))
                ema = self.ema.module if self.ema is not None else None
                load_sharded(best, state, self.dist, self.model, None, ema)
                self.results["val"] = self.checkpointer.best_metrics or self.results.get(
                    "val_last", {}
                )
            else:
                self.results["val"] = self.results.get("val_last", {})
            return
        # Every rank knows whether there is a best epoch (they saw the same metrics); only
        # rank 0 reads the file, then broadcasts the weights (no shared disk needed).
        if self.checkpointer.best_epoch is not None and (best.is_file() or not self.dist.is_main):
            if self.dist.is_main:
                from visiontrain.engine.checkpoint import load_checkpoint

                state = load_checkpoint(best)
                self.model.load_state_dict(state["model"])
                if self.ema is not None:
                    self.ema.load_state_dict(state["ema"])
            self.dist.broadcast_module(self.model)
            if self.ema is not None:
                self.dist.broadcast_module(self.ema.module)
            self.results["val"] = self.checkpointer.best_metrics or self.results.get("val_last", {})
        else:
            self.results["val"] = self.results.get("val_last", {})

    def _calibrate(self) -> None:
        """Let the task tune its post-processing (a threshold) on val with the best weights."""
        if not self.task.calibrates:
            return
        self.evaluate(self.loaders.val, "val", emit=False)
        info = self.task.calibrate()
        if info is None:
            return
        self.results["val"] = self.task.compute_metrics()
        if not isinstance(self.cfg.train.threshold, float) or "temperature" in info:
            # A tuned threshold or a temperature changes the val metrics; a fixed threshold
            # gives the best epoch's.
            self._emit({"split": "val", "kind": "calibrated", **self.results["val"]})
        self.checkpointer.store_task_state(self.task.state_dict())
        if "temperature" in info:
            c = info["calibration"]
            self.console(
                f"temperature {c['temperature']:.4g} fitted on val: ECE {c['val_ece_before']:.4f}"
                f" -> {c['val_ece_after']:.4f}, NLL {c['val_nll_before']:.4f} -> "
                f"{c['val_nll_after']:.4f}"
            )
            if c.get("note"):
                self.console(f"warning: train.calibrate=temperature: {c['note']}")
        if "thresholds" in info:
            per = ", ".join(f"{c} {t:.3g}" for c, t in info["thresholds"].items())
            self.console(f"thresholds per class ({self.cfg.train.threshold}, val): {per}")
        if "threshold" in info:
            self.console(
                f"threshold {info['threshold']:.4g} ({info['rule']}): val precision "
                f"{info['val_precision']:.3f}, recall {info['val_recall']:.3f}, "
                f"F1 {info['val_f1']:.3f}" + (f" — {info['note']}" if info.get("note") else "")
            )

    def _group_lrs(self) -> dict[str, float] | None:
        """Every named parameter group's LR, when the groups train at different LRs."""
        groups = self.optimizer.param_groups
        if len({g.get("lr_scale", 1.0) for g in groups}) < 2:
            return None
        return {str(g.get("name", i)): g["lr"] for i, g in enumerate(groups)}

    def _set_phase(self, epoch: int) -> None:
        """``train.freeze_epochs``: the head alone before the boundary, everything after."""
        if self.freeze is None or not self.freeze.apply(epoch):
            return
        # DDP's reducer and a compiled graph were built for the old set of trainable
        # parameters: build them anew (every rank reaches this at the same epoch).
        self.train_model.rewrap()
        self.console(
            f"note: epoch {epoch + 1}: only the head trains (train.freeze_epochs="
            f"{self.freeze.epochs})"
            if self.freeze.frozen
            else f"note: epoch {epoch + 1}: every layer trains from here (unfrozen)"
        )

    def _check_stop(self, sync_point: bool = True) -> None:
        if self.dist.enabled:
            # A signal may reach one rank only; all stop together, at the same step.
            if not sync_point or not self.dist.any(bool(self.stop_flag)):
                return
        elif not self.stop_flag:
            return
        path = self.checkpointer.save_last(self, wait=True)
        raise Interrupted(
            self.stop_flag.exit_code or EXIT_SIGTERM,
            f"stopped by signal at epoch {self.epoch + 1}, step {self.global_step}; saved "
            f"{path}. Resume with the same command plus run.name={self.run_dir.name} "
            f"run.resume=auto (or run.resume={path}).",
        )

    def _emit(self, record: dict[str, Any]) -> None:
        record = {
            "step": self.global_step,
            # 1-based, as the console counts: everything a user reads numbers epochs so.
            "epoch": self.epoch + 1,
            **record,
            "time": round(self.elapsed(), 4),
            "hparams": self.hparams(),
        }
        for cb in self.callbacks:
            cb.on_log(self, record)

    def _fire(self, hook: str) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self)

    # ------------------------------------------------------------------ state

    def elapsed(self) -> float:
        """Seconds this run has run, over every process that worked on it (resumes add)."""
        return self._time_offset + time.perf_counter() - self._fit_start

    def hparams(self) -> dict[str, Any]:
        """The run's headline hyperparameters, attached to every record."""
        c = self.cfg
        return {
            "task": c.task,
            "data": c.data.name,
            "model": c.model.name,
            "loss": c.loss.name,
            "optim": c.optim.name,
            "lr": c.optim.lr,
            "weight_decay": c.optim.weight_decay,
            "schedule": c.schedule.name,
            "batch_size": c.data.batch_size,
            "accumulate": c.train.accumulate,
            "epochs": c.train.epochs,
            "precision": c.train.precision,
            "seed": c.train.seed,
            "label_smoothing": c.loss.label_smoothing,
            "class_weights": str(c.loss.class_weights),
            "sampler": c.data.sampler,
        }

    def final_scalars(self) -> dict[str, float]:
        """Headline numbers for TensorBoard's hparams view."""
        out = {}
        for split in ("val", "test"):
            for key in HEADLINE_ORDER:
                value = self.results.get(split, {}).get(key)
                if isinstance(value, int | float):
                    out[f"{split}/{key}"] = float(value)
        return out

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly (tensors and plain data only)."""
        sched = self.schedule.scheduler
        acc = self._accum
        b = self.bundle
        rng = capture_rng()
        return {
            # Under FSDP: this rank's shards (DTensors), written by engine/sharded.py.
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "world_size": self.dist.world_size,
            # Each rank's RNG (dropout masks differ per rank); a collective under DDP.
            "rng_by_rank": self.dist.gather([rng]) if self.dist.enabled else None,
            # Sharded checkpoints key the optimizer state by parameter name (resharding).
            "optimizer": named_optimizer_state(self.model, self.optimizer)
            if self.checkpointer.sharded
            else self.optimizer.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "scaler": self.precision.scaler.state_dict(),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            "counters": {
                "epochs_done": self.epochs_done,
                "batch_in_epoch": self.batch_in_epoch,
                "global_step": self.global_step,
            },
            "accum": {
                "interval_loss": acc.interval_loss.detach().cpu().clone(),
                "interval_parts": {
                    k: v.detach().cpu().clone() for k, v in acc.interval_parts.items()
                },
                "interval_batches": acc.interval_batches,
                "interval_samples": acc.interval_samples,
                "epoch_loss": acc.epoch_loss,
                "epoch_batches": acc.epoch_batches,
                "epoch_samples": acc.epoch_samples,
                "epoch_seconds": acc.epoch_seconds,
            },
            "timings": dict(self.timings),
            "elapsed_s": self.elapsed(),
            "nan": {**self.nan.state_dict(), "amp_skipped": self.amp_skipped},
            "skipped": sorted(self.skipped),
            "rng": rng,
            "config": self.cfg.to_dict(),
            "task": self.task.name,
            "task_state": self.task.state_dict(),
            "weights": self.weights_info,
            "data": {
                "name": self.cfg.data.name,
                "class_names": list(b.class_names),
                "target_names": list(b.target_names),
                "in_channels": b.in_channels,
                "image_size": b.image_size,
                "mean": list(b.mean),
                "std": list(b.std),
                "same_size": b.same_size,
            },
        }

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        """Continue from a checkpoint written by :meth:`checkpoint_state`."""
        if state.get("task") != self.task.name:
            raise CheckpointError(
                f"checkpoint {path} is from task `{state.get('task')}`, this run is "
                f"`{self.task.name}`. Resume with the config the checkpoint was trained with."
            )
        if ("sharded" in state) != self.checkpointer.sharded:
            now = self.cfg.train.strategy
            raise CheckpointError(
                f"checkpoint {path} is {'sharded' if 'sharded' in state else 'a .pt file'}, "
                f"but this run has train.strategy={now}. Resume with the strategy it was "
                "written with (its config.yaml)."
            )
        try:
            if self.checkpointer.sharded:
                ema = self.ema.module if self.ema is not None and state.get("ema") else None
                load_sharded(path, state, self.dist, self.model, self.optimizer, ema)
            else:
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            msg = str(exc).strip().splitlines()[0]
            raise CheckpointError(
                f"checkpoint {path} does not fit this model ({msg}). It was written for a "
                "different architecture or class count; resume with the config it was "
                "trained with (its config.yaml)."
            ) from None
        if self.schedule.scheduler is not None and state.get("scheduler") is not None:
            self.schedule.scheduler.load_state_dict(state["scheduler"])
        self.precision.scaler.load_state_dict(state["scaler"])
        self.step.reset()
        for cb in self.callbacks:
            cb.load_state_dict(state["callbacks"].get(cb.name, {}))
        counters = state["counters"]
        self.epochs_done = self.epoch = counters["epochs_done"]
        self.batch_in_epoch = self._resume_batch(counters["batch_in_epoch"], state)
        self.global_step = counters["global_step"]
        if self.ema is not None:
            if state.get("ema") is None:
                raise CheckpointError(
                    f"checkpoint {path} was trained without train.ema, so it has no averaged "
                    "weights to continue. Resume with train.ema=false, or start a new run."
                )
            if self.checkpointer.sharded:
                self.ema.updates = int(state["ema"]["updates"])  # its weights: load_sharded
            else:
                self.ema.load_state_dict(state["ema"])
        acc = state["accum"]
        self._accum.interval_loss = acc["interval_loss"].to(self.device)
        self._accum.interval_parts = {
            k: v.to(self.device) for k, v in acc.get("interval_parts", {}).items()
        }
        for key in (
            "interval_batches",
            "interval_samples",
            "epoch_loss",
            "epoch_batches",
            "epoch_samples",
            "epoch_seconds",
        ):
            setattr(self._accum, key, acc[key])
        self.timings.update(state.get("timings", {}))
        saved = float(state.get("elapsed_s", 0.0))
        if saved > self.elapsed():  # a resume; a rollback keeps its own, later clock
            self._time_offset, self._fit_start = saved, time.perf_counter()
        self.nan.load_state_dict(state.get("nan", {}))
        self.amp_skipped = int(state.get("nan", {}).get("amp_skipped", 0))
        self.skipped.update(state.get("skipped", []))
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.task.load_state_dict(state.get("task_state", {}))
        self.weights_info = list(state.get("weights") or self.weights_info)
        by_rank = state.get("rng_by_rank")
        if by_rank and len(by_rank) == self.dist.world_size:
            restore_rng(by_rank[self.dist.rank])
        else:
            restore_rng(state["rng"])
            if self.dist.rank > 0:
                # A new process layout: fresh, distinct, reproducible streams per rank.
                seed_everything(sample_seed(self.cfg.train.seed, self.global_step, self.dist.rank))

    def _resume_batch(self, batch_in_epoch: int, state: dict[str, Any]) -> int:
        """Where this epoch continues; recomputed when the number of processes changed.

        Ranks take the epoch's order by stride, so N processes that each ran ``b`` batches
        of ``B`` consumed its first ``b·B·N`` samples. With M processes the epoch resumes
        at the last accumulation-group boundary before that position (a few samples may
        be seen twice; none are skipped).
        """
        saved_world = int(state.get("world_size", 1))
        world = self.dist.world_size
        if saved_world == world or batch_in_epoch == 0:
            return batch_in_epoch
        batch = self.cfg.data.batch_size
        consumed = batch_in_epoch * batch * saved_world
        group = batch * world * self.cfg.train.accumulate
        resumed = consumed // group * self.cfg.train.accumulate
        self.console(
            f"note: checkpoint written by {saved_world} processes, resumed by {world}: this "
            f"epoch continues at batch {resumed} ({consumed - resumed * batch * world} of "
            f"its {consumed} samples seen so far are repeated)"
        )
        return resumed


def monitored(metrics: dict[str, Any], key: str) -> float:
    """Look up ``val/<metric>`` or ``val/<metric>/<class or target>`` in a metrics dict."""
    parts = key.split("/")[1:]
    if len(parts) == 1 and isinstance(metrics.get(parts[0]), int | float):
        return float(metrics[parts[0]])
    if len(parts) == 2:
        metric, name = parts
        for group in ("per_class", "per_target"):
            rows = metrics.get(group, {})
            if name in rows and metric in rows[name]:
                return float(rows[name][metric])
    raise KeyError(key)
