"""The one training step: prepare a batch, forward and backward, apply an update.

The trainer, ``lr-find``, every ``doctor`` check that trains, and ``bench amp`` all run
their updates through :class:`Step`, and every evaluation prepares its batches with
:class:`BatchPrep`, so a fix here (a precision detail, clipping, channels_last, device
augmentation) reaches all of them.

Nothing here reads a value back from the device unless asked: ``forward_backward`` returns
detached device tensors, and ``update`` synchronises only for the NaN policy's decision
(``check_finite``) or GradScaler's scale, once per update.

The phases carry ``torch.profiler.record_function`` ranges (``vt/h2d``, ``vt/forward``,
``vt/backward``, ``vt/optimizer``), which ``visiontrain profile`` and
``train.profile_steps`` aggregate. A range is host-side bookkeeping that never waits for
the device; without an active profiler it costs a few microseconds (docs/profile.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.profiler import record_function

from visiontrain.data.device_augment import DeviceAugment
from visiontrain.data.mix import BatchMixer
from visiontrain.data.transforms import Normalizer
from visiontrain.engine.distributed import Dist
from visiontrain.engine.ema import ModelEma
from visiontrain.engine.precision import Precision
from visiontrain.engine.schedules import Schedule
from visiontrain.tasks.base import Task

Batch = dict[str, Any]
# What the NaN policy answers for an update: "step", "skip" or "rollback".
Decide = Callable[[bool], str]


def to_device(target: Any, device: torch.device) -> Any:
    """Move a batch's targets — a tensor, or a detection list of dicts — to the device."""
    if isinstance(target, torch.Tensor):
        return target.to(device, non_blocking=True)
    if isinstance(target, list):
        return [to_device(t, device) for t in target]
    if isinstance(target, dict):
        return {k: to_device(v, device) for k, v in target.items()}
    return target


