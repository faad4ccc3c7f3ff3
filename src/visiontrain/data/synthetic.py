"""The embedded ``defects`` data: surface-inspection images with rare defects.

Each image is a grey textured surface (low-frequency shading, grain, faint blotches);
a small fraction carries one defect — a scratch (a thin straight line), a spot (a soft
blob) or a crack (a jagged random walk). Contrast varies so that some defects are
subtle. Everything is drawn from a numpy Generator seeded by the config, so the same
settings always give the same arrays; they are generated once and cached on disk.

For ``task=regression`` the same generator asks "how big is the damage": a defective
image carries one to three defects, and each image's targets are the damaged area in
percent of the image and the number of defects.

For ``task=multilabel`` (``data.defect_classes=multilabel``) a defective image likewise
carries one to three defects, each of a random type, and its label set is the types it
shows: ``{scratch, crack}`` for a scratch and a crack, ``{spot}`` for two spots; an ``ok``
image has no label. The images are those of the regression data (the same random stream);
only the labels differ.
"""

from __future__ import annotations

import io
import itertools
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from visiontrain.config import DataConfig
from visiontrain.data.sources import (
    DEFAULT_IMAGE_SIZES,
    ArraySplit,
    DataBundle,
    cache_key,
    cache_root,
    channel_stats,
    register_source,
)
from visiontrain.errors import ConfigError
from visiontrain.io import atomic_write

