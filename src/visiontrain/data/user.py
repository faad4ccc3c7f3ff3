"""A user's own ``torch.utils.data.Dataset`` objects as a visiontrain data source.

:func:`from_datasets` wraps map-style Datasets that yield ``(image, target)``:

* image: a uint8 tensor (CHW or HWC), a uint8 numpy array (HWC or HW) or a PIL image —
  kept as uint8 until the device, where the run normalises it;
* target, by task: a class index (classification); a 0/1 vector with one value per class
  (multilabel); a float vector (regression); a dict
  with ``boxes`` (K, 4) x1 y1 x2 y2 pixels and ``labels`` (K,) 0-based classes
  (detection); an (H, W) integer mask of class indices, 255 = ignore (segmentation).

The first sample of every split is checked when the source is made, so a Dataset that
yields the wrong kind of image or target fails at once, naming the split, the sample and
the fix; later samples are checked as they load (``data.on_error`` applies).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from visiontrain.config import DataConfig, refuse_unused
from visiontrain.data.sources import (
    COMMON_DATA_KEYS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    Split,
    Target,
    as_targets,
    cap_splits,
)
from visiontrain.errors import ConfigError, DataError

TASKS = ("classification", "multilabel", "regression", "detection", "segmentation")
# The name runs, checkpoints and config.yaml record for data that came from Python.
SOURCE_NAME = "datasets"


def to_uint8_chw(image: Any, channels: int, where: str) -> torch.Tensor:
    """A uint8 (C, H, W) tensor from a tensor, a numpy array or a PIL image.

    Raises:
        DataError: a float image, a wrong number of dimensions or channels, naming
            ``where`` and the fix.
    """
    if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image
        # np.array copies: PIL's buffer is read-only, which torch.from_numpy warns about.
        image = np.array(image.convert("RGB" if channels == 3 else "L"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
        if image.ndim == 3:  # numpy images are HWC
            image = image.permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise DataError(
            f"{where} is an image of type {type(image).__name__}; yield a uint8 tensor "
            "(C, H, W or H, W, C), a uint8 numpy array or a PIL image."
        )
    if image.dtype != torch.uint8:
        raise DataError(
            f"{where} yields a {image.dtype} image; visiontrain takes uint8 pixels (0..255) "
            "and normalises on the device. Yield `(x * 255).round().to(torch.uint8)` for a "
            "0..1 float image, or drop the ToTensor/Normalize transforms."
        )
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3:
        raise DataError(f"{where} yields an image of shape {tuple(image.shape)}; yield C, H, W.")
    if image.shape[0] not in (1, 3) and image.shape[-1] in (1, 3):
        image = image.permute(2, 0, 1)  # an HWC tensor
    if image.shape[0] == 1 and channels == 3:
        image = image.expand(3, -1, -1)
    if image.shape[0] != channels:
        raise DataError(
            f"{where} has {image.shape[0]} channels where {channels} are expected (a "
            "source takes the channel count of its first training image). Give every "
            "image the same number (a PIL image: .convert('RGB') or .convert('L'))."
        )
    return image.contiguous()


def check_target(target: Any, task: str, num_classes: int, num_targets: int, where: str) -> Target:
    """The target in the form the task's loss and metrics take, or a DataError naming it."""
    if task == "classification":
        if isinstance(target, torch.Tensor | np.ndarray) and np.ndim(target) == 0:
            target = target.item()
        if isinstance(target, bool) or not isinstance(target, int | np.integer):
            raise DataError(
                f"{where} yields a target of type {type(target).__name__}; classification "
                "takes a class index (an int in 0..classes-1)."
            )
        if not 0 <= int(target) < num_classes:
            raise DataError(
                f"{where} yields class {int(target)}; the classes are 0..{num_classes - 1} "
                f"({num_classes} names given)."
            )
        return int(target)
    if task == "multilabel":
        try:
            row = np.asarray(
                target.detach().cpu() if isinstance(target, torch.Tensor) else target,
                dtype=np.float32,
            ).reshape(-1)
        except (TypeError, ValueError):
            row = np.zeros(0, np.float32)
        if len(row) != num_classes or not ((row >= 0) & (row <= 1)).all():
            raise DataError(
                f"{where} yields multi-label target {target!r}; give one value in [0, 1] per "
                f"class ({num_classes}: 1 where the image carries the label, else 0)."
            )
        return row
    if task == "regression":
        values = np.asarray(
            target.detach().cpu() if isinstance(target, torch.Tensor) else target,
            dtype=np.float32,
        ).reshape(-1)
        if len(values) != num_targets or not np.isfinite(values).all():
            raise DataError(
                f"{where} yields regression target {values.tolist()}; give {num_targets} "
                "finite float values per image (one per target name)."
            )
        return values
    if task == "detection":
        if not isinstance(target, dict) or not {"boxes", "labels"} <= set(target):
            raise DataError(
                f"{where} yields a {type(target).__name__} target; detection takes a dict "
                'with "boxes" (K, 4) x1 y1 x2 y2 in pixels and "labels" (K,) 0-based classes.'
            )
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)
        if len(boxes) != len(labels):
            raise DataError(f"{where} yields {len(boxes)} boxes but {len(labels)} labels.")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(
                f"{where} yields box labels {labels.tolist()}; the classes are "
                f"0..{num_classes - 1} (no background class: visiontrain adds it)."
            )
        return {"boxes": boxes, "labels": labels}
    mask = torch.as_tensor(target)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2 or mask.is_floating_point():
        raise DataError(
            f"{where} yields a {mask.dtype} target of shape {tuple(mask.shape)}; segmentation "
            "takes an integer (H, W) mask of class indices (255 = ignore)."
        )
    return mask.long()


