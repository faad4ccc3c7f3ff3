"""Time to accuracy: visiontrain's shipped configs against the seed material's recipe.

What is compared
    Two recipes per data set, both fed by visiontrain's own loader (same splits, same
    uint8 images, the same on-device normalisation with the data set's mean and std):

    * ``visiontrain``: the shipped config as ``visiontrain train configs/<name>.yaml``
      runs it (``build_config`` + ``assemble``, every callback, its own validation
      each epoch, early stopping, schedule, augmentation).
    * ``reference``: the recipe of the seed material's MNIST exercise, written here
      from its description: a small conv net (two stages of 3x3 conv, BatchNorm, ReLU
      and 2x2 max-pool, 32 then 64 channels, then a 128-unit hidden layer), Kaiming
      initialisation, AdamW at 1e-3 (torch defaults otherwise), batch 128, cross
      entropy, gradient norm clipped at 1.0, no schedule, no augmentation, no
      validation. It is trained by a plain loop over a visiontrain loader built with
      ``data.batch_size=128 data.augment=none``.

    Targets (``--digits-target``, ``--defects-target``):

    * ``digits``: test accuracy ≥ 0.99 (at most 3 of the 359 test digits wrong).
    * ``defects``: test macro F1 ≥ 0.84, the median final test macro F1 of the shipped
      default config (``configs/defects.yaml``) over training seeds 0, 1, 2 in
      ``benchmarks/imbalance.py`` (0.920, 0.842, 0.842; docs/benchmarks.md).

    Each recipe trains for at most the shipped config's epoch budget (digits 20,
    defects 12; ``--max-epochs`` overrides), seeds ``--seeds`` (0 1 2).

What is timed
    Wall time from the start of training to the end of the first epoch after which
    the test metric reaches the target: training, and for visiontrain its per-epoch
    validation and logging (part of its recipe). The test split is evaluated after
    every epoch **for this benchmark only** (a normal run tests once, at the end) and
    that evaluation is not timed. A recipe that misses the target is reported as
    ``not reached in N epochs`` (N: the epochs it ran; visiontrain's early stopping may
    end it before the budget). Runs stop as soon as they reach the target.

Method
    For each seed, for each data set: visiontrain, then the reference, alternating,
    so that drift in machine load hits both alike; all in one process with the torch
    thread count ``assemble`` chooses (both recipes use it). Reported: per-seed
    time and epoch, the median time to target per recipe and data set (a recipe that
    missed the target on a seed counts as infinitely slow), and the ratio
    ``reference/visiontrain`` of the medians (above 1: visiontrain is the faster).

Run ``python benchmarks/time_to_accuracy.py --help`` for the options; ``--quick`` is a
seconds-long smoke run (a few batches, one seed, one epoch or two) used by the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from common import private_cache
from visiontrain.api import assemble
from visiontrain.config import Config, load_config
from visiontrain.data import DataBundle, build_data
from visiontrain.data.pipeline import build_loaders
from visiontrain.data.transforms import Normalizer
from visiontrain.engine.callbacks import Callback
from visiontrain.engine.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# data set -> (test metric, default target)
TARGETS: dict[str, tuple[str, float]] = {
    "digits": ("accuracy", 0.99),
    "defects": ("macro_f1", 0.84),
    "imagefolder": ("accuracy", 0.95),
}
# Run without --datasets; imagefolder (a ResNet-18 on real photos) takes minutes a run.
DEFAULT_DATASETS = ("digits", "defects")
# --quick: a few batches of each data set, so that every code path runs in seconds.
QUICK_OVERRIDES = {
    "digits": ["data.train_size=128"],
    "defects": ["data.train_size=128", "data.val_size=64", "data.test_size=64"],
    "imagefolder": ["data.image_size=32", "model.name=simple_cnn", "model.drop_path=0"],
}
# The image folder: JPEG crops of real photos (benchmarks/loader.py's generator), one class
# per photo; images per class in train/ (val is held out of it by the config) and test/.
FOLDER_IMAGES = {"train": 60, "test": 20}
QUICK_FOLDER_IMAGES = {"train": 8, "test": 3}


@dataclass(frozen=True)
class Settings:
    """Resolved benchmark settings."""

    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    targets: dict[str, float]
    max_epochs: int | None
    quick: bool
    folder: Path | None = None  # the imagefolder data set's root (set by main)


@dataclass
class Outcome:
    """One run: the epoch and seconds at which it reached the target, if it did."""

    recipe: str
    dataset: str
    seed: int
    epochs_run: int
    seconds: float | None  # None: target not reached
    epoch: int | None
    best: float  # the best test metric seen

    @property
    def reached(self) -> bool:
        """Whether the run reached its target."""
        return self.seconds is not None


def parse_args(argv: Sequence[str] | None) -> Settings:
    """Command-line flags."""
    p = argparse.ArgumentParser(
        description="Wall time to a test-accuracy target: visiontrain's shipped configs "
        "against the seed material's reference recipe, alternating, several seeds."
    )
    p.add_argument("--quick", action="store_true", help="tiny data, 1-2 epochs (smoke test)")
    p.add_argument(
        "--datasets",
        nargs="+",
        default=list(DEFAULT_DATASETS),
        choices=list(TARGETS),
        help=f"data sets (default: {' '.join(DEFAULT_DATASETS)})",
    )
    p.add_argument("--seeds", nargs="+", type=int, help="training seeds (default 0 1 2)")
    p.add_argument("--digits-target", type=float, default=TARGETS["digits"][1])
    p.add_argument("--defects-target", type=float, default=TARGETS["defects"][1])
    p.add_argument("--imagefolder-target", type=float, default=TARGETS["imagefolder"][1])
    p.add_argument(
        "--data",
        type=Path,
        help="imagefolder: keep the generated photo folder here and reuse it (default: a "
        "temporary folder)",
    )
    p.add_argument(
        "--max-epochs", type=int, help="epoch budget of both recipes (default: the config's)"
    )
    args = p.parse_args(argv)
    if args.max_epochs is not None and args.max_epochs < 1:
        p.error("--max-epochs must be positive")
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    max_epochs = args.max_epochs if args.max_epochs is not None else (2 if args.quick else None)
    return Settings(
        datasets=tuple(args.datasets),
        seeds=tuple(seeds),
        targets={
            "digits": args.digits_target,
            "defects": args.defects_target,
            "imagefolder": args.imagefolder_target,
        },
        max_epochs=max_epochs,
        quick=args.quick,
        folder=args.data,
    )


def config_for(dataset: str, s: Settings, seed: int, extra: Sequence[str] = ()) -> Config:
    """The shipped config of ``dataset`` with the seed, budget and any extra overrides."""
    overrides = [f"train.seed={seed}", "train.device=cpu", *extra]
    if s.max_epochs is not None:
        # An explicit epoch budget: the recipe's update floor would lengthen it.
        overrides += [f"train.epochs={s.max_epochs}", "train.min_updates=null"]
    if s.quick:
        overrides.extend(QUICK_OVERRIDES[dataset])
    if dataset == "imagefolder":
        assert s.folder is not None
        overrides.append(f"data.root={s.folder}")
    return load_config(CONFIGS / f"{dataset}.yaml", overrides)


def make_photo_folder(root: Path, quick: bool) -> None:
    """train/ and test/ of JPEG crops of real photos, one class per photo (kept if present).

    Each image is a random crop of its photo (30-100% of the area), resized to 256-512 px
    a side and saved at quality 90, as ``benchmarks/loader.py`` makes them.
    """
    from PIL import Image

    from loader import photos, random_crop

    counts = QUICK_FOLDER_IMAGES if quick else FOLDER_IMAGES
    done = root / ".complete"
    if done.exists() and done.read_text() == repr(counts):
        return
    rng = np.random.default_rng(0)
    sides = (64, 97) if quick else (256, 513)
    for name, photo in sorted(photos().items()):
        for split, n in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = (int(v) for v in rng.integers(*sides, size=2))
                crop = Image.fromarray(random_crop(photo, rng)).resize((w, h), Image.BILINEAR)
                crop.save(folder / f"{i}.jpg", quality=90)
    done.write_text(repr(counts))


# ---------------------------------------------------------------------- visiontrain


class TargetReached(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised from the epoch-end hook to end ``fit`` early: the clock has what it needs."""


