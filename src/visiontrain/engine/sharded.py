"""Sharded checkpoints (``train.strategy=fsdp``) through ``torch.distributed.checkpoint``.

One save is one folder, e.g. ``checkpoints/last.dcp/``::

    .metadata             DCP's index: every tensor's global shape and dtype, where its
                          chunks lie (written by rank 0 once every rank has written)
    __<rank>_<n>.distcp   the tensors each rank wrote: its shards of the parameters, of
                          the optimizer state and of the EMA's copy
    state.pt              everything else, from rank 0: counters, every rank's RNG,
                          callbacks, config, task state, scheduler, scaler, the optimizer's
                          param groups... — a visiontrain checkpoint with its own content
                          hash — plus the manifest: the size and SHA-256 of every other file

DCP's files hold tensors only (nothing that loading would unpickle), and every tensor has a
global shape, so a checkpoint written by N processes loads in M: each process reads the
parts of each tensor its own shards cover (one process reads whole tensors).

Commit: every rank writes into ``NAME.partial/``; after the last rank's file and the
metadata have landed (DCP's final collective) and each rank has hashed its own files, rank
0 writes ``state.pt``, renames the previous ``NAME`` to ``NAME.old``, ``NAME.partial`` to
``NAME``, and deletes ``NAME.old``. A kill before the second rename leaves the previous
checkpoint: as ``NAME``, or as ``NAME.old``, which is renamed back when it is next looked
for (:func:`visiontrain.rundir.is_sharded`).

Verified on load: ``state.pt``'s content hash (as for a ``.pt`` checkpoint), then that the
folder holds exactly the files of the manifest, each with its recorded size and SHA-256. A
resume under torchrun splits that hashing between the ranks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.tensor import DTensor

from visiontrain.engine.checkpoint import load_checkpoint, save_checkpoint
from visiontrain.engine.distributed import Dist
from visiontrain.errors import CheckpointError
from visiontrain.rundir import SHARDED_ASIDE, SHARDED_STATE, is_sharded

PARTIAL = ".partial"
# The parts of a checkpoint state whose tensors go into DCP's files; the rest into state.pt.
TENSOR_PARTS = ("model", "optimizer", "ema")
DCP_FORMAT = "torch.distributed.checkpoint"

# Called with the commit's stage ("written": NAME.partial complete; "set_aside": the
# previous NAME renamed away) and NAME. Tests kill the process there; None in a real run.
fault_hook: Callable[[str, Path], None] | None = None


@contextmanager
def _one_process() -> Iterator[None]:
    # DCP warns on every call without a process group that it assumes one process: here
    # that is the intent, and the warning would reach every eval/predict/export user.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fault(stage: str, folder: Path) -> None:
    if fault_hook is not None:
        fault_hook(stage, folder)


# ----------------------------------------------------------------------------- state


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` keyed by parameter name instead of position.

    Names do not depend on how many processes hold the shards, so the state reshards.
    """
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    return {
        "state": {order[i]: v for i, v in sd["state"].items()},
        "param_groups": [
            {**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]
        ],
    }


def _optimizer_by_position(
    model: nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, Any]
) -> dict[str, Any]:
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    index = {
        names[id(p)]: i
        for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])
    }
    try:
        return {
            "state": {index[n]: v for n, v in named["state"].items()},
            "param_groups": [
                {**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]
            ],
        }
    except KeyError as exc:
        raise CheckpointError(
            f"the checkpoint's optimizer holds parameter {exc} that this model lacks; resume "
            "with the config it was trained with."
        ) from None


def _split(tree: Any, keep_plain: bool) -> tuple[Any, Any]:
    """``(tensors, rest)`` of a nested dict: tensor leaves apart from everything else.

    With ``keep_plain`` false only sharded tensors (DTensor) are kept: a replicated tensor
    (a BatchNorm buffer, a step count) is written once, by rank 0.
    """
    if isinstance(tree, dict):
        tensors, rest = {}, {}
        for key, value in tree.items():
            t, r = _split(value, keep_plain)
            if t is not None:
                tensors[key] = t
            if r is not None:
                rest[key] = r
        return tensors or None, rest if rest or not tensors else None
    if isinstance(tree, torch.Tensor):
        return (tree if keep_plain or isinstance(tree, DTensor) else None), None
    return None, tree


def _merge(base: Any, extra: Any) -> Any:
    if isinstance(base, dict) and isinstance(extra, dict):
        out = dict(base)
        for key, value in extra.items():
            out[key] = _merge(out[key], value) if key in out else value
        return out
    return extra


