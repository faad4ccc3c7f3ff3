"""Framework overhead: visiontrain's Trainer, a hand-written PyTorch loop and Lightning.

What is compared
    Both contenders train the same network (built by ``visiontrain.models.create_model``,
    starting from the same weights) on exactly the same in-memory uint8 images — the raw
    loop is handed the very tensor the Trainer's ``defects`` split holds — with the same
    batch size, the same number of steps per epoch, AdamW at the same learning rate
    (weight decay 0 on both sides, no LR schedule), 32-bit precision, on the CPU, in one
    process (so with the same torch thread count). Both turn uint8 into normalised float
    on the device with the same fused ``addcmul`` and the data set's mean and std.

    * ``raw``: what a careful engineer writes by hand — a ``DataLoader`` over a
      ``TensorDataset`` (or, with ``--raw-loader slice``, index slicing of a shuffled
      permutation), ``model.train()``, ``zero_grad(set_to_none=True)``, forward,
      cross entropy, backward, ``step``. No logging, no host syncs.
    * ``trainer``: the real :class:`visiontrain.engine.trainer.Trainer`, built through the
      normal path (``build_config`` + ``assemble``) with every callback the CLI
      installs: ``metrics.jsonl``, TensorBoard, checkpointer and the progress printer
      (``--progress bar``, the default, or ``plain``). ``train.log_every`` keeps its
      default (10), so logging, the grad-norm and the one host sync per interval are in.
    * ``lightning``: PyTorch Lightning (``pip install -e '.[bench]'``; skipped, with the
      reason printed, when it is not importable, or with ``--no-lightning``) — a
      ``LightningModule`` around its own copy of the network with the same starting
      weights, the raw loop's ``DataLoader`` kind over the same tensor, the same
      ``addcmul`` normalisation in ``training_step``, ``self.log("train/loss", loss,
      prog_bar=True)`` every step, the same AdamW (returned by ``configure_optimizers``
      and kept across rounds, so its state carries over as the other two's does), and
      ``lightning.Trainer(accelerator="cpu", devices=1, precision="32-true",
      max_epochs=1, log_every_n_steps=10, enable_checkpointing=False,
      enable_model_summary=False, num_sanity_val_steps=0)`` with Lightning's own
      ``TensorBoardLogger`` (its default logger) and ``TQDMProgressBar(refresh_rate=10)``
      drawing to ``/dev/null``: the same logging cadence as visiontrain's (records every
      10 steps, the bar redrawn every 10), one logger fewer (no JSON lines file) and no
      grad-norm. Automatic optimisation: Lightning's closure runs zero_grad, forward,
      backward, then ``optimizer.step``.

What is timed
    One training epoch: for the raw loop the ``for`` loop over its loader, for the
    Trainer one ``Trainer.train_epoch()`` call (its loader, every step, the interval and
    epoch log records), for Lightning from its ``on_train_epoch_start`` to its
    ``on_train_epoch_end`` callback hook (the loader, every step, the logging and bar
    updates; one ``lightning.Trainer.fit`` with ``max_epochs=1`` per round, its set-up
    and tear-down untimed). Excluded from all: imports, data generation, building the
    model, optimizer, loaders and run directory, and the per-epoch work that ``fit`` does
    after the epoch (validation, checkpoint files). The progress bar is started just
    before each timed Trainer epoch and stopped just after, so that whatever it runs
    (a refresh thread, in rich's default mode) runs only while the Trainer is timed.
    With ``--progress bar`` the bar renders to ``/dev/null`` as if to a terminal
    (``force_terminal``), so its drawing is paid.

Method
    Setup once, then a warm-up epoch of each contender (oneDNN primitive caches, the
    allocator, first-call imports), then ``--rounds`` rounds of ``raw``, ``trainer``,
    ``lightning``, alternating (the order rotating from round to round), so that drift
    in machine load hits all alike. Each epoch is timed by the wall clock and by the
    process's CPU time (all threads, so the bar's refresh thread and TensorBoard's writer
    thread count; steadier than wall time on a shared machine, but with two or more torch
    threads it also counts OpenMP spin-waiting). Reported: median and minimum seconds per
    epoch of each contender, the median CPU seconds, the median of the per-round (paired)
    ratios, the CPU-time ratio, the ratios ``lightning/raw`` and ``trainer/lightning``
    (below 1: visiontrain is the faster), and last the headline ``ratio trainer/raw:
    X.XX``, the ratio of the median wall times. The table also gives each contender's
    minor page faults per step (``getrusage``): memory the kernel had to map in and
    zero-fill during the epoch.

    Two process settings are made before anything is built, for every contender alike,
    so that all three time the same arithmetic on the same kind of memory:

    * :func:`visiontrain.engine.host_memory.keep_freed_memory`, the setting every CPU run
      of the Trainer makes: freed memory is reused instead of being handed back to the
      kernel and faulted in again. Left at glibc's defaults, how much of the heap was
      handed back at each step depended on what the other contenders had left allocated
      in it: in one measurement with ResNet-18 the Trainer paid 4,400 page faults a step,
      Lightning 1,500 and the raw loop 250.
    * ``torch.set_flush_denormal(True)``: each contender trains its own copy of the
      network and reaches its own share of subnormal numbers in the gradients as the loss
      falls (the defects data is 95% one class); on x86 arithmetic on them is many times
      slower. In one process
      ResNet-18's convolution backward took 521, 568 and 595 ms a step (raw, Lightning,
      Trainer), and 409-416 ms for all three with subnormals flushed: this, not framework
      work, is why Lightning could beat the raw loop.

    Importing Lightning also sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` for the process,
    which makes every AdamW step (its ``torch.cuda.is_available()`` check) try to load
    NVML, about 50 µs on this machine, for all three contenders alike; it is left as it is.

    ``assemble`` sets torch's thread count for the run (``OMP_NUM_THREADS`` if set,
    else the cores left free by loader workers); ``--threads N`` overrides it after the
    build, for every contender. ``--profile DIR`` runs cProfile over extra epochs after
    the timed rounds (never during them). ``--drop NAME`` removes one of the Trainer's
    loggers, to attribute the overhead; the target setting keeps them all.

Run ``python benchmarks/overhead.py --help`` for the options; ``--quick`` is a
seconds-long smoke run (tiny sizes, one round) used by the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib.util
import logging
import os
import platform
import pstats
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common import private_cache
from visiontrain.api import assemble
from visiontrain.config import build_config
from visiontrain.engine.host_memory import keep_freed_memory
from visiontrain.engine.trainer import Trainer
from visiontrain.models import create_model
from visiontrain.tracking.progress import ProgressPrinter

# Sizes of a normal run and of the --quick smoke run; an explicit flag overrides either.
DEFAULTS: dict[str, Any] = {
    "rounds": 7,
    "warmup": 1,
    "steps": 32,
    "batch_size": 64,
    "image_size": 64,
}
QUICK: dict[str, Any] = {
    "rounds": 1,
    "warmup": 1,
    "steps": 3,
    "batch_size": 8,
    "image_size": 16,
}
# The embedded default's CNN (configs/defects.yaml); other models keep their own shape.
SIMPLE_CNN_SHAPE = ("model.width=16", "model.depth=3")
SEED = 0


@dataclass(frozen=True)
class Settings:
    """Resolved benchmark settings."""

    model: str
    rounds: int
    warmup: int
    steps: int
    batch_size: int
    image_size: int
    lr: float
    progress: str
    raw_loader: str
    threads: int | None
    profile: Path | None
    drop: tuple[str, ...]
    lightning: bool


def parse_args(argv: Sequence[str] | None) -> Settings:
    """Command-line flags, with ``--quick`` changing the defaults of the sizes."""
    p = argparse.ArgumentParser(
        description="Time visiontrain's Trainer against a hand-written PyTorch loop "
        "(alternating rounds, medians) and print the ratio trainer/raw."
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (smoke test)")
    p.add_argument("--model", default="simple_cnn", help="simple_cnn (default) or resnet18")
    p.add_argument("--rounds", type=int, help=f"timed rounds (default {DEFAULTS['rounds']})")
    p.add_argument("--warmup", type=int, help="untimed epochs of each contender first (1)")
    p.add_argument("--steps", type=int, help=f"steps per epoch ({DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=int, help=f"batch size ({DEFAULTS['batch_size']})")
    p.add_argument("--image-size", type=int, help=f"image side ({DEFAULTS['image_size']})")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (1e-3)")
    p.add_argument(
        "--progress",
        choices=("bar", "plain", "none"),
        default="bar",
        help="the Trainer's progress printer: bar (drawn as on a terminal, the default), "
        "plain lines, or none (to attribute the printer's cost; not the target setting)",
    )
    p.add_argument(
        "--raw-loader",
        choices=("dataloader", "slice"),
        default="dataloader",
        help="raw loop's batches: DataLoader over a TensorDataset, or index slicing",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads for both contenders (default: what assemble "
        "chooses, i.e. OMP_NUM_THREADS or the cores left free by loader workers)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after timing, cProfile --rounds more epochs of each contender; print the "
        "top functions and write DIR/raw.prof and DIR/trainer.prof",
    )
    p.add_argument(
        "--drop",
        action="append",
        default=[],
        choices=("jsonl", "tensorboard", "progress"),
        help="remove this callback from the Trainer (repeatable): to attribute the "
        "overhead only; the target setting keeps them all",
    )
    p.add_argument(
        "--no-lightning",
        dest="lightning",
        action="store_false",
        help="leave out the PyTorch Lightning contender (it is also left out, with the "
        "reason printed, when lightning is not importable)",
    )
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    for key, value in sizes.items():
        if value < (0 if key == "warmup" else 1):
            p.error(f"--{key.replace('_', '-')} must be positive")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be positive")
    return Settings(
        model=args.model,
        lr=args.lr,
        progress=args.progress,
        raw_loader=args.raw_loader,
        threads=args.threads,
        profile=args.profile,
        drop=tuple(args.drop),
        lightning=args.lightning,
        **sizes,
    )


# ---------------------------------------------------------------------- the raw loop


class RawLoop:
    """The hand-written baseline: the minimum a careful engineer writes."""

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        s: Settings,
    ) -> None:
        self.model = model
        self.device = torch.device("cpu")
        # Decay off on both sides: the Trainer's AdamW exempts norm weights and biases from
        # it, a one-group AdamW would not, and the two would no longer do the same work.
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        sd = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        # (x/255 - mean)/std folded into one multiply-add on the uint8→float copy.
        self.scale, self.shift = (1.0 / sd).to(self.device), (-m / sd).to(self.device)
        self.images, self.labels = images, labels
        self.batch_size, self.steps = s.batch_size, s.steps
        self.generator = torch.Generator().manual_seed(SEED)
        self.mode = s.raw_loader
        self.loader = DataLoader(
            TensorDataset(images, labels),
            batch_size=s.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=0,
            generator=self.generator,
        )

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of shuffled uint8 batches."""
        if self.mode == "dataloader":
            yield from self.loader
            return
        perm = torch.randperm(len(self.labels), generator=self.generator)
        bs = self.batch_size
        for i in range(self.steps):
            idx = perm[i * bs : (i + 1) * bs]
            yield self.images[idx], self.labels[idx]

    def epoch(self) -> None:
        """One training epoch."""
        model, opt = self.model, self.optimizer
        model.train()
        for images, labels in self.batches():
            x = torch.addcmul(
                self.shift, images.to(self.device, non_blocking=True).float(), self.scale
            )
            y = labels.to(self.device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()


# ---------------------------------------------------------------------- the Trainer


def trainer_overrides(s: Settings, run_root: Path) -> list[str]:
    """``key=value`` overrides of the Trainer's run: the same work as the raw loop."""
    out = [
        "task=classification",
        "data.name=defects",
        f"data.image_size={s.image_size}",
        f"data.train_size={s.steps * s.batch_size}",
        # Validation and test are never timed; keep them small so generation is quick.
        f"data.val_size={s.batch_size}",
        f"data.test_size={s.batch_size}",
        f"data.batch_size={s.batch_size}",
        "data.num_workers=0",
        "data.augment=none",  # the raw loop does not augment either
        "data.drop_last=true",
        f"model.name={s.model}",
        "optim.name=adamw",
        f"optim.lr={s.lr}",
        "optim.weight_decay=0.0",
        "schedule.name=none",
        "loss.name=cross_entropy",
        "train.precision=32",
        "train.device=cpu",
        f"train.epochs={s.warmup + s.rounds}",  # the progress bar's total
        "train.log_every=10",
        f"train.progress={s.progress}",
        f"train.seed={SEED}",
        f"run.dir={run_root}",
        "run.name=trainer",
    ]
    if s.model == "simple_cnn":
        out.extend(SIMPLE_CNN_SHAPE)
    return out


class TrainerSide:
    """The real Trainer, driven one ``train_epoch`` at a time."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.printer = next(
            (cb for cb in trainer.callbacks if isinstance(cb, ProgressPrinter)), None
        )
        # What fit() does first, except for the bar, which runs only while timed.
        for cb in trainer.callbacks:
            if cb is not self.printer:
                cb.on_fit_start(trainer)
        self.epoch_index = 0

    def before(self) -> None:
        """Untimed: set the epoch counters as ``fit`` does and start the bar."""
        t = self.trainer
        t.epoch, t.batch_in_epoch = self.epoch_index, 0
        if self.printer is not None:
            self.printer.on_fit_start(t)

    def epoch(self) -> None:
        """One training epoch: the timed part."""
        self.trainer.train_epoch()

    def after(self) -> None:
        """Untimed: stop the bar and advance the epoch."""
        if self.printer is not None:
            self.printer.close()
        self.epoch_index += 1
        self.trainer.epochs_done = self.epoch_index

    def close(self) -> None:
        """Close the log files and the bar."""
        for cb in self.trainer.callbacks:
            cb.close()


# ---------------------------------------------------------------------- Lightning


def lightning_missing() -> str | None:
    """Why the Lightning contender cannot run, or None when it can."""
    if importlib.util.find_spec("lightning") is None:
        return "lightning is not importable (pip install -e '.[bench]')"
    return None


class LightningSide:
    """PyTorch Lightning on the raw loop's data, network and optimizer settings.

    Each epoch is one ``lightning.Trainer.fit(max_epochs=1)``: a Lightning Trainer runs
    its epochs inside ``fit``, and the benchmark must interleave the contenders between
    epochs. A callback times the epoch itself (from ``on_train_epoch_start`` to
    ``on_train_epoch_end``), so the per-``fit`` set-up is not charged to Lightning. The
    module, its optimizer (and so the AdamW state) and the logger persist across rounds.
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        s: Settings,
        log_dir: Path,
    ) -> None:
        import lightning as L  # optional: only imported when the contender runs
        from lightning.pytorch.callbacks import TQDMProgressBar
        from lightning.pytorch.loggers import TensorBoardLogger

        self._L, self._bar = L, TQDMProgressBar
        # Lightning's "GPU available" and tip lines go to a logging handler bound to the
        # real stderr at import; keep them out of the benchmark's output.
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        sd = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        scale, shift = 1.0 / sd, -m / sd
        optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)

        class Module(L.LightningModule):
            """The idiomatic LightningModule: step, log, optimizer."""

            def __init__(self) -> None:
                super().__init__()
                self.net = model

            def training_step(
                self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
            ) -> torch.Tensor:
                images, labels = batch
                x = torch.addcmul(shift, images.float(), scale)
                loss = F.cross_entropy(self.net(x), labels)
                self.log("train/loss", loss, prog_bar=True)
                return loss

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return optimizer  # the same object every fit: AdamW state carries over

        self.module = Module()
        self.loader = DataLoader(
            TensorDataset(images, labels),
            batch_size=s.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=0,
            generator=torch.Generator().manual_seed(SEED),
        )
        # Lightning's default logger when tensorboard is installed, made explicit so that
        # every round writes into the same version folder.
        self.logger = TensorBoardLogger(str(log_dir), name="lightning", version=0)
        self.into: Samples | None = None
        self.threads = torch.get_num_threads()
        side = self

        class EpochTimer(L.Callback):
            """Times the epoch inside ``fit``: the part comparable to the other two."""

            def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
                self.faults = minor_faults()
                self.wall, self.cpu = time.perf_counter(), time.process_time()

            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
                faults = minor_faults() - self.faults
                if side.into is not None:
                    side.into.wall.append(wall)
                    side.into.cpu.append(cpu)
                    side.into.faults.append(faults)

        self.timer = EpochTimer()

    def epoch(self, into: Samples | None) -> None:
        """One ``fit`` of one epoch; its epoch time goes into ``into`` (None: warm-up)."""
        self.into = into
        trainer = self._L.Trainer(
            accelerator="cpu",
            devices=1,
            precision="32-true",
            max_epochs=1,
            logger=self.logger,
            log_every_n_steps=10,
            callbacks=[self._bar(refresh_rate=10), self.timer],
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        # The bar draws to stdout (tqdm, as on a terminal: carriage returns); /dev/null
        # takes it, and Lightning's start-up lines, so that only our table is printed.
        with (
            open(os.devnull, "w") as sink,
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
            warnings.catch_warnings(),
        ):
            # "does not have many workers": in-memory tensors, as for the other two.
            warnings.simplefilter("ignore")
            trainer.fit(self.module, train_dataloaders=self.loader)
        if torch.get_num_threads() != self.threads:
            raise RuntimeError(
                f"Lightning changed torch's thread count from {self.threads} to "
                f"{torch.get_num_threads()}: the contenders would not compare"
            )


# ---------------------------------------------------------------------- measuring


@dataclass
class Samples:
    """Per-epoch figures of one contender: wall clock, CPU time and minor page faults."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)


def minor_faults() -> int:
    """The process's minor page faults so far: pages the kernel mapped in (zero-filled)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(
    run: Callable[[], None],
    into: Samples | None = None,
    before: Callable[[], None] | None = None,
    after: Callable[[], None] | None = None,
) -> None:
    """Time ``run()`` into ``into``; ``before``/``after`` run outside the clocks.

    CPU time is summed over all the process's threads (so the progress bar's refresh
    thread counts) and, unlike wall time, does not grow while other processes hold the
    cores: on a shared machine it is the steadier of the two.
    """
    if before is not None:
        before()
    faults = minor_faults()
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    faults = minor_faults() - faults
    if after is not None:
        after()
    if into is not None:
        into.wall.append(wall)
        into.cpu.append(cpu)
        into.faults.append(faults)


