"""The data-source registry and the two storage shapes every source reduces to.

A source turns ``data.*`` config into a :class:`DataBundle`: train/val/test splits that
each return ``(uint8 CHW tensor, target)`` for an index, plus class (or target) names and
the normalisation statistics. A target is a class index for classification and a float32
vector for regression. Images stay uint8 until they reach the device.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from visiontrain.config import DataConfig, refuse_unused
from visiontrain.errors import ConfigError, DataError
from visiontrain.registry import Registry

# int (classification), float32 row (regression), dict (detection), int64 mask (segmentation)
Target = int | np.ndarray | dict | torch.Tensor


# Normalisation statistics of file sources: ImageNet's, what pretrained backbones expect.
# The working size of each built-in source when data.image_size is unset (docs/config.md
# lists them; tests/test_docs.py holds the two together).
DEFAULT_IMAGE_SIZES = {
    "defects": 48,
    "digits": 32,
    "mnist": 28,
    "cifar10": 32,
    "cifar100": 32,
    "imagefolder": 224,
    "coco": 512,
    "masks": 256,
    "shapes": 128,
}

# Optional data keys every source honours: the working size, pinning, split caps.
COMMON_DATA_KEYS = frozenset(
    {
        "image_size",
        "pin_memory",
        "train_size",
        "val_size",
        "test_size",
        "epoch_samples",
        "train_fraction",
        # The loader's augmentation knobs: every source is augmented by the same loader,
        # and the preset refuses a knob it does not read (transforms.augment_options).
        "augment_magnitude",
        "augment_ops",
        "autoaugment_policy",
    }
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def target_at(labels: np.ndarray, index: int) -> Target:
    """The target of sample ``index``: an int class index, or a float32 row for regression."""
    if labels.ndim == 1:
        return int(labels[index])
    return labels[index]


def as_targets(labels: np.ndarray | Sequence) -> np.ndarray:
    """Class indices as int64 (N,), regression targets as float32 (N, T)."""
    arr = np.asarray(labels)
    return arr.astype(np.int64) if arr.ndim == 1 else arr.astype(np.float32)


class Split:
    """One split of a source: indexable ``(uint8 CHW tensor, target)`` pairs.

    Targets by task: an int class index (classification); a float32 row (regression);
    ``{"boxes": float32 (K, 4) xyxy pixels, "labels": int64 (K,) 0-based class}``
    (detection); an int64 (H, W) mask of class indices with 255 = ignore (segmentation).
    """

    # int64 (N,) class indices or float32 (N, T) regression targets; None for detection and
    # segmentation splits, whose targets are read per sample.
    labels: np.ndarray | None

    def __len__(self) -> int:
        if self.labels is None:
            raise NotImplementedError("a split without a labels array defines __len__")
        return len(self.labels)

    def load(self, index: int) -> tuple[torch.Tensor, Target]:
        """Decode sample ``index`` into a uint8 CHW tensor and its target."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Name of sample ``index`` for messages (a path, or split and index)."""
        return f"sample {index}"

    def load_decoded(self, index: int) -> tuple[torch.Tensor, Target]:
        """Sample ``index`` at the resolution of its file (``load`` may resize it)."""
        return self.load(index)


