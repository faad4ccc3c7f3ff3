"""DataLoaders whose order and augmentation are functions of (seed, epoch, index).

The batch sampler yields ``(epoch, index)`` pairs, so every loader worker — persistent
or not — knows the epoch without shared state, and each sample's augmentation is seeded
from (seed, epoch, index). Resuming therefore needs only the epoch and the batch
position: no worker RNG state, and no re-reading of the batches already seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from visiontrain.config import DataConfig
from visiontrain.data import kernels
from visiontrain.data.sources import DataBundle, Split, Target
from visiontrain.data.transforms import (
    PairTransform,
    augment_options,
    build_pair_transform,
    build_transform,
)
from visiontrain.errors import ConfigError, DataError, RunError, clean_message
from visiontrain.seed import sample_seed, worker_init


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)``; the order is seeded by (seed, epoch), resumable.

    Sharded by stride over ``rank``/``world_size`` (rank ``r`` takes positions ``r, r + N,
    ...`` of the epoch's order), like ``torch.utils.data.DistributedSampler``: every rank
    uses the same order for an epoch, so ``set_epoch`` reshuffles all ranks alike. With
    ``pad`` (training) the order is padded with its own first indices to a multiple of
    ``world_size``, so every rank runs the same number of batches and DDP's gradient
    all-reduce never waits for a rank that has finished; without it (evaluation) every
    sample is seen exactly once. With ``weights`` it draws ``num_samples`` indices per
    epoch with replacement, each with probability proportional to its weight (a resumable
    ``WeightedRandomSampler``).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: torch.Tensor | None = None,
        num_samples: int | None = None,
        pad: bool = False,
    ) -> None:
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pad = pad and world_size > 1
        self.weights = None if weights is None else weights.double()
        self.num_samples = num_samples if num_samples is not None else n
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order and skip the first ``start_batch`` batches (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        if self.weights is not None:
            order = torch.multinomial(
                self.weights, self.num_samples, replacement=True, generator=g
            ).tolist()
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad and len(order) % self.world_size:
            extra = self.world_size - len(order) % self.world_size
            order += (order * (extra // max(len(order), 1) + 1))[:extra]
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        total = self.num_samples if self.weights is not None else self.n
        if self.pad:
            total = -(-total // self.world_size) * self.world_size
        per_rank = len(range(self.rank, total, self.world_size))
        if self.drop_last:
            return per_rank // self.batch_size
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        idx = self._indices()
        for b in range(self.start_batch, len(self)):
            chunk = idx[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(self.epoch, i) for i in chunk]


@dataclass
class Skipped:
    """A sample that could not be read under ``data.on_error=skip``."""

    name: str
    reason: str


class AugmentedDataset(Dataset):
    """A split plus its transform, indexed by ``(epoch, index)``."""

    def __init__(
        self, split: Split, transform: PairTransform | None, seed: int, on_error: str
    ) -> None:
        self.split, self.transform, self.seed, self.on_error = split, transform, seed, on_error

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, Target] | Skipped:
        epoch, index = key
        try:
            image, target = self.split.load(index)
        except DataError as exc:
            if self.on_error == "skip":
                return Skipped(self.split.describe(index), str(exc))
            raise
        if self.transform is not None:
            # Seed this sample's augmentation from (seed, epoch, index) without touching
            # the caller's RNG stream: identical in any worker and after a resume.
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed would also queue a lazy CUDA
                # seed (formatting the call stack each time, ~0.1-1 ms per sample).
                torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
                image, target = self.transform(image, target)
        return image, target


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 (C, H, W) images of one size as a contiguous (N, C, H, W) batch, any layout.

    In a loader worker the batch is made in shared memory (as ``default_collate`` does):
    it crosses to the main process through shared memory anyway, and a batch made
    elsewhere would be copied there once more when it is sent. Always contiguous NCHW:
    the augmentation returns channels-last images, on which ``torch.stack`` alone would
    give a channels-last batch, and the model's numerics must not depend on whether the
    loader has workers.
    """
    first = images[0]
    shape = (len(images), *first.shape)
    if get_worker_info() is not None:
        numel = first.numel() * len(images)
        storage = first._typed_storage()._new_shared(numel, device=first.device)
        out = first.new(storage).view(shape)
    else:
        out = torch.empty(shape, dtype=first.dtype)
    for i, image in enumerate(images):
        kernels.copy_planes(image, out[i])
    return out


