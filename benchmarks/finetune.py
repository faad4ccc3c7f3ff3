"""Fine-tuning against training from scratch, with few labels, on generated shapes.

What is compared
    One visual domain, generated here as 32 px PNG files in imagefolder layout (seeded,
    written fresh into a temporary folder): a filled shape of a random colour, size,
    position and rotation on a background of a random colour with a gradient or
    stripes, a few random clutter lines and pixel noise.

    * SOURCE task: 10 shapes (circle, triangle, square, pentagon, five-pointed star,
      plus, ring, crescent, arrow, T), 250 training and 30 validation images each.
      ``--model`` (default timm's ``test_resnet``, a 0.4 M-parameter ResNet that trains at
      a few hundred images/s on one CPU thread at 32 px) is trained on it by ``vt.train``
      (AdamW at 3e-3, batch 32, ``--source-epochs`` 15, warmup + cosine); its weights
      are put into a fresh ``timm.create_model`` and written with timm's own
      ``timm.models.save_for_hf`` (``model.safetensors``): that third-party file is
      what ``model.weights`` loads.
    * TARGET task: 6 other shapes of the same domain (hexagon, four-pointed star,
      heart, L, semicircle, ellipse) with ``--budgets`` labelled training images per
      class (default 10, 50, 200; the smaller sets are subsets of the larger), a fixed
      validation set of 20 per class (best-epoch selection) and a fixed test set of 100
      per class.

    Per budget, four variants train the same model on the target:

    * ``scratch``: timm's initialisation.
    * ``finetune``: ``model.weights=<source>/model.safetensors`` (the 10-class head is
      re-initialised for 6 classes), everything trains at ``optim.lr``.
    * ``freeze_epochs=1``: the same plus ``train.freeze_epochs=1`` (the head alone for
      the first epoch, then everything, each phase with its own warmup and decay).
    * ``layer_decay=D``: the same plus ``optim.layer_decay=D`` (``--layer-decay``, 0.7).

    Within a budget every variant has the same epochs, batch size, number of optimizer
    updates, LR and schedule (AdamW at 2e-3, weight decay 0.01, warmup + cosine),
    augmentation (``light``) and seed set (``--seeds``; a seed sets the initialisation
    of what is not loaded, the order and the augmentation, never the data). Batch 32 (16
    under 320 training images); epochs: enough for at least 90 updates, between 10 and
    30. Reported: the mean ± std (sample std over seeds) of the target's test accuracy
    and macro F1 with the weights of the best validation epoch (``val/loss``), and the
    accuracy gain over scratch at the same budget.

Usage
    python benchmarks/finetune.py [--budgets 10 50 200] [--seeds 0 1 2] [--out FILE.json]
    python benchmarks/finetune.py --quick     # seconds-long smoke run, not a measurement

    ``--quick``: 8 source images per class for one epoch, then one budget of 4 images per
    class with 2/4 per class for val/test, one seed, 2 epochs (``freeze_epochs=1`` needs
    an epoch after the head-only one); every variant runs.

    Runs, data and the data cache live in a temporary folder removed at the end. One
    process, one torch thread (``OMP_NUM_THREADS``, default 1: small models at 32 px gain
    nothing from a second thread on a shared 2-core machine).
"""

from __future__ import annotations

import os

# Before torch is imported (visiontrain imports it on first use).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import contextlib
import io
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common import command_line, mean_std, private_cache

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled with antialiasing
SOURCE_PER_CLASS = (250, 30)  # train, val
TARGET_VAL, TARGET_TEST = 20, 100
LR = 2e-3  # every target run (AdamW, warmup + cosine); the source trains at SOURCE_LR
MIN_UPDATES, MIN_EPOCHS, MAX_EPOCHS = 90, 10, 30
SOURCE_EPOCHS, SOURCE_LR, SOURCE_BATCH = 15, 3e-3, 32

Points = list[tuple[float, float]]