class ArraySplit(Split):
    """Images held in memory as one uint8 NHWC array (generated or read from a binary file)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError("ArraySplit needs uint8 images shaped N,H,W,C")
        # One CHW tensor for the whole array: indexing it is a cheap slice, no copy.
        chw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        if not chw.flags.writeable:
            # A view of read-only memory (np.frombuffer over bytes, a read-only memmap):
            # torch cannot guard it, and an in-place op would write through. Own a copy.
            chw = chw.copy()
        self.images = torch.from_numpy(chw)
        self.labels = as_targets(labels)
        self.name = name

    def load(self, index: int) -> tuple[torch.Tensor, Target]:  # noqa: D102
        return self.images[index], target_at(self.labels, index)

    def describe(self, index: int) -> str:  # noqa: D102
        return f"{self.name}[{index}]"


class PreparedSplit(Split):
    """A split decoded from files and *prepared* (resized) once per image to the working size.

    ``load`` = decode, then :func:`~visiontrain.data.images.prepare_image` to
    ``working_size``, then the target. ``data.cache`` stores exactly the prepared output
    (:mod:`visiontrain.data.cache`), so cached and uncached loaders feed the random
    augmentation identical pixels. ``build_data`` sets ``working_size`` (the bundle's image
    size) and ``store``; without a working size ``load`` returns the file's own resolution.

    Subclasses define :meth:`files`, :meth:`decode` and :meth:`make_target`.
    """

    # "short": shorter side to the working size (classification, regression: the centre
    # crop or random resized crop comes after); "long": longer side (detection,
    # segmentation: the square fit pads afterwards, so nothing is cut off).
    fit: str = "short"
    channels: int = 3
    working_size: int | None = None
    # A visiontrain.data.cache.ImageStore holding the prepared samples, or None.
    store: object | None = None

    def files(self, index: int) -> tuple[Path, ...]:
        """The files sample ``index`` reads (they key the cache by path, size and mtime)."""
        raise NotImplementedError

    def decode(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode and check sample ``index``: uint8 (C, H, W) image and uint8 (H, W) mask."""
        raise NotImplementedError

    def decode_for_working_size(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`decode`, as :meth:`prepared` calls it.

        A split whose targets do not depend on the decoded size may decode less here.
        """
        return self.decode(index)

    def make_target(
        self,
        index: int,
        decoded_hw: tuple[int, int],
        image_hw: tuple[int, int],
        mask: torch.Tensor | None,
    ) -> Target:
        """The target of sample ``index`` for an image resized from ``decoded_hw``."""
        raise NotImplementedError

    def prepare_settings(self) -> tuple[object, ...]:
        """What, besides the files, determines the prepared samples (part of the cache key)."""
        return (type(self).__name__, self.fit, self.channels, self.working_size)

    def prepared(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Prepared image, prepared mask (or None) and the decoded (H, W) of sample ``index``."""
        if self.store is not None:
            return self.store.get(index)  # type: ignore[attr-defined]
        image, mask = self.decode_for_working_size(index)
        decoded_hw = (int(image.shape[-2]), int(image.shape[-1]))
        if self.working_size is not None:
            image, mask = _prepare(image, self.working_size, self.fit, mask)
        return image, mask, decoded_hw

    def load(self, index: int) -> tuple[torch.Tensor, Target]:  # noqa: D102
        image, mask, decoded_hw = self.prepared(index)
        image_hw = (int(image.shape[-2]), int(image.shape[-1]))
        return image, self.make_target(index, decoded_hw, image_hw, mask)

    def load_decoded(self, index: int) -> tuple[torch.Tensor, Target]:  # noqa: D102
        image, mask = self.decode(index)
        hw = (int(image.shape[-2]), int(image.shape[-1]))
        return image, self.make_target(index, hw, hw, mask)


def _prepare(
    image: torch.Tensor, size: int, fit: str, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    from visiontrain.data.images import prepare_image

    return prepare_image(image, size, fit, mask)


class FileSplit(PreparedSplit):
    """Image files with class or regression targets, decoded with libjpeg-turbo/libpng."""

    def __init__(
        self, paths: Sequence[Path], labels: Sequence[int] | np.ndarray, channels: int
    ) -> None:
        self.paths = list(paths)
        self.labels = as_targets(labels)
        self.channels = channels

    def files(self, index: int) -> tuple[Path, ...]:  # noqa: D102
        return (self.paths[index],)

    def decode(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:  # noqa: D102
        # Through the module attribute, so that one patch point sees every decode.
        from visiontrain.data import images

        return images.decode_file(self.paths[index], self.channels), None

    def decode_for_working_size(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode at reduced scale where the file is much larger than it is prepared to.

        Classification and regression targets do not depend on the image's size, so the
        decoded size may be the reduced one.
        """
        from visiontrain.data import images

        target = None if self.working_size is None else (self.working_size, self.fit)
        return images.decode_file(self.paths[index], self.channels, target), None

    def prepare_settings(self) -> tuple[object, ...]:  # noqa: D102
        # Reduced-scale decoding changes the prepared pixels (slightly): part of the key.
        from visiontrain.data.images import DRAFT_FACTOR

        return (*super().prepare_settings(), f"draft{DRAFT_FACTOR}")

    def make_target(  # noqa: D102
        self,
        index: int,
        decoded_hw: tuple[int, int],
        image_hw: tuple[int, int],
        mask: torch.Tensor | None,
    ) -> Target:
        return target_at(self.labels, index)

    def describe(self, index: int) -> str:  # noqa: D102
        return str(self.paths[index])


class SubsetSplit(Split):
    """A fixed subset of another split."""

    def __init__(self, base: Split, indices: np.ndarray) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = None if base.labels is None else base.labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[torch.Tensor, Target]:  # noqa: D102
        return self.base.load(int(self.indices[index]))

    def describe(self, index: int) -> str:  # noqa: D102
        return self.base.describe(int(self.indices[index]))

    def load_decoded(self, index: int) -> tuple[torch.Tensor, Target]:  # noqa: D102
        return self.base.load_decoded(int(self.indices[index]))


@dataclass
class DataBundle:
    """Everything the trainer needs to know about a data source."""

    train: Split
    val: Split
    test: Split | None
    class_names: list[str]
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    same_size: bool = True
    notes: list[str] = field(default_factory=list)
    target_names: list[str] = field(default_factory=list)
    # The dataset's own category id of each class (COCO ids, gaps and order kept); empty
    # when the source has none, and then the ids written out are 1..K.
    category_ids: list[int] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for regression)."""
        return len(self.class_names)

    @property
    def num_outputs(self) -> int:
        """Outputs the model needs: one per class, or one per regression target."""
        return len(self.target_names) if self.target_names else len(self.class_names)


SourceBuilder = Callable[[DataConfig, str], DataBundle]


@dataclass(frozen=True)
class _SourceEntry:
    build: SourceBuilder
    uses: frozenset[str]
    generates: bool
    tasks: frozenset[str]


_SOURCES: Registry[_SourceEntry] = Registry("data source", key="data.name")


def register_source(
    name: str,
    uses: Sequence[str] = (),
    generates: bool = False,
    tasks: Sequence[str] = ("classification",),
) -> Callable[[SourceBuilder], SourceBuilder]:
    """Register a data source builder ``fn(cfg, task) -> DataBundle`` under ``name``.

    Args:
        name: the value of ``data.name``.
        uses: the optional ``data.*`` keys the source honours; others are refused when set.
        generates: True when the source makes its data, so that ``data.train_size`` and
            friends set how much it makes; for real data they cap a fixed random subset.
        tasks: the tasks the source has targets for.

    Raises:
        ValueError: ``name`` is already registered.
    """
    return _SOURCES.decorator(
        name, lambda fn: _SourceEntry(fn, frozenset(uses), generates, frozenset(tasks))
    )


def list_sources() -> list[str]:
    """Registered data-source names."""
    _import_builtin_sources()
    return _SOURCES.names()


def _import_builtin_sources() -> None:
    # Imported for their @register_source side effect.
    from visiontrain.data import builtin, coco, imagefolder, masks, shapes, synthetic  # noqa: F401


def build_data(cfg: DataConfig, task: str = "classification") -> DataBundle:
    """Build the data bundle named by ``data.name`` with targets for ``task``."""
    _import_builtin_sources()
    entry = _SOURCES.get(cfg.name)
    if task not in entry.tasks:
        fits = [n for n, e in _SOURCES.items() if task in e.tasks]
        raise ConfigError(
            f"data source {cfg.name} has no targets for task {task} (it serves "
            f"{', '.join(sorted(entry.tasks))}). For task {task} use data.name= one of "
            f"{', '.join(fits) or '(none yet)'}."
        )
    always = {*COMMON_DATA_KEYS, "cache"}
    if cfg.cache == "disk":
        always.add("cache_dir")  # where the disk cache of decoded images goes
    refuse_unused(cfg, "data", entry.uses | always, f"data source {cfg.name}")
    bundle = entry.build(cfg, task)
    prepare_splits(bundle, cfg)
    cap_splits(bundle, cfg, cap=not entry.generates)
    for name, split in (("train", bundle.train), ("val", bundle.val)):
        if len(split) == 0:
            raise DataError(f"the {name} split of data source {cfg.name} is empty.")
    return bundle


def cap_splits(bundle: DataBundle, cfg: DataConfig, cap: bool = True) -> None:
    """Apply ``data.train_size``/``val_size``/``test_size`` and ``data.train_fraction``.

    Args:
        bundle: Its splits are replaced by their capped subsets.
        cfg: The data config.
        cap: Whether the sizes cap the splits (real data: a fixed random subset); a
            generating source has made that many already.
    """
    if cap:
        bundle.train = cap_split(bundle.train, cfg.train_size, cfg.split_seed)
        bundle.val = cap_split(bundle.val, cfg.val_size, cfg.split_seed + 1)
        if bundle.test is not None:
            bundle.test = cap_split(bundle.test, cfg.test_size, cfg.split_seed + 2)
    # After the cap, so that a fraction of a capped source is a fraction of what trains.
    bundle.train = fraction_split(bundle.train, cfg.train_fraction, cfg.split_seed + 3)


def base_splits(bundle: DataBundle) -> list[Split]:
    """The distinct splits under the bundle's train/val/test subsets, in that order."""
    out: list[Split] = []
    for split in (bundle.train, bundle.val, bundle.test):
        while isinstance(split, SubsetSplit):
            split = split.base
        if split is not None and not any(split is seen for seen in out):
            out.append(split)
    return out


def prepare_splits(bundle: DataBundle, cfg: DataConfig) -> None:
    """Give file splits the working size, and attach the ``data.cache`` store to each.

    Sources whose splits are arrays already in memory (defects, digits, mnist, cifar,
    shapes) have nothing to cache; ``data.cache`` is accepted there and noted.
    """
    files = [s for s in base_splits(bundle) if isinstance(s, PreparedSplit)]
    for split in files:
        split.working_size = bundle.image_size
    if cfg.cache == "none":
        return
    if not files:
        bundle.notes.append(
            f"data.cache={cfg.cache}: data source {cfg.name} already holds its images in "
            "memory as decoded arrays; there is nothing to cache"
        )
        return
    from visiontrain.data.cache import attach_store

    for split in files:
        bundle.notes.append(attach_store(split, cfg))


def cap_split(split: Split, size: int | None, seed: int) -> Split:
    """Take a fixed random subset of ``size`` samples (for sources that read real data)."""
    if size is None or size >= len(split):
        return split
    rng = np.random.default_rng(seed)
    return SubsetSplit(split, np.sort(rng.choice(len(split), size=size, replace=False)))


def fraction_split(split: Split, fraction: float | None, seed: int) -> Split:
    """A fixed subset holding ``fraction`` of a split: per class for class labels, else random.

    Args:
        split: the training split.
        fraction: share to keep, in (0, 1]; None or 1 keeps the split as it is.
        seed: seed of the draw (``data.split_seed`` based, so every run draws the same).

    Returns:
        The subset; every class with two or more samples keeps at least one, so a small
        fraction still trains on each class.

    """
    if fraction is None or fraction >= 1.0:
        return split
    labels = split.labels
    if labels is not None and labels.ndim == 1:
        # The held-out part of a stratified split is exactly the per-class share we want.
        _, keep = stratified_split(labels, fraction, seed)
        return SubsetSplit(split, keep)
    n = len(split)
    size = max(1, round(n * fraction))
    rng = np.random.default_rng(seed)
    return SubsetSplit(split, np.sort(rng.choice(n, size=size, replace=False)))


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, held-out) with ``fraction`` of each class held out."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        # Every class with two or more samples gives at least one and keeps at least one.
        n_held = min(max(round(len(idx) * fraction), 1), len(idx) - 1) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def cache_root(cfg: DataConfig) -> Path:
    """Folder for generated and converted data: data.cache_dir, $VISIONTRAIN_CACHE, ~/.cache."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("VISIONTRAIN_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "visiontrain"


def cache_key(*parts: object) -> str:
    """Short stable hash of the settings that determine a cached array."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 scale) of a uint8 NHWC array, on a sample of it."""
    sample = images[:: max(1, len(images) // 2000)].astype(np.float64) / 255.0
    mean = sample.mean(axis=(0, 1, 2))
    std = sample.std(axis=(0, 1, 2)).clip(min=1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
