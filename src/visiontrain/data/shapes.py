"""The embedded ``shapes`` data: procedural RGB scenes of circles, squares and triangles.

Each image is a textured background (a smooth two-colour gradient, a few soft colour blobs
and mild noise) with one to six objects of random class, size, colour and rotation. Later
objects occlude earlier ones. Every object is rasterised as a binary mask (PIL polygons and
ellipses on an L-mode image) and composited, so the ground truth is exact:

* detection: one box per instance, the tight box of its *visible* pixels after occlusion
  (xyxy, x2/y2 exclusive), and its class;
* segmentation: a semantic mask, 0 = background, 1 + class for the visible pixels of each
  kept instance;
* regression ("counting"): the number of kept instances of each class.

An instance whose visible part is tiny (under 20 pixels at 128 px) is dropped from the
boxes and counts, and its few visible pixels are marked 255 (ignore) in the semantic mask,
so that the three tasks agree on what counts as an object.

Everything is drawn from a numpy Generator seeded by the config, so the same settings
always give the same arrays; they are generated once per split and cached as one ``.npz``.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from visiontrain.config import DataConfig
from visiontrain.data.sources import (
    DEFAULT_IMAGE_SIZES,
    ArraySplit,
    DataBundle,
    Split,
    Target,
    cache_key,
    cache_root,
    channel_stats,
    register_source,
)
from visiontrain.io import atomic_write

GENERATOR_VERSION = 1
SHAPE_CLASSES = ("circle", "square", "triangle")
DEFAULTS = {"train": 2000, "val": 300, "test": 300}
# Objects per image, inclusive.
MIN_OBJECTS, MAX_OBJECTS = 1, 6
# Object size (circle diameter, square side, triangle side) at 128 px; scaled with the size.
MIN_OBJECT_PX, MAX_OBJECT_PX = 12.0, 48.0
# Floor on the scaled sizes: below a few pixels a shape is no longer recognisable.
MIN_OBJECT_FLOOR = 5.0
# An instance with fewer visible pixels than this (at 128 px, scaled) is dropped.
MIN_VISIBLE_PX = 20
# Smallest RGB distance between an object's colour and what it is drawn over.
MIN_CONTRAST = 90.0
IGNORE = 255


@dataclass
class ShapesArrays:
    """One generated split.

    Attributes:
        images: uint8 (N, S, S, 3).
        masks: uint8 (N, S, S) semantic masks: 0 background, 1 + class, 255 ignore.
        boxes: float32 (M, 4) xyxy of all kept instances, image after image.
        labels: int64 (M,) 0-based class of each box.
        offsets: int64 (N + 1,): the boxes of image i are ``boxes[offsets[i]:offsets[i+1]]``.
    """

    images: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    def counts(self) -> np.ndarray:
        """Float32 (N, C): the number of kept instances of each class per image."""
        n = len(self.images)
        image_of_box = np.repeat(np.arange(n), np.diff(self.offsets))
        counts = np.zeros((n, len(SHAPE_CLASSES)), np.float32)
        np.add.at(counts, (image_of_box, self.labels), 1.0)
        return counts


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int) -> np.ndarray:
    """A smooth random textured background as float32 (S, S, 3) in 0..255 (before noise)."""
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    # Projection on a random direction, rescaled to 0..1 so the gradient spans the image.
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    # A few soft blobs of colour: low-frequency structure that is not an object.
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0, size, 2)
        sigma = rng.uniform(0.1, 0.3) * size
        amp = rng.uniform(-40, 40, 3).astype(np.float32)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma * sigma))
        img += blob[..., None] * amp
    return img


def _object_mask(rng: np.random.Generator, size: int, kind: int, diam: float) -> np.ndarray:
    """Rasterise one object of class ``kind`` with size ``diam``; a bool (S, S) mask."""
    r = diam / 2
    # Centres keep the whole shape inside the image: boxes then never need clipping.
    cx, cy = rng.uniform(r, size - r, 2)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if SHAPE_CLASSES[kind] == "circle":
        # PIL's ellipse box is inclusive of x1/y1, hence the -1 on the far corner.
        draw.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=1)
    else:
        theta = rng.uniform(0, 2 * np.pi)
        if SHAPE_CLASSES[kind] == "square":
            # Corners of a square of side diam rotated by theta: circumradius diam / sqrt 2.
            radius = diam / np.sqrt(2)
            angles = theta + np.pi / 4 + np.arange(4) * np.pi / 2
        else:
            # Equilateral triangle of side diam: circumradius diam / sqrt 3.
            radius = diam / np.sqrt(3)
            angles = theta + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=1)
    return np.asarray(canvas, dtype=np.uint8).astype(bool)


def _object_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour that stands out from ``under`` (the mean colour it is drawn over)."""
    for _ in range(20):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        if float(np.linalg.norm(colour - under)) >= MIN_CONTRAST:
            return colour
    # Rarely reached (mid-grey backgrounds): the far corner of the RGB cube always contrasts.
    return np.where(under < 128, 255.0, 0.0).astype(np.float32)


