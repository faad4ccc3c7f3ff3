"""``masks``: semantic segmentation data as image files with class-index mask PNGs.

Layout under ``data.root``::

    classes.txt                     optional: one class name per line, line i = class i
    train/images/*.png|jpg|jpeg     required
    train/masks/<same stem>.png     one mask per image
    val/images, val/masks           optional; else data.val_split of train is held out
    test/images, test/masks         optional

A mask is a single-channel PNG whose pixel values are class indices (mode ``L``, or mode
``P`` whose palette indices are the classes, as in Pascal VOC; 1-bit masks read as 0/1);
255 marks pixels to ignore. Class 0 is the background.

Without ``classes.txt`` the classes are named ``class_0`` .. ``class_K`` where K is the
largest value (other than 255) in the train masks; finding it reads every train mask once
when the bundle is built, which is fine for small datasets — write a ``classes.txt`` to
skip that pass on large ones. A value outside the classes is reported when its mask is
loaded.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visiontrain.config import DataConfig
from visiontrain.data import images as imagefiles
from visiontrain.data.images import MAX_PIXELS
from visiontrain.data.sources import (
    DEFAULT_IMAGE_SIZES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    PreparedSplit,
    Split,
    SubsetSplit,
    Target,
    register_source,
)
from visiontrain.errors import DataError

# Working size when data.image_size is unset.
MASK_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IGNORE = 255


def read_mask(path: Path) -> np.ndarray:
    """Read a class-index mask PNG as uint8 (H, W).

    The file is checked as an image file is (:func:`visiontrain.data.images.file_problem`)
    and its header's size against ``MAX_PIXELS`` before any pixel is decoded.

    Raises:
        DataError: the file is not a regular file, unreadable, declares more than
            ``MAX_PIXELS`` pixels, or is not a single-channel class-index image.
    """
    problem = imagefiles.file_problem(path)
    if problem is not None:
        raise DataError(f"cannot read mask {path}: {problem}.")
    # PIL refuses above twice its global limit on open; ours is checked on the header.
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                imagefiles.refuse_oversized(path, *im.size, what="mask")
                im.load()
                mode = im.mode
                # For mode P, np.array gives the palette indices, which are the classes.
                arr = np.array(im) if mode in ("L", "P", "1") else None
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        raise DataError(
            f"cannot read mask {path}: {type(exc).__name__}: {exc}. Replace the file."
        ) from None
    if arr is None:
        raise DataError(
            f"mask {path} is a mode {mode} image; masks must be single-channel class-index "
            "PNGs (mode L or P, pixel value = class index, 255 = ignore). Convert colour-coded "
            "masks to class indices first."
        )
    return arr.astype(np.uint8)


def _scan_split(folder: Path) -> tuple[list[Path], list[Path]]:
    """Pair every image in ``folder/images`` with its mask in ``folder/masks``."""
    img_dir, mask_dir = folder / "images", folder / "masks"
    if not img_dir.is_dir():
        raise DataError(
            f"{folder} has no images/ folder. Expected {folder}/images/*.png|jpg and "
            f"{folder}/masks/<same name>.png."
        )
    # A directory named like an image is a folder, not an image; anything else with an
    # image's name is listed so that a symlink loop or dangling link is refused by name
    # below rather than silently left out.
    images = sorted(
        p
        for p in img_dir.iterdir()
        if p.suffix.lower() in MASK_IMAGE_EXTENSIONS
        and not p.name.startswith(".")
        and not p.is_dir()
    )
    if not images:
        raise DataError(
            f"{img_dir} holds no images ({', '.join(MASK_IMAGE_EXTENSIONS)}). Add images, or "
            "remove the empty folder."
        )
    seen: dict[str, Path] = {}
    masks = []
    for image in images:
        if image.stem in seen:
            # Both would share one mask file: almost certainly a leftover copy.
            raise DataError(
                f"{seen[image.stem]} and {image} have the same name stem, so they would share "
                f"the mask {mask_dir / (image.stem + '.png')}. Rename or remove one."
            )
        seen[image.stem] = image
        if not image.is_file():
            raise DataError(
                f"cannot read image {image}: {imagefiles.file_problem(image)}. Fix or remove it."
            )
        mask = mask_dir / f"{image.stem}.png"
        if os.path.lexists(mask) and not mask.is_file():
            problem = imagefiles.file_problem(mask)
            raise DataError(f"the mask {mask} of image {image} cannot be read: {problem}.")
        if not mask.is_file():
            raise DataError(
                f"image {image} has no mask: expected {mask} (a class-index PNG with the same "
                "name stem). Add the mask or remove the image."
            )
        masks.append(mask)
    return images, masks


def _read_classes(path: Path) -> list[str]:
    """Class names from ``classes.txt``: line i names class i."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DataError(f"{path} is empty; write one class name per line (line 1 = class 0).")
    for n, name in enumerate(names):
        if not name:
            # A blank line would shift every later class index by one.
            raise DataError(f"{path} line {n + 1} is blank; every class index needs a name.")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{path} lists {dupes} more than once; class names must be unique.")
    if len(names) > IGNORE:
        raise DataError(
            f"{path} lists {len(names)} classes; masks are 8-bit with 255 = ignore, so at "
            f"most {IGNORE} classes fit."
        )
    return names


