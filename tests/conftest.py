"""Shared fixtures: a private data cache, tiny configs, and a CLI runner."""

from __future__ import annotations

import os

# Tiny models gain nothing from a second compute thread, and on a 2-core machine shared
# with loader workers and child processes an OpenMP team of two stalls at every barrier.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from visiontrain.cli import main

# Small enough for a CPU test to train in a second or two, big enough to have every class.
TINY_ANY = [
    "data.image_size=16",
    "data.train_size=96",
    "data.val_size=40",
    "data.test_size=40",
    "data.batch_size=16",
    "model.width=4",
    "model.depth=2",
    "train.epochs=1",
    "train.progress=none",
    # Report pages are tested in test_report.py; elsewhere they only cost time.
    "run.report=false",
]
TINY = [*TINY_ANY, "data.defect_rate=0.25"]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["VISIONTRAIN_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def run_dir(self) -> Path:
        return Path(self.out.strip().splitlines()[-1])


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run the CLI in this process; returns exit code and captured output."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def run_subprocess(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m visiontrain`` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "visiontrain", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )
