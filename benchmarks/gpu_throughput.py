"""GPU training throughput: ResNet-50 at 224 px across precisions and compilation.

What is measured
    Training images/s of torchvision's ResNet-50 (no pretrained weights, 1000 classes)
    on synthetic data that lives on the device (so no loader is in the way), SGD with
    momentum 0.9, cross entropy, batch ``--batch-size`` (256), in five modes:

    * ``fp32``: float32 with TF32 off (``torch.backends.cuda.matmul.allow_tf32`` and
      ``torch.backends.cudnn.allow_tf32`` False): full-precision CUDA-core math.
    * ``tf32``: float32 storage, TF32 tensor-core matmuls and convolutions.
    * ``bf16``: ``torch.autocast(dtype=torch.bfloat16)`` (TF32 on for what stays fp32).
    * ``bf16_cl``: the same with the model and the inputs in ``channels_last``.
    * ``bf16_cl_compile``: the same through ``torch.compile`` (default mode).

    For each mode: images/s and ms/step (median of ``--repeats`` timed blocks of
    ``--steps`` steps after ``--warmup`` steps; ``torch.cuda.synchronize`` around each
    block), peak allocated memory, the achieved model FLOP/s and the model FLOPs
    utilisation (MFU) against the device's peak dense throughput for that math (table
    ``PEAK_TFLOPS``; ``--peak-tflops`` for another device), and with ``--max-batch`` the
    largest batch that trains without running out of memory (doubling, then a binary
    search to within ``--batch-tolerance``) for fp32 and bf16 and bf16 + channels_last.

FLOPs per image
    ResNet-50's forward pass at 224 px is 4.1 G multiply-adds, often quoted as "4.1
    GFLOPs"; a multiply-add is two floating-point operations, so it is 8.2 GFLOPs, and a
    training step (forward plus a backward about twice as costly) is about 3 x 8.2 =
    24.6 GFLOPs per image. MFU here is computed with 24.6 GFLOPs (``--flops-per-image``
    to change it), scaled by (image size / 224)^2; counting 4.1 G as FLOPs would halve it.

Reference point
    NVIDIA's published ResNet-50 v1.5 PyTorch training figure is about 2,470 img/s with
    AMP on one A100 80GB, 2.6x its TF32 figure (DALI loader, NVIDIA's container).

Run ``python benchmarks/gpu_throughput.py`` on a GPU machine (never in CI).
``--quick`` runs on the CPU with a tiny model (resnet18 at 32 px, batch 4, 2 steps) and
skips the CUDA-only modes with the reason printed: the test suite's smoke run.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

MODES = ("fp32", "tf32", "bf16", "bf16_cl", "bf16_cl_compile")
# Peak dense tensor throughput in TFLOP/s (no structured sparsity), by device name
# fragment, from NVIDIA's data sheets: (bf16, tf32, fp32 without tensor cores). The
# first fragment found in torch.cuda.get_device_name() wins, so the more specific first.
PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    "H200": (989.4, 494.7, 66.9),
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H100": (989.4, 494.7, 66.9),  # SXM5
    "A100": (312.0, 156.0, 19.5),
}
# ResNet-50 forward at 224 px: 4.1 G multiply-adds = 8.2 GFLOPs; training ~3x forward.
RESNET50_TRAIN_FLOPS = 3 * 2 * 4.1e9
NVIDIA_A100_AMP_IMG_S = 2470  # published ResNet-50 PyTorch, AMP, one A100 80GB


@dataclass(frozen=True)
class Settings:
    """Resolved benchmark settings."""

    model: str
    image_size: int
    batch_size: int
    warmup: int
    steps: int
    repeats: int
    modes: tuple[str, ...]
    max_batch: bool
    batch_tolerance: int
    flops_per_image: float | None
    peak_tflops: float | None
    device: str


@dataclass
class Result:
    """One mode's measurement (None: not measured)."""

    mode: str
    img_s: float | None = None
    ms_step: float | None = None
    peak_gib: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    max_batch: int | None = None
    skipped: str | None = None


