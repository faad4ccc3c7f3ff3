"""Training recipes at the shipped budgets: mixing, policy augmentation, calibration.

What is compared
    Table A, accuracy. Two shipped recipes, as they are and with one key added:

    * ``defects``: ``configs/defects.yaml`` with ``data.defect_classes=types`` (ok,
      scratch, spot, crack; 48 px grey, 2,000/600/600 images, 5% defective), 12 epochs,
      ``data.augment=light`` (padded crop + flip).
    * ``digits``: ``configs/digits.yaml`` (scikit-learn's 8x8 digits upsampled to 32 px,
      1,295/143/359 images), 20 epochs with early stopping, ``data.augment=none``
      (flips turn digits into other shapes).

    Recipes: ``shipped``; ``data.mixup=0.2``; ``data.cutmix=1.0``;
    ``data.augment=randaugment``, ``trivialaugment``, ``autoaugment``. The three policies
    run after ``standard``'s random resized crop (25-100% of the area) and horizontal
    flip, which they bring with them: on digits that adds the flips the shipped config
    avoids, and on defects a crop that can leave a small defect out of the picture.
    Same epochs, optimizer and schedule as the shipped config. Reported: test macro F1
    and accuracy (weights of the best validation epoch), mean ± sample std over seeds.

    Every run also fits ``train.calibrate=temperature`` after training. It changes no
    decision (dividing logits by T > 0 keeps their argmax), so Table A is the recipes'
    own; the fit gives each recipe's calibration before and after for free (Table A2,
    with how many runs classify every val image right: their val NLL falls as T -> 0,
    so the fit ends near its bound e^-3 and such a T calibrates nothing).

    Table B, calibration: ``train.calibrate=temperature`` on

    * ``default``: ``configs/defects.yaml`` as shipped (ok/defect, 12 epochs);
    * ``over-confident``: defects types trained 3x the epochs (36), no label smoothing,
      ``data.augment=none``, the best epoch picked by ``val/macro_f1`` (selection by
      ``val/loss``, the shipped monitor, would pick the least over-confident epoch).

    Reported: the fitted temperature; on val the expected and maximum calibration error
    (15 bins), the Brier score and the NLL before and after (``summary.json``
    ``calibration``; MCE before from the best epoch's val record in ``metrics.jsonl``,
    after from the calibrated val metrics); on test, ECE, MCE and Brier with the
    temperature and at T = 1. ``visiontrain eval`` always applies a run's temperature,
    so the T = 1 numbers take ``vt.evaluate``'s steps with the task's temperature set
    to 1 (``test_at_unit_temperature``; this uses visiontrain's internal modules).

Usage
    python benchmarks/recipes.py [--seeds 0 1 2] [--defects-seeds ...] [--recipes ...]
                                 [--jobs 2] [--out DIR]
    python benchmarks/recipes.py --quick     # a smoke run of tiny runs, not a measurement

    ``--quick``: 96/40/40 images at 16 px, a 4-wide 2-stage model, 2 epochs (the
    over-confident run 6), the first seed only. ``--recipes`` picks table A's rows
    (``shipped``, the baseline, always runs).

    Each run is ``python -m visiontrain train`` in its own process with
    ``OMP_NUM_THREADS`` (default 1) torch threads; ``--jobs`` runs that many at once
    (default 2: on a 2-core machine two one-thread runs finish sooner than one after the
    other with two threads each). ``--defects-seeds`` sets the seeds of the slow defects
    runs on their own; by default the first two of ``--seeds``, which keeps a full run
    near 25 minutes on an idle 2-core machine (three would take about 35). The data
    cache is private; runs go to ``--out`` (kept, with ``recipes.json``) or a temporary
    folder removed at the end.
"""

from __future__ import annotations

import os

# Before anything imports torch; the training subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import contextlib
import io
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common import command_line, mean_std, private_cache