def _polygon(n: int, r: float = 1.0, inner: float | None = None) -> Points:
    """A regular ``n``-gon of radius ``r``, or an ``n``-pointed star with that inner radius."""
    k = 2 * n if inner else n
    radii = [r if not inner or i % 2 == 0 else r * inner for i in range(k)]
    angles = [2 * math.pi * i / k - math.pi / 2 for i in range(k)]
    return [(q * math.cos(a), q * math.sin(a)) for q, a in zip(radii, angles, strict=True)]


def _arc(r: float, a0: float, a1: float, n: int = 40) -> Points:
    return [
        (r * math.cos(a0 + (a1 - a0) * i / n), r * math.sin(a0 + (a1 - a0) * i / n))
        for i in range(n + 1)
    ]


def _rect(x0: float, y0: float, x1: float, y1: float) -> Points:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _heart() -> Points:
    """The classic parametric heart, point down, scaled to radius ~1."""
    ts = [2 * math.pi * i / 48 for i in range(48)]
    return [
        (
            math.sin(t) ** 3,
            -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 16,
        )
        for t in ts
    ]


TAU = 2 * math.pi
# Each shape: (fill or hole, polygon) in unit coordinates around the centre, radius ~1.
SHAPES: dict[str, Callable[[], list[tuple[bool, Points]]]] = {
    # source
    "circle": lambda: [(True, _arc(1, 0, TAU))],
    "triangle": lambda: [(True, _polygon(3, 1.1))],
    "square": lambda: [(True, _rect(-0.8, -0.8, 0.8, 0.8))],
    "pentagon": lambda: [(True, _polygon(5))],
    "star5": lambda: [(True, _polygon(5, 1.1, 0.45))],
    "plus": lambda: [(True, _rect(-1, -0.3, 1, 0.3)), (True, _rect(-0.3, -1, 0.3, 1))],
    "ring": lambda: [(True, _arc(1, 0, TAU)), (False, _arc(0.55, 0, TAU))],
    "crescent": lambda: [
        (True, _arc(1, 0, TAU)),
        (False, [(x + 0.5, y - 0.2) for x, y in _arc(0.85, 0, TAU)]),
    ],
    "arrow": lambda: [
        (
            True,
            [(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25), (-1, 0.25)],
        )
    ],
    "tee": lambda: [(True, _rect(-1, -1, 1, -0.45)), (True, _rect(-0.28, -1, 0.28, 1))],
    # target
    "hexagon": lambda: [(True, _polygon(6))],
    "star4": lambda: [(True, _polygon(4, 1.15, 0.4))],
    "heart": lambda: [(True, _heart())],
    "ell": lambda: [(True, _rect(-0.8, -1, -0.25, 1)), (True, _rect(-0.8, 0.45, 0.8, 1))],
    "semicircle": lambda: [(True, _arc(1, math.pi, TAU, 30))],
    "ellipse": lambda: [(True, [(x, 0.5 * y) for x, y in _arc(1, 0, TAU)])],
}
SOURCE = [
    "circle",
    "triangle",
    "square",
    "pentagon",
    "star5",
    "plus",
    "ring",
    "crescent",
    "arrow",
    "tee",
]
TARGET = ["hexagon", "star4", "heart", "ell", "semicircle", "ellipse"]


