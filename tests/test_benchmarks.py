"""The overhead benchmark runs end to end; its timings are never asserted (they are noise)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
RATIO_LINE = re.compile(r"^ratio trainer/raw: \d+\.\d{2}$")


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--progress", "plain", "--raw-loader", "slice", "--threads", "1"],
    ],
    ids=["defaults", "plain-slice"],
)
def test_overhead_quick_runs_and_prints_a_ratio(tmp_path: Path, extra: list[str]) -> None:
    # TMPDIR points the benchmark's temporary run folder and data cache at tmp_path, so
    # that we can check it cleans up after itself.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert RATIO_LINE.match(lines[-1]), proc.stdout
    assert any(line.startswith("raw ") for line in lines), proc.stdout
    assert any(line.startswith("trainer ") for line in lines), proc.stdout
    assert "round 1/1" in proc.stdout
    # torch may leave its own cache folder (torchinductor_*) in TMPDIR; the benchmark's
    # run directories and data cache live under a vt-bench-* folder that must be gone.
    assert not list(tmp_path.glob("vt-bench-*")), "the benchmark left its temp folder"


def test_overhead_refuses_a_bad_flag() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--rounds", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "--rounds must be positive" in proc.stderr


IMBALANCE = Path(__file__).resolve().parents[1] / "benchmarks" / "imbalance.py"


@pytest.mark.slow
def test_imbalance_quick_prints_the_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(IMBALANCE),
            "--quick",
            "--seeds",
            "0",
            "1",
            "--variants",
            "cross_entropy",
            "class_weights",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "VISIONTRAIN_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "| variant | defect precision | defect recall | macro F1 |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| cross_entropy", "| class_w"))]
    assert len(rows) == 2 and all(" ± " in row for row in rows)
    import json

    results = json.loads((tmp_path / "imbalance.json").read_text())
    assert [len(v) for v in results.values()] == [2, 2]
    # The table's mean is the mean of the runs' own summaries.
    recalls = [
        json.loads((tmp_path / f"class_weights-seed{s}" / "summary.json").read_text())["metrics"][
            "test"
        ]["per_class"]["defect"]["recall"]
        for s in (0, 1)
    ]
    assert f"{sum(recalls) / 2:.3f} ± " in rows[1]