class DatasetSplit(Split):
    """One split backed by a user's map-style Dataset.

    Args:
        dataset: Yields ``(image, target)`` by index.
        name: ``train``, ``val`` or ``test`` (for messages).
        task: The task whose target format is enforced.
        channels: Image channels every sample must have.
        num_classes: Number of classes (classification, detection, segmentation).
        num_targets: Number of regression targets.
        labels: Every sample's class index or target row, when known.
    """

    def __init__(
        self,
        dataset: Dataset,
        name: str,
        task: str,
        channels: int,
        num_classes: int,
        num_targets: int,
        labels: np.ndarray | None = None,
    ) -> None:
        self.dataset, self.name, self.task = dataset, name, task
        self.channels, self.num_classes, self.num_targets = channels, num_classes, num_targets
        self.labels = labels
        self._len = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._len

    def describe(self, index: int) -> str:  # noqa: D102
        return f"{self.name} Dataset sample {index}"

    def load(self, index: int) -> tuple[torch.Tensor, Target]:  # noqa: D102
        where = self.describe(index)
        item = self.dataset[index]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise DataError(f"{where} is a {type(item).__name__}; yield (image, target).")
        image = to_uint8_chw(item[0], self.channels, where)
        target = check_target(item[1], self.task, self.num_classes, self.num_targets, where)
        if self.task == "segmentation" and tuple(target.shape) != tuple(image.shape[-2:]):
            raise DataError(
                f"{where}: mask {tuple(target.shape)} and image {tuple(image.shape[-2:])} "
                "differ in size; yield a mask of the image's height and width."
            )
        return image, target


def _labels_of(dataset: Dataset, task: str, split: DatasetSplit) -> np.ndarray:
    """Every training target, from ``dataset.targets`` when it has one, else by loading."""
    given = getattr(dataset, "targets", None)
    if given is not None and len(given) == len(split):
        return as_targets(np.asarray(given))
    # Class counts (balanced weights, the weighted sampler) and target standardisation
    # need all of them; a `targets` attribute spares this pass.
    return as_targets([split.load(i)[1] for i in range(len(split))])