GENERATOR_VERSION = 1
DEFECT_TYPES = ("scratch", "spot", "crack")
DEFAULTS = {"train": 2000, "val": 600, "test": 600, "rate": 0.05}
# Regression wants damage on many images, of varied size and number.
REGRESSION_DEFAULTS = {"rate": 0.5, "max_defects": 3}
# Multi-label: as many defective images, each with one to three defects of random types.
MULTILABEL_DEFAULTS = {"rate": 0.5, "max_defects": 3}
REGRESSION_TARGETS = ["area_pct", "count"]
# A pixel belongs to the damaged area where the soft defect mask reaches half strength.
AREA_LEVEL = 0.5


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like RGB uint8 image (H, W, 3): gradients, discs and some texture.

    What a camera JPEG looks like to a decoder and a resize, without shipping a photo
    (the decode-less test and ``benchmarks/decode.py`` save it as a JPEG).
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, height / 4)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """A defect-free textured surface as float32 in 0..255."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(90, 170)
    shade = sum(
        rng.uniform(4, 12)
        * np.sin(
            2 * np.pi * (rng.uniform(0.3, 2.0) * (np.cos(a) * xx + np.sin(a) * yy))
            + rng.uniform(0, 2 * np.pi)
        )
        for a in rng.uniform(0, np.pi, size=3)
    )
    grain = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), rng.uniform(0.6, 1.4))
    grain *= rng.uniform(6, 12) / max(grain.std(), 1e-6)
    # Faint large blotches: nuisance structure that is not a defect.
    blotch = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), size / 8)
    blotch *= rng.uniform(3, 8) / max(blotch.std(), 1e-6)
    return (base + shade + grain + blotch).astype(np.float32)


def _line_mask(size: int, points: np.ndarray, width: float) -> np.ndarray:
    """Rasterise a polyline as a soft mask in 0..1."""
    mask = np.zeros((size, size), np.float32)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        n = int(max(abs(x1 - x0), abs(y1 - y0)) * 3) + 2
        xs = np.clip(np.round(np.linspace(x0, x1, n)).astype(int), 0, size - 1)
        ys = np.clip(np.round(np.linspace(y0, y1, n)).astype(int), 0, size - 1)
        mask[ys, xs] = 1.0
    mask = ndimage.gaussian_filter(mask, width * 0.5)
    return mask / max(mask.max(), 1e-6)


def _defect(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """The soft mask of one defect of ``kind``."""
    if kind == "scratch":
        length = rng.uniform(0.3, 0.75) * size
        angle = rng.uniform(0, np.pi)
        cx, cy = rng.uniform(0.25, 0.75, 2) * size
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        return _line_mask(
            size, np.array([[cx - dx, cy - dy], [cx + dx, cy + dy]]), rng.uniform(1, 1.8)
        )
    if kind == "spot":
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        rx, ry = rng.uniform(0.03, 0.08, 2) * size
        d = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
        return np.clip(1.5 - d, 0, 1).astype(np.float32)
    # crack: a jagged random walk
    steps = rng.integers(12, 28)
    angle = rng.uniform(0, 2 * np.pi)
    pts = [rng.uniform(0.2, 0.8, 2) * size]
    for _ in range(steps):
        angle += rng.normal(0, 0.6)
        pts.append(pts[-1] + rng.uniform(1.0, 2.5) * np.array([np.cos(angle), np.sin(angle)]))
    return _line_mask(size, np.array(pts), rng.uniform(0.8, 1.4))


def generate_defects(
    n: int,
    size: int,
    rate: float,
    seed: int,
    types: bool,
    max_defects: int = 1,
    multilabel: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``n`` grey images (N,H,W,1 uint8), class labels and damage targets.

    Args:
        n: number of images.
        size: side length in pixels.
        rate: fraction of images with a defect (at least one defective image per split).
        seed: seed of the numpy Generator.
        types: label defects by type (1=scratch, 2=spot, 3=crack) instead of 1=defect;
            with several defects the label is the first one's type.
        max_defects: a defective image carries 1..max_defects defects. With 1 the random
            stream is exactly that of the classification data.
        multilabel: the label is the set of types present, as a bit mask (bit k set for
            ``DEFECT_TYPES[k]``; :func:`label_rows` turns it into 0/1 rows). The random
            stream is unchanged.

    Returns:
        The images, the integer labels (0 = ok) and float32 targets (N, 2): damaged area
        in percent of the image and the number of defects.
    """
    rng = np.random.default_rng(seed)
    n_defect = min(n, max(1, round(n * rate)))
    defective = np.zeros(n, bool)
    defective[rng.choice(n, n_defect, replace=False)] = True
    images = np.empty((n, size, size, 1), np.uint8)
    labels = np.zeros(n, np.int64)
    targets = np.zeros((n, 2), np.float32)
    for i in range(n):
        img = _surface(rng, size)
        if defective[i]:
            count = 1 if max_defects == 1 else int(rng.integers(1, max_defects + 1))
            damaged = np.zeros((size, size), bool)
            for j in range(count):
                k = int(rng.integers(len(DEFECT_TYPES)))
                mask = _defect(rng, size, DEFECT_TYPES[k])
                # Mostly darker than the surface, sometimes brighter; contrast varies widely.
                contrast = rng.uniform(25, 70) * (1 if rng.random() < 0.25 else -1)
                img = img + contrast * mask
                damaged |= mask >= AREA_LEVEL
                if multilabel:
                    labels[i] |= 1 << k
                elif j == 0:
                    labels[i] = k + 1 if types else 1
            targets[i] = (100.0 * damaged.mean(), count)
        images[i, :, :, 0] = np.clip(img, 0, 255).astype(np.uint8)
    return images, labels, targets