def render(shape: str, rng: np.random.Generator) -> Image.Image:
    """One image of ``shape``: the domain both tasks share (see the module docstring)."""
    w = IMAGE_SIZE * SUPERSAMPLE
    base = rng.integers(0, 256, 3)
    pixels = np.empty((w, w, 3), np.float32)
    pixels[:] = base
    yy, xx = np.mgrid[0:w, 0:w] / w
    angle = rng.uniform(0, TAU)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    if rng.random() < 0.5:  # a colour gradient
        pixels += ramp * rng.uniform(-80, 80, 3)
    else:  # stripes
        pixels += np.sin(ramp * rng.uniform(3, 8) * TAU) * rng.uniform(10, 40)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 4)):  # clutter
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line(list(rng.uniform(0, w, 4)), fill=colour, width=int(rng.integers(1, 3)) * 2)
    # The shape's colour differs from the background by 70-160 per channel (mod 256).
    colour = tuple(int(c) for c in (base + rng.choice([-1, 1], 3) * rng.integers(70, 160, 3)) % 256)
    r = rng.uniform(0.25, 0.42) * w
    cx, cy = rng.uniform(r + 2, w - r - 2, 2)
    turn = rng.uniform(0, TAU)
    cos, sin = math.cos(turn), math.sin(turn)
    mask = Image.new("L", (w, w), 0)
    mask_draw = ImageDraw.Draw(mask)
    for fill, points in SHAPES[shape]():
        placed = [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]
        mask_draw.polygon(placed, fill=255 if fill else 0)
    image.paste(Image.new("RGB", (w, w), colour), (0, 0), mask)
    small = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)).astype(np.int16)
    small += rng.integers(-12, 13, small.shape, dtype=np.int16)  # sensor noise
    return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8))


def write_split(folder: Path, shapes: Sequence[str], per_class: int, seed: int) -> None:
    """``folder/<shape>/NNNN.png``, ``per_class`` each, from its own seeded stream."""
    for k, shape in enumerate(shapes):
        rng = np.random.default_rng([seed, k])
        (folder / shape).mkdir(parents=True)
        for i in range(per_class):
            render(shape, rng).save(folder / shape / f"{i:04d}.png")


def make_data(root: Path, budgets: Sequence[int], sizes: dict[str, int]) -> dict[str, Path]:
    """Source and per-budget target folders; returns their roots by name.

    The target's training images of a smaller budget are the first ones of the largest
    (the same files, copied), and every budget shares the same val and test files.
    """
    write_split(root / "source" / "train", SOURCE, sizes["source_train"], seed=1)
    write_split(root / "source" / "val", SOURCE, sizes["source_val"], seed=2)
    pool = root / "target-pool"
    write_split(pool / "train", TARGET, max(budgets), seed=3)
    write_split(pool / "val", TARGET, sizes["target_val"], seed=4)
    write_split(pool / "test", TARGET, sizes["target_test"], seed=5)
    roots = {"source": root / "source"}
    for n in budgets:
        budget_root = root / f"target-{n}"
        for split in ("train", "val", "test"):
            for shape in TARGET:
                files = sorted((pool / split / shape).iterdir())
                if split == "train":
                    files = files[:n]
                (budget_root / split / shape).mkdir(parents=True)
                for f in files:
                    (budget_root / split / shape / f.name).write_bytes(f.read_bytes())
        roots[f"target-{n}"] = budget_root
    return roots


