"""Decoding less: a large JPEG prepared to the working size, full decode vs reduced scale.

What is compared
    The same JPEG (a generated photo-like image: gradients, discs, noise; ``--width`` x
    ``--height``, default 1600 x 1200) prepared to ``--size`` (224) the way an image
    folder's sample is, in paired rounds, side by side in one process:

    * ``full``: ``decode_file(path)`` (torchvision, libjpeg-turbo) then ``prepare_image``;
    * ``reduced``: ``decode_file(path, target=(size, "short"))`` (libjpeg's DCT scaling
      through PIL's draft) then the same ``prepare_image``.

    Reported: ms per image (median of ``--rounds`` rounds of ``--repeats`` images each),
    the ratio full / reduced, and the mean absolute pixel difference of the results.

Usage
    python benchmarks/decode.py [--width 1600] [--height 1200] [--size 224] [--rounds 5]
    python benchmarks/decode.py --quick     # small and fast: a smoke test, not a measurement
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from common import command_line
from visiontrain.data.images import decode_file, prepare_image
from visiontrain.data.synthetic import photo_like


def photo(path: Path, width: int, height: int) -> Path:
    """A photo-like JPEG (quality 90), seeded."""
    Image.fromarray(photo_like(width, height)).save(path, quality=90)
    return path


def per_image_ms(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Milliseconds per call of ``fn``, over ``repeats`` calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1200)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.width, a.height, a.size, a.rounds, a.repeats = 640, 480, 96, 1, 2
    with tempfile.TemporaryDirectory() as tmp:
        path = photo(Path(tmp) / "photo.jpg", a.width, a.height)

        def full() -> torch.Tensor:
            return prepare_image(decode_file(path, 3), a.size, "short")[0]

        def reduced() -> torch.Tensor:
            return prepare_image(decode_file(path, 3, (a.size, "short")), a.size, "short")[0]

        times: dict[str, list[float]] = {"full": [], "reduced": []}
        for _ in range(a.rounds):  # paired: one of each per round
            times["full"].append(per_image_ms(full, a.repeats))
            times["reduced"].append(per_image_ms(reduced, a.repeats))
        diff = (full().int() - reduced().int()).abs().float().mean().item()
    f, r = statistics.median(times["full"]), statistics.median(times["reduced"])
    print(f"command: {command_line()}")
    print(f"{a.width}x{a.height} JPEG to {a.size} px, {a.rounds} rounds of {a.repeats} images")
    print(f"full decode + resize:    {f:.2f} ms/image")
    print(f"reduced decode + resize: {r:.2f} ms/image")
    print(f"ratio full/reduced: {f / r:.2f}")
    print(f"mean |pixel difference|: {diff:.2f} grey levels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