ROOT = Path(__file__).resolve().parents[1]
DATASETS: dict[str, list[str]] = {
    "defects": [str(ROOT / "configs" / "defects.yaml"), "data.defect_classes=types"],
    "digits": [str(ROOT / "configs" / "digits.yaml")],
}
RECIPES: dict[str, list[str]] = {
    "shipped": [],
    "mixup=0.2": ["data.mixup=0.2"],
    "cutmix=1.0": ["data.cutmix=1.0"],
    "randaugment": ["data.augment=randaugment"],
    "trivialaugment": ["data.augment=trivialaugment"],
    "autoaugment": ["data.augment=autoaugment"],
}
DEFECTS_EPOCHS = yaml.safe_load((ROOT / "configs" / "defects.yaml").read_text())["train"]["epochs"]
CALIBRATION_RUNS = ("default", "over-confident")  # Table B's rows
LONG_FACTOR = 3  # the over-confident run trains this many times the shipped epochs


def calibration_runs(quick: bool) -> dict[str, list[str]]:
    """Table B's runs (their keys), by name."""
    epochs = LONG_FACTOR * (QUICK_EPOCHS if quick else DEFECTS_EPOCHS)
    return {
        "default": [str(ROOT / "configs" / "defects.yaml")],
        "over-confident": [
            *DATASETS["defects"],
            f"train.epochs={epochs}",
            "loss.label_smoothing=0",
            "data.augment=none",
            "train.monitor=val/macro_f1",
        ],
    }


# Nothing here changes what is trained or measured: no report, no TensorBoard, no
# per-epoch checkpoint copies.
COMMON = [
    "train.calibrate=temperature",
    "train.progress=none",
    "run.report=false",
    "run.loggers=[jsonl]",
    "run.keep_last=0",
]
# --quick: tiny data and model; two epochs (digits' one warmup epoch needs a second).
QUICK_EPOCHS = 2
QUICK = [
    "data.train_size=96",
    "data.val_size=40",
    "data.test_size=40",
    "data.image_size=16",
    "data.batch_size=16",
    "model.width=4",
    "model.depth=2",
    "train.min_updates=null",  # 2 epochs of tiny data: the update floors would lengthen them
]
QUICK_DEFECTS = ["data.defect_rate=0.5"]  # digits ignores it: a defects-only key


@dataclass
class Run:
    """One training run: which table, which row, which seed, and its keys."""

    table: str  # "A" or "B"
    data: str  # defects, digits (A); the calibration run's name (B)
    recipe: str
    seed: int
    keys: list[str]
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.table}-{self.data}-{self.recipe}-seed{self.seed}"


def plan(
    seeds: Sequence[int], defects_seeds: Sequence[int], recipes: Sequence[str], quick: bool
) -> list[Run]:
    """Every run, seed-major (a drift in machine load hits every variant alike)."""

    def tiny(data: str, epochs: bool = True) -> list[str]:
        if not quick:
            return []
        return [
            *QUICK,
            *(QUICK_DEFECTS if data == "defects" else []),
            *([f"train.epochs={QUICK_EPOCHS}"] if epochs else []),
        ]

    runs: list[Run] = []
    for seed in sorted(set(seeds) | set(defects_seeds)):
        for data, base in DATASETS.items():
            if seed not in (defects_seeds if data == "defects" else seeds):
                continue
            for recipe in recipes:
                keys = RECIPES[recipe]
                runs.append(Run("A", data, recipe, seed, [*base, *tiny(data), *keys]))
        if seed not in defects_seeds:
            continue
        for name, keys in calibration_runs(quick).items():
            # The over-confident run sets its own (long) epochs.
            extra = tiny("defects", epochs=name == "default")
            runs.append(Run("B", name, "calibrate", seed, [*keys, *extra]))
    return runs


