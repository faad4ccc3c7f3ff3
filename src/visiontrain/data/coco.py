"""``coco``: object detection data in the COCO JSON format.

Layout under ``data.root``::

    annotations/instances_train.json   required
    annotations/instances_val.json     optional; else data.val_split of train is held out
    annotations/instances_test.json    optional
    <file_name> or images/<file_name>  the images

Each image's ``file_name`` is looked up as ``root/<file_name>`` first and, when that file
does not exist, as ``root/images/<file_name>``; either way the resolved path (symlinks
followed) must stay inside ``data.root``.

For ``task=multilabel`` the same files give image-level labels: an image carries class c
when any of its annotations has category c (crowd annotations and boxes dropped for their
shape included: the object is there); an image without annotations carries none. The
images are then fitted as for classification (shorter side, centre crop; 224 px default).

Category ids may be sparse (1, 3, 7): they map to contiguous 0-based class indices in
increasing id order. Crowd annotations are skipped; boxes with no width or height, or that
lie entirely outside their image, are dropped; boxes partly outside are clipped. The counts
go to the bundle's notes. Every image file is checked to exist when the bundle is built
(a stat per image); images are decoded when a sample is loaded (or once, with data.cache).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visiontrain.config import DataConfig
from visiontrain.data import images
from visiontrain.data.sources import (
    DEFAULT_IMAGE_SIZES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    FileSplit,
    PreparedSplit,
    Split,
    SubsetSplit,
    Target,
    register_source,
)
from visiontrain.errors import DataError

# Working size when data.image_size is unset: detection needs more pixels than the 224 of
# classification for small objects to survive the resize.
SPLIT_FILES = {
    "train": "instances_train.json",
    "val": "instances_val.json",
    "test": "instances_test.json",
}


@dataclass
class CocoEntry:
    """One image of a COCO split and its kept boxes."""

    path: Path
    image_id: int
    width: int
    height: int
    boxes: np.ndarray  # float32 (K, 4) xyxy pixels
    labels: np.ndarray  # int64 (K,) 0-based class
    # Every class any annotation of the image names (crowd and dropped boxes too), sorted.
    present: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class CocoCounts:
    """How many annotations were skipped, dropped or changed while reading a file."""

    crowd: int = 0
    degenerate: int = 0
    outside: int = 0
    clipped: int = 0

    def notes(self, json_path: Path) -> list[str]:
        """One line per non-zero count, naming the file."""
        out = []
        if self.crowd:
            out.append(f"{json_path.name}: skipped {self.crowd} crowd annotations (iscrowd=1)")
        if self.degenerate:
            out.append(
                f"{json_path.name}: dropped {self.degenerate} boxes with zero width or height"
            )
        if self.outside:
            out.append(
                f"{json_path.name}: dropped {self.outside} boxes entirely outside their image"
            )
        if self.clipped:
            out.append(f"{json_path.name}: clipped {self.clipped} boxes to their image")
        return out


@dataclass
class CocoFile:
    """The parsed contents of one annotations file."""

    entries: list[CocoEntry]
    categories: dict[int, str]  # COCO category id -> name
    counts: CocoCounts = field(default_factory=CocoCounts)


class CocoSplit(PreparedSplit):
    """COCO images decoded from files, with ``{"boxes", "labels", "image_id"}`` targets.

    Prepared with the longer side at the working size (boxes scaled with it); the square
    fit of the transform then only pads.
    """

    fit = "long"

    def __init__(self, entries: list[CocoEntry]) -> None:
        self.entries = list(entries)
        self.labels = None

    def __len__(self) -> int:
        return len(self.entries)

    def files(self, index: int) -> tuple[Path, ...]:  # noqa: D102
        return (self.entries[index].path,)

    def decode(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:  # noqa: D102
        entry = self.entries[index]
        image = images.decode_file(entry.path, 3)
        h, w = image.shape[-2:]
        if (w, h) != (entry.width, entry.height):
            # The boxes are in the coordinates of the size the JSON records; on another
            # size they would silently point at the wrong pixels.
            raise DataError(
                f"image {entry.path} is {w}x{h} pixels but its COCO record (id "
                f"{entry.image_id}) says {entry.width}x{entry.height}. Fix width/height in "
                "the annotations file or replace the image."
            )
        return image, None

    def make_target(  # noqa: D102
        self,
        index: int,
        decoded_hw: tuple[int, int],
        image_hw: tuple[int, int],
        mask: torch.Tensor | None,
    ) -> Target:
        entry = self.entries[index]
        # Copies: a transform that flips or scales boxes in place must not touch them.
        boxes = torch.tensor(entry.boxes, dtype=torch.float32).reshape(-1, 4)
        if image_hw != decoded_hw:
            # The same kernel the joint v2.Resize of the square fit applies to boxes.
            from torchvision import tv_tensors
            from torchvision.transforms.v2 import functional as F

            wrapped = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=decoded_hw)
            boxes = F.resize(wrapped, list(image_hw), antialias=True).as_subclass(torch.Tensor)
        return {
            "boxes": boxes,
            "labels": torch.tensor(entry.labels, dtype=torch.int64),
            "image_id": entry.image_id,
        }

    def describe(self, index: int) -> str:  # noqa: D102
        return str(self.entries[index].path)


def _field(obj: Any, key: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    """``obj[key]``, checked to exist and be of ``kind``; a DataError naming file and key."""
    if not isinstance(obj, Mapping) or key not in obj:
        raise DataError(f"{path}: {where} has no {key!r} key; it is not a COCO annotations file.")
    value = obj[key]
    # bool is an int subclass; a true/false id or size is a mistake, not a number.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(
            f"{path}: {where} key {key!r} is {type(value).__name__} {value!r}, expected "
            f"{kind.__name__ if isinstance(kind, type) else ' or '.join(k.__name__ for k in kind)}."
        )
    return value


def _image_path(root: Path, file_name: str, json_path: Path, image_id: int) -> Path:
    """Resolve ``file_name`` to an existing file inside ``root`` (root/ first, then images/).

    Raises:
        DataError: the name is not a valid path, leads outside ``root`` (by ``..``, an
            absolute path or a symlink), or names no regular file (missing, a directory,
            a symlink loop or a dangling link).
    """
    resolved_root = Path(os.path.realpath(root))
    candidates = [root / file_name, root / "images" / file_name]
    problems: list[str] = []
    for candidate in candidates:
        try:
            # realpath follows symlinks, so a link inside root pointing out is caught too;
            # unlike Path.resolve on Python 3.11 it does not raise on a symlink loop.
            resolved = Path(os.path.realpath(candidate))
        except ValueError as exc:  # an embedded NUL byte
            raise DataError(
                f"{json_path}: image id {image_id} has file_name {file_name!r}, which is not a "
                f"valid path ({exc}). Fix the file_name."
            ) from None
        if not resolved.is_relative_to(resolved_root):
            raise DataError(
                f"{json_path}: image id {image_id} has file_name {file_name!r}, which points "
                f"outside data.root={root}. Use paths relative to data.root (or its images/ "
                "folder), without '..', absolute paths or symlinks leading out."
            )
        if resolved.is_file():
            return candidate
        if os.path.lexists(candidate):  # something is there, but not an image file
            problems.append(f"{candidate}: {images.file_problem(candidate)}")
    if problems:
        raise DataError(
            f"{json_path}: image id {image_id} (file_name {file_name!r}) names no image file: "
            f"{problems[0]}. Fix the file or remove the image from the annotations."
        )
    raise DataError(
        f"{json_path}: image id {image_id}: image file {candidates[0]} does not exist (nor "
        f"{candidates[1]}). Add the file or remove the image from the annotations."
    )


def read_coco(json_path: Path, root: Path, class_ids: list[int] | None = None) -> CocoFile:
    """Parse and check one COCO annotations file; every problem names the file.

    Args:
        json_path: the ``instances_*.json`` file.
        root: ``data.root``; image files must resolve inside it.
        class_ids: the category ids of train, in class-index order, when reading val or
            test (their categories must be among them); None for train.

    Returns:
        The entries (one per image, in file order) and the file's categories.

    Raises:
        DataError: unreadable or malformed JSON, a missing key, an image outside
            ``root`` or missing, an annotation of an unknown image or category.
    """
    try:
        with open(json_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read COCO annotations {json_path}: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{json_path}: the top level is not a JSON object; not a COCO file.")
    images = _field(data, "images", list, "the top level", json_path)
    annotations = _field(data, "annotations", list, "the top level", json_path)
    raw_categories = _field(data, "categories", list, "the top level", json_path)

    categories: dict[int, str] = {}
    for n, cat in enumerate(raw_categories):
        cid = _field(cat, "id", int, f"categories[{n}]", json_path)
        name = _field(cat, "name", str, f"categories[{n}]", json_path)
        if cid in categories:
            raise DataError(f"{json_path}: category id {cid} is listed twice.")
        categories[cid] = name
    if class_ids is None:
        if not categories:
            raise DataError(f"{json_path}: 'categories' is empty; list the object classes.")
        class_ids = sorted(categories)
    index_of = {cid: i for i, cid in enumerate(class_ids)}

    # image id -> (path, width, height), in file order.
    records: dict[int, tuple[Path, int, int]] = {}
    for n, img in enumerate(images):
        where = f"images[{n}]"
        image_id = _field(img, "id", int, where, json_path)
        file_name = _field(img, "file_name", str, where, json_path)
        width = _field(img, "width", int, where, json_path)
        height = _field(img, "height", int, where, json_path)
        if width <= 0 or height <= 0:
            raise DataError(f"{json_path}: image id {image_id} has size {width}x{height}.")
        if image_id in records:
            raise DataError(f"{json_path}: image id {image_id} is listed twice.")
        records[image_id] = (_image_path(root, file_name, json_path, image_id), width, height)

    counts = CocoCounts()
    boxes: dict[int, list[list[float]]] = {i: [] for i in records}
    labels: dict[int, list[int]] = {i: [] for i in records}
    present: dict[int, set[int]] = {i: set() for i in records}
    for n, ann in enumerate(annotations):
        ann_id = ann.get("id", f"#{n}") if isinstance(ann, Mapping) else f"#{n}"
        where = f"annotation {ann_id}"
        image_id = _field(ann, "image_id", int, where, json_path)
        category_id = _field(ann, "category_id", int, where, json_path)
        bbox = _field(ann, "bbox", list, where, json_path)
        if image_id not in records:
            raise DataError(
                f"{json_path}: annotation {ann_id} refers to image_id {image_id}, which is not "
                "in 'images'. Add the image or remove the annotation."
            )
        if category_id not in index_of:
            known = ", ".join(map(str, class_ids))
            raise DataError(
                f"{json_path}: annotation {ann_id} has category_id {category_id}, which is not "
                f"a known category (ids {known}). Add it to 'categories' (of the train file) or "
                "fix the annotation."
            )
        present[image_id].add(index_of[category_id])
        if ann.get("iscrowd", 0):
            counts.crowd += 1
            continue
        if len(bbox) != 4 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in bbox
        ):
            raise DataError(
                f"{json_path}: annotation {ann_id} has bbox {bbox!r}; expected [x, y, w, h]."
            )
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            counts.degenerate += 1
            continue
        _, width, height = records[image_id]
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, float(width)), min(y + h, float(height))
        if x2 <= x1 or y2 <= y1:
            counts.outside += 1
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            counts.clipped += 1
        boxes[image_id].append([x1, y1, x2, y2])
        labels[image_id].append(index_of[category_id])
    entries = [
        CocoEntry(
            path=path,
            image_id=image_id,
            width=width,
            height=height,
            boxes=np.asarray(boxes[image_id], np.float32).reshape(-1, 4),
            labels=np.asarray(labels[image_id], np.int64),
            present=np.asarray(sorted(present[image_id]), np.int64),
        )
        for image_id, (path, width, height) in records.items()
    ]
    return CocoFile(entries, categories, counts)


def _check_categories(path: Path, own: dict[int, str], train: dict[int, str]) -> None:
    """Val and test must name their categories as train does (ids are the shared key)."""
    for cid, name in own.items():
        if train.get(cid, name) != name:
            raise DataError(
                f"{path}: category id {cid} is {name!r} but {train[cid]!r} in the train "
                "annotations; every split must use the train file's categories."
            )


def image_labels(entries: list[CocoEntry], num_classes: int) -> FileSplit:
    """Image-level multi-label targets: class c where any annotation has category c."""
    rows = np.zeros((len(entries), num_classes), np.float32)
    for row, entry in zip(rows, entries, strict=True):
        row[entry.present] = 1.0
    return FileSplit([e.path for e in entries], rows, channels=3)


@register_source(
    "coco",
    uses=("root", "on_error", "augment", "val_split"),
    tasks=("detection", "multilabel"),
)
def build_coco(cfg: DataConfig, task: str) -> DataBundle:
    """Build detection (or multi-label) splits from COCO annotation files under ``data.root``."""
    if cfg.root is None:
        raise DataError(
            "data.name=coco needs data.root: a folder with annotations/instances_train.json "
            "(optionally instances_val.json, instances_test.json) and the images. "
            "Pass data.root=PATH."
        )
    root = Path(cfg.root).expanduser()
    ann_dir = root / "annotations"
    train_json = ann_dir / SPLIT_FILES["train"]
    if not train_json.is_file():
        raise DataError(
            f"data.root={root} has no annotations/{SPLIT_FILES['train']}. Put the COCO "
            "training annotations there (and optionally instances_val.json, "
            "instances_test.json)."
        )
    parsed = read_coco(train_json, root)
    class_ids = sorted(parsed.categories)
    class_names = [parsed.categories[c] for c in class_ids]
    multilabel = task == "multilabel"
    # Box counts mean nothing to image-level labels.
    notes = [] if multilabel else parsed.counts.notes(train_json)

    def make(entries: list[CocoEntry]) -> Split:
        return image_labels(entries, len(class_ids)) if multilabel else CocoSplit(entries)

    train: Split = make(parsed.entries)

    def optional(split: str) -> Split | None:
        path = ann_dir / SPLIT_FILES[split]
        if not path.is_file():
            return None
        other = read_coco(path, root, class_ids)
        _check_categories(path, other.categories, parsed.categories)
        if not multilabel:
            notes.extend(other.counts.notes(path))
        return make(other.entries)

    val: Split | None = optional("val")
    if val is None:
        n = len(train)
        order = np.random.default_rng(cfg.split_seed).permutation(n)
        # At least one image each way when there are two or more; the empty-split check of
        # build_data names a one-image train set.
        n_val = min(max(round(n * cfg.val_split), 1), n - 1) if n > 1 else 0
        val = SubsetSplit(train, np.sort(order[:n_val]))
        train = SubsetSplit(train, np.sort(order[n_val:]))
        notes.append(
            f"no annotations/{SPLIT_FILES['val']}: held out {n_val} training images "
            "(data.val_split)"
        )
    return DataBundle(
        train=train,
        val=val,
        test=optional("test"),
        class_names=class_names,
        in_channels=3,
        image_size=cfg.image_size or DEFAULT_IMAGE_SIZES["imagefolder" if multilabel else "coco"],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        same_size=False,
        notes=notes,
        category_ids=list(class_ids),
    )
