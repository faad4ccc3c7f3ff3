"""The parts a run trains with, built from a resolved config before anything is written."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from visiontrain.config import Config, OptimConfig
from visiontrain.data import build_data
from visiontrain.data.device_augment import DeviceAugment, check_augment_on
from visiontrain.data.loaders import check_sampler
from visiontrain.data.mix import build_mixer
from visiontrain.data.pipeline import Loaders, build_loaders
from visiontrain.data.sources import DataBundle
from visiontrain.data.transforms import Normalizer
from visiontrain.data.user import DatasetSource
from visiontrain.data.workers import resolve_num_workers, set_cpu_threads
from visiontrain.engine.autobatch import (
    MAX_BATCH,
    CudaMemory,
    StepTrial,
    describe,
    find_batch_size,
    held_bytes,
    refuse_on_cpu,
    sample_batch,
)
from visiontrain.engine.distributed import Dist, current
from visiontrain.engine.freeze import FreezePhase, freeze_prefixes
from visiontrain.engine.host_memory import keep_freed_memory
from visiontrain.engine.optim import build_optimizer
from visiontrain.engine.precision import Precision
from visiontrain.engine.step import BatchPrep, Step
from visiontrain.engine.weights import start_weights
from visiontrain.engine.wrap import convert_sync_bn, enable_activation_checkpointing
from visiontrain.errors import ConfigError, did_you_mean
from visiontrain.models.build import build_model
from visiontrain.models.heads import find_head
from visiontrain.models.weights import WeightsReport
from visiontrain.seed import sample_seed, seed_everything, set_deterministic
from visiontrain.tasks import Task, build_task
from visiontrain.tasks.base import task_class


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
    # train.freeze_epochs (None without it); what model.weights/pretrained loaded.
    freeze: FreezePhase | None = None
    weights: list[WeightsReport] = field(default_factory=list)


def build_parts(
    cfg: Config,
    model: nn.Module | None = None,
    data: DatasetSource | None = None,
    start_from_weights: bool = True,
) -> Parts:
    """Seed, then build data, task, model, optimizer and loaders (no schedule, nothing written).

    Shared by ``train`` and ``lr-find`` so that both see the same initial weights and the
    same batches for the same config.

    Args:
        cfg: The resolved config.
        model: A user's own module instead of ``model.name``.
        data: A user's Datasets (``vt.data.from_datasets``) instead of ``data.name``.
        start_from_weights: Load ``model.pretrained``/``weights``/``backbone_weights``
            (False on a resume: the checkpoint holds the weights).
    """
    set_deterministic(cfg.train.deterministic)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    if cfg.data.batch_size == "auto":
        refuse_on_cpu(device)  # before any data is read
    if device.type == "cpu":
        # Activations live in host memory: keep what a step frees for the next step
        # instead of faulting it in afresh every step (engine/host_memory.py).
        keep_freed_memory()
    if cfg.data.num_workers != "auto":
        set_cpu_threads(device, cfg.data.num_workers)
    task_class(cfg.task)  # an unknown task is named before any data is read
    check_sampler(cfg.data, cfg.task)
    check_augment_on(cfg.data.augment_on, cfg.data.augment, cfg.task)
    bundle = data.build(cfg.data, cfg.task) if data is not None else build_data(cfg.data, cfg.task)
    if cfg.data.batch_size != "auto":
        # The loader is measured at the run's batch; with batch_size=auto that waits
        # until the batch-size search below has answered.
        _resolve_workers(cfg, bundle, device)
    # The config records what the source resolved (its default image size), so config.yaml
    # and every checkpoint hold the run's real settings, not "the default".
    cfg.data.image_size = bundle.image_size
    task = build_task(cfg, bundle, device)
    check_monitor(cfg, task)
    model = build_model(cfg, bundle, device, model)
    if data is not None or model is not None:
        check_outputs(cfg, bundle, model, device)
    notes: list[str] = []
    dist = current()
    weights = start_weights(cfg, model) if start_from_weights else []
    for report in weights:
        notes.extend(report.notes())
    if cfg.model.freeze:
        notes.append(freeze_prefixes(model, cfg.model.freeze))
    if cfg.train.sync_bn:
        model, note = convert_sync_bn(model, dist, device)
        notes.append(note)
    if cfg.train.activation_checkpointing:
        notes.append(enable_activation_checkpointing(model, cfg.model.name))
    optimizer = build_optimizer(buildable_optim(cfg.optim), model)
    if cfg.data.batch_size == "auto":
        notes.append(resolve_batch_size(cfg, bundle, task, model, optimizer, device, dist))
        _resolve_workers(cfg, bundle, device)
    lr_note = resolve_lr_scale(cfg, dist.world_size)
    if lr_note is not None:
        notes.append(lr_note)
        # The run trains at the scaled LR; the optimizer has no state yet to carry over.
        optimizer = build_optimizer(buildable_optim(cfg.optim), model)
    loaders = build_loaders(cfg, bundle, device, dist.rank, dist.world_size)
    budget = resolve_min_updates(cfg, updates_per_epoch(cfg, loaders))
    if budget is not None:
        notes.append(budget)
    freeze = None
    if cfg.train.freeze_epochs:
        if cfg.train.freeze_epochs >= cfg.train.epochs:
            raise ConfigError(
                f"train.freeze_epochs={cfg.train.freeze_epochs} leaves no epoch in which the "
                f"whole model trains (train.epochs={cfg.train.epochs}); lower it or raise "
                "train.epochs."
            )
        head = find_head(model)
        freeze = FreezePhase(model, head, cfg.train.freeze_epochs)
        notes.append(
            f"train.freeze_epochs={cfg.train.freeze_epochs}: only the head "
            f"({', '.join(head.head)}; {head.rule}) trains first, then every layer"
        )
    if dist.rank > 0:
        # Same initial weights on every rank (seeded alike above; DDP broadcasts rank 0's
        # anyway), but each rank its own dropout and drop-path stream, repeatable per run.
        seed_everything(sample_seed(cfg.train.seed, 0, dist.rank) % 2**63)
    return Parts(device, bundle, task, model, optimizer, loaders, notes, freeze, weights)


def _resolve_workers(cfg: Config, bundle: DataBundle, device: torch.device) -> None:
    """``data.num_workers=auto``: measured once, written into ``cfg``, threads set after.

    Everything after this (threads, loaders, config.yaml, the checkpoint's config) sees
    the measured integer.
    """
    if cfg.data.num_workers != "auto":
        return
    note = resolve_num_workers(cfg, bundle, device)
    if note is not None:
        bundle.notes.append(note)
    set_cpu_threads(device, cfg.data.num_workers)


def resolve_batch_size(
    cfg: Config,
    bundle: DataBundle,
    task: Task,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    dist: Dist,
) -> str:
    """Resolve ``data.batch_size=auto`` in place by searching on the run's training step.

    The step is the run's own (precision, clipping, batch preparation, activation
    checkpointing and channels_last as configured); the search and its headroom rule are
    :func:`visiontrain.engine.autobatch.search_batch`. It is capped at this process's
    share of the training split and at :data:`MAX_BATCH`; every process takes the
    smallest answer. The model, the optimizer and the RNGs are as they were afterwards.

    Returns:
        The note naming the chosen size.
    """

    def make_step() -> Step:
        return _step(
            cfg, bundle, device, model, task, optimizer, Precision(cfg.train.precision, device)
        )

    cap = max(1, min(MAX_BATCH, len(bundle.train) // dist.world_size))
    trial = StepTrial(
        make_step,
        sample_batch(cfg, bundle),
        CudaMemory(device),
        # What the run holds beyond the search's step: DDP's buckets, the EMA's copy.
        held_bytes(model, ddp=dist.enabled, ema=cfg.train.ema),
    )
    result = find_batch_size(trial, model, optimizer, cap, trial.meter, dist)
    cfg.data.batch_size = result.batch
    return describe(result, dist.world_size)


# optim.lr_scale: the factor on optim.lr for a batch `ratio` times optim.lr_batch.
LR_SCALE_RULES: dict[str, Callable[[float], float]] = {
    "none": lambda ratio: 1.0,
    "linear": lambda ratio: ratio,
    "sqrt": math.sqrt,
}


def scaled_lr(lr: float, rule: str, batch: int, reference: int) -> float:
    """``lr`` moved from a batch of ``reference`` to ``batch`` by ``rule``.

    ``linear``: ``lr * batch / reference`` (Goyal et al. 2017, SGD); ``sqrt``:
    ``lr * sqrt(batch / reference)`` (the rule usually kept for Adam-family optimizers);
    ``none``: ``lr``.
    """
    return lr * LR_SCALE_RULES[rule](batch / reference)


def resolve_lr_scale(cfg: Config, world_size: int = 1) -> str | None:
    """``optim.lr_scale``: scale ``optim.lr`` from ``optim.lr_batch`` to the run's batch.

    The batch is the one of an optimizer update: ``data.batch_size * processes *
    train.accumulate``. The scaled LR is written into ``optim.lr`` and the run's batch
    into ``optim.lr_batch``, so config.yaml (and every checkpoint) hold the pair the LR is
    for: running that config again gives the same LR, and a resume is not a change.

    Returns:
        A note with the numbers, or None with ``optim.lr_scale=none``.

    Raises:
        ConfigError: the scaled LR leaves ``optim.lr``'s range (0, 10].
    """
    rule, reference, base = cfg.optim.lr_scale, cfg.optim.lr_batch, cfg.optim.lr
    if rule == "none" or reference is None or not isinstance(base, float):
        return None  # `find` with a rule is refused by the config itself
    if not isinstance(cfg.data.batch_size, int):
        raise ConfigError("optim.lr_scale: data.batch_size=auto must be resolved first.")
    batch = cfg.data.batch_size * world_size * cfg.train.accumulate
    lr = scaled_lr(base, rule, batch, reference)
    if not 0.0 < lr <= 10.0:
        raise ConfigError(
            f"optim.lr_scale={rule} gives optim.lr={lr:g} ({base:g} at a batch of "
            f"{reference}, now {batch} per update), outside (0, 10]. Lower optim.lr or "
            "raise optim.lr_batch."
        )
    cfg.optim.lr = lr
    cfg.optim.lr_batch = batch
    how = ""
    if batch != cfg.data.batch_size:
        how = f" ({cfg.data.batch_size}"
        how += f" x {world_size} processes" if world_size > 1 else ""
        how += f" x {cfg.train.accumulate} accumulated" if cfg.train.accumulate > 1 else ""
        how += ")"
    return (
        f"optim.lr_scale={rule}: optim.lr {base:g} for a batch of {reference} -> {lr:g} for "
        f"this run's {batch} per update{how}; config.yaml records optim.lr={lr:g} with "
        f"optim.lr_batch={batch}"
    )


def updates_per_epoch(cfg: Config, loaders: Loaders) -> int:
    """Optimizer updates in one epoch: batches over ``train.accumulate``, the remainder too."""
    return math.ceil(len(loaders.train.batch_sampler) / cfg.train.accumulate)


def resolve_min_updates(cfg: Config, per_epoch: int) -> str | None:
    """``train.min_updates``: raise ``train.epochs`` until the run makes that many updates.

    The rule a recipe states once and that holds for data ten times smaller or larger:
    ``epochs = max(train.epochs, ceil(min_updates / updates per epoch))``. The resolved
    number is written back to the config, so config.yaml, every checkpoint and a resume
    see the epochs the run trains.

    Returns:
        A note saying what the rule gave, or None without ``train.min_updates``.
    """
    floor = cfg.train.min_updates
    if floor is None:
        return None
    asked = cfg.train.epochs
    need = math.ceil(floor / max(1, per_epoch))
    if need <= asked:
        return (
            f"train.min_updates={floor}: train.epochs={asked} already gives "
            f"{asked * per_epoch} updates ({per_epoch} per epoch)"
        )
    cfg.train.epochs = need
    return (
        f"train.min_updates={floor}: {per_epoch} updates per epoch, so {need} epochs "
        f"({need * per_epoch} updates) instead of train.epochs={asked} ({asked * per_epoch})"
    )


def build_prep(cfg: Config, bundle: DataBundle, device: torch.device, rank: int = 0) -> BatchPrep:
    """The run's batch preparation: normalisation, ``channels_last``, device augmentation."""
    augment = (
        DeviceAugment(cfg.data.augment, cfg.train.seed, rank)
        if cfg.data.augment_on == "device"
        else None
    )
    mixer = build_mixer(cfg.data, cfg.task, bundle.num_outputs, cfg.train.seed, rank)
    return BatchPrep(
        device, Normalizer(bundle.mean, bundle.std), cfg.train.channels_last, augment, mixer
    )


