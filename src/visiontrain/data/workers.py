"""How many loader workers, and how many compute threads beside them.

``data.num_workers=auto`` runs a short measurement of the real training loader at build
time (:func:`resolve_num_workers`); ``visiontrain bench loader`` runs the long one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from visiontrain.config import Config
from visiontrain.data.loaders import build_loader
from visiontrain.data.sources import DataBundle
from visiontrain.errors import UserError

WORKER_CANDIDATES = (0, 2, 4, 8)


AUTO_WORKER_CANDIDATES = (0, 2, 4)


PREFETCH_CANDIDATES = (2, 4)


AUTO_BATCHES = 8


AUTO_WARMUP_BATCHES = 2


# Settings within this share of the best throughput count as equally fast; the one with
# fewer workers then wins, since every worker costs a process, memory and a CPU core.
WITHIN = 0.05


@dataclass(frozen=True)
class LoaderSetting:
    """One point of the loader sweep."""

    num_workers: int
    pin_memory: bool
    prefetch_factor: int | None  # None: no workers, so nothing is prefetched

    def label(self) -> str:
        """Short text for tables and plots, e.g. ``workers=2 pin=off prefetch=4``."""
        text = f"workers={self.num_workers} pin={'on' if self.pin_memory else 'off'}"
        return text if self.prefetch_factor is None else f"{text} prefetch={self.prefetch_factor}"


def cap_workers(candidates: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Split worker counts into those up to ``os.cpu_count()`` and those above it.

    More workers than cores only time-slice the same cores, so they are not measured.
    """
    cpus = os.cpu_count() or 1
    return [w for w in candidates if w <= cpus], [w for w in candidates if w > cpus]


def loader_grid(candidates: tuple[int, ...], cuda: bool) -> tuple[list[LoaderSetting], list[int]]:
    """The settings to measure and the worker counts skipped for exceeding the CPU count.

    Args:
        candidates: worker counts to try.
        cuda: whether batches go to a CUDA device.

    Returns:
        The settings, and the worker counts above ``os.cpu_count()``.
    """
    workers, skipped = cap_workers(candidates)
    # Pinning only speeds up host-to-GPU copies; on CPU there is nothing to measure.
    pins = (False, True) if cuda else (False,)
    settings = [
        LoaderSetting(w, pin, pf)
        for w in workers
        for pin in pins
        for pf in (PREFETCH_CANDIDATES if w > 0 else (None,))
    ]
    return settings, skipped


def _shutdown(loader: torch.utils.data.DataLoader) -> None:
    # Persistent workers would otherwise live until garbage collection, competing for the
    # CPU with the next setting's measurement (or with the run that follows `auto`).
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
        loader._iterator = None


def measure_loader(
    cfg: Config,
    bundle: DataBundle,
    device: torch.device,
    setting: LoaderSetting,
    batches: int,
    warmup: int,
) -> dict[str, Any]:
    """Throughput of the configured training loader at one setting.

    The loader is the one ``train`` builds, with the setting's workers, pinning and
    prefetch depth. Epochs repeat when the split has fewer batches than asked for. On
    CUDA each batch's images are also copied to the device (``non_blocking``), because
    that copy is what pinned memory speeds up.

    Args:
        cfg: the resolved config.
        bundle: its data.
        device: where batches go.
        setting: the loader setting.
        batches: batches timed after the warm-up.
        warmup: batches read first and not timed (worker start-up, first-touch costs).

    Returns:
        The setting plus ``batches``, ``images``, ``seconds``, ``batches_per_s`` and
        ``images_per_s``.
    """
    update: dict[str, Any] = {"num_workers": setting.num_workers}
    if setting.prefetch_factor is not None:
        update["prefetch_factor"] = setting.prefetch_factor
    data_cfg = cfg.data.model_copy(update=update)
    loader = build_loader(
        bundle.train,
        bundle,
        data_cfg,
        train=True,
        seed=cfg.train.seed,
        pin_memory=setting.pin_memory,
        task=cfg.task,
    )
    if len(loader.batch_sampler) == 0:
        raise UserError(
            f"the training split ({len(bundle.train)} images) holds no full batch of "
            f"data.batch_size={cfg.data.batch_size}; lower data.batch_size to measure the loader."
        )
    set_cpu_threads(device, setting.num_workers)  # as `train` would run with this setting
    seen = images = 0
    start = time.perf_counter()
    epoch = 0
    try:
        while seen < warmup + batches:
            loader.batch_sampler.set_epoch(epoch)
            for batch in loader:
                image = batch["image"]
                if image is not None:
                    if device.type == "cuda":
                        image.to(device, non_blocking=True)
                    if seen >= warmup:
                        images += len(image)
                seen += 1
                if seen == warmup:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                if seen >= warmup + batches:
                    break
            epoch += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        _shutdown(loader)
    return {
        "num_workers": setting.num_workers,
        "pin_memory": setting.pin_memory,
        "prefetch_factor": setting.prefetch_factor,
        "label": setting.label(),
        "batches": batches,
        "images": images,
        "seconds": round(seconds, 6),
        "batches_per_s": round(batches / seconds, 3),
        "images_per_s": round(images / seconds, 3),
    }


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest row by images/s; among rows within :data:`WITHIN` of it, fewest workers."""
    best = max(r["images_per_s"] for r in rows)
    close = [r for r in rows if r["images_per_s"] >= (1.0 - WITHIN) * best]
    return min(close, key=lambda r: (r["num_workers"], -r["images_per_s"]))


def resolve_num_workers(cfg: Config, bundle: DataBundle, device: torch.device) -> str | None:
    """Resolve ``data.num_workers=auto`` in place by a short loader measurement.

    Worker counts 0, 2 and 4 (those not above the CPU count) are timed with the configured
    pinning and prefetch depth; the recommended count is written into ``cfg``, so the run's
    ``config.yaml`` and checkpoints record an integer.

    Returns:
        A note for the user naming the choice and the numbers, or None when the count
        was already an integer.
    """
    if cfg.data.num_workers != "auto":
        return None
    pin = cfg.data.pin_memory if cfg.data.pin_memory is not None else device.type == "cuda"
    counts, skipped = cap_workers(AUTO_WORKER_CANDIDATES)
    settings = [LoaderSetting(w, pin, cfg.data.prefetch_factor if w else None) for w in counts]
    rows = [
        measure_loader(cfg, bundle, device, s, AUTO_BATCHES, AUTO_WARMUP_BATCHES) for s in settings
    ]
    choice = recommend(rows)["num_workers"]
    cfg.data.num_workers = choice
    numbers = ", ".join(f"{r['num_workers']} workers {r['images_per_s']:.0f}" for r in rows)
    note = (
        f"data.num_workers=auto chose {choice} (images/s over {AUTO_BATCHES} batches: "
        f"{numbers}; within {WITHIN:.0%} of the best, fewer workers win)"
    )
    if skipped:
        note += f"; not tried: {', '.join(map(str, skipped))} (more than {os.cpu_count()} CPUs)"
    return note


def set_cpu_threads(device: torch.device, num_workers: int) -> None:
    """Give the compute threads the cores the loader workers leave free.

    OpenMP's thread team waits at a barrier after every parallel op; when a loader worker
    holds one of its cores, each op stalls until that thread is scheduled again. On a
    2-core machine with one busy worker this made small convolutions 50x slower. An
    explicit OMP_NUM_THREADS is respected.
    """
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    # Several processes on one machine (torchrun, which sets LOCAL_WORLD_SIZE) share its
    # cores.
    cores = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, cores - num_workers))