class BatchPrep:
    """uint8 images to what the model takes: on the device, augmented, normalised, laid out.

    Args:
        device: Where the model is.
        normalizer: The data's uint8 → float normalisation.
        channels_last: Whether the model runs in ``channels_last`` (``train.channels_last``);
            the input then must be too, or every convolution converts it.
        device_augment: Batch augmentation on the device (``data.augment_on=device``),
            applied to training batches only.
        mixer: MixUp/CutMix of training batches and their targets (``data.mixup``,
            ``data.cutmix``).
    """

    def __init__(
        self,
        device: torch.device,
        normalizer: Normalizer,
        channels_last: bool = False,
        device_augment: DeviceAugment | None = None,
        mixer: BatchMixer | None = None,
    ) -> None:
        self.device = device
        self.normalizer = normalizer.to(device)
        self.channels_last = channels_last
        self.device_augment = device_augment
        self.mixer = mixer

    def __call__(
        self, images: torch.Tensor, augment: bool = False, epoch: int = 0, batch: int = 0
    ) -> torch.Tensor:
        """A model-ready float batch from a uint8 NCHW batch.

        Args:
            images: uint8 (N, C, H, W), on any device (pinned CPU memory copies async).
            augment: Apply the device augmentation (training batches).
            epoch: The epoch, which seeds the device augmentation with ``batch``.
            batch: The batch's index in its epoch.
        """
        # uint8 crosses to the device (4x less traffic than float); normalise there, once.
        x = images.to(self.device, non_blocking=True)
        if augment and self.device_augment is not None:
            x = self.device_augment(x, epoch, batch)
        x = self.normalizer(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def target(self, target: Any) -> Any:
        """The batch's targets on the device."""
        return to_device(target, self.device)

    def train_batch(
        self, images: torch.Tensor, target: Any, epoch: int = 0, batch: int = 0
    ) -> tuple[torch.Tensor, Any]:
        """A training batch: augmented, normalised and (MixUp/CutMix) mixed with its targets."""
        x = self(images, augment=True, epoch=epoch, batch=batch)
        y = self.target(target)
        if self.mixer is not None:
            x, y = self.mixer(x, y, epoch, batch)
        return x, y


@dataclass
class UpdateResult:
    """What one call of :meth:`Step.update` did.

    Attributes:
        outcome: ``step`` (the optimizer stepped), ``skip`` (non-finite, dropped by the
            NaN policy), ``rollback`` (non-finite, the policy asks for a rollback),
            ``amp_skipped`` (fp16's GradScaler found inf/NaN gradients and skipped it).
        grad_norm: The pre-clip global gradient norm (a device tensor), when computed.
    """

    outcome: str
    grad_norm: torch.Tensor | None = None

    @property
    def stepped(self) -> bool:
        """Whether the weights changed: an update the schedule and counters count."""
        return self.outcome == "step"


class Step:
    """Forward/backward of micro-batches and the update they add up to.

    Args:
        model: The plain module (its parameters are clipped and averaged).
        task: Runs the forward and the loss (``{"loss": ..., **parts}``).
        optimizer: The optimizer to step.
        precision: autocast and (fp16) the GradScaler.
        prep: Turns a loader batch into model input.
        train_model: What the forward calls (DDP / compile wrappers); ``model`` if None.
        grad_clip_norm: Clip the global gradient norm to this (``train.grad_clip_norm``).
        grad_clip_value: Clip every gradient element to ±this (``train.grad_clip_value``).
        ema: Averaged weights, moved after every real update.
        schedule: Stepped after every real update when its interval is ``step``.
        check_finite: Decide on every update whether it is finite (``train.on_nan`` skip
            or rollback), one host sync per update.
        dist: The process group, so that all ranks take the same decision.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        prep: BatchPrep,
        *,
        train_model: Callable[..., Any] | None = None,
        grad_clip_norm: float | None = None,
        grad_clip_value: float | None = None,
        ema: ModelEma | None = None,
        schedule: Schedule | None = None,
        check_finite: bool = False,
        dist: Dist | None = None,
    ) -> None:
        self.model, self.task, self.optimizer = model, task, optimizer
        self.precision, self.prep = precision, prep
        self.train_model = train_model if train_model is not None else model
        self.grad_clip_norm, self.grad_clip_value = grad_clip_norm, grad_clip_value
        self.ema, self.schedule = ema, schedule
        self.check_finite, self.dist = check_finite, dist
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Whether a micro-batch of the current group had a non-finite loss (on the device).
        self.group_bad = torch.zeros((), dtype=torch.bool, device=prep.device)
        # GradScaler's scale after the last update, as a number: reading it costs a host
        # sync, so it is read once per update and remembered for the next comparison.
        self._amp_scale: float | None = None

    # ------------------------------------------------------------------ micro-batches

    def forward_backward(
        self,
        batch: Batch,
        scale: float = 1.0,
        sync: bool = True,
        epoch: int = 0,
        index: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; returns its detached losses.

        Args:
            batch: A collated loader batch (``image`` uint8, ``target``).
            scale: The micro-batch's share of the update (1 / accumulation group size).
            sync: Whether an update follows; DDP all-reduces gradients only then.
            epoch: The epoch (seeds device augmentation).
            index: The batch's index in its epoch (seeds device augmentation).

        Returns:
            ``{"loss": ..., **parts}``, detached, on the device. With ``check_finite`` a
            non-finite loss is marked for :meth:`update`.
        """
        with record_function("vt/h2d"):
            x, y = self.prep.train_batch(batch["image"], batch["target"], epoch, index)
        result: dict[str, dict[str, torch.Tensor]] = {}

        def run() -> None:
            with self._no_sync(sync):
                with record_function("vt/forward"):
                    with self.precision.autocast():
                        out = self.task.forward(self.train_model, x, y)
                    losses = self.task.loss(out, y)
                # Under DDP the gradient all-reduce runs inside this range (its hooks).
                with record_function("vt/backward"):
                    self.precision.scaler.scale(losses["loss"] * scale).backward()
            result["losses"] = losses

        first_step = getattr(self.train_model, "first_step", None)
        if first_step is not None:  # a compile failure retries eagerly (engine.wrap)
            first_step(run, lambda: self.optimizer.zero_grad(set_to_none=True))
        else:
            run()
        losses = {k: v.detach() for k, v in result["losses"].items()}
        if self.check_finite:
            self.group_bad |= ~torch.isfinite(losses["loss"])
        return losses

    def _no_sync(self, sync: bool) -> AbstractContextManager[None]:
        no_sync = getattr(self.train_model, "no_sync", None)
        return no_sync(sync) if no_sync is not None else nullcontext()

    # ------------------------------------------------------------------ the update

    def update(self, want_norm: bool = False, decide: Decide | None = None) -> UpdateResult:
        """Unscale, clip, check, step the optimizer, the scaler, the EMA and the schedule.

        An update that does not happen — non-finite under ``check_finite``, or skipped by
        fp16's GradScaler — advances neither the schedule nor the EMA.

        Args:
            want_norm: Compute the global gradient norm even without clipping (a log step).
            decide: With ``check_finite``, maps "this update is finite" to ``step``,
                ``skip`` or ``rollback`` (the NaN policy).
        """
        with record_function("vt/optimizer"):
            return self._apply_update(want_norm, decide)

    def _apply_update(self, want_norm: bool, decide: Decide | None) -> UpdateResult:
        """The body of :meth:`update`, inside its profiler range."""
        scaler = self.precision.scaler
        check = self.check_finite
        if self.grad_clip_norm or self.grad_clip_value or want_norm or check:
            scaler.unscale_(self.optimizer)
        norm: torch.Tensor | None = None
        if self.grad_clip_norm:
            # The returned norm is the pre-clip norm: what the log should show.
            norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip_norm)
        elif want_norm or self.grad_clip_value or check:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = nn.utils.get_total_norm(grads) if grads else None
        if isinstance(norm, DTensor):
            # train.strategy=fsdp: the norm over every shard (each rank summed its own
            # shards' squares; DTensor all-reduced them), replicated: the same on all ranks.
            norm = norm.full_tensor()
        if check:
            verdict = self._verdict(norm, decide)
            if verdict != "step":
                return UpdateResult(verdict, norm)
        if self.grad_clip_value:
            nn.utils.clip_grad_value_(self.params, self.grad_clip_value)
        if scaler.is_enabled() and self._amp_scale is None:
            self._amp_scale = scaler.get_scale()  # first update, or after a reset
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled() and self._scale_dropped():
            # GradScaler found inf/NaN gradients (fp16 overflow) and skipped the step; it
            # lowered its scale and the next step retries. Not an update.
            return UpdateResult("amp_skipped", norm)
        if self.ema is not None:
            self.ema.update(self.model)
        if self.schedule is not None and self.schedule.interval == "step":
            self.schedule.scheduler.step()
        return UpdateResult("step", norm)

    def _verdict(self, norm: torch.Tensor | None, decide: Decide | None) -> str:
        """``step``, or drop this update's gradients and say ``skip``/``rollback``.

        One host sync per update: the decision must come before the optimizer steps.
        """
        bad = self.group_bad.clone()
        self.group_bad.zero_()
        if norm is not None and self.precision.name != "fp16":
            # fp16 overflows are GradScaler's to handle; a NaN loss is still caught.
            bad |= ~torch.isfinite(norm)
        bad_i = bad.to(torch.int32)
        bad_any = bool(self.dist.sum_(bad_i) if self.dist is not None else bad_i)
        verdict = decide(not bad_any) if decide is not None else ("skip" if bad_any else "step")
        if verdict == "step":
            return verdict
        self.optimizer.zero_grad(set_to_none=True)
        if self.precision.scaler.is_enabled():
            self.precision.scaler.update()  # closes this step's unscale_ bookkeeping
            self._amp_scale = None  # the update may have lowered it: read it afresh
        return verdict

    def _scale_dropped(self) -> bool:
        """Whether the last ``scaler.update()`` lowered the scale (it skipped the step)."""
        before = self._amp_scale
        self._amp_scale = self.precision.scaler.get_scale()
        return before is not None and self._amp_scale < before

    def reset(self) -> None:
        """Forget the group's state: after a rollback or a resume (scale read afresh)."""
        self.group_bad.zero_()
        self._amp_scale = None
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ whole updates

    def train_update(
        self, batches: Iterator[Batch], accumulate: int = 1, index: int = 0
    ) -> tuple[torch.Tensor, UpdateResult]:
        """One whole update from ``accumulate`` micro-batches of ``batches``.

        What tools run when they train outside the trainer (lr-find, doctor, bench): the
        same micro-batches, scaling, clipping and precision as a training update.

        Args:
            batches: Yields readable loader batches.
            accumulate: Micro-batches per update (``train.accumulate``).
            index: The update's number, which seeds device augmentation per micro-batch.

        Returns:
            ``(mean loss of the micro-batches as a device tensor, UpdateResult)``.
        """
        total = torch.zeros((), device=self.prep.device)
        for i in range(accumulate):
            losses = self.forward_backward(
                next(batches), 1.0 / accumulate, i == accumulate - 1, 0, index * accumulate + i
            )
            total += losses["loss"]
        return total / accumulate, self.update()