def generate_shapes(n: int, size: int, seed: int) -> ShapesArrays:
    """Generate ``n`` scenes of ``size`` x ``size`` pixels with their ground truth.

    Args:
        n: number of images.
        size: side length in pixels.
        seed: seed of the numpy Generator; the same seed gives the same arrays.

    Returns:
        The images, semantic masks and per-instance boxes and labels.
    """
    rng = np.random.default_rng(seed)
    scale = size / 128
    lo = max(MIN_OBJECT_PX * scale, MIN_OBJECT_FLOOR)
    hi = max(MAX_OBJECT_PX * scale, lo + 1)
    # Never larger than the image, or the centre range would be empty.
    hi = min(hi, float(size))
    lo = min(lo, hi)
    min_visible = max(4, round(MIN_VISIBLE_PX * scale * scale))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    boxes: list[tuple[float, float, float, float]] = []
    labels: list[int] = []
    offsets = np.zeros(n + 1, np.int64)
    for i in range(n):
        img = _background(rng, xx, yy, size)
        # Which object owns each pixel: -1 background, else the object's draw order.
        owner = np.full((size, size), -1, np.int8)
        kinds = rng.integers(
            len(SHAPE_CLASSES), size=int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
        )
        for j, kind in enumerate(kinds):
            obj = _object_mask(rng, size, int(kind), float(rng.uniform(lo, hi)))
            # Contrast against what is there now (background and earlier objects), so that
            # an object never melts into the one it overlaps.
            colour = _object_colour(rng, img[obj].mean(axis=0))
            img[obj] = colour
            owner[obj] = j
        img += rng.standard_normal((size, size, 3), dtype=np.float32) * rng.uniform(3, 10)
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        sem = np.zeros((size, size), np.uint8)
        for j, kind in enumerate(kinds):
            visible = owner == j
            area = int(visible.sum())
            if area == 0:
                continue
            # The top object is never occluded, so every image keeps at least one instance.
            if area < min_visible and j != len(kinds) - 1:
                sem[visible] = IGNORE
                continue
            sem[visible] = kind + 1
            rows = np.flatnonzero(visible.any(axis=1))
            cols = np.flatnonzero(visible.any(axis=0))
            boxes.append((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))
            labels.append(int(kind))
        masks[i] = sem
        offsets[i + 1] = len(boxes)
    return ShapesArrays(
        images=images,
        masks=masks,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
        offsets=offsets,
    )


def _valid(arrays: ShapesArrays, n: int, size: int) -> bool:
    """Whether cached arrays have the shapes and invariants of a split of ``n`` x ``size``."""
    off = arrays.offsets
    m = len(arrays.boxes)
    return (
        arrays.images.shape == (n, size, size, 3)
        and arrays.images.dtype == np.uint8
        and arrays.masks.shape == (n, size, size)
        and arrays.masks.dtype == np.uint8
        and arrays.boxes.shape == (m, 4)
        and arrays.labels.shape == (m,)
        and off.shape == (n + 1,)
        and int(off[0]) == 0
        and int(off[-1]) == m
        and bool(np.all(np.diff(off) >= 1))
        and (
            m == 0
            or (int(arrays.labels.min()) >= 0 and int(arrays.labels.max()) < len(SHAPE_CLASSES))
        )
    )


