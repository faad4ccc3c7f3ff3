"""`make demo`: baseline and default trained, compared per class, reports named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_demo_trains_both_compares_and_names_the_reports(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "VISIONTRAIN": str(Path(sys.executable).parent / "visiontrain"),
        "DEMO_RUNS": str(tmp_path),
    }
    demo = [str(ROOT / "scripts" / "demo.sh"), *TINY]
    proc = subprocess.run(demo, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "training the baseline (configs/defects_baseline.yaml)" in out
    assert "training the default (configs/defects.yaml)" in out
    for name in ("demo-baseline", "demo-default"):
        assert (tmp_path / name / "summary.json").is_file()
        # Trained side by side: each run's console output is kept in its own log.
        assert "test:" in (tmp_path / f"{name}.log").read_text()
        assert f"{tmp_path / name / 'report.html'}" in out
    # compare's per-class table: precision and recall of the defect class, before and after.
    assert "defect" in out and "recall" in out and "precision" in out
    assert "demo took" in out


@pytest.mark.slow
def test_demo_stops_with_the_failing_runs_log(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "VISIONTRAIN": str(Path(sys.executable).parent / "visiontrain"),
        "DEMO_RUNS": str(tmp_path),
    }
    demo = [str(ROOT / "scripts" / "demo.sh"), *TINY, "optim.lr=-1"]
    proc = subprocess.run(demo, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the baseline run failed (exit 2)" in proc.stderr
    assert "optim.lr" in proc.stderr  # the end of the run's log names the key
    assert "compare" not in proc.stdout