def cpu_name() -> str:
    """The CPU model, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(s: Settings, tmp: Path) -> dict[str, Samples]:
    """Build both contenders, warm up, and time alternating rounds."""
    # Two settings of the process, made before anything is built, for every contender
    # alike (see the module docstring). A CPU run of the Trainer keeps the memory a step
    # frees for the next (engine/host_memory.py); left to glibc's defaults, the contenders'
    # interleaved heaps decided which of them paid for faulting its activations in again.
    kept = keep_freed_memory()
    print(
        "host memory (all contenders): "
        + ("freed memory kept for reuse" if kept else "malloc defaults (not glibc, or opted out)"),
        flush=True,
    )
    # Each contender trains its own copy of the network and reaches its own share of
    # subnormal gradients as the loss falls; arithmetic on them is many times slower on
    # x86 (ResNet-18's convolution backward: 521-595 ms a step across the contenders,
    # 409-416 ms flushed). Flushed for all, the contenders time the same arithmetic.
    flushed = torch.set_flush_denormal(True)
    print(
        "subnormal floats (all contenders): "
        + ("flushed to zero" if flushed else "kept (no flush-to-zero on this CPU)"),
        flush=True,
    )
    with open(os.devnull, "w") as sink:
        # force_terminal: the bar is drawn (to /dev/null) as it would be on a terminal.
        console = Console(file=sink, force_terminal=s.progress == "bar", width=120)
        with private_cache(tmp / "cache"):
            cfg = build_config(overrides=trainer_overrides(s, tmp / "runs"))
            trainer = assemble(cfg, console)
        if trainer is None:  # only with check_only=True
            raise RuntimeError("assemble returned no trainer")
        # assemble sets torch's thread count for the run (set_cpu_threads), so an
        # explicit --threads is applied after it; one process, so both contenders share it.
        if s.threads is not None:
            torch.set_num_threads(s.threads)
        print(f"torch intra-op threads (all contenders): {torch.get_num_threads()}", flush=True)
        if s.drop:
            for cb in trainer.callbacks:
                if cb.name in s.drop:
                    cb.close()  # its file and any writer thread go too
            trainer.callbacks = [cb for cb in trainer.callbacks if cb.name not in s.drop]
            print(f"callbacks dropped from the Trainer: {', '.join(s.drop)}", flush=True)
        side = TrainerSide(trainer)
        try:
            raw = raw_contender(s, trainer)
            return alternate(s, side, raw, lightning_contender(s, trainer, raw, tmp))
        finally:
            side.close()


def raw_contender(s: Settings, trainer: Trainer) -> RawLoop:
    """The raw loop on the Trainer's own data tensor and starting weights."""
    b = trainer.bundle
    split = b.train
    images = split.images  # the Trainer's own uint8 NCHW tensor: same data, no copy
    labels = torch.as_tensor(split.labels)
    m = trainer.cfg.model
    model = create_model(
        m.name, num_classes=b.num_classes, in_chans=b.in_channels, width=m.width, depth=m.depth
    )
    model.load_state_dict(trainer.model.state_dict())  # same starting weights
    raw = RawLoop(model, images, labels, b.mean, b.std, s)
    n_trainer = len(trainer.loaders.train)
    n_raw = len(raw.loader) if s.raw_loader == "dataloader" else s.steps
    if not n_trainer == n_raw == s.steps:
        raise RuntimeError(f"step counts differ: trainer {n_trainer}, raw {n_raw}")
    return raw