def train(run: Run, out: Path) -> dict:
    """Train one run in its own process; its numbers from summary.json and metrics.jsonl.

    A run that already finished in ``out`` (it has a summary.json: the same command
    interrupted before) is read, not trained again; an unfinished one resumes from its
    ``last.pt`` (``run.resume=auto``) or starts afresh.
    """
    folder = out / run.name
    if (folder / "summary.json").is_file():
        return read(folder, run.name) | {"reused": True}
    args = [
        sys.executable,
        "-m",
        "visiontrain",
        "train",
        *run.keys,
        f"train.seed={run.seed}",
        *COMMON,
        f"run.dir={out}",
        f"run.name={run.name}",
        "run.resume=auto",
    ]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{run.name} failed (exit {proc.returncode}):\n{shlex.join(args)}\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    seconds = time.perf_counter() - start
    return read(folder, run.name) | {"seconds": seconds}


def test_at_unit_temperature(folder: Path) -> dict[str, float]:
    """The test split's ECE, MCE and Brier of the run's best weights at T = 1 (uncalibrated).

    ``visiontrain eval`` and ``vt.evaluate`` apply the fitted temperature (it belongs to
    the trained run, and the checkpoint's content hash forbids editing it), so this takes
    ``vt.evaluate``'s steps with the task's temperature set to 1. Cached in the run folder.
    Main thread only: it silences the data's notes through ``sys.stdout``.
    """
    cache = folder / "test_at_t1.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from visiontrain.data import build_data
    from visiontrain.data.pipeline import build_loaders
    from visiontrain.engine.evaluate import evaluate
    from visiontrain.engine.precision import Precision
    from visiontrain.engine.restore import load_trained
    from visiontrain.tasks import build_task

    with contextlib.redirect_stdout(io.StringIO()):  # the data's own note: lines
        loaded = load_trained(folder)
        cfg = loaded.cfg
        bundle = build_data(cfg.data, cfg.task)
        task = build_task(cfg, bundle, loaded.device)
        task.load_state_dict({**loaded.task_state, "temperature": 1.0})
        loader = build_loaders(cfg, bundle, loaded.device).test
        precision = Precision(cfg.train.precision, loaded.device)
        metrics = evaluate(loaded.model, loader, task, loaded.prep, precision)
    result = {f"test_{k}_t1": float(metrics[k]) for k in ("ece", "mce", "brier")}
    cache.write_text(json.dumps(result))
    return result


def read(folder: Path, name: str) -> dict:
    """A finished run's numbers (``seconds``: the trainer's own total)."""
    summary = json.loads((folder / "summary.json").read_text())
    cal, val, test = summary["calibration"], summary["metrics"]["val"], summary["metrics"]["test"]
    # The best epoch's own val record (before the temperature) holds the MCE before.
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    best = [
        r
        for r in records
        if r.get("split") == "val"
        and r.get("kind") == "eval"
        and r.get("epoch") == summary["best_epoch"]
    ][-1]
    if abs(best["ece"] - cal["val_ece_before"]) > 1e-6:
        raise RuntimeError(f"{name}: the best epoch's val ECE is not calibration's 'before'")
    return {
        "accuracy": test["accuracy"],
        "macro_f1": test["macro_f1"],
        "test_ece": test["ece"],
        "test_mce": test["mce"],
        "test_brier": test["brier"],
        "val_accuracy": val["accuracy"],  # decisions do not depend on T
        "temperature": cal["temperature"],
        "val_ece_before": cal["val_ece_before"],
        "val_ece_after": cal["val_ece_after"],
        "val_mce_before": best["mce"],
        "val_mce_after": val["mce"],
        "val_brier_before": cal["val_brier_before"],
        "val_brier_after": cal["val_brier_after"],
        "val_nll_before": cal["val_nll_before"],
        "val_nll_after": cal["val_nll_after"],
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "seconds": summary["timings"]["total_s"],
    }


