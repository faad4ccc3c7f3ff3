"""``imagefolder``: ``root/train/<class>/*.png|jpg|...`` with optional val/ and test/."""

from __future__ import annotations

from pathlib import Path

from visiontrain.config import DataConfig
from visiontrain.data.images import IMAGE_EXTENSIONS
from visiontrain.data.sources import (
    DataBundle,
    FileSplit,
    SubsetSplit,
    register_source,
    stratified_split,
)
from visiontrain.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _scan(folder: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    """List image files per class folder; the class list comes from train/."""
    found = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = classes if classes is not None else [p.name for p in found]
    if not names:
        raise DataError(
            f"{folder} has no class folders. Put images under {folder}/<class name>/ "
            "(one folder per class)."
        )
    extra = sorted({p.name for p in found} - set(names))
    if extra:
        raise DataError(
            f"{folder} has class folders {extra} that train/ does not have. Every split "
            "must use the class folders of train/."
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        cdir = folder / name
        files = (
            sorted(
                p
                for p in cdir.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
            if cdir.is_dir()
            else []
        )
        if not files and classes is None:
            raise DataError(
                f"class folder {cdir} holds no images ({', '.join(IMAGE_EXTENSIONS)}). "
                "Add images or remove the empty folder."
            )
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        # val/ or test/ with class folders but no images: an empty split, named here.
        raise DataError(
            f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders. "
            "Add images, or remove the empty folder."
        )
    return paths, labels, names


@register_source("imagefolder", uses=("root", "val_split", "on_error", "augment"))
def build_imagefolder(cfg: DataConfig) -> DataBundle:
    """Build splits from a folder tree; val is split off train when root/val is absent."""
    if cfg.root is None:
        raise DataError(
            "data.name=imagefolder needs data.root: a folder with train/<class>/ images "
            "(and optionally val/ and test/). Pass data.root=PATH."
        )
    root = Path(cfg.root).expanduser()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(
            f"data.root={root} has no train/ folder. Expected {root}/train/<class>/*.jpg "
            "(and optionally val/ and test/)."
        )
    paths, labels, names = _scan(train_dir, None)
    train = FileSplit(paths, labels, channels=3)
    notes = []
    if (root / "val").is_dir():
        val = FileSplit(*_scan(root / "val", names)[:2], channels=3)
    else:
        keep, held = stratified_split(train.labels, cfg.val_split, cfg.split_seed)
        val = SubsetSplit(train, held)
        train = SubsetSplit(train, keep)
        notes.append(f"no val/ folder: held out {len(held)} training images (data.val_split)")
    test = (
        FileSplit(*_scan(root / "test", names)[:2], channels=3)
        if (root / "test").is_dir()
        else None
    )
    return DataBundle(
        train=train,
        val=val,
        test=test,
        class_names=names,
        in_channels=3,
        image_size=cfg.image_size or 224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        same_size=False,
        notes=notes,
    )
