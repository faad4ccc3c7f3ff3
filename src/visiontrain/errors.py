"""Errors that the command line turns into exit codes.

A :class:`UserError` is bad input — a config key, a data folder, a checkpoint — that the
user can fix; the CLI prints its message without a traceback and exits 2.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class UserError(Exception):
    """Bad input that the user can fix; exit code 2 with a one-paragraph message."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(UserError):
    """A config key, type or value is wrong."""


class DataError(UserError):
    """A data source is missing, empty, or holds an unreadable file."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, foreign or unsafe."""


class RunError(Exception):
    """The run cannot go on (disk full, a loader worker died, the loss stayed NaN).

    Not bad input and not a bug: the CLI prints the message (what happened, what was
    saved, what to do) without a traceback and exits 1.
    """

    exit_code = EXIT_FAILURE


class Interrupted(Exception):  # noqa: N818 - it is a stop request, not an error
    """The run stopped on SIGINT/SIGTERM after saving; carries the exit code."""

    def __init__(self, signum_exit: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = signum_exit


def did_you_mean(name: str, choices: list[str]) -> str:
    """`` — did you mean `x`?`` for the closest of ``choices``, or an empty string."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=1)
    return f" — did you mean `{close[0]}`?" if close else ""


def clean_message(exc: BaseException) -> str:
    """Return the user-facing message of an error, even when a loader worker re-raised it.

    A DataLoader worker re-raises an exception in the main process as
    ``Caught DataError in DataLoader worker process 0. Original Traceback ...``; the
    message the user needs is the last ``DataError: ...`` part of that text.
    """
    text = str(exc)
    marker = f"{type(exc).__name__}: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1]
    return text.strip()