def _cached(path: Path, make: Callable[[], ShapesArrays], n: int, size: int) -> ShapesArrays:
    """Read the split cached at ``path``, or ``make`` it and cache it atomically.

    A cache file that is damaged (truncated, not an npz, a bad CRC) or whose arrays do not
    fit the requested split is rebuilt rather than trusted.
    """
    if path.is_file():
        try:
            # Our own file handle: np.load leaks the one it opens when the zip is damaged.
            with open(path, "rb") as fh, np.load(fh) as z:
                arrays = ShapesArrays(
                    images=z["images"],
                    masks=z["masks"],
                    boxes=z["boxes"].astype(np.float32),
                    labels=z["labels"].astype(np.int64),
                    offsets=z["offsets"].astype(np.int64),
                )
            if _valid(arrays, n, size):
                return arrays
        # BadZipFile: a truncated npz; zlib.error: a damaged compressed member.
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
            pass
    arrays = make()

    def write(fh: io.BufferedWriter) -> None:
        np.savez(
            fh,
            images=arrays.images,
            masks=arrays.masks,
            boxes=arrays.boxes,
            labels=arrays.labels,
            offsets=arrays.offsets,
        )

    atomic_write(path, write)
    return arrays


def _chw(images: np.ndarray) -> torch.Tensor:
    """One uint8 CHW tensor for the whole NHWC array, so that indexing is a cheap view."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


class ShapesDetectionSplit(Split):
    """Shapes images with ``{"boxes", "labels", "image_id"}`` detection targets."""

    def __init__(self, arrays: ShapesArrays, name: str) -> None:
        self.images = _chw(arrays.images)
        self.boxes = arrays.boxes
        self.box_labels = arrays.labels
        self.offsets = arrays.offsets
        self.labels = None
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[torch.Tensor, Target]:  # noqa: D102
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        # Copies: a transform that flips or scales boxes in place must not touch the cache.
        target = {
            "boxes": torch.tensor(self.boxes[a:b], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(self.box_labels[a:b], dtype=torch.int64),
            "image_id": int(index),
        }
        return self.images[index], target  # type: ignore[return-value]

    def describe(self, index: int) -> str:  # noqa: D102
        return f"{self.name}[{index}]"


class ShapesSegmentationSplit(Split):
    """Shapes images with int64 (H, W) semantic masks (0 background, 255 ignore)."""

    def __init__(self, arrays: ShapesArrays, name: str) -> None:
        self.images = _chw(arrays.images)
        self.masks = arrays.masks
        self.labels = None
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[torch.Tensor, Target]:  # noqa: D102
        # .long() copies, so the cached uint8 masks are never written through.
        return self.images[index], torch.from_numpy(self.masks[index]).long()  # type: ignore[return-value]

    def describe(self, index: int) -> str:  # noqa: D102
        return f"{self.name}[{index}]"


@register_source(
    "shapes",
    uses=("cache_dir", "augment"),
    generates=True,
    tasks=("detection", "segmentation", "regression"),
)
def build_shapes(cfg: DataConfig, task: str) -> DataBundle:
    """Build the embedded shapes dataset for ``task`` (generated once per split, cached)."""
    size = cfg.image_size or DEFAULT_IMAGE_SIZES["shapes"]
    sizes = {
        "train": cfg.train_size or DEFAULTS["train"],
        "val": cfg.val_size or DEFAULTS["val"],
        "test": cfg.test_size or DEFAULTS["test"],
    }
    root = cache_root(cfg) / "shapes"
    splits: dict[str, Split] = {}
    train_images: np.ndarray | None = None
    notes: list[str] = []
    for offset, (split, n) in enumerate(sizes.items()):
        seed = cfg.split_seed * 1000 + offset
        key = cache_key(GENERATOR_VERSION, n, size, seed)
        arrays = _cached(
            root / f"{split}-{key}.npz",
            lambda n=n, seed=seed: generate_shapes(n, size, seed),
            n,
            size,
        )
        name = f"shapes/{split}"
        if task == "detection":
            splits[split] = ShapesDetectionSplit(arrays, name)
        elif task == "segmentation":
            splits[split] = ShapesSegmentationSplit(arrays, name)
        else:
            splits[split] = ArraySplit(arrays.images, arrays.counts(), name)
        if split == "train":
            train_images = arrays.images
            per_class = np.bincount(arrays.labels, minlength=len(SHAPE_CLASSES))
            counts = ", ".join(f"{c} {k}" for c, k in zip(SHAPE_CLASSES, per_class, strict=True))
            notes.append(f"shapes: {len(arrays.boxes)} objects in {n} training images ({counts})")
    assert train_images is not None
    mean, std = channel_stats(train_images)
    names = list(SHAPE_CLASSES)
    return DataBundle(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        class_names=(
            []
            if task == "regression"
            else ["background", *names]
            if task == "segmentation"
            else names
        ),
        target_names=[f"count_{c}" for c in names] if task == "regression" else [],
        in_channels=3,
        image_size=size,
        mean=mean,
        std=std,
        same_size=True,
        notes=notes,
    )
