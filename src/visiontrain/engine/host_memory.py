"""CPU training: keep the memory one step frees for the next step (glibc malloc).

A training step on the CPU allocates and frees the same tensors every step: the
activations, the gradients, the batch. glibc's malloc hands freed memory back to the
kernel when more than ``M_TRIM_THRESHOLD`` of it lies free at the top of its heap, and it
serves every chunk above ``M_MMAP_THRESHOLD`` (adjusted at run time, up to 32 MiB) with a
mapping of its own that ``free`` unmaps. Either way the next step's forward touches fresh
pages, which the kernel faults in and zero-fills again. Training ResNet-18 at 64 px,
batch 64, on one core (benchmarks/overhead.py) that was 11,000-29,000 minor page faults
per step and 4-9% of the step's CPU time; with the settings below, about none.

:func:`keep_freed_memory` turns both off for the process: freed memory stays in malloc's
free lists, where the next step finds it. The price is that the process's resident size
does not shrink after its peak, which a training process reaches again every step anyway.
``VISIONTRAIN_MALLOC=default`` leaves malloc's settings alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt's parameter numbers (<malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Larger chunks still get a mapping of their own; below this they come from the heap.
_MMAP_THRESHOLD = 1 << 30
# What glibc before 2.35 accepts at most (it refuses a larger value).
_MMAP_THRESHOLD_OLD_MAX = 32 << 20
ENV = "VISIONTRAIN_MALLOC"

_applied = False


def glibc_malloc() -> bool:
    """Whether this process runs on glibc (musl and macOS have no such mallopt)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError):  # an unknown name, or no confstr at all
        return False


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed memory to the kernel; returns whether it is in force.

    Sets ``M_TRIM_THRESHOLD`` to -1 (never trim the heap) and ``M_MMAP_THRESHOLD`` to
    1 GiB (32 MiB, glibc's old maximum, where a larger value is refused), for the whole
    process. Called once a CPU run is built (``engine.parts.build_parts``); calling it
    again does nothing. Without glibc, or with ``VISIONTRAIN_MALLOC=default``, nothing is
    changed and it returns False.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV, "") == "default" or not glibc_malloc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own libc
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Setting the threshold also ends its run-time adjustment, so it stays where it is put.
    mapped = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) or mallopt(
        _M_MMAP_THRESHOLD, _MMAP_THRESHOLD_OLD_MAX
    )
    # -1 is mallopt's documented "never trim" (it becomes the largest size_t).
    trimmed = mallopt(_M_TRIM_THRESHOLD, -1)
    _applied = bool(mapped and trimmed)
    return _applied
