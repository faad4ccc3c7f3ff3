"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder entry itself reaches the disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, writer: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temp file in the same folder, fsync, then rename.

    Args:
        path: destination file.
        writer: called with a binary file object to fill.

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            # mkstemp creates 0600; a run's files get the mode any new file of the user
            # gets (0666 less the umask), like metrics.jsonl, which is opened normally.
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write a UTF-8 text file."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write an indented JSON file."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_link(source: str | Path, path: str | Path) -> bool:
    """Make ``path`` a hard link to ``source``, replacing it atomically.

    Files written whole and never modified in place (checkpoints are replaced, not
    edited) can share their bytes: the epoch file and ``last.pt`` of one epoch are the
    same state. A later atomic rewrite of either gives it a new inode and leaves the
    other as it was.

    Returns:
        False when the filesystem cannot link (the caller then writes a copy).
    """
    source, path = Path(source), Path(path)
    tmp = path.with_name(f".{path.name}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(source, tmp)
    except OSError:
        return False
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return True
