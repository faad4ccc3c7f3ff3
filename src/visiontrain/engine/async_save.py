"""``run.async_save``: checkpoints written by a background thread.

At the step boundary the checkpoint's state is copied to host memory (:func:`snapshot`:
every tensor cloned to the CPU, every container copied), which is all the training loop
waits for; hashing and writing the file happen on a writer thread. Each file is still
written atomically (temp file, fsync, rename), so a crash mid-write leaves the previous
checkpoint in place.

At most one save is in flight: a second one waits for the first. A write that fails is
held and raised at the next step (:meth:`AsyncWriter.poll`) or the next wait, as a
:class:`~visiontrain.errors.RunError` (exit 1) naming the file; the file it was replacing
is untouched. Whatever ends the run (the last epoch, SIGTERM, an error) waits for the
save in flight first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from visiontrain.errors import RunError


def snapshot(obj: Any) -> Any:
    """A copy of a checkpoint state that training can no longer change.

    Tensors are cloned to the CPU (one device-to-host copy each; the loop's next update
    would otherwise write into the tensors being saved); dicts, lists and tuples are
    rebuilt; numbers, strings and None are immutable and shared.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: snapshot(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [snapshot(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot(value) for value in obj)
    return obj


class AsyncWriter:
    """Runs one checkpoint write at a time on a background thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._failure: tuple[str, BaseException] | None = None

    @property
    def busy(self) -> bool:
        """Whether a write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, what: str, write: Callable[[], None]) -> None:
        """Start ``write`` in the background once the previous write has finished.

        Args:
            what: the file(s) it writes, for the error message.
            write: writes from a :func:`snapshot`, never from live training state.

        Raises:
            RunError: the previous write failed.
        """
        self.wait()

        def run() -> None:
            try:
                write()
            except BaseException as exc:  # re-raised on the training thread
                self._failure = (what, exc)

        # Not a daemon: an interpreter exiting by surprise still finishes the file.
        self._thread = threading.Thread(target=run, name="visiontrain-checkpoint")
        self._thread.start()

    def poll(self) -> None:
        """Raise the failure of a finished write, if any; never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self._thread.join()
            self._thread = None
        self._raise_failure()

    def wait(self) -> None:
        """Block until the write in flight has finished; raise its failure, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is None:
            return
        what, exc = self._failure
        self._failure = None
        if isinstance(exc, RunError):
            raise exc
        raise RunError(
            f"writing checkpoint {what} in the background failed: {exc}. The file it was "
            "to replace is untouched (each checkpoint is written to a temporary file and "
            "renamed). Fix the cause (permissions, space on the disk), then continue with "
            "the same command plus run.resume=auto."
        ) from exc
