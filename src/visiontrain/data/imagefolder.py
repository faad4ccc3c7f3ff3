"""``imagefolder``: ``root/train/<class>/*.png|jpg|...`` with optional val/ and test/.

For ``task=regression`` the targets come from a ``labels.csv`` instead of class folders:
``root/train/labels.csv`` (and optionally ``val/``, ``test/``) or a single
``root/labels.csv``, each row ``filename,target[,target2...]`` with file names relative
to the CSV's folder. A header row (first cell ``filename``) names the targets.

For ``task=multilabel`` the same files hold label sets: each row ``filename,labels`` with
the image's class names separated by spaces (``a.jpg,cat dog``; ``b.jpg,`` for an image
with none). The classes are every name train's CSV uses, sorted.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np

from visiontrain.config import DataConfig
from visiontrain.data.images import IMAGE_EXTENSIONS, file_problem
from visiontrain.data.sources import (
    DEFAULT_IMAGE_SIZES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    FileSplit,
    Split,
    SubsetSplit,
    register_source,
    stratified_split,
)
from visiontrain.errors import DataError


def _unlistable(exc: OSError) -> NoReturn:
    raise DataError(
        f"cannot list the folder {exc.filename}: {exc.strerror}. Fix its permissions, or move "
        "it out of data.root."
    )


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted.

    ``os.walk`` sorts entries by what they are, not by name: a directory named ``x.jpg`` is
    a folder (walked into, never listed as an image), while a symlink loop or a dangling
    link named ``x.jpg`` is listed, so that loading it fails with a message naming it (or
    skips it under ``data.on_error=skip``). Links to directories are not followed, so a link
    that points back up the tree cannot make the scan loop.
    """
    found = [
        Path(dirpath) / name
        for dirpath, _dirs, names in os.walk(folder, onerror=_unlistable)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
    ]
    return sorted(found)


