"""Helpers shared by the benchmark scripts (imported as a sibling module when run)."""

from __future__ import annotations

import os
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
