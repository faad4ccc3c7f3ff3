"""Distributed data parallel through torchrun: process group, collectives, exact gathers.

``torchrun --nproc_per_node=N -m visiontrain train ...`` sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT``); :func:`init_distributed` reads them,
starts the process group (NCCL on CUDA, Gloo on the CPU) and pins the process to
``cuda:LOCAL_RANK``. Without those variables every helper here is a no-op for one process,
so the trainer has a single code path.

Evaluation gathers per-sample results in the dataset's order: the evaluation sampler shards
by stride (rank ``r`` holds samples ``r, r + N, r + 2N, ...``, no padding), so sample ``i``
is item ``i // N`` of rank ``i % N`` and :func:`interleave` restores the order exactly.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from visiontrain.errors import ConfigError, UserError

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in the job; ``world_size == 1`` means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    # A Gloo group for small host-side decisions (the stop flag), so that a CPU tensor
    # never has to go through NCCL and no device stream is synchronised for it.
    cpu_group: Any = None

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs, checkpoints and reports."""
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes, in place; every rank gets the same result."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(t.item())

    def gather(self, items: list[Any]) -> list[Any]:
        """Every rank's per-sample ``items`` joined in the dataset's order, on every rank.

        Items are moved to the CPU for the exchange (pickled by ``all_gather_object``).
        """
        if not self.enabled:
            return items
        local = [_to_cpu(x) for x in items]
        parts: list[list[Any]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(parts, local, group=self.cpu_group)
        return interleave(parts)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``tensor`` (one per sample) in the dataset's order.

        The result is on ``tensor``'s device, on every rank.
        """
        if not self.enabled:
            return tensor
        parts: list[torch.Tensor] = [torch.empty(0)] * self.world_size
        dist.all_gather_object(parts, tensor.detach().cpu(), group=self.cpu_group)
        n = sum(len(p) for p in parts)
        if all(len(p) == len(range(r, n, self.world_size)) for r, p in enumerate(parts)):
            out = torch.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
            for r, part in enumerate(parts):
                out[r :: self.world_size] = part
        else:  # a skipped sample broke the stride pattern: each sample still counts once
            out = torch.cat(parts)
        return out.to(tensor.device)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def run_on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, its result (or its :class:`UserError`) on every rank.

        For decisions that read the clock or the disk, which may differ between nodes.
        """
        if not self.enabled:
            return fn()
        result: Any = None
        error: UserError | None = None
        if self.is_main:
            try:
                result = fn()
            except UserError as exc:
                error = exc
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

    def broadcast_module(self, module: nn.Module, buffers_only: bool = False) -> None:
        """Copy rank 0's parameters (unless ``buffers_only``) and buffers on every rank."""
        if not self.enabled:
            return
        tensors = [*([] if buffers_only else module.parameters()), *module.buffers()]
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)


def interleave(parts: Sequence[list[Any]]) -> list[Any]:
    """Undo stride sharding: item ``i`` of the result is item ``i // N`` of part ``i % N``.

    When the lengths are not those of a stride shard (a sample was skipped as unreadable),
    the parts are concatenated instead: every sample still counts once.
    """
    n = sum(len(p) for p in parts)
    world = len(parts)
    if any(len(p) != len(range(r, n, world)) for r, p in enumerate(parts)):
        return [x for p in parts for x in p]
    return [parts[i % world][i // world] for i in range(n)]


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_to_cpu(v) for v in x)
    return x


def env_world() -> tuple[int, int, int, int]:
    """``(rank, world_size, local_rank, local_world_size)`` from torchrun's variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return rank, world, local, local_world


def refuse_distributed(verb: str) -> None:
    """Tools other than ``train`` run in one process; say so under torchrun."""
    if env_world()[1] > 1:
        raise ConfigError(
            f"`visiontrain {verb}` runs in one process; it was started by torchrun with "
            f"WORLD_SIZE={os.environ['WORLD_SIZE']}. Run it without torchrun."
        )


_CURRENT = Dist()


def current() -> Dist:
    """The job's :class:`Dist` (one process unless :func:`distributed_session` is active)."""
    return _CURRENT


@contextmanager
def distributed_session(device_name: str, timeout_s: float = 1800) -> Iterator[Dist]:
    """Start the process group when torchrun launched us; tear it down on the way out.

    Args:
        device_name: ``train.device`` (auto, cpu or cuda): CUDA means NCCL, one GPU per
            process (``cuda:LOCAL_RANK``); the CPU means Gloo.
        timeout_s: How long a collective may wait for a missing rank before failing.
    """
    global _CURRENT
    rank, world, local, local_world = env_world()
    if world <= 1:
        yield _CURRENT
        return
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available; use cpu.")
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPUs; "
                "start torchrun with --nproc_per_node at most the GPU count."
            )
        torch.cuda.set_device(local)
    backend = "nccl" if use_cuda else "gloo"
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if use_cuda:
        kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group(backend=backend, **kwargs)
    cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    previous = _CURRENT
    _CURRENT = Dist(rank, world, local, local_world, backend, cpu_group)
    try:
        yield _CURRENT
    finally:
        _CURRENT = previous
        # Free what still holds the group (a closed DDP wrapper in a reference cycle)
        # while it is alive, so no Gloo destructor runs after the teardown.
        gc.collect()
        dist.destroy_process_group()
