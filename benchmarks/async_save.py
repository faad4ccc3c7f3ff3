"""What a periodic checkpoint costs the training loop, with and without ``run.async_save``.

What is compared
    The same run three ways, in paired rounds (one of each per round, order rotated):

    * ``no periodic save``: checkpoints at epoch ends only;
    * ``sync``: plus ``run.save_every_steps=N``, written on the training thread;
    * ``async``: the same saves with ``run.async_save=true`` (the loop copies the state to
      host memory and goes on; a thread hashes and writes the file).

    The run: timm's ``resnet18`` (11.2 M parameters; a checkpoint with AdamW's moments is
    about 135 MB) on the embedded defects data at 32 px, batch 32, 2 epochs of 20 updates,
    ``N`` = 5 (6 periodic saves). Reported: the training time from ``summary.json``
    (``timings.train_s``: the epochs, their saves included, without start-up), median
    over rounds, and the cost per periodic save against the run without them.

Usage
    python benchmarks/async_save.py [--rounds 3] [--every 5] [--model resnet18]
    python benchmarks/async_save.py --quick     # tiny runs: a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from common import command_line

VARIANTS = {
    "no periodic save": [],
    "sync": ["run.save_every_steps={every}"],
    "async": ["run.save_every_steps={every}", "run.async_save=true"],
}


def run_once(out: Path, name: str, keys: list[str]) -> float:
    """``timings.train_s`` of one ``visiontrain train`` process."""
    args = [sys.executable, "-m", "visiontrain", "train", *keys, f"run.dir={out}",
            f"run.name={name}"]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return float(json.loads((out / name / "summary.json").read_text())["timings"]["train_s"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.every < 1:
        parser.error("--rounds and --every must be positive")
    base = [
        f"model.name={'simple_cnn' if args.quick else args.model}",
        f"data.train_size={128 if args.quick else 640}",
        "data.val_size=32",
        "data.test_size=32",
        "data.image_size=32",
        "data.batch_size=32",
        "train.epochs=2",
        "train.progress=none",
        "train.threshold=0.5",
        "run.report=false",
        "run.loggers=[jsonl]",
        "run.keep_last=0",
    ]
    rounds = 1 if args.quick else args.rounds
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name in names[r % 3 :] + names[: r % 3]:
                keys = [k.format(every=args.every) for k in VARIANTS[name]]
                run = f"{name.replace(' ', '-')}-{r}"
                times[name].append(run_once(Path(tmp), run, [*base, *keys]))
    updates = 2 * ((128 if args.quick else 640) // 32)
    saves = sum(
        1 for step in range(1, updates + 1) if step % args.every == 0 and step % (updates // 2)
    )
    plain = statistics.median(times["no periodic save"])
    print(f"command: {command_line()}")
    print(f"{rounds} round(s); {updates} updates, {saves} periodic saves (every {args.every})\n")
    print("| variant | train s (median) | per periodic save |")
    print("|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        cost = (
            "—"
            if name == "no periodic save"
            else f"{(median - plain) / max(1, saves) * 1000:.0f} ms"
        )
        print(f"| {name} | {median:.2f} | {cost} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