class TestEveryEpoch(Callback):
    """Benchmark only: test after every epoch, off the clock, and stop at the target."""

    name = "time_to_accuracy"

    def __init__(self, metric: str, target: float) -> None:
        self.metric, self.target = metric, target
        self.start = 0.0
        self.paused = 0.0  # seconds spent testing, taken off the clock
        self.seconds: float | None = None
        self.epoch: int | None = None
        self.best = -math.inf
        self.epochs_run = 0

    def on_epoch_end(self, trainer: Trainer) -> None:
        elapsed = time.perf_counter() - self.start - self.paused
        pause = time.perf_counter()
        test = trainer.loaders.test
        assert test is not None
        value = float(trainer.evaluate(test, "test", emit=False)[self.metric])
        self.paused += time.perf_counter() - pause
        self.epochs_run = trainer.epochs_done
        self.best = max(self.best, value)
        if value >= self.target:
            self.seconds, self.epoch = elapsed, trainer.epochs_done
            raise TargetReached


def run_visiontrain(dataset: str, s: Settings, seed: int, tmp: Path) -> Outcome:
    """The shipped config through ``assemble`` and ``fit``, tested every epoch."""
    metric, target = TARGETS[dataset][0], s.targets[dataset]
    cfg = config_for(
        dataset, s, seed, [f"run.dir={tmp}", f"run.name={dataset}-vt-{seed}", "train.progress=none"]
    )
    with open(os.devnull, "w") as sink:
        trainer = assemble(cfg, Console(file=sink))
        assert trainer is not None
        probe = TestEveryEpoch(metric, target)
        # Last in the list: an epoch's own end-of-epoch work (the checkpoint files) is on
        # the clock before the probe reads it.
        trainer.callbacks.append(probe)
        try:
            probe.start = time.perf_counter()
            trainer.fit()
        except TargetReached:
            pass
        finally:
            for cb in trainer.callbacks:
                cb.close()
    return Outcome(
        "visiontrain", dataset, seed, probe.epochs_run, probe.seconds, probe.epoch, probe.best
    )


