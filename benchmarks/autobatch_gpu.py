"""``data.batch_size=auto`` on a GPU: the batch found per precision, then trained at it.

For each precision: the search's answer, its ``note:`` and its time, then 5 real updates
at the chosen batch through the run's step, with the peak allocated memory as a share of
the GPU (the rule promises at most 0.90). The data is uint8 noise of the working size, so
nothing is read from disk.

Usage (a GPU machine; ``benchmarks/gpu_session.sh`` runs it)
    python benchmarks/autobatch_gpu.py [--model resnet50] [--precisions 32 bf16 fp16]
                                       [key=value ...]
    python benchmarks/autobatch_gpu.py train.activation_checkpointing=true

On the CPU ``data.batch_size=auto`` is refused (exit 2), and so is this script.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence

import torch

import visiontrain as vt
from visiontrain.config import build_config
from visiontrain.engine.parts import build_parts, build_step


class Noise(torch.utils.data.Dataset):
    """``n`` uint8 noise images (seeded per index) in 10 classes."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(i)
        shape = (3, self.size, self.size)
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g), i % 10


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--train-size", type=int, default=4096)
    p.add_argument("--precisions", nargs="+", default=["32", "bf16", "fp16"])
    p.add_argument("items", nargs="*", help="extra key=value")
    a = p.parse_args(argv)
    size = a.image_size
    data = vt.data.from_datasets(
        Noise(a.train_size, size), Noise(64, size), classes=[str(c) for c in range(10)],
        image_size=size,
    )  # fmt: skip
    for precision in a.precisions:
        keys = [f"model.name={a.model}", "data.batch_size=auto", f"train.precision={precision}",
                "train.channels_last=true", *a.items]  # fmt: skip
        cfg = build_config(None, keys)
        t0 = time.perf_counter()
        parts = build_parts(cfg, data=data)
        search_s = time.perf_counter() - t0
        note = next(n for n in parts.notes if n.startswith("data.batch_size=auto"))
        step = build_step(cfg, parts)
        batch = next(iter(parts.loaders.train))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i in range(5):
            step.train_update(itertools.repeat(batch), 1, i)
        torch.cuda.synchronize()
        total = torch.cuda.get_device_properties(parts.device).total_memory
        print(
            f"precision={precision} batch={cfg.data.batch_size} search_s={search_s:.1f} "
            f"5_updates_s={time.perf_counter() - t0:.1f} "
            f"peak_share={torch.cuda.max_memory_allocated() / total:.3f}\n  note: {note}",
            flush=True,
        )
        del parts, step, batch
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