def parse_args(argv: Sequence[str] | None) -> Settings:
    """Command-line flags; ``--quick`` switches to the CPU smoke-run sizes."""
    p = argparse.ArgumentParser(
        description="ResNet-50 training images/s, memory, MFU and largest batch per "
        "precision on one GPU (fp32, TF32, bf16, channels_last, torch.compile)."
    )
    p.add_argument("--quick", action="store_true", help="CPU, resnet18 at 32 px, 2 steps")
    p.add_argument("--model", help="torchvision model name (resnet50)")
    p.add_argument("--image-size", type=int, help="image side (224)")
    p.add_argument("--batch-size", type=int, help="batch size (256)")
    p.add_argument("--warmup", type=int, help="untimed steps per mode (15; compile: 3x)")
    p.add_argument("--steps", type=int, help="steps per timed block (30)")
    p.add_argument("--repeats", type=int, help="timed blocks per mode (3)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="modes to run (all)")
    p.add_argument("--max-batch", action="store_true", help="also search the largest batch")
    p.add_argument("--batch-tolerance", type=int, default=8, help="search precision (8)")
    p.add_argument("--flops-per-image", type=float, help="training FLOPs per image")
    p.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU")
    p.add_argument("--device", help="cuda (default) or cpu")
    args = p.parse_args(argv)
    quick = args.quick
    s = Settings(
        model=args.model or ("resnet18" if quick else "resnet50"),
        image_size=args.image_size or (32 if quick else 224),
        batch_size=args.batch_size or (4 if quick else 256),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 15),
        steps=args.steps or (2 if quick else 30),
        repeats=args.repeats or (1 if quick else 3),
        modes=tuple(args.modes or MODES),
        max_batch=args.max_batch,
        batch_tolerance=max(1, args.batch_tolerance),
        flops_per_image=args.flops_per_image,
        peak_tflops=args.peak_tflops,
        device=args.device or ("cpu" if quick else "cuda"),
    )
    if min(s.image_size, s.batch_size, s.steps, s.repeats) < 1 or s.warmup < 0:
        p.error("sizes must be positive")
    if s.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or use --quick / --device cpu")
    return s


def flops_per_image(s: Settings) -> float | None:
    """Training FLOPs per image: the flag, or ResNet-50's scaled to the image size."""
    if s.flops_per_image is not None:
        return s.flops_per_image
    if s.model == "resnet50":
        return RESNET50_TRAIN_FLOPS * (s.image_size / 224) ** 2
    return None


def peak_for(mode: str, s: Settings) -> float | None:
    """The device's peak TFLOP/s for the math ``mode`` runs on, if known."""
    if s.peak_tflops is not None:
        return s.peak_tflops
    if s.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for fragment, (bf16, tf32, fp32) in PEAK_TFLOPS.items():
        if fragment in name:
            return bf16 if mode.startswith("bf16") else tf32 if mode == "tf32" else fp32
    return None


def skip_reason(mode: str, s: Settings) -> str | None:
    """Why ``mode`` does not run here, or None."""
    if s.device != "cuda" and mode != "fp32":
        return "CUDA only (tensor-core TF32/bf16 and compiled GPU kernels)"
    if mode.startswith("bf16") and s.device == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    return None


# ---------------------------------------------------------------------- one mode


class Step:
    """One mode's model, optimizer and synthetic batch; ``run()`` is one training step."""

    def __init__(self, mode: str, s: Settings, batch_size: int) -> None:
        dev = torch.device(s.device)
        tf32 = mode != "fp32"
        if s.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels
        torch.manual_seed(0)
        model: nn.Module = getattr(torchvision.models, s.model)(num_classes=1000).to(dev)
        x = torch.randn(batch_size, 3, s.image_size, s.image_size, device=dev)
        self.channels_last = "_cl" in mode
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        self.model = model
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(model) if mode.endswith("_compile") else model
        )
        self.x, self.y = x, torch.randint(0, 1000, (batch_size,), device=dev)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.bf16 = mode.startswith("bf16")
        self.device = dev

    def autocast(self) -> AbstractContextManager[object]:
        """bf16 autocast for the bf16 modes."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def run(self) -> None:
        """Forward, loss, backward, optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(self.forward(self.x), self.y)
        loss.backward()
        self.optimizer.step()

    def sync(self) -> None:
        """Wait for the device (a no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def free_memory() -> None:
    """Drop what a finished mode left on the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_mode(mode: str, s: Settings) -> Result:
    """Throughput, memory and MFU of one mode at ``--batch-size``."""
    if torch.cuda.is_available() and s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = Step(mode, s, s.batch_size)
    # torch.compile traces and autotunes on its first calls: give it longer to settle.
    for _ in range(s.warmup * (3 if mode.endswith("_compile") else 1)):
        step.run()
    step.sync()
    blocks = []
    for _ in range(s.repeats):
        start = time.perf_counter()
        for _ in range(s.steps):
            step.run()
        step.sync()
        blocks.append(time.perf_counter() - start)
    seconds = statistics.median(blocks) / s.steps
    r = Result(mode, img_s=s.batch_size / seconds, ms_step=1000 * seconds)
    if s.device == "cuda":
        r.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    flops, peak = flops_per_image(s), peak_for(mode, s)
    if flops is not None and r.img_s is not None:
        r.tflops = r.img_s * flops / 1e12
        if peak is not None:
            r.mfu = r.tflops / peak
    del step
    free_memory()
    return r


