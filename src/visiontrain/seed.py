"""Seeding, determinism and RNG state capture.

Per-sample augmentation seeds are derived from (base seed, epoch, sample index), so a
resumed run repeats its augmentation without saving any loader-worker state.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

_MASK63 = (1 << 63) - 1


def sample_seed(base: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample in one epoch (splitmix64-style)."""
    x = (base * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index) & ((1 << 64) - 1)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & _MASK63


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and every CUDA device."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def set_deterministic(enabled: bool) -> None:
    """Turn on PyTorch's deterministic algorithms and the cuDNN flags."""
    if enabled:
        # cuBLAS needs a fixed workspace to be deterministic; must be set before first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def worker_init(worker_id: int) -> None:
    """Seed python and numpy in a loader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def capture_rng() -> dict[str, Any]:
    """All RNG states as tensors, numbers and lists (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng`."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