def build_step(
    cfg: Config,
    parts: Parts,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    precision: Precision | None = None,
) -> Step:
    """A training step as ``train`` runs it, for tools that train outside the trainer.

    Batch preparation (device augmentation, channels_last), precision and clipping come
    from ``cfg``; the EMA, the schedule and the NaN policy are the trainer's own.

    Args:
        cfg: The resolved config.
        parts: Built by :func:`build_parts`.
        model: Train this module instead of ``parts.model`` (a tool's copy).
        optimizer: Step this optimizer instead of ``parts.optimizer``.
        precision: Run at this precision instead of ``train.precision`` (``bench amp``).
    """
    return _step(
        cfg,
        parts.bundle,
        parts.device,
        model if model is not None else parts.model,
        parts.task,
        optimizer if optimizer is not None else parts.optimizer,
        precision if precision is not None else Precision(cfg.train.precision, parts.device),
    )


def _step(
    cfg: Config,
    bundle: DataBundle,
    device: torch.device,
    model: nn.Module,
    task: Task,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
) -> Step:
    """:func:`build_step` from its parts (the batch-size search runs before Parts exist)."""
    return Step(
        model,
        task,
        optimizer,
        precision,
        build_prep(cfg, bundle, device),
        grad_clip_norm=cfg.train.grad_clip_norm,
        grad_clip_value=cfg.train.grad_clip_value,
    )