def fits(mode: str, s: Settings, batch: int) -> bool:
    """Whether two training steps at ``batch`` run without running out of memory."""
    step = None
    try:
        step = Step(mode, s, batch)
        step.run()
        step.run()  # the second allocates nothing new, but the optimizer state is now in
        step.sync()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del step
        free_memory()


def largest_batch(mode: str, s: Settings, cap: int = 16384) -> int:
    """The largest batch that fits: doubling from ``--batch-size``, then bisection."""
    lo, hi = 0, s.batch_size
    while hi <= cap and fits(mode, s, hi):
        lo, hi = hi, hi * 2
    if hi > cap:
        return lo
    while hi - lo > s.batch_tolerance:
        mid = (lo + hi) // 2
        if fits(mode, s, mid):
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------- report


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec`` (width first), or a dash of the same width."""
    if value is None:
        return "-".rjust(int(re.match(r"\d*", spec).group() or 0))
    return format(value, spec)


def report(results: list[Result]) -> None:
    """The table and the speed-up ratios against fp32."""
    print()
    print(
        f"{'mode':<16} {'img/s':>9} {'ms/step':>9} {'peak GiB':>9} {'TFLOP/s':>8} "
        f"{'MFU':>6} {'max batch':>9}"
    )
    for r in results:
        if r.skipped:
            print(f"{r.mode:<16} skipped: {r.skipped}")
            continue
        mfu = "-" if r.mfu is None else f"{100 * r.mfu:.1f}%"
        print(
            f"{r.mode:<16} {fmt(r.img_s, '9.1f')} {fmt(r.ms_step, '9.2f')} "
            f"{fmt(r.peak_gib, '9.2f')} {fmt(r.tflops, '8.1f')} {mfu:>6} "
            f"{fmt(r.max_batch, '9d')}"
        )
    base = next((r for r in results if r.mode == "fp32" and r.img_s), None)
    for r in results:
        if base is not None and r is not base and r.img_s:
            print(f"ratio {r.mode}/fp32: {r.img_s / base.img_s:.2f}")
    tf32 = next((r for r in results if r.mode == "tf32" and r.img_s), None)
    bf16 = next((r for r in results if r.mode == "bf16" and r.img_s), None)
    if tf32 is not None and bf16 is not None:
        print(f"ratio bf16/tf32: {bf16.img_s / tf32.img_s:.2f} (NVIDIA's A100 AMP/TF32: 2.6)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    s = parse_args(argv)
    name = torch.cuda.get_device_name() if s.device == "cuda" else platform.processor() or "cpu"
    print(
        f"visiontrain gpu throughput: {s.model} at {s.image_size} px, batch {s.batch_size}, "
        f"{s.warmup} warm-up + {s.repeats} x {s.steps} steps per mode, SGD, synthetic data"
    )
    print(
        f"device: {s.device} ({name}), torch {torch.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print(
        f"reference: NVIDIA ResNet-50 PyTorch, AMP, one A100 80GB: ~{NVIDIA_A100_AMP_IMG_S} "
        "img/s (2.6x its TF32 figure)"
    )
    results = []
    for mode in s.modes:
        reason = skip_reason(mode, s)
        if reason is not None:
            print(f"  {mode}: skipped: {reason}", flush=True)
            results.append(Result(mode, skipped=reason))
            continue
        r = measure_mode(mode, s)
        if s.max_batch:
            if s.device != "cuda":
                print(f"  {mode}: largest batch: skipped (no out-of-memory error on the CPU)")
            elif mode.endswith("_compile") or mode == "tf32":
                # tf32 keeps fp32's memory; compile would recompile for every batch probed.
                pass
            else:
                r.max_batch = largest_batch(mode, s)
        print(f"  {mode}: {fmt(r.img_s, '.1f')} img/s", flush=True)
        results.append(r)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