def collate(items: list[tuple[torch.Tensor, Target] | Skipped]) -> dict[str, object]:
    """Stack uint8 images and targets; skipped samples are reported, not stacked.

    Class indices become an int64 vector, regression rows a float32 (N, T) matrix.
    """
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [it.name for it in items if isinstance(it, Skipped)]
    if not good:
        return {"image": None, "target": None, "skipped": skipped}
    images = stack_images([it[0] for it in good])
    first = good[0][1]
    targets: object
    if isinstance(first, int):
        targets = torch.tensor([it[1] for it in good], dtype=torch.int64)
    elif isinstance(first, dict):
        targets = [it[1] for it in good]  # detection: a different number of boxes per image
    elif isinstance(first, torch.Tensor):
        targets = torch.stack([it[1] for it in good])  # segmentation masks
    else:
        targets = torch.from_numpy(np.stack([it[1] for it in good]).astype(np.float32))
    return {"image": images, "target": targets, "skipped": skipped}


class EpochLoader(DataLoader):
    """A DataLoader that stops its workers as soon as one of them fails.

    A worker's exception is re-raised in the main process wrapped as ``Caught DataError in
    DataLoader worker process 0. Original Traceback ...``, and its traceback holds the
    loader iterator in a reference cycle. Shut down later by the cyclic garbage collector,
    the workers never see their stop signal and are killed only after a 5 s timeout each
    (a 10 s stall with two workers). So the workers are stopped here, at once, and a
    DataError is re-raised with the plain one-paragraph message.
    """

    def __iter__(self) -> Iterator[dict[str, object]]:
        iterator = super().__iter__()
        try:
            yield from iterator
        except Exception as exc:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
                if getattr(self, "_iterator", None) is iterator:
                    self._iterator = None  # persistent workers: start fresh ones next time
            if isinstance(exc, DataError) and clean_message(exc) != str(exc):
                raise DataError(clean_message(exc)) from None
            fault = worker_fault(exc, self.timeout)
            if fault is not None:
                raise fault from None
            raise


class LoaderFaultError(RunError):
    """A loader worker died or stopped answering; the trainer saves, then the run ends."""


def worker_fault(exc: Exception, timeout: float) -> LoaderFaultError | None:
    """The loader's own messages for a dead or stuck worker, as one clear error."""
    text = str(exc)
    if isinstance(exc, ConnectionResetError | EOFError):
        # A worker killed while the main process reads its batch: the shared-memory
        # handover (a socket to the worker) is reset before the loader notices the death.
        return LoaderFaultError(
            f"a data loader worker died while handing over a batch ({type(exc).__name__}: "
            f"{text or 'connection closed'}). The usual cause is the out-of-memory killer: "
            "lower data.num_workers, data.batch_size or data.prefetch_factor, or enlarge "
            "/dev/shm in a container (docker --shm-size, a memory emptyDir)."
        )
    if not isinstance(exc, RuntimeError):
        return None
    if "timed out" in text:
        return LoaderFaultError(
            f"a data loader worker sent no batch for {timeout:g} s (data.timeout) and was "
            "stopped. A worker is stuck (a hung network file system, a deadlocked library "
            "in the dataset, swapping). Check the data source, raise data.timeout for slow "
            "storage, or try data.num_workers=0 to see the failing file."
        )
    if "exited unexpectedly" in text or "killed by signal" in text:
        first = text.strip().splitlines()[0]
        return LoaderFaultError(
            f"a data loader worker died ({first}). The usual cause is the out-of-memory "
            "killer: lower data.num_workers, data.batch_size or data.prefetch_factor, or "
            "enlarge /dev/shm in a container (docker --shm-size, a memory emptyDir)."
        )
    return None


def sample_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Per-sample draw weights of the weighted sampler: inverse class frequency.

    Every class is then drawn equally often in expectation, whatever its size.
    """
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return torch.from_numpy(1.0 / counts.clip(min=1)[labels])


def check_sampler(cfg: DataConfig, task: str) -> None:
    """Refuse sampler options that the task or the sampler cannot honour."""
    if cfg.sampler == "weighted" and task != "classification":
        why = (
            "an image of task multilabel carries a set of labels, not one class to weigh"
            if task == "multilabel"
            else f"task {task} has no classes"
        )
        raise ConfigError(
            f"data.sampler=weighted draws by class frequency; {why}. Use data.sampler=random"
            + (" and loss.pos_weight=balanced for rare labels." if task == "multilabel" else ".")
        )
    if cfg.epoch_samples is not None and cfg.sampler != "weighted":
        raise ConfigError(
            "data.epoch_samples sets the length of a weighted sampler's epoch; with "
            "data.sampler=random an epoch is the training set. Remove data.epoch_samples "
            "or set data.sampler=weighted."
        )


def pair_transform(
    task: str, cfg: DataConfig, bundle: DataBundle, train: bool
) -> PairTransform | None:
    """The split's transform as ``(image, target) -> (image, target)``, or None."""
    augment = augment_options(cfg)
    if task in ("detection", "segmentation"):
        return build_pair_transform(task, augment, bundle.image_size, bundle.same_size, train)

    # With data.augment_on=device the loader only fits images to the working size; the
    # random part runs on the device, on whole batches (data/device_augment.py).
    on_loader = train and cfg.augment_on == "loader"
    transform = build_transform(
        augment, bundle.image_size, bundle.in_channels, bundle.same_size, on_loader
    )
    if transform is None:
        return None
    return lambda image, target: (transform(image), target)