def grouped(runs: list[Run], table: str) -> dict[tuple[str, str], list[dict]]:
    """Results of one table by (data, recipe), in plan order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        if run.table == table and run.result:
            groups.setdefault((run.data, run.recipe), []).append(run.result)
    rows = [*DATASETS, *CALIBRATION_RUNS]
    recipes = [*RECIPES, "calibrate"]
    return dict(
        sorted(groups.items(), key=lambda kv: (rows.index(kv[0][0]), recipes.index(kv[0][1])))
    )


def table_a(runs: list[Run]) -> str:
    """Test macro F1 and accuracy per dataset and recipe, with the change from shipped."""
    lines = [
        "| data | recipe | seeds | test macro F1 | Δ macro F1 | test accuracy | Δ accuracy "
        "| best epoch |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    groups = grouped(runs, "A")
    for (data, recipe), results in groups.items():
        shipped = groups.get((data, "shipped"), results)
        f1, acc = [r["macro_f1"] for r in results], [r["accuracy"] for r in results]
        base_f1 = statistics.mean(r["macro_f1"] for r in shipped)
        base_acc = statistics.mean(r["accuracy"] for r in shipped)
        d_f1 = "—" if recipe == "shipped" else f"{statistics.mean(f1) - base_f1:+.3f}"
        d_acc = "—" if recipe == "shipped" else f"{statistics.mean(acc) - base_acc:+.3f}"
        epochs = ", ".join(f"{r['best_epoch']}/{r['epochs_run']}" for r in results)
        lines.append(
            f"| {data} | {recipe} | {len(results)} | {mean_std(f1)} | {d_f1} | "
            f"{mean_std(acc)} | {d_acc} | {epochs} |"
        )
    return "\n".join(lines)


def perfect_val(results: list[dict]) -> str:
    """How many runs classify every val image right: their T has no finite optimum.

    The val NLL then keeps falling as T -> 0, so the fit ends at (or, LBFGS stopping
    on the flat tanh, near) its bound e^-3 and the probabilities become almost one-hot.
    """
    n = sum(r["val_accuracy"] == 1.0 for r in results)
    return f"{n}/{len(results)}"


def table_a2(runs: list[Run]) -> str:
    """Each recipe's calibration: temperature, val ECE before and after, test ECE both ways."""
    lines = [
        "| data | recipe | temperature | val all right | val ECE before | val ECE after "
        "| test ECE at T = 1 | test ECE with T |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (data, recipe), results in grouped(runs, "A").items():
        temperature = mean_std([r["temperature"] for r in results], 2)
        cells = [
            mean_std([r[k] for r in results])
            for k in ("val_ece_before", "val_ece_after", "test_ece_t1", "test_ece")
        ]
        lines.append(
            f"| {data} | {recipe} | {temperature} | {perfect_val(results)} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def table_b(runs: list[Run]) -> str:
    """Calibration of the two runs, before and after the temperature, one row a measure."""
    lines = [
        "| run | seeds | measure | before (T = 1) | after (fitted T) |",
        "|---|---:|---|---:|---:|",
    ]
    for (data, _), results in grouped(runs, "B").items():
        n = len(results)
        temps = mean_std([r["temperature"] for r in results], 2)
        lines.append(f"| {data} | {n} | temperature | 1 | {temps} |")
        for label, before, after in (
            ("val ECE", "val_ece_before", "val_ece_after"),
            ("val MCE", "val_mce_before", "val_mce_after"),
            ("val Brier", "val_brier_before", "val_brier_after"),
            ("val NLL", "val_nll_before", "val_nll_after"),
            ("test ECE", "test_ece_t1", "test_ece"),
            ("test MCE", "test_mce_t1", "test_mce"),
            ("test Brier", "test_brier_t1", "test_brier"),
        ):
            b = mean_std([r[before] for r in results])
            a = mean_std([r[after] for r in results])
            lines.append(f"| {data} | {n} | {label} | {b} | {a} |")
        lines.append(
            f"| {data} | {n} | test macro F1 (accuracy) | — | "
            f"{mean_std([r['macro_f1'] for r in results])} "
            f"({mean_std([r['accuracy'] for r in results])}) |"
        )
        epochs = ", ".join(f"{r['best_epoch']}/{r['epochs_run']}" for r in results)
        lines.append(f"| {data} | {n} | best epoch / epochs | — | {epochs} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--defects-seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds of the defects runs, tables A and B (default: the first two of --seeds, "
        "to keep a full run near 25 minutes on 2 cores)",
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        choices=list(RECIPES),
        default=list(RECIPES),
        help="table A's recipes (default: all; shipped is always run, the baseline)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument(
        "--out", type=Path, default=None, help="keep the runs and recipes.json here"
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, not a measurement")
    args = parser.parse_args(argv)
    args.recipes = [r for r in RECIPES if r in {"shipped", *args.recipes}]
    if args.defects_seeds is None:
        args.defects_seeds = list(args.seeds[:2])
    if args.quick:
        args.seeds, args.defects_seeds = args.seeds[:1], args.defects_seeds[:1]
    if args.jobs < 1:
        parser.error("--jobs must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every recipe and calibration run with every seed; print the tables."""
    args = parse_args(argv)
    began = time.perf_counter()
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"command: {command_line()}")
    print(
        f"machine: {os.cpu_count()} logical CPUs, {platform.machine()}, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {args.jobs} run(s) at once, "
        f"load average {load:.2f}"
    )
    print(
        f"seeds: digits {args.seeds}, defects {args.defects_seeds}"
        + (
            " (fewer for defects, the slow dataset: --defects-seeds)"
            if len(args.defects_seeds) < len(args.seeds)
            else ""
        )
        + ("  [--quick: a smoke run, not a measurement]" if args.quick else ""),
        flush=True,
    )
    runs = plan(args.seeds, args.defects_seeds, args.recipes, args.quick)
    with tempfile.TemporaryDirectory(prefix="vt-bench-recipes-") as tmp_name:
        tmp = Path(tmp_name)
        out = args.out or tmp / "runs"
        out.mkdir(parents=True, exist_ok=True)
        # Runs in parallel may both generate the defects data; its cache file is
        # written atomically, so the second writer just replaces the same arrays.
        with private_cache(tmp / "cache"), ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(train, r, out): r for r in runs}
            for future, run in futures.items():
                try:
                    run.result = future.result()
                except RuntimeError as error:
                    pool.shutdown(cancel_futures=True)
                    sys.exit(str(error))
                # In this (main) thread while the workers' runs train: it redirects
                # sys.stdout, which is the whole process's, not a thread's.
                run.result |= test_at_unit_temperature(out / run.name)
                print(f"{run.name:42s} {_line(run.result)}", flush=True)
        wall = time.perf_counter() - began
        tables = {
            "A": table_a(runs),
            "A2": table_a2(runs),
            "B": table_b(runs),
        }
        print()
        print("Table A: test split, mean ± sample std over seeds (Δ: against shipped)")
        print(tables["A"])
        print()
        print("Table A2: the same runs' calibration (train.calibrate=temperature, fitted on val)")
        print(tables["A2"])
        print()
        print("Table B: temperature scaling on defects (before: T = 1; after: the fitted T)")
        print(tables["B"])
        print()
        reused = sum(bool(r.result.get("reused")) for r in runs)
        print(
            f"wall time: {wall:.0f} s"
            + (f" ({reused} of {len(runs)} runs read from --out, trained before)" if reused else "")
        )
        if args.out:
            payload = {
                "command": command_line(),
                "wall_seconds": wall,
                "seeds": args.seeds,
                "defects_seeds": args.defects_seeds,
                "runs": [
                    {"name": r.name, "table": r.table, "data": r.data, "recipe": r.recipe}
                    | {"seed": r.seed, "keys": r.keys, **r.result}
                    for r in runs
                ],
                "tables": tables,
            }
            (args.out / "recipes.json").write_text(json.dumps(payload, indent=2))
    return 0


def _line(r: dict) -> str:
    return (
        f"macro F1 {r['macro_f1']:.3f} acc {r['accuracy']:.3f}  T {r['temperature']:.2f} "
        f"val ECE {r['val_ece_before']:.3f}->{r['val_ece_after']:.3f}  test ECE "
        f"{r['test_ece_t1']:.3f}->{r['test_ece']:.3f}  best {r['best_epoch']}/{r['epochs_run']}"
        f"  ({r['seconds']:.0f} s" + (", reused from --out)" if r.get("reused") else ")")
    )


if __name__ == "__main__":
    sys.exit(main())