def check_outputs(cfg: Config, bundle: DataBundle, model: nn.Module, device: torch.device) -> None:
    """Refuse a model whose output does not fit the data, before anything trains or is written.

    Classification and regression: ``(batch, classes or targets)``; segmentation:
    ``(batch, classes, H, W)`` at the working size. Detectors are not probed.

    A user's own module or Datasets can disagree on the class or target count; the loss
    would fail at the first step with a shape error, or (worse) broadcast silently. One
    eval-mode forward of a tiny batch (no gradients, no state change) says it plainly.

    Raises:
        ConfigError: the output's last dimension is not the number of classes or targets.
    """
    if cfg.task == "detection":
        return  # a detector answers in torchvision's structures, with or without targets
    size = bundle.image_size
    x = torch.zeros((2, bundle.in_channels, size, size), device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.to(memory_format=torch.channels_last) if cfg.train.channels_last else x)
    except Exception as exc:  # any failure of the user's forward on the run's input
        raise ConfigError(
            f"{type(model).__name__} fails on a batch of the run's images (2, "
            f"{bundle.in_channels}, {size}, {size}): {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. Make its input "
            f"layer take {bundle.in_channels} channels at {size} px (data.image_size)."
        ) from None
    finally:
        model.train(was_training)
    want = bundle.num_outputs
    shape = tuple(getattr(out, "shape", ()))
    if cfg.task == "segmentation":
        if not isinstance(out, torch.Tensor) or shape != (2, want, size, size):
            got = f"a {type(out).__name__}" if not isinstance(out, torch.Tensor) else str(shape)
            raise ConfigError(
                f"{type(model).__name__} returns {got} for a batch of shape (2, "
                f"{bundle.in_channels}, {size}, {size}); segmentation takes logits of shape "
                f"(batch, {want}, {size}, {size}), one channel per class "
                f"({', '.join(bundle.class_names)}). A torchvision segmenter returns a dict: "
                "wrap it to return its ['out'] tensor."
            )
        return
    if len(shape) != 2 or shape[1] != want:
        what = "targets" if cfg.task == "regression" else "classes"
        raise ConfigError(
            f"{type(model).__name__} returns outputs of shape {shape} for a batch of 2; the "
            f"data has {want} {what} ({', '.join(bundle.target_names or bundle.class_names)}), "
            f"so it must return (batch, {want}). Change its last layer to {want} outputs."
        )