# The most of a training epoch that data.drop_last may leave out; above it the short last
# batch trains (a small folder would otherwise lose a large share of its images).
MAX_DROPPED_SHARE = 0.1


def short_batch_rule(num_samples: int, batch_size: int, world_size: int) -> tuple[bool, str | None]:
    """Whether ``data.drop_last`` drops the short last batch, and a note saying what it costs.

    Dropping keeps every batch full (a steady batch-norm statistic, a steady step size) but
    leaves the remainder out of each epoch. It is done when the remainder is at most
    :data:`MAX_DROPPED_SHARE` of a process's samples, or a single sample (BatchNorm cannot
    train on a batch of one); otherwise the short batch trains.

    Returns:
        ``(drop, note)``; the note is None when nothing is left out or kept.
    """
    per_rank = -(-num_samples // world_size)
    short = per_rank % batch_size
    if short == 0:
        return False, None
    if per_rank < batch_size:
        return False, None  # one short batch is all there is: it trains
    if short == 1 or short <= MAX_DROPPED_SHARE * per_rank:
        return True, (
            f"data.drop_last: the last {short} of {per_rank} training images per epoch"
            + (" per process" if world_size > 1 else "")
            + " (a short batch) are left out each epoch, a different few each time; "
            "data.drop_last=false trains them"
        )
    return False, (
        f"data.drop_last: the short last batch ({short} images) trains: dropping it would "
        f"leave out {short / per_rank:.0%} of the {per_rank} training images each epoch "
        f"(more than {MAX_DROPPED_SHARE:.0%})"
    )


def build_loader(
    split: Split,
    bundle: DataBundle,
    cfg: DataConfig,
    *,
    train: bool,
    seed: int,
    pin_memory: bool,
    task: str = "classification",
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader over one split with the resumable batch sampler, sharded by rank.

    Training shards are padded to equal length across ranks; evaluation shards are not, so
    that every sample is evaluated exactly once (the trainer gathers the results).
    """
    if not isinstance(cfg.batch_size, int):
        # `auto` is searched on the training step when a run is built (engine.parts).
        raise ConfigError(
            "data.batch_size=auto is resolved only where a run is built on CUDA (train, "
            "lr-find, doctor, bench amp); this command reads batches of a size it is given. "
            "Pass an integer, e.g. data.batch_size=64."
        )
    transform = pair_transform(task, cfg, bundle, train)
    dataset = AugmentedDataset(split, transform, seed, cfg.on_error)
    weights = (
        sample_weights(split.labels, bundle.num_classes)
        if train and cfg.sampler == "weighted"
        else None
    )
    num_samples = (cfg.epoch_samples or len(split)) if weights is not None else len(split)
    drop_last = False
    if train and cfg.drop_last:
        drop_last, note = short_batch_rule(num_samples, cfg.batch_size, world_size)
        if note is not None and note not in bundle.notes:
            bundle.notes.append(note)
    sampler = EpochBatchSampler(
        len(split),
        cfg.batch_size,
        shuffle=train,
        drop_last=drop_last,
        seed=seed,
        rank=rank,
        world_size=world_size,
        weights=weights,
        num_samples=num_samples,
        pad=train,
    )
    workers = cfg.num_workers
    if not isinstance(workers, int):
        # `auto` is measured by engine.build.build_loaders, which builds through here.
        raise ConfigError(
            "data.num_workers=auto must be resolved before a loader is built; build loaders "
            "with visiontrain.api.build_loaders, or pass an integer."
        )
    return EpochLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=cfg.persistent_workers and workers > 0,
        # A stuck worker ends the run instead of hanging it (0 waits forever).
        timeout=cfg.timeout if workers > 0 else 0,
        worker_init_fn=worker_init if workers > 0 else None,
        # A private generator: creating loader iterators must not consume the global RNG,
        # or a resumed run would draw different dropout masks than an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