def _scan(folder: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    """List image files per class folder; the class list comes from train/."""
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        _unlistable(exc)
    found = sorted(p for p in entries if p.is_dir() and not p.name.startswith("."))
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
        files = _image_files(cdir) if cdir.is_dir() else []
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


def read_labels_csv(path: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Read ``filename,target[,target2...]`` rows; every problem names the file and line.

    File names must stay inside the CSV's folder: a row cannot make the loader read
    ``../../etc/passwd`` or an absolute path.
    """
    folder = Path(os.path.realpath(path.parent))
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [
                (n, row) for n, row in enumerate(csv.reader(fh), 1) if any(c.strip() for c in row)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not rows:
        raise DataError(f"{path} is empty; write one row per image: filename,target[,target2...]")
    names: list[str] | None = None
    if rows[0][1][0].strip().lower() in ("filename", "file", "path", "image"):
        names = [c.strip() for c in rows[0][1][1:]]
        rows = rows[1:]
    width = len(names) if names is not None else len(rows[0][1]) - 1 if rows else 0
    if width < 1:
        raise DataError(f"{path}: each row needs a file name and at least one target value.")
    names = names or ["target"] + [f"target{i}" for i in range(2, width + 1)]
    paths: list[Path] = []
    values: list[list[float]] = []
    for line, row in rows:
        if len(row) != width + 1:
            raise DataError(
                f"{path} line {line}: {len(row)} columns, expected {width + 1} "
                f"(filename,{','.join(names)})."
            )
        file = _row_file(folder, row[0], path, line)
        try:
            vals = [float(c) for c in row[1:]]
        except ValueError:
            raise DataError(f"{path} line {line}: targets {row[1:]} are not all numbers.") from None
        if not all(math.isfinite(v) for v in vals):
            raise DataError(f"{path} line {line}: target values must be finite, got {row[1:]}.")
        paths.append(file)
        values.append(vals)
    if not paths:
        raise DataError(f"{path} has a header but no rows.")
    return paths, np.asarray(values, dtype=np.float32), names


def _row_file(folder: Path, name: str, path: Path, line: int) -> Path:
    """The image a CSV row names, checked to exist inside the CSV's ``folder``."""
    # realpath, not Path.resolve: on Python 3.11 resolve raises RuntimeError for a
    # symlink loop, where realpath stops and leaves the loop to the check below.
    file = Path(os.path.realpath(folder / name.strip()))
    if not file.is_relative_to(folder):
        raise DataError(
            f"{path} line {line}: file name {name!r} points outside {folder}. Use paths "
            "relative to the CSV's folder, without '..' or absolute paths."
        )
    if not file.is_file():
        problem = file_problem(file) or "not a regular file"
        raise DataError(
            f"{path} line {line}: image {file} cannot be used: {problem}. Fix the row or the file."
        )
    return file


# The header of a multi-label labels.csv, when it has one (the first cell names it).
HEADER_CELLS = ("filename", "file", "path", "image")


def read_label_sets_csv(
    path: Path, classes: list[str] | None = None
) -> tuple[list[Path], np.ndarray, list[str]]:
    """Read multi-label ``filename,labels`` rows (labels separated by spaces).

    An optional header row starts with ``filename`` (or ``file``, ``path``, ``image``).
    An empty labels cell is an image without labels. Every problem names the file and
    line: a blank line, a row without its labels cell, a missing image, a label outside
    ``classes``.

    Args:
        path: the CSV file.
        classes: the class names (train's, for val and test); None for train, whose
            classes are every label its rows use, sorted.

    Returns:
        The image paths, float32 0/1 label rows (N, classes) and the class names.
    """
    folder = Path(os.path.realpath(path.parent))
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(enumerate(csv.reader(fh), 1))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    form = "filename,labels with the labels separated by spaces (a.jpg,cat dog)"
    # Blank lines at the end are a trailing newline's doing; one between rows is a mistake.
    while rows and not any(c.strip() for c in rows[-1][1]):
        rows.pop()
    if rows and rows[0][1] and rows[0][1][0].strip().lower() in HEADER_CELLS:
        rows = rows[1:]
    if not rows:
        raise DataError(f"{path} has no rows; write one row per image: {form}.")
    files: list[Path] = []
    sets: list[list[str]] = []
    for line, row in rows:
        if not any(c.strip() for c in row):
            raise DataError(
                f"{path} line {line} is empty. Remove it, or write the image's row: {form}."
            )
        if len(row) != 2:
            extra = " (write `a.jpg,` for an image without labels)" if len(row) == 1 else ""
            raise DataError(
                f"{path} line {line}: {len(row)} columns, expected 2: {form}{extra}. Quote a "
                'file name that holds a comma ("a,b.jpg").'
            )
        if ";" in row[1]:
            raise DataError(
                f"{path} line {line}: labels {row[1]!r} hold ';'; separate labels with "
                "spaces (a.jpg,cat dog)."
            )
        files.append(_row_file(folder, row[0], path, line))
        sets.append(row[1].split())
    names = classes if classes is not None else sorted({c for s in sets for c in s})
    if not names:
        raise DataError(f"{path}: no row has a label; give each image its labels: {form}.")
    index = {c: i for i, c in enumerate(names)}
    values = np.zeros((len(files), len(names)), np.float32)
    for (line, _), labels, row_values in zip(rows, sets, values, strict=True):
        unknown = [c for c in labels if c not in index]
        if unknown:
            raise DataError(
                f"{path} line {line}: label {unknown[0]!r} is not a class of train's "
                f"labels.csv ({', '.join(names)}). Fix the row, or add an image of it to train."
            )
        row_values[[index[c] for c in labels]] = 1.0
    return files, values, names


# Reads one split's labels.csv: (files, targets, names), the names checked against train's.
CsvReader = Callable[[Path, list[str] | None], tuple[list[Path], np.ndarray, list[str]]]


def _csv_splits(
    cfg: DataConfig, root: Path, task: str, rows: str, read: CsvReader
) -> tuple[Split, Split, Split | None, list[str], list[str]]:
    """Train, val and test from labels.csv files (per split folder, or one at the root).

    Without ``val/labels.csv`` a ``data.val_split`` share of train is held out.

    Returns:
        The splits, the names train's file gives (classes or targets) and the notes.
    """
    per_split = (root / "train" / "labels.csv").is_file()
    first = root / "train" / "labels.csv" if per_split else root / "labels.csv"
    if not first.is_file():
        raise DataError(
            f"task={task} with data.name=imagefolder needs {root}/train/labels.csv (or "
            f"{root}/labels.csv): {rows}."
        )
    paths, values, names = read(first, None)
    train: Split = FileSplit(paths, values, channels=3)
    notes = []
    val_csv, test_csv = root / "val" / "labels.csv", root / "test" / "labels.csv"
    if per_split and val_csv.is_file():
        val: Split = FileSplit(*read(val_csv, names)[:2], channels=3)
    else:
        order = np.random.default_rng(cfg.split_seed).permutation(len(train))
        n_val = min(max(round(len(train) * cfg.val_split), 1), len(train) - 1)
        val = SubsetSplit(train, np.sort(order[:n_val]))
        train = SubsetSplit(train, np.sort(order[n_val:]))
        notes.append(f"no val/labels.csv: held out {n_val} training images (data.val_split)")
    test = (
        FileSplit(*read(test_csv, names)[:2], channels=3)
        if per_split and test_csv.is_file()
        else None
    )
    return train, val, test, names, notes


def _build_multilabel(cfg: DataConfig, root: Path) -> DataBundle:
    """Label sets per image from labels.csv (``filename,labels``, space-separated)."""
    rows = "rows of filename,labels with the labels separated by spaces"
    train, val, test, names, notes = _csv_splits(cfg, root, "multilabel", rows, read_label_sets_csv)
    return _bundle(cfg, train, val, test, notes, class_names=names)


def _build_regression(cfg: DataConfig, root: Path) -> DataBundle:
    """Targets per image from labels.csv (``filename,target[,target2...]``)."""
    rows = "rows of filename,target[,target2...]"
    train, val, test, names, notes = _csv_splits(cfg, root, "regression", rows, _read_targets)
    return _bundle(cfg, train, val, test, notes, target_names=names)


def _bundle(
    cfg: DataConfig,
    train: Split,
    val: Split,
    test: Split | None,
    notes: list[str],
    class_names: list[str] | None = None,
    target_names: list[str] | None = None,
) -> DataBundle:
    """RGB files of any size, resized to ``data.image_size`` (224), ImageNet statistics."""
    return DataBundle(
        train=train,
        val=val,
        test=test,
        class_names=class_names or [],
        target_names=target_names or [],
        in_channels=3,
        image_size=cfg.image_size or DEFAULT_IMAGE_SIZES["imagefolder"],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        same_size=False,
        notes=notes,
    )


def _read_targets(path: Path, names: list[str] | None) -> tuple[list[Path], np.ndarray, list[str]]:
    """A regression labels.csv; val's and test's must list train's targets, in its order."""
    paths, values, own = read_labels_csv(path)
    if names is not None and own != names:
        raise DataError(
            f"{path} has targets {own} but train's labels.csv has {names}; every split "
            "must list the same targets in the same order."
        )
    return paths, values, own


@register_source(
    "imagefolder",
    uses=("root", "val_split", "on_error", "augment"),
    tasks=("classification", "multilabel", "regression"),
)
def build_imagefolder(cfg: DataConfig, task: str) -> DataBundle:
    """Build splits from a folder tree; val is split off train when root/val is absent."""
    if cfg.root is None:
        raise DataError(
            "data.name=imagefolder needs data.root: a folder with train/<class>/ images "
            "(and optionally val/ and test/). Pass data.root=PATH."
        )
    root = Path(cfg.root).expanduser()
    if task == "regression":
        return _build_regression(cfg, root)
    if task == "multilabel":
        return _build_multilabel(cfg, root)
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
    return _bundle(cfg, train, val, test, notes, class_names=names)