class DatasetSource:
    """A user's Datasets, made into a :class:`DataBundle` when a run is built.

    Made by :func:`from_datasets`; pass it as ``data=`` to ``vt.build_trainer``.
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset | None,
        test: Dataset | None,
        task: str,
        class_names: list[str],
        target_names: list[str],
        channels: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.task, self.class_names, self.target_names = task, class_names, target_names
        self.channels, self.image_size, self.mean, self.std = channels, image_size, mean, std
        n_cls, n_tgt = len(class_names), len(target_names)
        self.train = DatasetSplit(train, "train", task, channels, n_cls, n_tgt)
        self.val = None if val is None else DatasetSplit(val, "val", task, channels, n_cls, n_tgt)
        self.test = (
            None if test is None else DatasetSplit(test, "test", task, channels, n_cls, n_tgt)
        )
        # (H, W) of each split's first image, which is checked here (a wrong image or target
        # type fails now, not in a loader worker).
        self._first_sizes: list[tuple[int, int]] = []
        for split in (self.train, self.val, self.test):
            if split is not None:
                if len(split) == 0:
                    raise DataError(f"the {split.name} Dataset is empty.")
                hw = split.load(0)[0].shape[-2:]
                self._first_sizes.append((int(hw[0]), int(hw[1])))
        if task in ("classification", "multilabel", "regression"):
            self.train.labels = _labels_of(train, task, self.train)

    def build(self, cfg: DataConfig, task: str) -> DataBundle:
        """The bundle a run trains on, with ``cfg``'s image size and split caps.

        Raises:
            ConfigError: the run's task differs from the Datasets', no val split was
                given, or a data key that only file sources use was set.
        """
        if task != self.task:
            raise ConfigError(
                f"task={task}, but the Datasets were given for task={self.task} "
                "(vt.data.from_datasets(..., task=...)). Use the same task in both."
            )
        if self.val is None:
            raise ConfigError(
                "vt.data.from_datasets was given no val Dataset; training monitors a "
                "validation metric (best checkpoint, early stopping). Pass val=..."
            )
        refuse_unused(cfg, "data", COMMON_DATA_KEYS, "a source of Python Datasets")
        if cfg.cache != "none" or cfg.download:
            raise ConfigError(
                "data.cache and data.download apply to file sources; a Python Dataset "
                "loads its own samples. Remove them."
            )
        size = cfg.image_size or self.image_size
        bundle = DataBundle(
            train=self.train,
            val=self.val,
            test=self.test,
            class_names=list(self.class_names),
            in_channels=self.channels,
            image_size=size,
            mean=self.mean,
            std=self.std,
            # Whether the images need the loader's fit to the working size.
            same_size=all(hw == (size, size) for hw in self._first_sizes),
            target_names=list(self.target_names),
        )
        cap_splits(bundle, cfg)
        return bundle


def from_datasets(
    train: Dataset,
    val: Dataset | None = None,
    test: Dataset | None = None,
    *,
    classes: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    task: str = "classification",
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DatasetSource:
    """Train on your own map-style Datasets.

    Example:
        >>> import torch, visiontrain as vt
        >>> class Squares(torch.utils.data.Dataset):
        ...     def __len__(self):
        ...         return 8
        ...     def __getitem__(self, i):
        ...         image = torch.full((3, 16, 16), 40 * (i % 2), dtype=torch.uint8)
        ...         return image, i % 2
        >>> data = vt.data.from_datasets(Squares(), Squares(), classes=["dark", "light"])
        >>> data.build(vt.Config().data, "classification").image_size
        16

    Args:
        train: The training Dataset; ``(image, target)`` per index (module docstring).
        val: The validation Dataset (required to train: it picks the best checkpoint).
        test: An optional test Dataset, evaluated with the best weights at the end.
        classes: Class names, index order (classification, multilabel, detection,
            segmentation).
        targets: Target names (regression), one per value of a target vector.
        task: ``classification``, ``multilabel`` (a target is a 0/1 row, one value per
            class), ``regression``, ``detection`` or ``segmentation``.
        image_size: The working size; default the first training image's longer side
            (``data.image_size`` in the config wins).
        mean: Per-channel normalisation mean in 0..1 (default ImageNet's for 3 channels,
            0.5 for one).
        std: Per-channel normalisation std (default ImageNet's, or 0.5).

    Raises:
        ConfigError: an unknown task, or names missing for it.
        DataError: a Dataset is empty or its first sample has the wrong image or target.
    """
    if task not in TASKS:
        raise ConfigError(f"task={task} is not one of {', '.join(TASKS)}.")
    if task == "regression":
        if not targets:
            raise ConfigError("task=regression needs targets=[names of the values].")
        class_names, target_names = [], list(targets)
    else:
        if not classes:
            raise ConfigError(f"task={task} needs classes=[class names in index order].")
        class_names, target_names = list(classes), []
    if len(train) == 0:  # type: ignore[arg-type]
        raise DataError("the train Dataset is empty.")
    first = train[0]
    if not isinstance(first, tuple | list) or len(first) != 2:
        raise DataError(
            f"train Dataset sample 0 is a {type(first).__name__}; yield (image, target)."
        )
    channels = _channels(first[0])
    height, width = to_uint8_chw(first[0], channels, "train Dataset sample 0").shape[-2:]
    default_mean = IMAGENET_MEAN if channels == 3 else (0.5,)
    default_std = IMAGENET_STD if channels == 3 else (0.5,)
    return DatasetSource(
        train,
        val,
        test,
        task,
        class_names,
        target_names,
        channels,
        int(image_size or max(height, width)),
        tuple(float(v) for v in (mean or default_mean)),
        tuple(float(v) for v in (std or default_std)),
    )


def _channels(image: Any) -> int:
    """The channel count of a first image: 3 for RGB, 1 for grey (PIL, numpy, tensor)."""
    # A PIL image (a tensor has a `mode` too: torch.Tensor.mode, the statistic).
    if hasattr(image, "mode") and hasattr(image, "convert"):
        return 1 if image.mode in ("L", "1", "I", "F") else 3
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) == 2:
        return 1
    if len(shape) == 3:
        c = shape[0] if shape[0] in (1, 3) else shape[-1]
        return 1 if c == 1 else 3
    return 3
