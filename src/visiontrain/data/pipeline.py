"""The three loaders of a run, built from the resolved config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from visiontrain.config import Config
from visiontrain.data.loaders import build_loader
from visiontrain.data.sources import DataBundle
from visiontrain.data.workers import resolve_num_workers


@dataclass
class Loaders:
    """The three loaders of a run (test may be absent)."""

    train: DataLoader
    val: DataLoader
    test: DataLoader | None


def build_loaders(
    cfg: Config, bundle: DataBundle, device: torch.device, rank: int = 0, world_size: int = 1
) -> Loaders:
    """Train, val and test loaders with the run's seed (``num_workers=auto`` resolved first).

    Args:
        cfg: The resolved config; ``data.num_workers=auto`` is replaced by a measured count.
        bundle: Its data.
        device: Where batches go (pinning defaults to on for CUDA).
        rank: This process's rank under torchrun (its shard of each split).
        world_size: The number of processes.
    """
    note = resolve_num_workers(cfg, bundle, device)
    if note is not None:
        bundle.notes.append(note)
    pin = cfg.data.pin_memory if cfg.data.pin_memory is not None else device.type == "cuda"
    kw: dict[str, Any] = {
        "seed": cfg.train.seed,
        "pin_memory": pin,
        "task": cfg.task,
        "rank": rank,
        "world_size": world_size,
    }
    return Loaders(
        train=build_loader(bundle.train, bundle, cfg.data, train=True, **kw),
        val=build_loader(bundle.val, bundle, cfg.data, train=False, **kw),
        test=(
            build_loader(bundle.test, bundle, cfg.data, train=False, **kw)
            if bundle.test is not None
            else None
        ),
    )
