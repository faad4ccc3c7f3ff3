"""Imbalanced defects, before and after: does a loss or a sampler find more defects?

What is compared
    The embedded ``defects`` data (5% defective, 2,000 training images) at the default
    budget (``configs/defects.yaml``: simple_cnn, AdamW, warmup-cosine, 12 epochs), one
    key changed per variant:

    * ``cross_entropy``: plain cross entropy, the baseline.
    * ``focal``: ``loss.name=focal`` (gamma 2, no alpha).
    * ``class_weights``: ``loss.class_weights=balanced`` (inverse frequency).
    * ``effective_weights``: ``loss.class_weights=effective`` (Cui et al. 2019, beta
      0.999: milder than inverse frequency for a class with a few hundred samples).
    * ``weighted_sampler``: ``data.sampler=weighted`` (every class drawn equally often).
    * ``threshold``: plain cross entropy with ``train.threshold=best_f1`` (the threshold
      that maximises F1 on val, applied to test) — a post-hoc fix for comparison.

    Each variant runs with ``--seeds`` training seeds (model initialisation, order and
    augmentation; the data is the same). Reported on the test split: mean ± std over the
    seeds of the defect class's precision and recall and the macro F1.

Usage
    python benchmarks/imbalance.py [--seeds 0 1 2] [--out DIR] [--quick]

    ``--quick`` runs tiny data for one epoch (a smoke test, not a measurement). Runs go
    to ``--out`` (default: a temporary folder, removed afterwards); the table is printed
    in markdown and written to ``imbalance.json`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import mean_std

BASELINE = Path(__file__).parents[1] / "configs" / "defects_baseline.yaml"
VARIANTS: dict[str, list[str]] = {
    "cross_entropy": [],
    "focal": ["loss.name=focal"],
    "class_weights": ["loss.class_weights=balanced"],
    "effective_weights": ["loss.class_weights=effective"],
    "weighted_sampler": ["data.sampler=weighted"],
    "threshold": ["train.threshold=best_f1"],
    # Combinations of the remedies that each lifted recall without losing macro F1.
    "effective+threshold": ["loss.class_weights=effective", "train.threshold=best_f1"],
    "sampler+threshold": ["data.sampler=weighted", "train.threshold=best_f1"],
    "focal+threshold": ["loss.name=focal", "train.threshold=best_f1"],
    "effective+sampler": ["loss.class_weights=effective", "data.sampler=weighted"],
}
QUICK = [
    "data.image_size=16",
    "data.train_size=96",
    "data.val_size=40",
    "data.test_size=40",
    "data.batch_size=16",
    "data.defect_rate=0.25",
    "model.width=4",
    "model.depth=2",
    "train.epochs=1",
]
COLUMNS = ("defect precision", "defect recall", "macro F1")


def run_variant(name: str, seed: int, out: Path, quick: bool) -> dict[str, float]:
    """Train one variant with one seed; return its test numbers."""
    args = [
        sys.executable,
        "-m",
        "visiontrain",
        "train",
        # Every variant changes the plain baseline (threshold fixed at 0.5) by its keys.
        str(BASELINE),
        *(QUICK if quick else []),
        *VARIANTS[name],
        f"train.seed={seed}",
        "train.progress=none",
        f"run.dir={out}",
        f"run.name={name}-seed{seed}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} seed {seed} failed (exit {proc.returncode}):\n{proc.stderr}")
    summary = json.loads((out / f"{name}-seed{seed}" / "summary.json").read_text())
    test = summary["metrics"]["test"]
    defect = test["per_class"]["defect"]
    return {
        "defect precision": defect["precision"],
        "defect recall": defect["recall"],
        "macro F1": test["macro_f1"],
        "seconds": time.perf_counter() - start,
    }


def markdown(results: dict[str, list[dict[str, float]]]) -> str:
    """The before/after table, one row per variant."""
    lines = [
        "| variant | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for name, runs in results.items():
        cells = [mean_std([r[c] for r in runs]) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every variant with every seed and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, not a measurement")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vt-imbalance-") as tmp:
        out = args.out or Path(tmp)
        results: dict[str, list[dict[str, float]]] = {}
        for seed in args.seeds:  # seed-major: a drift in machine load hits every variant
            for name in args.variants:
                r = run_variant(name, seed, out, args.quick)
                results.setdefault(name, []).append(r)
                print(
                    f"{name:17s} seed {seed}: defect P {r['defect precision']:.3f} "
                    f"R {r['defect recall']:.3f}  macro F1 {r['macro F1']:.3f}  "
                    f"({r['seconds']:.0f} s)",
                    flush=True,
                )
        table = markdown(results)
        print()
        print(f"test split, mean ± std over seeds {args.seeds}")
        print(table)
        if args.out:
            (args.out / "imbalance.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