# ---------------------------------------------------------------------- the reference


class ReferenceNet(nn.Module):
    """The seed material's small conv net: two conv stages and a 128-unit classifier."""

    def __init__(self, in_chans: int, num_classes: int, image_size: int) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]

        self.features = nn.Sequential(*stage(in_chans, 32), *stage(32, 64))
        side = image_size // 4  # two 2x2 pools
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.classifier(self.features(x))


def test_metric(
    model: nn.Module, loader: Any, norm: Normalizer, num_classes: int, metric: str
) -> float:
    """Test accuracy or macro F1 of ``model`` (the benchmark's per-epoch probe)."""
    model.eval()
    preds, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            preds.append(model(norm(batch["image"])).argmax(1))
            labels.append(batch["target"])
    model.train()
    p, y = torch.cat(preds), torch.cat(labels)
    if metric == "accuracy":
        return float((p == y).float().mean())
    f1s = []
    for c in range(num_classes):
        tp = float(((p == c) & (y == c)).sum())
        denom = float((p == c).sum() + (y == c).sum())
        f1s.append(2 * tp / denom if denom else 0.0)
    return statistics.fmean(f1s)


def run_reference(dataset: str, s: Settings, seed: int) -> Outcome:
    """The reference recipe, trained by a plain loop over a visiontrain loader."""
    metric, target = TARGETS[dataset][0], s.targets[dataset]
    cfg = config_for(dataset, s, seed, ["data.batch_size=128", "data.augment=none"])
    bundle: DataBundle = build_data(cfg.data, cfg.task)
    loaders = build_loaders(cfg, bundle, torch.device("cpu"))
    assert loaders.test is not None
    torch.manual_seed(seed)
    model = ReferenceNet(bundle.in_channels, bundle.num_classes, bundle.image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    norm = Normalizer(tuple(bundle.mean), tuple(bundle.std))
    outcome = Outcome("reference", dataset, seed, 0, None, None, -math.inf)
    clock = 0.0
    model.train()
    for epoch in range(cfg.train.epochs):
        start = time.perf_counter()
        loaders.train.batch_sampler.set_epoch(epoch)
        for batch in loaders.train:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(norm(batch["image"])), batch["target"])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        clock += time.perf_counter() - start
        value = test_metric(model, loaders.test, norm, bundle.num_classes, metric)
        outcome.epochs_run, outcome.best = epoch + 1, max(outcome.best, value)
        if value >= target:
            outcome.seconds, outcome.epoch = clock, epoch + 1
            break
    return outcome


