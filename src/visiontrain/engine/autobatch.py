"""``data.batch_size=auto``: the largest batch whose whole training step fits on the GPU.

The search runs the run's own update (:class:`~visiontrain.engine.step.Step`: batch
preparation, autocast, the scaled backward, clipping, the optimizer step with its state)
on batches of the data's shape, built by repeating a few real training samples through
the training transform, so the images are uint8 and the targets have the task's form
(class indices, masks, a detector's boxes). Sizes double from :data:`START` until a step
runs out of memory or reaches the cap, then bisection finds the exact largest size that
runs; the answer is then lowered, if needed, to keep :data:`HEADROOM` of the device's
memory free (see :func:`search_batch`).

Everything the search touches is put back: the weights and buffers, the optimizer state
and every RNG stream, so the run starts exactly as one given the chosen integer would.

The pieces are injectable so that the logic is tested without a GPU: ``search_batch``
takes any "try one batch size" function, and :class:`StepTrial` any :class:`MemoryMeter`.
"""

from __future__ import annotations

import gc
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from visiontrain.config import Config
from visiontrain.data.loaders import build_loader
from visiontrain.data.sources import DataBundle
from visiontrain.engine.distributed import Dist
from visiontrain.engine.step import Batch, Step
from visiontrain.errors import ConfigError, DataError, UserError
from visiontrain.seed import capture_rng, restore_rng

# Beyond this a larger batch stops guiding any choice, and the tries themselves get slow
# (the same cap as `visiontrain bench amp`).
MAX_BATCH = 4096
# The first size tried. Not 1: a training-mode BatchNorm refuses one sample per channel.
START = 2
# Peak allocated memory may use at most this share of the device's total memory: the rest
# is for what the caching allocator holds but has not handed out (fragmentation), cuDNN
# workspaces of other shapes, and the CUDA context.
HEADROOM = 0.9
# Measured guesses when the largest size that runs is above the headroom (each guess is
# one more step; with memory linear in the batch the first one is already exact).
REFINE_STEPS = 4
# Real samples repeated to make a batch of any size.
SAMPLES = 8

OutOfMemory = torch.OutOfMemoryError  # the same class as torch.cuda.OutOfMemoryError