def lightning_contender(
    s: Settings, trainer: Trainer, raw: RawLoop, tmp: Path
) -> LightningSide | None:
    """Lightning on the raw loop's tensor and starting weights; None (said why) if absent."""
    if not s.lightning:
        print("lightning: skipped (--no-lightning)", flush=True)
        return None
    missing = lightning_missing()
    if missing is not None:
        print(f"lightning: skipped ({missing})", flush=True)
        return None
    b, m = trainer.bundle, trainer.cfg.model
    model = create_model(
        m.name, num_classes=b.num_classes, in_chans=b.in_channels, width=m.width, depth=m.depth
    )
    model.load_state_dict(trainer.model.state_dict())  # same starting weights
    side = LightningSide(model, raw.images, raw.labels, b.mean, b.std, s, tmp / "lightning")
    if len(side.loader) != s.steps:
        raise RuntimeError(f"step counts differ: lightning {len(side.loader)}, {s.steps}")
    import lightning

    print(f"lightning {lightning.__version__}: contender on", flush=True)
    return side


def alternate(
    s: Settings, side: TrainerSide, raw: RawLoop, light: LightningSide | None = None
) -> dict[str, Samples]:
    """Warm up each contender, then time rounds of raw, trainer, lightning, raw, ..."""
    for _ in range(s.warmup):
        timed(raw.epoch)
        timed(side.epoch, None, side.before, side.after)
        if light is not None:
            light.epoch(None)
    times = {"raw": Samples(), "trainer": Samples()}
    if light is not None:
        times["lightning"] = Samples()
    runs: list[Callable[[], None]] = [
        lambda: timed(raw.epoch, times["raw"]),
        lambda: timed(side.epoch, times["trainer"], side.before, side.after),
    ]
    if light is not None:
        runs.append(lambda: light.epoch(times["lightning"]))
    for r in range(s.rounds):
        # The order rotates from round to round, so that no contender always runs first
        # (after a pause) or right after another one's allocations.
        for i in range(len(runs)):
            runs[(r + i) % len(runs)]()
        print(
            f"  round {r + 1}/{s.rounds}: "
            + "  ".join(f"{name} {v.wall[-1]:.3f} s" for name, v in times.items()),
            flush=True,
        )
    if s.profile is not None:
        profile(s, side, raw, s.profile)
    return times


