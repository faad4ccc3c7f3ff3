"""SIGINT/SIGTERM handling: request a clean stop; the trainer saves, then exits 130/143."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from visiontrain.errors import EXIT_SIGINT, EXIT_SIGTERM


class StopFlag:
    """Set by a signal; read by the trainer after each optimizer update."""

    def __init__(self) -> None:
        self.exit_code: int | None = None

    def __bool__(self) -> bool:
        return self.exit_code is not None


@contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    """Install handlers that set a :class:`StopFlag`; a second SIGINT stops at once."""
    flag = StopFlag()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if flag and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the user insists: do not wait for the save
        flag.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in previous:
            signal.signal(s, on_signal)
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