TryBatch = Callable[[int], int]


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory.

    Besides torch's own error, cuBLAS and cuDNN report a failed workspace allocation as
    a plain RuntimeError; the search treats those as "too big" too.
    """
    if isinstance(exc, OutOfMemory):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


@dataclass
class BatchSearch:
    """What the search found.

    Attributes:
        batch: The chosen batch size.
        largest_fit: The largest size whose step ran without running out of memory.
        capped: The search stopped at the cap (the data's size or :data:`MAX_BATCH`),
            not at an out-of-memory error.
        budget: The peak memory allowed, in bytes (:data:`HEADROOM` of the total).
        peaks: Peak bytes of each size that ran.
        failed: The sizes that ran out of memory, in the order tried.
    """

    batch: int
    largest_fit: int
    capped: bool
    budget: int
    peaks: dict[int, int] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)

    @property
    def over_budget(self) -> bool:
        """Even the chosen batch (then 1) peaks above the budget."""
        return self.peaks.get(self.batch, 0) > self.budget


def search_batch(
    try_batch: TryBatch,
    cap: int,
    budget: int,
    start: int = START,
    release: Callable[[], None] = lambda: None,
) -> BatchSearch:
    """The largest batch size that runs, lowered to fit the memory budget.

    The rule: sizes double from ``start`` (``start, 2·start, ...``, the last one ``cap``)
    until a try runs out of memory; bisection between the last size that ran and the
    first that did not then finds the largest size ``b`` that runs. If ``b``'s peak is
    at most ``budget`` (90% of the device's memory), ``b`` is the answer. Otherwise the
    answer is the largest size whose measured peak is within the budget: the peak is
    interpolated linearly in the batch size between the nearest measured sizes below and
    above the budget, the guess is measured, and this repeats (at most
    :data:`REFINE_STEPS` times) until no size lies between the two.

    Args:
        try_batch: Runs one training step at a batch size and returns its peak memory in
            bytes; raises :class:`torch.OutOfMemoryError` (or another error
            :func:`is_oom` recognises) when it does not fit.
        cap: The largest size to try (the training split's size, :data:`MAX_BATCH`).
        budget: Peak bytes allowed for the answer.
        start: The first size tried.
        release: Frees what a failed try left behind (gc, the allocator's cache); called
            after the error has been dropped, so that its traceback holds no tensors.

    Returns:
        The search's result.

    Raises:
        ConfigError: not even a batch of 1 runs.
    """
    peaks: dict[int, int] = {}
    failed: list[int] = []

    def runs(n: int) -> bool:
        oom = False
        try:
            peaks[n] = try_batch(n)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not is_oom(exc):
                raise
            oom = True
        if oom:  # outside the except block: the error and its frames are gone by now
            failed.append(n)
            release()
        return not oom

    low, high = 0, None  # the largest size that ran, the smallest that did not
    n = max(1, min(start, cap))
    while True:
        if not runs(n):
            high = n
            break
        low = n
        if n >= cap:
            break
        n = min(2 * n, cap)
    if high is not None:
        while high - low > 1:
            mid = (low + high) // 2
            if runs(mid):
                low = mid
            else:
                high = mid
    if low == 0:
        raise ConfigError(
            "data.batch_size=auto: not even a batch of 1 fits in GPU memory for a training "
            "step. Lower data.image_size, use train.precision=bf16 or "
            "train.activation_checkpointing=true, or choose a smaller model."
        )
    result = BatchSearch(low, low, high is None, budget, peaks, failed)
    if peaks[low] > budget:
        result.batch = _under_budget(runs, peaks, low, budget)
    return result


def _under_budget(runs: Callable[[int], bool], peaks: dict[int, int], top: int, budget: int) -> int:
    """The largest measured size within ``budget``, refined by linear interpolation.

    Every measured size is at most ``top``, whose peak is above the budget.
    """
    seen = dict(peaks)  # the peaks, and guesses that failed counted as over the budget
    for _ in range(REFINE_STEPS):
        lo = max((b for b, p in seen.items() if p <= budget), default=0)
        hi = min(b for b, p in seen.items() if p > budget and b > lo)
        if hi - lo <= 1:
            break
        lo_peak = seen[lo] if lo else 0
        # Peak grows about linearly with the batch (activations) over a fixed part
        # (weights, gradients, optimizer state): interpolate where it meets the budget.
        slope = (seen[hi] - lo_peak) / (hi - lo)
        guess = lo + math.floor((budget - lo_peak) / slope) if slope > 0 else (lo + hi) // 2
        guess = min(max(guess, lo + 1), hi - 1)
        # Below a size that ran, a failure can only be fragmentation: count it as too big.
        seen[guess] = peaks[guess] if runs(guess) else budget + 1
    below = [b for b, p in peaks.items() if p <= budget]
    if not below and 1 not in peaks:
        runs(1)  # measured, so that the note can say by how much the headroom is missed
    # Not even a batch of 1 stays under the budget: it still runs, so the run can go on,
    # and the note says that the headroom is not kept.
    return max(below, default=1)


class MemoryMeter(Protocol):
    """Reads a device's memory around one try (CUDA's allocator; a fake one in tests)."""

    def total(self) -> int:
        """The device's memory in bytes."""
        ...

    def reset(self) -> None:
        """Start measuring a new peak."""
        ...

    def peak(self) -> int:
        """Peak bytes allocated since :meth:`reset`, after the device has finished."""
        ...

    def release(self) -> None:
        """Return freed memory after an out-of-memory error."""
        ...


class CudaMemory:
    """:class:`MemoryMeter` of a CUDA device through the caching allocator's statistics.

    Args:
        device: The CUDA device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def total(self) -> int:  # noqa: D102
        return torch.cuda.get_device_properties(self.device).total_memory

    def reset(self) -> None:  # noqa: D102
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:  # noqa: D102
        torch.cuda.synchronize(self.device)  # an asynchronous error surfaces here, not later
        return torch.cuda.max_memory_allocated(self.device)

    def release(self) -> None:  # noqa: D102
        gc.collect()
        torch.cuda.empty_cache()


def repeat_batch(batch: Batch, n: int) -> Batch:
    """A loader batch of ``n`` samples made by cycling through ``batch``'s samples."""
    x, y = batch["image"], batch["target"]
    idx = torch.arange(n) % len(x)
    # Detection targets are a list of dicts, one per image; every other task's a tensor.
    y = y[idx] if isinstance(y, torch.Tensor) else [y[i] for i in idx.tolist()]
    return {"image": x[idx], "target": y, "skipped": []}


def sample_batch(cfg: Config, bundle: DataBundle, samples: int = SAMPLES) -> Batch:
    """A few real training samples as the training loader delivers them.

    The training transform (crop to ``data.image_size``, augmentation) and the collate of
    ``train`` apply, so the images are uint8 of the run's shape and the targets have the
    task's form.

    Raises:
        DataError: no sample of the training split could be read.
    """
    size = max(1, min(samples, len(bundle.train)))
    # One process, no workers, and no short-batch note: only the samples matter here.
    data = cfg.data.model_copy(update={"batch_size": size, "num_workers": 0, "drop_last": False})
    loader = build_loader(
        bundle.train, bundle, data, train=True, seed=cfg.train.seed, pin_memory=False, task=cfg.task
    )
    for batch in loader:
        if batch["image"] is not None:
            return batch
    raise DataError(
        "data.batch_size=auto: no training sample could be read to size the batch with."
    )


def _cpu_copy(obj: Any) -> Any:
    """A deep copy of a state dict with every tensor on the CPU (no second GPU copy)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


@contextmanager
def restored(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Run a block, then put the weights, buffers, optimizer state and RNGs back."""
    model_state = _cpu_copy(model.state_dict())
    optim_state = _cpu_copy(optimizer.state_dict())
    rng = capture_rng()
    was_training = model.training
    try:
        yield
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        model.train(was_training)
        restore_rng(rng)


@contextmanager
def local_norms(model: nn.Module) -> Iterator[None]:
    """Run ``SyncBatchNorm`` layers as plain BatchNorm inside the block.

    Under torchrun a SyncBatchNorm gathers statistics from every rank at each forward;
    the ranks search different sizes at different moments, so those collectives would
    not match. Locally it computes the same thing with the same memory, less the small
    gathered statistics.
    """
    syncs = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    for m in syncs:
        # _BatchNorm.forward is BatchNorm's own; an instance attribute shadows the class's.
        m.forward = _BatchNorm.forward.__get__(m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in syncs:
            del m.forward


def _allocate_state(optimizer: torch.optim.Optimizer) -> None:
    """Give the optimizer its state (momenta) with one step on zero gradients.

    A run holds the optimizer state during every forward after its first update, so each
    try must measure with it in place. Without this, a first try, a try after an
    out-of-memory error, or an fp16 try whose step GradScaler skipped, would measure
    without it. The weights this moves (weight decay) are restored after the search.
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class StepTrial:
    """The "try one batch size" of a real run: one update of the training step.

    Args:
        make_step: Builds the run's training step (a fresh one per try, so that an
            out-of-memory error in the middle of one leaves no GradScaler state behind).
        sample: A loader batch of real samples, repeated to each size.
        meter: Measures the device's peak memory.
        extra_bytes: Memory the run will hold that the search does not build (DDP's
            gradient buckets, the EMA's copy of the model), added to every peak.
    """

    def __init__(
        self, make_step: Callable[[], Step], sample: Batch, meter: MemoryMeter, extra_bytes: int = 0
    ) -> None:
        self.make_step, self.sample, self.meter = make_step, sample, meter
        self.extra_bytes = extra_bytes
        self._has_state = False

    def __call__(self, n: int) -> int:
        """Run one update at batch ``n``; its peak bytes (plus the extra), or raise OOM."""
        step = self.make_step()
        if step.precision.scaler.is_enabled():
            # fp16: at scale 1 no step is skipped as an overflow (a skipped step allocates
            # less than a real one); memory does not depend on the scale's value.
            step.precision.scaler = torch.amp.GradScaler(step.prep.device.type, init_scale=1.0)
        big = repeat_batch(self.sample, n)
        step.model.train()
        try:
            if not self._has_state:
                _allocate_state(step.optimizer)
                self._has_state = True
            self.meter.reset()
            step.train_update(itertools.repeat(big), 1)
            return self.meter.peak() + self.extra_bytes
        except RuntimeError as exc:
            if is_oom(exc):
                # Drop the half-done try: gradients, and the optimizer state it may have
                # been building (allocated again before the next try).
                step.optimizer.zero_grad(set_to_none=True)
                step.model.zero_grad(set_to_none=True)
                step.optimizer.state.clear()
                self._has_state = False
            raise
        finally:
            del big


def agree(batch: int, dist: Dist) -> int:
    """The smallest of every rank's batch, on every rank (one process: ``batch``).

    Each rank searched on its own GPU; the one with the least free memory decides, so that
    every process trains the same batch and none runs out of memory.
    """
    return min(dist.gather([batch])) if dist.enabled else batch


def find_batch_size(
    trial: TryBatch,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cap: int,
    meter: MemoryMeter,
    dist: Dist,
) -> BatchSearch:
    """Search on this process's device, restore what the search moved, agree across ranks.

    Args:
        trial: Runs one update at a batch size (:class:`StepTrial`).
        model: The run's model: its weights and buffers are restored afterwards.
        optimizer: The run's optimizer: its state is restored afterwards.
        cap: The largest batch to try.
        meter: The device's memory (its total sets the budget).
        dist: The process group; every rank takes the smallest answer.

    Returns:
        The search; ``batch`` is the agreed size.

    Raises:
        ConfigError: on every rank, when a batch of 1 does not fit on some rank.
    """
    result: BatchSearch | None = None
    error: UserError | None = None
    with restored(model, optimizer), local_norms(model):
        try:
            result = search_batch(trial, cap, int(HEADROOM * meter.total()), release=meter.release)
        except UserError as exc:
            # Every rank must reach the agreement below, or the others would wait forever.
            error = exc
        finally:
            meter.release()
    batch = agree(result.batch if result is not None else 0, dist)
    if result is None or batch == 0:
        raise error or ConfigError(
            "data.batch_size=auto: another process found no batch that fits on its GPU; "
            "see its message."
        )
    result.batch = batch
    return result


def describe(result: BatchSearch, world_size: int = 1) -> str:
    """The note a run prints about the search, e.g.

    ``data.batch_size=auto: 352 (448 ran, lowered to keep 10% of the GPU free; peak 118.9
    GiB of 139.8 GiB; 12 sizes tried)``.
    """
    gib = 2**30
    mine = result.peaks.get(result.batch)
    if result.batch < result.largest_fit and mine is not None and mine <= result.budget:
        why = [f"{result.largest_fit} ran, lowered to keep {1 - HEADROOM:.0%} of the GPU free"]
    elif result.capped:
        why = [f"the cap: this process's share of the training split, at most {MAX_BATCH}"]
    else:
        why = ["the largest batch whose training step ran"]
    if mine is not None:
        why.append(f"peak {mine / gib:.2f} GiB of {result.budget / HEADROOM / gib:.2f} GiB")
    if result.over_budget:
        why.append(f"above {HEADROOM:.0%} even so: the run will be close to the memory limit")
    if world_size > 1:
        why.append(f"the smallest over {world_size} processes")
    why.append(f"{len(result.peaks) + len(result.failed)} sizes tried")
    return f"data.batch_size=auto: {result.batch} ({'; '.join(why)})"


def refuse_on_cpu(device: torch.device) -> None:
    """``data.batch_size=auto`` measures GPU memory; elsewhere it is refused.

    Raises:
        ConfigError: the run's device is not CUDA.
    """
    if device.type != "cuda":
        raise ConfigError(
            f"data.batch_size=auto searches for the largest batch that fits in GPU memory, "
            f"and this run is on the {device.type.upper()}: there the memory is not the limit "
            "the search measures (a batch that fits in RAM can still be far too slow, or "
            "swap). Set an integer instead, e.g. data.batch_size=64."
        )


def batch_from_checkpoint(state: Mapping[str, Any], path: object) -> int:
    """The batch size a resumed run started with (its ``data.batch_size=auto`` answer).

    Raises:
        ConfigError: the checkpoint records no integer batch size.
    """
    batch = (state.get("config") or {}).get("data", {}).get("batch_size")
    if isinstance(batch, bool) or not isinstance(batch, int):
        raise ConfigError(
            f"data.batch_size=auto on a resume: {path} records no batch size to continue "
            "with. Pass the number from the run's config.yaml as data.batch_size."
        )
    return batch


def held_bytes(model: nn.Module, ddp: bool, ema: bool) -> int:
    """Memory the run holds beyond what the search builds.

    Under DDP the reducer keeps a flat copy of the gradients (its buckets); an EMA keeps a
    copy of every parameter and buffer.
    """
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    everything = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return (trainable if ddp else 0) + (everything if ema else 0)