def profile(s: Settings, side: TrainerSide, raw: RawLoop, folder: Path) -> None:
    """After the timed rounds: cProfile ``rounds`` more epochs of each contender."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, run, before, after in (
        ("raw", raw.epoch, None, None),
        ("trainer", side.epoch, side.before, side.after),
    ):
        prof = cProfile.Profile()
        for _ in range(s.rounds):
            timed(lambda prof=prof, run=run: prof.runcall(run), None, before, after)
        prof.dump_stats(folder / f"{name}.prof")
        stats = pstats.Stats(prof, stream=sys.stdout)
        print(f"\n== cProfile, {name}: {s.rounds} epochs, {s.rounds * s.steps} steps")
        stats.sort_stats("cumulative").print_stats(r"visiontrain|overhead\.py", 25)
    print(f"profiles written to {folder}/{{raw,trainer}}.prof")


def report(s: Settings, times: dict[str, Samples]) -> float:
    """Print the table and the ratio line; return the ratio of the median wall times."""
    wall = {k: statistics.median(v.wall) for k, v in times.items()}
    cpu = {k: statistics.median(v.cpu) for k, v in times.items()}
    print()
    print(
        f"{'contender':<10} {'median s/epoch':>15} {'min s/epoch':>12} {'ms/step':>9} "
        f"{'CPU s/epoch':>12} {'faults/step':>12}"
    )
    for name, v in times.items():
        faults = statistics.median(v.faults) / s.steps
        print(
            f"{name:<10} {wall[name]:>15.3f} {min(v.wall):>12.3f} "
            f"{1000 * wall[name] / s.steps:>9.2f} {cpu[name]:>12.3f} {faults:>12.0f}"
        )
    raw, tr = times["raw"], times["trainer"]
    paired = [t / r for r, t in zip(raw.wall, tr.wall, strict=True)]
    per_step_ms = 1000 * (wall["trainer"] - wall["raw"]) / s.steps
    print(
        f"paired per-round ratio: median {statistics.median(paired):.3f} "
        f"(min {min(paired):.3f}, max {max(paired):.3f}); "
        f"overhead {per_step_ms:+.2f} ms/step"
    )
    print(f"CPU-time ratio trainer/raw (medians): {cpu['trainer'] / cpu['raw']:.3f}")
    if "lightning" in times:
        lt = times["lightning"]
        paired_l = [t / lg for t, lg in zip(tr.wall, lt.wall, strict=True)]
        print(f"ratio lightning/raw: {wall['lightning'] / wall['raw']:.2f}")
        print(
            f"paired per-round ratio trainer/lightning: median "
            f"{statistics.median(paired_l):.3f} (min {min(paired_l):.3f}, "
            f"max {max(paired_l):.3f}); CPU-time ratio {cpu['trainer'] / cpu['lightning']:.3f}"
        )
        print(f"ratio trainer/lightning: {wall['trainer'] / wall['lightning']:.2f}")
    ratio = wall["trainer"] / wall["raw"]
    print(f"ratio trainer/raw: {ratio:.2f}")
    return ratio


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    s = parse_args(argv)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"visiontrain overhead: model {s.model}, {s.image_size}px, batch {s.batch_size}, "
        f"{s.steps} steps/epoch, {s.warmup} warm-up + {s.rounds} rounds, fp32, cpu, "
        f"progress={s.progress}, raw loader={s.raw_loader}, "
        f"lightning={'on' if s.lightning and lightning_missing() is None else 'off'}"
    )
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"python {platform.python_version()}, load average {load[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="vt-bench-") as tmp:
        times = measure(s, Path(tmp))
    report(s, times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