# ---------------------------------------------------------------------- reporting


def describe(o: Outcome) -> str:
    """``12.3 s (epoch 4)`` or ``not reached in N epochs``."""
    if o.seconds is None:
        return f"not reached in {o.epochs_run} epochs"
    return f"{o.seconds:.1f} s (epoch {o.epoch})"


def report(outcomes: list[Outcome], s: Settings) -> None:
    """Per-seed table, medians and the ratio line per data set."""
    print()
    print("| data | target | recipe | " + " | ".join(f"seed {x}" for x in s.seeds) + " | median |")
    print("|---|---|---|" + "---|" * (len(s.seeds) + 1))
    ratios = []
    for dataset in s.datasets:
        metric = TARGETS[dataset][0]
        medians: dict[str, float] = {}
        for recipe in ("visiontrain", "reference"):
            runs = [o for o in outcomes if o.dataset == dataset and o.recipe == recipe]
            # A miss counts as infinitely slow: the median is then a miss when most are.
            med = statistics.median(o.seconds if o.reached else math.inf for o in runs)
            medians[recipe] = med
            cells = " | ".join(f"{describe(o)}, best {o.best:.3f}" for o in runs)
            shown = f"{med:.1f} s" if math.isfinite(med) else "not reached"
            print(
                f"| {dataset} | {metric} ≥ {s.targets[dataset]:g} | {recipe} | {cells} | {shown} |"
            )
        vt, ref = medians["visiontrain"], medians["reference"]
        if math.isfinite(vt) and math.isfinite(ref):
            ratio = f"{ref / vt:.2f}"
        elif math.isfinite(vt):
            ratio = "inf (the reference did not reach the target)"
        elif math.isfinite(ref):
            ratio = "0.00 (visiontrain did not reach the target)"
        else:
            ratio = "n/a (neither reached the target)"
        ratios.append(f"ratio reference/visiontrain {dataset}: {ratio}")
    print()
    for line in ratios:
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    s = parse_args(argv)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"visiontrain time to accuracy: {', '.join(s.datasets)}; seeds "
        f"{' '.join(map(str, s.seeds))}; targets "
        + ", ".join(f"{d} test {TARGETS[d][0]} ≥ {s.targets[d]:g}" for d in s.datasets)
    )
    print(
        f"machine: {os.cpu_count()} logical CPUs, {platform.machine()}, torch "
        f"{torch.__version__}, python {platform.python_version()}, load average {load[0]:.2f}"
    )
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="vt-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if "imagefolder" in s.datasets:
            s = dataclasses.replace(s, folder=s.folder or tmp / "photos")
            make_photo_folder(s.folder, s.quick)
        with private_cache(tmp / "cache"):
            for seed in s.seeds:
                for dataset in s.datasets:
                    vt = run_visiontrain(dataset, s, seed, tmp / "runs")
                    # assemble set the thread count; the reference runs with the same.
                    threads = torch.get_num_threads()
                    ref = run_reference(dataset, s, seed)
                    outcomes += [vt, ref]
                    print(
                        f"  seed {seed} {dataset} ({threads} threads): visiontrain "
                        f"{describe(vt)}; reference {describe(ref)}",
                        flush=True,
                    )
    report(outcomes, s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
