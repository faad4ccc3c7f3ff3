"""The training loop: ``fit`` → ``train_epoch`` → ``train_step`` / ``evaluate``.

The loop never reads a value back from the device between log intervals: losses are
summed on the device and read once per ``train.log_every`` updates. Everything stateful
goes into one checkpoint, so a run resumes at the exact batch where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from visiontrain.compare import HEADLINE_ORDER
from visiontrain.config import Config
from visiontrain.data.sources import DataBundle
from visiontrain.data.transforms import Normalizer
from visiontrain.engine.callbacks import Callback, Checkpointer
from visiontrain.engine.precision import Precision
from visiontrain.engine.schedules import Horizon, Schedule
from visiontrain.engine.seed import capture_rng, restore_rng
from visiontrain.engine.signals import StopFlag
from visiontrain.errors import CheckpointError, ConfigError, Interrupted
from visiontrain.tasks.base import Task


@dataclass
class Loaders:
    """The three loaders of a run (test may be absent)."""

    train: DataLoader
    val: DataLoader
    test: DataLoader | None


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
    ) -> None:
        self.cfg, self.run_dir, self.bundle = cfg, run_dir, bundle
        self.model, self.task, self.optimizer = model, task, optimizer
        self.schedule, self.precision, self.device = schedule, precision, device
        self.loaders, self.horizon = loaders, horizon
        self.checkpointer = checkpointer
        self.callbacks = [checkpointer, *callbacks]
        self._console = console
        self.stop_flag = stop_flag if stop_flag is not None else StopFlag()
        self.normalizer = Normalizer(bundle.mean, bundle.std).to(device)
        self.params = [p for p in model.parameters() if p.requires_grad]
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
        self.skipped: set[str] = set()
        self.results: dict[str, dict[str, Any]] = {}
        self.timings = {"train_s": 0.0, "eval_s": 0.0}
        self._grad_norm: torch.Tensor | None = None
        self._accum = _TrainAccum(torch.zeros((), device=device))
        self._fit_start = time.perf_counter()

    # ------------------------------------------------------------------ public API

    def fit(self) -> dict[str, Any]:
        """Train for ``train.epochs`` (from where a resume left off), then test the best weights."""
        self._fire("on_fit_start")
        for epoch in range(self.epochs_done, self.cfg.train.epochs):
            self.epoch = epoch
            self.evaluated_this_epoch = self.improved = False
            self.train_epoch()
            if (epoch + 1) % self.cfg.train.eval_every == 0 or epoch + 1 == self.cfg.train.epochs:
                self._validate()
            if self.schedule.interval == "epoch":
                self.schedule.scheduler.step()
            self.epochs_done, self.batch_in_epoch = epoch + 1, 0
            self._fire("on_epoch_end")
            self._check_stop()
            if self.should_stop:
                break
        self._restore_best()
        self._calibrate()
        if self.loaders.test is not None:
            self.results["test"] = self.evaluate(self.loaders.test, "test")
        self._fire("on_fit_end")
        return self.results

    def train_epoch(self) -> None:
        """One pass over the training loader, from ``batch_in_epoch`` on."""
        self.model.train()
        sampler = self.loaders.train.batch_sampler
        n_batches = len(sampler)
        sampler.set_epoch(self.epoch, self.batch_in_epoch)
        accumulate = self.cfg.train.accumulate
        start = time.perf_counter()
        self._accum.interval_start = start
        for batch in self.loaders.train:
            i = self.batch_in_epoch
            group_start = i - i % accumulate
            # A short remainder at the epoch's end still updates, averaged over its own size.
            group_len = min(accumulate, n_batches - group_start)
            if batch["skipped"]:
                self.skipped.update(batch["skipped"])
            if batch["image"] is not None:
                self.train_step(batch, 1.0 / group_len)
            self.batch_in_epoch += 1
            if i + 1 - group_start == group_len:
                self.at_epoch_end = self.batch_in_epoch == n_batches
                self._update()
                if self.global_step % self.cfg.train.log_every == 0 or self.at_epoch_end:
                    self._log_train()
                self._fire("on_update")
                self._check_stop()
        self._accum.epoch_seconds += time.perf_counter() - start
        self.timings["train_s"] += time.perf_counter() - start
        self._log_train_epoch()

    def train_step(self, batch: dict[str, Any], scale: float) -> None:
        """Forward and backward of one micro-batch; the loss stays on the device."""
        x = self._prepare(batch["image"])
        y = to_device(batch["target"], self.device)
        with self.precision.autocast():
            out = self.task.forward(self.model, x, y)
        losses = self.task.loss(out, y)
        loss = losses["loss"]
        self.precision.scaler.scale(loss * scale).backward()
        acc = self._accum
        acc.interval_loss += loss.detach()
        for name, part in losses.items():
            if name != "loss":
                # Each term of a composite loss (a detector's) is summed on the device too.
                acc.interval_parts[name] = acc.interval_parts.get(name, 0) + part.detach()
        acc.interval_batches += 1
        acc.interval_samples += len(batch["image"])

    def evaluate(self, loader: DataLoader, split: str, emit: bool = True) -> dict[str, Any]:
        """Metrics of the current weights on one split (eval mode, inference mode)."""
        start = time.perf_counter()
        self.model.eval()
        self.task.reset_metrics()
        with torch.inference_mode():
            for batch in loader:
                if batch["skipped"]:
                    self.skipped.update(batch["skipped"])
                if batch["image"] is None:
                    continue
                x = self._prepare(batch["image"])
                y = to_device(batch["target"], self.device)
                with self.precision.autocast():
                    out = self.task.infer(self.model, x)
                self.task.update_metrics(out, y)
        metrics = self.task.compute_metrics()
        self.model.train()
        self.timings["eval_s"] += time.perf_counter() - start
        if emit:
            self._emit({"split": split, "kind": "eval", **metrics})
        return metrics

    def console(self, message: str) -> None:
        """Print a line for the user (through the progress bar's console)."""
        if self.cfg.train.progress != "none":
            self._console.print(message, highlight=False)

    # ------------------------------------------------------------------ internals

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        # uint8 crosses to the device (4x less traffic than float); normalise there, once.
        x = self.normalizer(images.to(self.device, non_blocking=True))
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _update(self) -> None:
        """Unscale, clip, step the optimizer, the scaler and a per-update schedule."""
        tcfg = self.cfg.train
        scaler = self.precision.scaler
        log_due = (self.global_step + 1) % tcfg.log_every == 0 or self.at_epoch_end
        if tcfg.grad_clip_norm or tcfg.grad_clip_value or log_due:
            scaler.unscale_(self.optimizer)
        if tcfg.grad_clip_norm:
            # The returned norm is the pre-clip norm: what the log should show.
            self._grad_norm = nn.utils.clip_grad_norm_(self.params, tcfg.grad_clip_norm)
        elif log_due or tcfg.grad_clip_value:
            grads = [p.grad for p in self.params if p.grad is not None]
            self._grad_norm = nn.utils.get_total_norm(grads) if grads else None
        if tcfg.grad_clip_value:
            nn.utils.clip_grad_value_(self.params, tcfg.grad_clip_value)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.schedule.interval == "step":
            self.schedule.scheduler.step()
        self.global_step += 1

    def _log_train(self) -> None:
        acc = self._accum
        now = time.perf_counter()
        batches = max(acc.interval_batches, 1)
        # The one host sync per log interval: the loss and every loss term read together.
        sums = torch.stack([acc.interval_loss, *acc.interval_parts.values()]).tolist()
        loss_sum = sums[0]
        acc.epoch_loss += loss_sum
        acc.epoch_batches += acc.interval_batches
        acc.epoch_samples += acc.interval_samples
        parts = {
            f"loss_{k}": v / batches for k, v in zip(acc.interval_parts, sums[1:], strict=True)
        }
        record = {
            "split": "train",
            "kind": "train_step",
            "loss": loss_sum / batches,
            **parts,
            "lr": self.last_lr,
            "grad_norm": None if self._grad_norm is None else float(self._grad_norm),
            "samples_per_s": acc.interval_samples / max(now - acc.interval_start, 1e-9),
        }
        acc.interval_loss.zero_()
        acc.interval_parts = {}
        acc.interval_batches = acc.interval_samples = 0
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
                "samples_per_s": acc.epoch_samples / max(acc.epoch_seconds, 1e-9),
                "samples": acc.epoch_samples,
            }
        )
        acc.epoch_loss, acc.epoch_batches, acc.epoch_samples, acc.epoch_seconds = 0.0, 0, 0, 0.0

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
        best = self.checkpointer.folder / "best.pt"
        if best.is_file() and self.checkpointer.best_epoch is not None:
            from visiontrain.engine.checkpoint import load_checkpoint

            self.model.load_state_dict(load_checkpoint(best)["model"])
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
        if not isinstance(self.cfg.train.threshold, float):
            # A tuned threshold changes the val metrics; a fixed one gives the best epoch's.
            self._emit({"split": "val", "kind": "calibrated", **self.results["val"]})
        self.checkpointer.store_task_state(self.task.state_dict())
        if "threshold" in info:
            self.console(
                f"threshold {info['threshold']:.4g} ({info['rule']}): val precision "
                f"{info['val_precision']:.3f}, recall {info['val_recall']:.3f}, "
                f"F1 {info['val_f1']:.3f}" + (f" — {info['note']}" if info.get("note") else "")
            )

    def _check_stop(self) -> None:
        if not self.stop_flag:
            return
        path = self.checkpointer.save_last(self)
        raise Interrupted(
            self.stop_flag.exit_code,
            f"stopped by signal at epoch {self.epoch + 1}, step {self.global_step}; saved "
            f"{path}. Resume with the same command plus run.name={self.run_dir.name} "
            f"run.resume=auto (or run.resume={path}).",
        )

    def _emit(self, record: dict[str, Any]) -> None:
        record = {
            "step": self.global_step,
            "epoch": self.epoch,
            **record,
            "time": round(time.perf_counter() - self._fit_start, 4),
            "hparams": self.hparams(),
        }
        for cb in self.callbacks:
            cb.on_log(self, record)

    def _fire(self, hook: str) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self)

    # ------------------------------------------------------------------ state

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
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
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
            "skipped": sorted(self.skipped),
            "rng": capture_rng(),
            "config": self.cfg.to_dict(),
            "task": self.task.name,
            "task_state": self.task.state_dict(),
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
        try:
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
        for cb in self.callbacks:
            cb.load_state_dict(state["callbacks"].get(cb.name, {}))
        counters = state["counters"]
        self.epochs_done = self.epoch = counters["epochs_done"]
        self.batch_in_epoch = counters["batch_in_epoch"]
        self.global_step = counters["global_step"]
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
        self.skipped.update(state.get("skipped", []))
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.task.load_state_dict(state.get("task_state", {}))
        restore_rng(state["rng"])


def to_device(target: Any, device: torch.device) -> Any:
    """Move a batch's targets — a tensor, or a detection list of dicts — to the device."""
    if isinstance(target, torch.Tensor):
        return target.to(device, non_blocking=True)
    if isinstance(target, list):
        return [to_device(t, device) for t in target]
    if isinstance(target, dict):
        return {k: to_device(v, device) for k, v in target.items()}
    return target


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
