"""Checkpoints: one dict of tensors, numbers, strings, lists and dicts.

Written atomically and read with ``torch.load(weights_only=True)``, so a file from the
internet cannot run code, and a crash mid-write never leaves a half file as ``last.pt``.
"""

from __future__ import annotations

import errno
import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from visiontrain.errors import CheckpointError, RunError
from visiontrain.io import atomic_write

FORMAT = "visiontrain-checkpoint"
VERSION = 1


def content_hash(state: dict[str, Any]) -> str:
    """SHA-256 over a checkpoint's contents, computed on save and verified on load.

    It covers every tensor's bytes, dtype and shape, and every number, string and key, in
    order, so any change to what a checkpoint holds is caught.
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "content_sha256"})
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, list | tuple):
        h.update(f"L{len(obj)}".encode())
        for value in obj:
            _feed(h, value)
    else:  # None, bool, int, float, str: repr is exact for each
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temp file, fsync, rename) with its content hash.

    The previous file at ``path`` stays whole until the new one is complete. A full disk
    (ENOSPC, EDQUOT) ends the run with :class:`RunError`; nothing half-written is left.
    """
    payload = {"format": FORMAT, "version": VERSION, **state}
    payload["content_sha256"] = content_hash(payload)
    path = Path(path)
    try:
        atomic_write(path, lambda fh: torch.save(payload, fh))
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = f"{path} still holds the previous checkpoint" if path.exists() else (
            f"no earlier {path.name} exists"
        )  # fmt: skip
        raise RunError(
            f"disk full while writing checkpoint {path} ({exc.strerror}); the partial file "
            f"was removed and {kept}. Free space on {path.parent} (or lower "
            "run.keep_last), then continue with the same command plus run.resume=auto."
        ) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a visiontrain checkpoint; any problem is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist. Pass the path of a `.pt` file under a run's "
            "checkpoints/ folder, or run.resume=auto with the run's run.name."
        )
    state = read_torch_file(
        path,
        f"checkpoint {path}",
        not_torch=f"{path} is not a checkpoint: it is neither a PyTorch zip archive nor a "
        "pickle (another kind of file?). Pass a .pt file from a run's checkpoints/ folder.",
        refused_fix="Only checkpoints written by visiontrain load; never load a checkpoint "
        "from an untrusted source with weights_only=False.",
        truncated_fix="Resume from another checkpoint (checkpoints/ keeps the last few) or "
        "start anew.",
    )
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
    stored = state.get("content_sha256")
    if stored is None:
        raise CheckpointError(
            f"checkpoint {path} carries no content hash, so its integrity cannot be checked; "
            "visiontrain writes one into every checkpoint. Use a checkpoint written by "
            "visiontrain train."
        )
    if stored != content_hash(state):
        raise CheckpointError(
            f"checkpoint {path} fails its content hash: the file was modified or corrupted "
            "after it was written. Use another checkpoint (checkpoints/ keeps the last few)."
        )
    return state


def read_torch_file(
    path: Path, what: str, not_torch: str, refused_fix: str, truncated_fix: str
) -> Any:
    """``torch.load(weights_only=True)`` of ``path``; every failure a :class:`CheckpointError`.

    Nothing that a safe load may not create is ever built: a pickle that would run code is
    refused, not run. Shared by checkpoints and by initial weights (``model.weights``).

    Args:
        path: The file.
        what: How messages name it (``checkpoint runs/x/last.pt``).
        not_torch: The whole message for a file that is not PyTorch's at all.
        refused_fix: What to do about a refused (unsafe) file.
        truncated_fix: What to do about a truncated or damaged file.
    """
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head and head[:2] != b"PK" and head[:1] != b"\x80":
        # torch.save writes a zip archive (a legacy one a pickle); anything else (an image,
        # a text file) would otherwise reach the unpickler and read as an unsafe file.
        raise CheckpointError(not_torch)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{what} was refused: it holds objects that a safe load may not create "
            f"({_first_line(exc)}), so it was not unpickled. {refused_fix}"
        ) from None
    except (
        RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError
    ) as exc:  # fmt: skip
        # A truncated file fails inside the unpickler with any of these.
        raise CheckpointError(
            f"{what} is truncated or not a PyTorch file ({_first_line(exc)}). {truncated_fix}"
        ) from None


SAFETENSORS_FIX = (
    "Copy it again, or export it anew with `visiontrain export RUN --format safetensors`."
)


def read_safetensors(path: Path, what: str, fix: str = SAFETENSORS_FIX) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors (never unpickled); a damaged file a CheckpointError.

    Args:
        path: The file.
        what: How the message names it (``model.weights=w.safetensors``).
        fix: What to do about a truncated or foreign file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{what} is truncated or not a safetensors file ({_first_line(exc)}). {fix}"
        ) from None


def eval_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint was evaluated with: its EMA when trained with ``train.ema``."""
    ema = state.get("ema")
    return ema["module"] if ema else state["model"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