def label_rows(masks: np.ndarray) -> np.ndarray:
    """Multi-label bit masks (N,) as float32 0/1 rows (N, len(DEFECT_TYPES))."""
    bits = 1 << np.arange(len(DEFECT_TYPES))
    return ((masks[:, None] & bits) > 0).astype(np.float32)


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def _cached(path: Path, make: Callable[[], Arrays], shape: tuple[int, ...]) -> Arrays:
    """Read the arrays cached at ``path``, or ``make`` them and cache them atomically.

    A cache file that is damaged (truncated, not an npz, a bad CRC) or that holds arrays of
    another shape is rebuilt rather than trusted.
    """
    if path.is_file():
        try:
            # Our own file handle: np.load leaks the one it opens when the zip is damaged.
            with open(path, "rb") as fh, np.load(fh) as z:
                images, labels, targets = z["images"], z["labels"], z["targets"]
            if (
                images.shape == shape
                and images.dtype == np.uint8
                and labels.shape == shape[:1]
                and targets.shape == (shape[0], 2)
            ):
                return images, labels.astype(np.int64), targets.astype(np.float32)
        # BadZipFile: a truncated npz; zlib.error: a damaged compressed member.
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
            pass
    images, labels, targets = make()

    def write(fh: io.BufferedWriter) -> None:
        np.savez(fh, images=images, labels=labels, targets=targets)

    atomic_write(path, write)
    return images, labels, targets


@register_source(
    "defects",
    uses=("defect_rate", "defect_classes", "cache_dir", "augment"),
    generates=True,
    tasks=("classification", "multilabel", "regression"),
)
def build_defects(cfg: DataConfig, task: str) -> DataBundle:
    """Build the embedded defects dataset (generated once, cached)."""
    regression = task == "regression"
    multilabel = task == "multilabel"
    if regression and cfg.defect_classes is not None:
        raise ConfigError(
            "data.defect_classes labels classes; task=regression predicts the damaged area "
            "and the defect count instead. Remove data.defect_classes."
        )
    if multilabel and cfg.defect_classes not in (None, "multilabel"):
        raise ConfigError(
            f"data.defect_classes={cfg.defect_classes} gives one label per image; task="
            "multilabel labels each image with the set of defect types it shows. Set "
            "data.defect_classes=multilabel (or leave it unset)."
        )
    if cfg.defect_classes == "multilabel" and not multilabel:
        raise ConfigError(
            f"data.defect_classes=multilabel gives each image a set of labels; task={task} "
            "takes one class per image. Set task=multilabel, or data.defect_classes=binary "
            "or types."
        )
    size = cfg.image_size or DEFAULT_IMAGE_SIZES["defects"]
    many = REGRESSION_DEFAULTS if regression else MULTILABEL_DEFAULTS if multilabel else None
    default_rate = many["rate"] if many else DEFAULTS["rate"]
    rate = cfg.defect_rate if cfg.defect_rate is not None else default_rate
    max_defects = many["max_defects"] if many else 1
    types = (cfg.defect_classes or "binary") == "types"
    sizes = {
        "train": cfg.train_size or DEFAULTS["train"],
        "val": cfg.val_size or DEFAULTS["val"],
        "test": cfg.test_size or DEFAULTS["test"],
    }
    root = cache_root(cfg) / "defects"
    splits = {}
    for offset, (split, n) in enumerate(sizes.items()):
        seed = cfg.split_seed * 1000 + offset
        # The label mode in the key: "multilabel" keys its own files (bit-mask labels).
        mode = "multilabel" if multilabel else types
        key = cache_key(GENERATOR_VERSION, n, size, rate, seed, mode, max_defects)
        path = root / f"{split}-{key}.npz"
        images, labels, targets = _cached(
            path,
            lambda n=n, seed=seed: generate_defects(
                n, size, rate, seed, types, max_defects, multilabel=multilabel
            ),
            (n, size, size, 1),
        )
        y = targets if regression else label_rows(labels) if multilabel else labels
        splits[split] = ArraySplit(images, y, f"defects/{split}")
    names = (
        list(DEFECT_TYPES) if multilabel else ["ok", *DEFECT_TYPES] if types else ["ok", "defect"]
    )
    mean, std = channel_stats(splits["train"].images.permute(0, 2, 3, 1).numpy())
    return DataBundle(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        class_names=[] if regression else names,
        target_names=REGRESSION_TARGETS if regression else [],
        in_channels=1,
        image_size=size,
        mean=mean,
        std=std,
    )