@dataclass(frozen=True)
class Budget:
    """The training length of every variant at one budget."""

    per_class: int
    batch: int
    epochs: int

    @property
    def images(self) -> int:
        return self.per_class * len(TARGET)

    @property
    def updates(self) -> int:
        return self.epochs * (self.images // self.batch)  # data.drop_last is on


def budget_for(per_class: int, quick: bool) -> Budget:
    """Batch 32 (16 under 320 images); epochs for >= MIN_UPDATES updates, clamped."""
    images = per_class * len(TARGET)
    batch = max(2, min(32 if images >= 320 else 16, images // 2))
    if quick:  # two epochs: freeze_epochs=1 needs one after the head-only phase
        return Budget(per_class, batch, 2)
    epochs = math.ceil(MIN_UPDATES / (images // batch))
    return Budget(per_class, batch, min(MAX_EPOCHS, max(MIN_EPOCHS, epochs)))


COMMON = [
    f"data.image_size={IMAGE_SIZE}",
    "data.name=imagefolder",
    "data.cache=disk",
    "train.progress=none",
    "run.report=false",
    "run.loggers=[jsonl]",
    "run.keep_last=0",  # best.pt and last.pt only: no per-epoch copies to write
]


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Hold back the runs' own ``note:`` lines (yielded); written out if the run fails."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield buffer
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise


def pretrain(roots: dict[str, Path], runs: Path, model: str, epochs: int) -> tuple[Path, dict]:
    """Train the source task, then write its weights with timm's ``save_for_hf``."""
    import timm
    from timm.models import save_for_hf

    import visiontrain as vt

    with quiet():
        result = vt.train(
            None,
            *COMMON,
            f"data.root={roots['source']}",
            f"model.name={model}",
            f"data.batch_size={SOURCE_BATCH}",
            f"optim.lr={SOURCE_LR}",
            f"train.epochs={epochs}",
            "train.seed=0",
            f"run.dir={runs}",
            "run.name=source",
        )
        trained = vt.load(result.run_dir).model
    # A fresh timm model holds the weights: the file is timm's own format, not ours.
    fresh = timm.create_model(model, num_classes=len(SOURCE))
    fresh.load_state_dict(trained.state_dict())
    folder = runs / "source-timm"
    save_for_hf(fresh, folder, safe_serialization=True)  # model.safetensors + config.json
    return folder / "model.safetensors", result.metrics["val"]


def variants(weights: Path, layer_decay: float) -> dict[str, list[str]]:
    """The target runs' extra keys, by variant name."""
    tuned = [f"model.weights={weights}"]
    return {
        "scratch": [],
        "finetune": tuned,
        "freeze_epochs=1": [*tuned, "train.freeze_epochs=1"],
        f"layer_decay={layer_decay:g}": [*tuned, f"optim.layer_decay={layer_decay}"],
    }


def train_target(
    root: Path, budget: Budget, model: str, keys: list[str], seed: int, runs: Path, name: str
) -> dict[str, float]:
    """One target run; its test accuracy, macro F1 and seconds."""
    import visiontrain as vt

    start = time.perf_counter()
    with quiet() as notes:
        result = vt.train(
            None,
            *COMMON,
            f"data.root={root}",
            f"model.name={model}",
            f"data.batch_size={budget.batch}",
            f"optim.lr={LR}",
            f"train.epochs={budget.epochs}",
            f"train.seed={seed}",
            *keys,
            f"run.dir={runs}",
            f"run.name={name}",
        )
    test = result.metrics["test"]
    return {
        "seed": seed,
        "accuracy": test["accuracy"],
        "macro_f1": test["macro_f1"],
        "best_epoch": result.summary["best_epoch"],
        "seconds": time.perf_counter() - start,
        "notes": [line for line in notes.getvalue().splitlines() if "model.weights" in line],
    }


def markdown(results: dict[int, dict[str, list[dict]]], budgets: dict[int, Budget]) -> str:
    """One row per budget and variant; the gain is against scratch at the same budget."""
    lines = [
        "| labels/class | epochs | updates | variant | test accuracy | test macro F1 "
        "| Δ accuracy vs scratch |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for n, by_variant in results.items():
        b = budgets[n]
        scratch = statistics.mean(r["accuracy"] for r in by_variant["scratch"])
        for name, runs in by_variant.items():
            acc = [r["accuracy"] for r in runs]
            gain = "—" if name == "scratch" else f"{statistics.mean(acc) - scratch:+.3f}"
            lines.append(
                f"| {n} | {b.epochs} | {b.updates} | {name} | {mean_std(acc)} | "
                f"{mean_std([r['macro_f1'] for r in runs])} | {gain} |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=[10, 50, 200],
        help="labelled training images per target class (default 10 50 200)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="test_resnet", help="a timm model name")
    parser.add_argument("--layer-decay", type=float, default=0.7)
    parser.add_argument("--source-epochs", type=int, default=SOURCE_EPOCHS)
    parser.add_argument("--out", type=Path, default=None, help="also write the results here (JSON)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, not a measurement")
    args = parser.parse_args(argv)
    if args.quick:
        args.budgets, args.seeds, args.source_epochs = [4], args.seeds[:1], 1
    if min(args.budgets) < 1:
        parser.error("--budgets must be positive")
    if not 0 < args.layer_decay <= 1:
        parser.error("--layer-decay must be in (0, 1]")
    args.budgets = sorted(set(args.budgets))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the data, pretrain, run every budget, variant and seed; print the table."""
    args = parse_args(argv)
    began = time.perf_counter()
    train, val = (8, 2) if args.quick else SOURCE_PER_CLASS
    sizes = {
        "source_train": train,
        "source_val": val,
        "target_val": TARGET_VAL,
        "target_test": TARGET_TEST,
    }
    if args.quick:
        sizes.update(target_val=2, target_test=4)
    budgets = {n: budget_for(n, args.quick) for n in args.budgets}
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"command: {command_line()}")
    print(
        f"machine: {os.cpu_count()} logical CPUs, {platform.machine()}, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load average {load:.2f}"
    )
    print(
        f"model {args.model} at {IMAGE_SIZE} px; source {len(SOURCE)} classes x "
        f"{sizes['source_train']} train; target {len(TARGET)} classes, val "
        f"{sizes['target_val']}/class, test {sizes['target_test']}/class; seeds {args.seeds}"
        + ("  [--quick: a smoke run, not a measurement]" if args.quick else ""),
        flush=True,
    )
    results: dict[int, dict[str, list[dict]]] = {n: {} for n in args.budgets}
    with tempfile.TemporaryDirectory(prefix="vt-bench-finetune-") as tmp_name:
        tmp = Path(tmp_name)
        with private_cache(tmp / "cache"):
            t = time.perf_counter()
            roots = make_data(tmp / "data", args.budgets, sizes)
            print(f"data written in {time.perf_counter() - t:.1f} s", flush=True)
            t = time.perf_counter()
            weights, source_val = pretrain(roots, tmp / "runs", args.model, args.source_epochs)
            print(
                f"source: {args.source_epochs} epochs in {time.perf_counter() - t:.0f} s, val "
                f"accuracy {source_val['accuracy']:.3f}; weights {weights.name} "
                "(timm.models.save_for_hf)",
                flush=True,
            )
            runs = variants(weights, args.layer_decay)
            shown_notes = False
            for seed in args.seeds:  # seed-major: drift in machine load hits every variant
                for n, budget in budgets.items():
                    for name, keys in runs.items():
                        root, run_name = roots[f"target-{n}"], f"{n}-{name}-seed{seed}"
                        r = train_target(
                            root, budget, args.model, keys, seed, tmp / "runs", run_name
                        )
                        if name == "finetune" and not shown_notes:  # what model.weights did
                            print("\n".join(f"  {line}" for line in r["notes"]))
                            shown_notes = True
                        results[n].setdefault(name, []).append(r)
                        print(
                            f"{n:4d}/class seed {seed} {name:16s} accuracy {r['accuracy']:.3f} "
                            f"macro F1 {r['macro_f1']:.3f} best epoch {r['best_epoch']}/"
                            f"{budget.epochs} ({r['seconds']:.1f} s)",
                            flush=True,
                        )
    wall = time.perf_counter() - began
    table = markdown(results, budgets)
    print()
    print(f"target test split ({sizes['target_test']}/class), mean ± std over seeds {args.seeds}")
    print(table)
    print(f"wall time: {wall:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": command_line(),
            "wall_seconds": wall,
            "model": args.model,
            "image_size": IMAGE_SIZE,
            "source": {
                "classes": SOURCE,
                "epochs": args.source_epochs,
                "val": {k: source_val[k] for k in ("accuracy", "macro_f1")},
            },
            "target": {"classes": TARGET, **sizes},
            "budgets": {n: vars(b) | {"updates": b.updates} for n, b in budgets.items()},
            "results": results,
            "table": table,
        }
        args.out.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