class MaskSplit(PreparedSplit):
    """Image files with class-index mask PNGs; targets are int64 (H, W) masks.

    Prepared with the longer side at the working size (masks with nearest neighbours);
    the square fit of the transform then only pads.
    """

    fit = "long"
    has_masks = True

    def __init__(self, images: list[Path], masks: list[Path], num_classes: int) -> None:
        self.images = list(images)
        self.masks = list(masks)
        self.num_classes = num_classes
        self.labels = None

    def __len__(self) -> int:
        return len(self.images)

    def files(self, index: int) -> tuple[Path, ...]:  # noqa: D102
        return (self.images[index], self.masks[index])

    def prepare_settings(self) -> tuple[object, ...]:  # noqa: D102
        # The class count decides which masks are refused when they are read.
        return (*super().prepare_settings(), self.num_classes)

    def decode(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:  # noqa: D102
        image = imagefiles.decode_file(self.images[index], 3)
        mask_path = self.masks[index]
        mask = read_mask(mask_path)
        if mask.shape != tuple(image.shape[-2:]):
            raise DataError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} pixels but its image "
                f"{self.images[index]} is {image.shape[-1]}x{image.shape[-2]}; a mask must have "
                "its image's size."
            )
        bad = (mask >= self.num_classes) & (mask != IGNORE)
        if bad.any():
            value = int(mask[bad].max())
            raise DataError(
                f"mask {mask_path} has value {value}, but there are only {self.num_classes} "
                f"classes (0..{self.num_classes - 1}; 255 = ignore). Add the missing class "
                "names to classes.txt, or fix the mask."
            )
        return image, torch.from_numpy(mask)

    def make_target(  # noqa: D102
        self,
        index: int,
        decoded_hw: tuple[int, int],
        image_hw: tuple[int, int],
        mask: torch.Tensor | None,
    ) -> Target:
        assert mask is not None
        return mask.long()

    def describe(self, index: int) -> str:  # noqa: D102
        return str(self.images[index])


@register_source(
    "masks", uses=("root", "on_error", "augment", "val_split"), tasks=("segmentation",)
)
def build_masks(cfg: DataConfig, task: str) -> DataBundle:
    """Build segmentation splits from ``root/{train,val,test}/{images,masks}``."""
    if cfg.root is None:
        raise DataError(
            "data.name=masks needs data.root: a folder with train/images/ and train/masks/ "
            "(class-index PNGs with the images' name stems), optionally val/, test/ and "
            "classes.txt. Pass data.root=PATH."
        )
    root = Path(cfg.root).expanduser()
    if not (root / "train").is_dir():
        raise DataError(
            f"data.root={root} has no train/ folder. Expected {root}/train/images/*.png|jpg "
            f"and {root}/train/masks/<same name>.png."
        )
    images, masks = _scan_split(root / "train")
    notes: list[str] = []
    classes_txt = root / "classes.txt"
    if classes_txt.is_file():
        class_names = _read_classes(classes_txt)
    else:
        top = 0
        for mask_path in masks:
            values = np.unique(read_mask(mask_path))
            values = values[values != IGNORE]
            if len(values):
                top = max(top, int(values.max()))
        # At least background and one class: a single class has nothing to separate.
        top = max(top, 1)
        class_names = [f"class_{i}" for i in range(top + 1)]
        notes.append(
            f"no classes.txt: {len(class_names)} classes (class_0..class_{top}) from the "
            "largest value in the train masks"
        )
    num_classes = len(class_names)
    train: Split = MaskSplit(images, masks, num_classes)
    if (root / "val").is_dir():
        val: Split = MaskSplit(*_scan_split(root / "val"), num_classes)
    else:
        n = len(train)
        order = np.random.default_rng(cfg.split_seed).permutation(n)
        n_val = min(max(round(n * cfg.val_split), 1), n - 1) if n > 1 else 0
        val = SubsetSplit(train, np.sort(order[:n_val]))
        train = SubsetSplit(train, np.sort(order[n_val:]))
        notes.append(f"no val/ folder: held out {n_val} training images (data.val_split)")
    test = MaskSplit(*_scan_split(root / "test"), num_classes) if (root / "test").is_dir() else None
    return DataBundle(
        train=train,
        val=val,
        test=test,
        class_names=class_names,
        in_channels=3,
        image_size=cfg.image_size or DEFAULT_IMAGE_SIZES["masks"],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        same_size=False,
        notes=notes,
    )
