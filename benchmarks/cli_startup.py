"""How long the command line takes to answer --version and --help (no timed test: here).

Usage: python benchmarks/cli_startup.py [--rounds N]

Runs ``python -m visiontrain --version``, ``--help``, ``train --help`` and ``doctor --help``
in fresh processes, alternating, and prints the median and the slowest of each, and the
ratio of the verb that imports its tool to ``--help``. The target is
under a second: the parser imports no tool (and no torch) until a verb that needs it runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "--version": ["--version"],
    "--help": ["--help"],
    "train --help": ["train", "--help"],
    "doctor --help (imports its tool)": ["doctor", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, extra in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "visiontrain", *extra], capture_output=True, check=True
            )
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:34s} median {statistics.median(values):.3f} s  max {max(values):.3f} s")
    # Side by side in one run: a verb that imports its tool (and torch) against --help,
    # which imports none; the ratio is what lazy verbs save at every light start.
    heavy = statistics.median(times["doctor --help (imports its tool)"])
    light = statistics.median(times["--help"])
    print(f"ratio: doctor --help / --help = {heavy / light:.1f}x")


if __name__ == "__main__":
    main()
