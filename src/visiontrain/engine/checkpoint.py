"""Checkpoints: one dict of tensors, numbers, strings, lists and dicts.

Written atomically and read with ``torch.load(weights_only=True)``, so a file from the
internet cannot run code, and a crash mid-write never leaves a half file as ``last.pt``.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from visiontrain.errors import CheckpointError
from visiontrain.io import atomic_write

FORMAT = "visiontrain-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temp file, fsync, rename)."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a visiontrain checkpoint; any problem is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist. Pass the path of a `.pt` file under a run's "
            "checkpoints/ folder, or run.resume=auto with the run's run.name."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds objects that a safe load may not "
            f"create ({_first_line(exc)}). Only checkpoints written by visiontrain load; "
            "never load a checkpoint from an untrusted source with weights_only=False."
        ) from None
    except (
        RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError
    ) as exc:  # fmt: skip
        # A truncated file fails inside the unpickler with any of these.
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a PyTorch file ({_first_line(exc)}). "
            "Resume from another checkpoint (checkpoints/ keeps the last few) or start anew."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a PyTorch file but not a visiontrain checkpoint (no "
            f"'format: {FORMAT}' entry). Pass a checkpoint written by `visiontrain train`."
        )
    if state.get("version", 0) > VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state['version']}, newer than this "
            f"visiontrain understands ({VERSION}). Upgrade visiontrain."
        )
    for key in ("model", "config"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no `{key}` entry; it is incomplete.")
    return state


def eval_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint was evaluated with: its EMA when trained with ``train.ema``."""
    ema = state.get("ema")
    return ema["module"] if ema else state["model"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
