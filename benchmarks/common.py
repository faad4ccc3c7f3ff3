"""Helpers shared by the benchmark scripts (imported as a sibling module when run)."""

from __future__ import annotations

import contextlib
import os
import shlex
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def private_cache(folder: Path) -> Iterator[None]:
    """Point ``VISIONTRAIN_CACHE`` at ``folder`` for the duration, then restore it."""
    old = os.environ.get("VISIONTRAIN_CACHE")
    os.environ["VISIONTRAIN_CACHE"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VISIONTRAIN_CACHE", None)
        else:
            os.environ["VISIONTRAIN_CACHE"] = old


def mean_std(values: list[float], digits: int = 3) -> str:
    """``mean ± std`` (sample std; 0 for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def command_line() -> str:
    """The command as typed, with the interpreter relative to the working folder if inside."""
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(Path.cwd())
    return shlex.join([str(exe), *sys.argv])
