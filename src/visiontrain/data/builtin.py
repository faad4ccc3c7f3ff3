"""Real datasets read from their own file formats: digits, MNIST (IDX), CIFAR (pickled batches).

``digits`` ships inside scikit-learn. MNIST and CIFAR are read from a local ``data.root``
in the layout torchvision's downloaders produce; nothing is fetched unless
``data.download=true``. CIFAR batches are Python pickles, so they are read with an
unpickler that only builds dicts, lists, strings, bytes and numpy arrays.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visiontrain.config import DataConfig
from visiontrain.data.sources import (
    DEFAULT_IMAGE_SIZES,
    ArraySplit,
    DataBundle,
    channel_stats,
    register_source,
    stratified_split,
)
from visiontrain.errors import DataError


def _resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 NHWC array once, at load (bilinear, antialiased when shrinking)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    t = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    out = torch.nn.functional.interpolate(
        t, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _bundle(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray | None,
    test_y: np.ndarray | None,
    names: list[str],
    cfg: DataConfig,
    default_size: int,
    label: str,
) -> DataBundle:
    """Split val off train (stratified), resize once, and wrap as array splits."""
    size = cfg.image_size or default_size
    keep, held = stratified_split(train_y, cfg.val_split, cfg.split_seed)
    train_x = _resize_array(train_x, size)
    mean, std = channel_stats(train_x[keep])
    test = None
    if test_x is not None and test_y is not None:
        test = ArraySplit(_resize_array(test_x, size), test_y, f"{label}/test")
    return DataBundle(
        train=ArraySplit(train_x[keep], train_y[keep], f"{label}/train"),
        val=ArraySplit(train_x[held], train_y[held], f"{label}/val"),
        test=test,
        class_names=names,
        in_channels=train_x.shape[-1],
        image_size=size,
        mean=mean,
        std=std,
    )


@register_source("digits", uses=("augment",))
def build_digits(cfg: DataConfig, task: str) -> DataBundle:
    """scikit-learn's 1,797 8x8 digits, upsampled; 20% test, then data.val_split of the rest."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    rest, test = stratified_split(labels, 0.2, cfg.split_seed + 7)
    names = [str(i) for i in range(10)]
    return _bundle(
        images[rest],
        labels[rest],
        images[test],
        labels[test],
        names,
        cfg,
        DEFAULT_IMAGE_SIZES["digits"],
        "digits",
    )


# ---------------------------------------------------------------- MNIST (IDX files)

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    # EOFError: a truncated .gz; zlib.error: damaged compressed data inside one.
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"cannot read IDX file {path}: {exc}. The file is damaged; download it again."
        ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(
            f"{path} is not an unsigned-byte IDX file (bad magic number). Replace it with "
            "the original MNIST file."
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"IDX file {path} is truncated: it ends inside its {header}-byte header. "
            "Download it again."
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape))
    if len(data) - header != count:
        raise DataError(
            f"IDX file {path} is truncated: header promises {count} bytes of data, file has "
            f"{len(data) - header}. Download it again."
        )
    # A copy: np.frombuffer over bytes is read-only, and torch cannot guard such memory.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _require_root(cfg: DataConfig) -> Path:
    if cfg.root is None:
        raise DataError(
            f"data.name={cfg.name} reads files from data.root. Pass data.root=PATH (the "
            "folder that holds the dataset), and data.download=true on a machine with "
            "internet access to fetch it there."
        )
    return Path(cfg.root).expanduser()


def _download(cfg: DataConfig, root: Path) -> None:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[cfg.name]
    try:
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(
            f"data.download=true could not fetch {cfg.name} into {root}: {exc}. Check the "
            "network, or copy the files there by hand."
        ) from None


def _read_mnist_pair(img: Path, lbl: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one images/labels pair of IDX files and check that they belong together."""
    images, labels = read_idx(img), read_idx(lbl)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(
            f"MNIST files {img} (shape {images.shape}) and {lbl} (shape {labels.shape}): "
            "expected images of N x H x W and N labels. Are the two files swapped?"
        )
    if len(images) != len(labels):
        raise DataError(f"MNIST: {img} holds {len(images)} images but {lbl} {len(labels)} labels.")
    if labels.size and labels.max() > 9:
        raise DataError(f"MNIST labels file {lbl} has labels outside 0..9 (max {labels.max()}).")
    return images, labels.astype(np.int64)


@register_source("mnist", uses=("root", "augment"))
def build_mnist(cfg: DataConfig, task: str) -> DataBundle:
    """MNIST from ``root/MNIST/raw`` (torchvision's layout) or ``root`` itself."""
    root = _require_root(cfg)
    if cfg.download:
        _download(cfg, root)
    folders = [root / "MNIST" / "raw", root]
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (img_name, lbl_name) in _MNIST_FILES.items():
        for folder in folders:
            img, lbl = _find(folder, img_name), _find(folder, lbl_name)
            if img and lbl:
                arrays[split] = _read_mnist_pair(img, lbl)
                break
    if "train" not in arrays:
        raise DataError(
            f"MNIST not found under {root}: expected {root}/MNIST/raw/"
            f"{_MNIST_FILES['train'][0]} (and the labels file, .gz accepted). Put the files "
            "there, or set data.download=true on a machine with internet access."
        )
    (tx, ty) = arrays["train"]
    test = arrays.get("test")
    names = [str(i) for i in range(10)]
    return _bundle(
        tx[..., None],
        ty.astype(np.int64),
        test[0][..., None] if test else None,
        test[1].astype(np.int64) if test else None,
        names,
        cfg,
        DEFAULT_IMAGE_SIZES["mnist"],
        "mnist",
    )


# ---------------------------------------------------------------- CIFAR (pickled batches)


class _SafeUnpickler(pickle.Unpickler):
    """Builds only numpy arrays and plain containers: a CIFAR batch, nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # Arrays pickled with protocol 5 (the numpy 2 default there) are rebuilt from a buffer.
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def read_cifar_batch(path: Path) -> dict[str, Any]:
    """Read one CIFAR python batch with the restricted unpickler; keys become str."""
    try:
        with open(path, "rb") as fh:
            obj = _SafeUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as exc:
        raise DataError(
            f"cannot read CIFAR batch {path}: {exc}. It is truncated or not a CIFAR python "
            "batch; download the dataset again."
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR batch {path} does not hold a dict.")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


_CIFAR = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "label_names",
        "labels",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "meta",
        "fine_label_names",
        "fine_labels",
    ),
}


def _read_cifar_split(
    folder: Path, files: list[str], label_key: str, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in files:
        batch = read_cifar_batch(folder / name)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            labels = np.asarray(batch[label_key], dtype=np.int64)
        except KeyError as exc:
            raise DataError(f"CIFAR batch {folder / name} has no {exc} entry.") from None
        except (TypeError, ValueError) as exc:
            raise DataError(f"CIFAR batch {folder / name} holds unexpected values: {exc}") from None
        if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(data) != len(labels):
            raise DataError(
                f"CIFAR batch {folder / name} has data of shape {data.shape} and "
                f"{len(labels)} labels; expected N x 3072 and N labels."
            )
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise DataError(
                f"CIFAR batch {folder / name} has labels outside 0..{n_classes - 1} "
                f"(`{label_key}`); is it a batch of the other CIFAR dataset?"
            )
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def _build_cifar(cfg: DataConfig, task: str) -> DataBundle:
    folder_name, train_files, test_files, meta_name, names_key, label_key = _CIFAR[cfg.name]
    root = _require_root(cfg)
    if cfg.download:
        _download(cfg, root)
    folder = root / folder_name if (root / folder_name).is_dir() else root
    missing = [f for f in train_files if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{cfg.name} not found under {root}: expected {root}/{folder_name}/ with "
            f"{', '.join(train_files)}. Extract the python version of the dataset there, or "
            "set data.download=true on a machine with internet access."
        )
    n_classes = 10 if cfg.name == "cifar10" else 100
    tx, ty = _read_cifar_split(folder, train_files, label_key, n_classes)
    test = None
    if all((folder / f).is_file() for f in test_files):
        test = _read_cifar_split(folder, test_files, label_key, n_classes)
    names = [str(i) for i in range(n_classes)]
    if (folder / meta_name).is_file():
        meta = read_cifar_batch(folder / meta_name)
        raw = meta.get(names_key)
        if isinstance(raw, list) and len(raw) == n_classes:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw]
    return _bundle(
        tx,
        ty,
        test[0] if test else None,
        test[1] if test else None,
        names,
        cfg,
        DEFAULT_IMAGE_SIZES[cfg.name],
        cfg.name,
    )


register_source("cifar10", uses=("root", "augment"))(_build_cifar)
register_source("cifar100", uses=("root", "augment"))(_build_cifar)