def split_state(state: dict[str, Any], rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors for DCP, the rest for state.pt)`` of a checkpoint state."""
    tensors: dict[str, Any] = {}
    rest = {k: v for k, v in state.items() if k not in TENSOR_PARTS}
    for part in TENSOR_PARTS:
        if state.get(part) is None:
            rest[part] = None
            continue
        t, r = _split(state[part], keep_plain=rank == 0)
        if t:
            tensors[part] = t
        rest[part] = r if r is not None else {}
    return tensors, rest


# ----------------------------------------------------------------------------- files


def _digest(path: Path) -> list[Any]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return [path.stat().st_size, h.hexdigest()]


def _sibling(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dist(dist: Dist) -> Dist:
    """``dist`` with a process group of its own for the saves of a background thread.

    ``run.async_save`` under fsdp: every rank's writer thread runs the save's collectives
    (DCP's plan exchange, the barriers, the gather of file digests) while the training
    thread runs FSDP's all-gathers and reduce-scatters. Collectives on one group must be
    issued in the same order on every rank, which two threads cannot promise; on a group
    of their own the saves stay in order among themselves. A collective itself: every
    rank calls it, at set-up.
    """
    if not dist.enabled:
        return dist
    return replace(dist, cpu_group=torch_dist.new_group(backend="gloo"))


def _barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier(group=dist.cpu_group)


def _prepare(folder: Path) -> None:
    """Rank 0, before a save: finish an interrupted commit, clear a stale partial folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    is_sharded(folder)  # an interrupted commit's NAME.old back to NAME
    shutil.rmtree(_sibling(folder, PARTIAL), ignore_errors=True)
    if folder.exists():  # else NAME.old may be all there is: keep it
        shutil.rmtree(_sibling(folder, SHARDED_ASIDE), ignore_errors=True)


def _commit(partial: Path, folder: Path) -> None:
    """Rank 0: ``partial`` (complete) becomes ``folder``; the previous one goes."""
    _fsync_dir(partial)
    _fault("written", folder)
    aside = _sibling(folder, SHARDED_ASIDE)
    if folder.exists():
        os.rename(folder, aside)
        _fault("set_aside", folder)
    os.rename(partial, folder)
    _fsync_dir(folder.parent)
    shutil.rmtree(aside, ignore_errors=True)


def save_sharded(folders: list[Path], state: dict[str, Any], dist: Dist) -> None:
    """Write ``state`` as the sharded checkpoint ``folders[0]`` and copies under the others.

    A collective: every rank calls it with its own state (its shards). The copies are
    hard links to the first folder's files (a copy where the filesystem cannot link), each
    committed the same way, in order.
    """
    import torch.distributed.checkpoint as dcp

    first = folders[0]
    partial = _sibling(first, PARTIAL)
    if dist.is_main:
        _prepare(first)
    _barrier(dist)
    tensors, rest = split_state(state, dist.rank)
    writer = dcp.FileSystemWriter(partial, sync_files=True)
    with _one_process():
        dcp.save(
            tensors,
            storage_writer=writer,
            process_group=dist.cpu_group if dist.enabled else None,
            no_dist=not dist.enabled,
        )
    # dcp.save returns once every rank has written and rank 0 has written the metadata.
    mine = {p.name: _digest(p) for p in sorted(partial.glob(f"__{dist.rank}_*.distcp"))}
    everyone = dist.gather([mine])  # also a barrier: every rank has hashed its files
    if dist.is_main:
        files = {name: d for part in everyone for name, d in part.items()}
        files[".metadata"] = _digest(partial / ".metadata")
        rest["sharded"] = {"format": DCP_FORMAT, "world_size": dist.world_size, "files": files}
        save_checkpoint(partial / SHARDED_STATE, rest)
        _commit(partial, first)
        for other in folders[1:]:
            _copy_committed(first, other)
    _barrier(dist)


def _copy_committed(source: Path, folder: Path) -> None:
    _prepare(folder)
    partial = _sibling(folder, PARTIAL)
    partial.mkdir()
    for path in source.iterdir():
        try:
            os.link(path, partial / path.name)
        except OSError:
            shutil.copy2(path, partial / path.name)
    _commit(partial, folder)


def remove_sharded(folder: Path) -> None:
    """Delete a sharded checkpoint (an epoch folder beyond ``run.keep_last``)."""
    shutil.rmtree(folder, ignore_errors=True)


def rewrite_state(folder: Path, update: dict[str, Any]) -> None:
    """Change entries of ``state.pt`` (the task's threshold), atomically; shards untouched."""
    state = load_checkpoint(folder / SHARDED_STATE)
    state.update(update)
    save_checkpoint(folder / SHARDED_STATE, state)


# ----------------------------------------------------------------------------- loading


def read_state(folder: Path) -> dict[str, Any]:
    """``state.pt`` of a sharded checkpoint (its content hash checked); no tensors loaded."""
    path = Path(folder)
    if not is_sharded(path):
        raise CheckpointError(
            f"checkpoint {path} is not a sharded checkpoint folder (no {SHARDED_STATE}); a "
            "save may have been interrupted before its commit. Pass another checkpoint."
        )
    state = load_checkpoint(path / SHARDED_STATE)
    if not isinstance(state.get("sharded"), dict) or "files" not in state["sharded"]:
        raise CheckpointError(f"checkpoint {path}: {SHARDED_STATE} has no manifest of its shards.")
    return state


def verify_files(folder: Path, state: dict[str, Any], rank: int = 0, world: int = 1) -> None:
    """The folder holds the manifest's files with their sizes and SHA-256 (share ``rank``).

    Raises:
        CheckpointError: a file is missing, extra, or differs from what was written.
    """
    files: dict[str, list[Any]] = state["sharded"]["files"]
    present = {p.name for p in folder.iterdir() if p.name != SHARDED_STATE}
    problems = [f"{n} is missing" for n in sorted(set(files) - present)]
    problems += [f"{n} was not written with it" for n in sorted(present - set(files))]
    for name in sorted(set(files) & present)[rank::world]:
        if _digest(folder / name) != list(files[name]):
            problems.append(f"{name} differs from what was written (size or SHA-256)")
    if problems:
        raise CheckpointError(
            f"checkpoint {folder} fails its check: {'; '.join(problems[:3])}. The folder was "
            "modified or damaged after it was written; use another checkpoint (checkpoints/ "
            "keeps the last few)."
        )


def _metadata(folder: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(folder).read_metadata()
    for key, item in md.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            # visiontrain writes tensors only; loading anything else would unpickle it.
            raise CheckpointError(
                f"checkpoint {folder} holds a non-tensor entry {key!r} in its shards, which "
                "visiontrain never writes; it is refused rather than unpickled."
            )
    return md


def _skeleton(md: Any, make: Callable[[tuple[Any, ...], Any], torch.Tensor | None]) -> dict:
    """Nested dict of tensors to load into, one per tensor of the checkpoint."""
    out: dict[str, Any] = {}
    for key, item in md.state_dict_metadata.items():
        path = tuple(md.planner_data[key])
        tensor = make(path, item)
        if tensor is None:
            continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = tensor
    return out


def read_sharded(folder: Path) -> dict[str, Any]:
    """A whole sharded checkpoint in this one process: full tensors, as a ``.pt`` holds.

    For ``eval``, ``predict``, ``export``, ``vt.load``: no process group needed. The
    optimizer state is keyed by parameter name.
    """
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    state = read_state(folder)
    verify_files(folder, state)
    md = _metadata(folder)
    tensors = _skeleton(md, lambda _p, item: torch.empty(item.size, dtype=item.properties.dtype))
    with _one_process():
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    return _merge(state, tensors)


def load_sharded(
    folder: Path,
    state: dict[str, Any],
    dist: Dist,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    ema_module: nn.Module | None,
) -> None:
    """Load a sharded checkpoint's tensors into the live (sharded or plain) objects.

    A collective under torchrun. Each rank checks its share of the files, then reads what
    its shards cover; with ``optimizer`` None only the weights (and the EMA's) are loaded.

    Args:
        folder: The ``.dcp`` folder.
        state: Its ``state.pt`` (:func:`read_state`, read by rank 0 and broadcast).
        dist: The job.
        model: The plain or sharded module.
        optimizer: Its optimizer, or None for the weights alone.
        ema_module: The EMA's copy, when the run has one.
    """
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    bad = ""
    try:
        verify_files(folder, state, dist.rank, dist.world_size)
    except CheckpointError as exc:
        bad = str(exc)
    if dist.any(bool(bad)):
        raise CheckpointError(bad or f"checkpoint {folder} fails its check on another rank.")
    md = _metadata(folder)
    live = {"model": model.state_dict()}
    if ema_module is not None:
        live["ema"] = ema_module.state_dict()
    params = dict(model.named_parameters())

    def make(path: tuple[Any, ...], item: Any) -> torch.Tensor | None:
        if path[0] == "optimizer":
            if optimizer is None:
                return None
            p = params.get(path[2]) if len(path) > 2 else None
            if isinstance(p, DTensor) and tuple(item.size) == tuple(p.shape):
                return torch.empty_like(p, dtype=item.properties.dtype)  # this rank's shard
            return torch.empty(item.size, dtype=item.properties.dtype)
        if path[0] not in live:
            return None  # the checkpoint has an EMA; the run does not (checked by the caller)
        # ("model", name) or ("ema", "module", name)
        tensor = live[path[0]].get(path[-1])
        if tensor is None or tuple(tensor.shape) != tuple(item.size):
            raise CheckpointError(
                f"checkpoint {folder} does not fit this model ({path[-1]}: "
                f"{tuple(item.size)} in the checkpoint, "
                f"{None if tensor is None else tuple(tensor.shape)} here). Resume with the "
                "config it was trained with (its config.yaml)."
            )
        return tensor  # read in place into the parameter or buffer (its shard)

    tensors = _skeleton(md, make)
    with _one_process():
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(folder), no_dist=not dist.enabled)
    full = _merge({k: state.get(k) for k in TENSOR_PARTS}, tensors)
    try:
        model.load_state_dict(full["model"])
        if ema_module is not None and full.get("ema"):
            ema_module.load_state_dict(full["ema"]["module"])
        if optimizer is not None:
            optimizer.load_state_dict(_optimizer_by_position(model, optimizer, full["optimizer"]))
    except (RuntimeError, ValueError, KeyError) as exc:
        msg = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint {folder} does not fit this model ({msg}). Resume with the config it "
            "was trained with (its config.yaml)."
        ) from None
