"""Where a training step's time goes: ``torch.profiler`` over a window of the real trainer.

``visiontrain profile`` (``vt.profile``) and ``train.profile_steps=a:b`` attach a
:class:`ProfileWindow` to a trainer that the composition root built (``api.assemble``), so
the profiled steps are the steps ``train`` runs: its loader, batch preparation, forward,
backward, update, logging and callbacks. The trainer and the step open a ``vt/<phase>``
range around each phase (``engine/trainer.py``, ``engine/step.py``); the window steps
the profiler at every optimizer update — on CUDA after synchronising, so that a step's
time holds its kernels — and aggregates the ranges from the profiler's own events
(``key_averages``), not from timers of its own.

At the window's end it writes ``trace.json`` (a Chrome trace: chrome://tracing or
https://ui.perfetto.dev), ``tb/<worker>.<time>.pt.trace.json`` (TensorBoard's profile
plugin) and ``profile.json``, then prints the breakdown per step, the top operators,
samples/s, on CUDA the peak memory and the model FLOPs utilisation, and the advice of
:mod:`visiontrain.tools.profile_advice`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.table import Table
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList, FunctionEventAvg
from torch.profiler import ProfilerActivity, schedule, tensorboard_trace_handler
from torch.utils.flop_counter import FlopCounterMode

from visiontrain.engine.callbacks import Callback
from visiontrain.io import atomic_write, atomic_write_json
from visiontrain.tools.profile_advice import Measurements, advise

if TYPE_CHECKING:
    from visiontrain.engine.trainer import Trainer

# Names inside a run directory (train.profile_steps) or the tool's folder.
PROFILE_DIR = "profile"
TRACE_FILE = "trace.json"
PROFILE_JSON = "profile.json"
TB_PROFILE_DIR = "tb"
TOP_OPERATORS = 10
# The trainer's and the step's ranges, in the order a step runs them, with the label the
# table prints. They are disjoint, so their times add up to the step (plus "other").
PHASES: tuple[tuple[str, str], ...] = (
    ("loader_wait", "waiting for the loader"),
    ("h2d", "host→device copy, batch prep"),
    ("forward", "forward + loss"),
    ("backward", "backward"),
    ("optimizer", "optimizer update"),
    ("logging", "logging"),
    ("eval", "evaluation (epoch end)"),
)
OTHER_LABEL = "other (callbacks, epoch start)"
STEP_KEY = "ProfilerStep*"  # the profiler's own range per step, numbers folded into '*'
_CPU = DeviceType.CPU
# c10d and NCCL/Gloo name their collectives so (c10d::allreduce_, nccl:all_reduce,
# ncclDevKernel_AllReduce..., FSDP's all_gather_into_tensor and reduce_scatter_tensor).
COLLECTIVE_MARKERS = ("all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter")
# Dense peak throughput in TFLOP/s from NVIDIA's data sheets: (16-bit tensor cores, TF32,
# FP32). Matched on torch.cuda.get_device_name in this order (L40S before L4).
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float | None, float]], ...] = (
    ("H200", (989.0, 494.0, 67.0)),
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100 NVL", (835.0, 418.0, 60.0)),
    ("H100", (989.0, 494.0, 67.0)),
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
    ("V100", (125.0, None, 15.7)),
    ("T4", (65.0, None, 8.1)),
)


class ProfileDone(Exception):  # noqa: N818 - not an error: the profile is complete
    """Raised by a window with ``stop_at_end`` after writing its files: the run ends there."""


class ProfileWindow(Callback):
    """Profile the updates from step ``first`` to step ``last`` of a run.

    A step is one optimizer update, counted as ``metrics.jsonl`` counts them: the window
    covers the ``last - first`` updates that take the run from step ``first`` to step
    ``last``. The update before it runs under the profiler's own warm-up (its first
    events carry set-up cost), unrecorded. On CUDA, after the window, one more update
    runs under ``FlopCounterMode`` for the model FLOPs utilisation (outside the timed
    steps: counting slows the step it counts).

    Args:
        first: The step the window starts at.
        last: The step it ends at (``first < last``).
        folder: Where trace.json, tb/ and profile.json go.
        console: Where the breakdown is printed.
        stop_at_end: Raise :class:`ProfileDone` once the files are written
            (``visiontrain profile``); a training run goes on otherwise.
        title: What the printout calls the window.
    """

    name = "profile"

    def __init__(
        self,
        first: int,
        last: int,
        folder: Path,
        console: Console,
        *,
        stop_at_end: bool = False,
        title: str | None = None,
    ) -> None:
        self.first, self.last = first, last
        self.folder, self.console = folder, console
        self.stop_at_end = stop_at_end
        self.title = title or f"train.profile_steps={first}:{last}"
        # What profile.json holds, once the window is done.
        self.report: dict[str, Any] | None = None
        self._begin = max(first - 1, 0)  # the profiler starts one update early: warm-up
        self._warmup = first - self._begin
        self._state = "waiting"  # → profiling → (CUDA: count_next → counting) → done
        self._prof: torch.profiler.profile | None = None
        self._calls = 0
        self._steps = 0
        self._averages: EventList | None = None
        self._trace: Path | None = None
        self._discard = False
        self._flop_mode: FlopCounterMode | None = None
        self._flops: float | None = None
        self._flops_note: str | None = None
        self._notes: list[str] = []

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: Trainer) -> None:
        """Start now when the window begins at the run's first step."""
        if self._state == "waiting" and trainer.global_step > self._begin:
            self._state = "done"
            self.console.print(
                f"note: {self.title}: the run continues from step {trainer.global_step}, past "
                "the window's start; nothing is profiled",
                highlight=False,
            )
            return
        self._maybe_start(trainer)

    def on_update(self, trainer: Trainer) -> None:
        """Step the profiler at the end of each update; start, count or finish on cue."""
        if self._state == "profiling":
            self._advance(trainer)
        elif self._state == "count_next":
            self._maybe_count(trainer)
        elif self._state == "counting":
            self._end_count(trainer)
        else:
            self._maybe_start(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        """A run that ends inside the window is reported up to its end."""
        if self._state == "profiling":
            self._notes.append(
                f"the run ended at step {trainer.global_step}, inside the window: "
                f"{self._steps} of {self.last - self.first} steps profiled"
            )
            self._stop()
            self._finish(trainer)
        elif self._state in ("count_next", "counting"):
            self._drop_count("the run ended before one more step could be counted")
            self._finish(trainer)

    def close(self) -> None:
        """An interrupted run: stop the profiler, write nothing."""
        self._discard = True
        self._stop()
        if self._flop_mode is not None:
            self._flop_mode.__exit__(None, None, None)
            self._flop_mode = None

    # ------------------------------------------------------------------ the window

    def _maybe_start(self, trainer: Trainer) -> None:
        if self._state != "waiting" or trainer.global_step != self._begin:
            return
        cuda = trainer.device.type == "cuda"
        activities = [ProfilerActivity.CPU]
        if cuda:
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.synchronize(trainer.device)
            torch.cuda.reset_peak_memory_stats(trainer.device)
        else:
            # A CUDA build of torch on a machine without a GPU: kineto logs a harmless
            # "gpuGetDeviceCount failed" error line at the first profile.
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        with warnings.catch_warnings():
            # Warm-up 0 (a window from step 0) is fine: the first step is slow anyway.
            warnings.filterwarnings("ignore", message=".*won't be using warmup.*")
            self._prof = torch.profiler.profile(
                activities=activities,
                schedule=schedule(
                    wait=0, warmup=self._warmup, active=self.last - self.first, repeat=1
                ),
                on_trace_ready=self._ready,
                acc_events=True,
            )
        self._prof.start()
        self._state = "profiling"

    def _advance(self, trainer: Trainer) -> None:
        if trainer.device.type == "cuda":
            # The step ends when its kernels have: without this, its time is only the
            # launches, and the next step's first sync pays for this one.
            torch.cuda.synchronize(trainer.device)
        self._calls += 1
        if self._calls > self._warmup:
            self._steps += 1
        assert self._prof is not None
        self._prof.step()  # calls _ready after the window's last step
        # The run's last update: what follows is the final evaluation, not a step.
        run_ends = trainer.at_epoch_end and trainer.epoch + 1 >= trainer.cfg.train.epochs
        if self._averages is None:
            if not run_ends:
                return
            self._notes.append(
                f"the run ends at step {trainer.global_step}, inside the window: "
                f"{self._steps} of {self.last - self.first} steps profiled"
            )
        self._stop()
        if _no_flops(trainer) is None and not run_ends:
            self._state = "count_next"
            self._maybe_count(trainer)
            return
        self._finish(trainer)

    def _ready(self, prof: torch.profiler.profile) -> None:
        """The profiler's ``on_trace_ready``: write the traces, keep the aggregates."""
        if self._discard:
            return
        tb = self.folder / TB_PROFILE_DIR
        tb.mkdir(parents=True, exist_ok=True)
        before = set(tb.glob("*.pt.trace.json"))
        tensorboard_trace_handler(str(tb))(prof)
        written = sorted(set(tb.glob("*.pt.trace.json")) - before)
        if written:
            # Kineto saves a trace once, so trace.json is a copy of the TensorBoard file.
            self._trace = written[-1]
            data = self._trace.read_bytes()
            atomic_write(self.folder / TRACE_FILE, lambda fh: fh.write(data))
        self._averages = prof.key_averages()

    def _stop(self) -> None:
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.stop()

    def _maybe_count(self, trainer: Trainer) -> None:
        if trainer.at_epoch_end:
            return  # an evaluation comes next, not an update: count the one after it
        self._flop_mode = FlopCounterMode(display=False)
        self._flop_mode.__enter__()
        self._state = "counting"

    def _end_count(self, trainer: Trainer) -> None:
        assert self._flop_mode is not None
        self._flop_mode.__exit__(None, None, None)
        self._flops = float(self._flop_mode.get_total_flops())
        self._flop_mode = None
        self._finish(trainer)

    def _drop_count(self, why: str) -> None:
        if self._flop_mode is not None:
            self._flop_mode.__exit__(None, None, None)
            self._flop_mode = None
        self._flops_note = f"FLOPs and MFU: {why}"

    def _finish(self, trainer: Trainer) -> None:
        self._state = "done"
        if self._flops is None and self._flops_note is None:
            self._flops_note = _no_flops(trainer) or (
                "FLOPs and MFU: the run ended before one more step could be counted"
            )
        if self._averages is None or self._steps == 0:
            self.console.print(
                f"note: {self.title}: the run ended before a step was profiled", highlight=False
            )
            return
        self.report = build_report(
            trainer,
            self._averages,
            self._steps,
            flops=self._flops,
            flops_note=self._flops_note,
            notes=self._notes,
            window=(self.first, self.first + self._steps),
        )
        self.report["files"] = {
            "trace": TRACE_FILE,
            "tensorboard": f"{TB_PROFILE_DIR}/{self._trace.name}" if self._trace else None,
            "profile": PROFILE_JSON,
        }
        atomic_write_json(self.folder / PROFILE_JSON, self.report)
        print_report(self.report, self.console, self.title, self.folder)
        if self.stop_at_end:
            raise ProfileDone


def _no_flops(trainer: Trainer) -> str | None:
    """Why FLOPs and MFU cannot be measured for this run, or None when they can."""
    if trainer.device.type != "cuda":
        return (
            "FLOPs and MFU: measured on CUDA only (MFU divides by a GPU's peak FLOP rate; "
            "on the CPU there is none to divide by)"
        )
    if trainer.cfg.train.compile:
        return (
            "FLOPs and MFU: skipped under train.compile=true (FlopCounterMode counts eager "
            "operators, which a compiled graph hides); profile with train.compile=false"
        )
    return None


# ----------------------------------------------------------------------------- numbers


def _ms(us: float, steps: int) -> float:
    return us / 1000.0 / steps


def phase_times(averages: EventList, steps: int) -> tuple[float, dict[str, float]]:
    """The mean step and each phase's host milliseconds per step, from the profiler.

    Args:
        averages: ``key_averages()`` of the window.
        steps: Steps profiled.

    Returns:
        ``(step_ms, {phase: ms})`` with every phase of :data:`PHASES` and ``other`` (the
        step's time outside the named ranges).
    """
    total: dict[str, float] = {}
    for e in averages:
        if e.device_type == _CPU:
            total[e.key] = total.get(e.key, 0.0) + e.cpu_time_total
    step_ms = _ms(total.get(STEP_KEY, 0.0), steps)
    ms = {name: _ms(total.get(f"vt/{name}", 0.0), steps) for name, _ in PHASES}
    ms["other"] = max(step_ms - sum(ms.values()), 0.0)
    return step_ms, ms


def gpu_phase_times(averages: EventList, steps: int) -> dict[str, float]:
    """CUDA milliseconds per step of the kernels launched inside each phase's range."""
    out = {}
    for name, _ in PHASES:
        key = f"vt/{name}"
        # The range's GPU-side twin (kineto's gpu_user_annotation) spans its kernels; the
        # CPU range's own device total is the fallback.
        device = [e for e in averages if e.key == key and e.device_type != _CPU]
        host = [e for e in averages if e.key == key and e.device_type == _CPU]
        source = device or host
        out[name] = _ms(sum(e.device_time_total for e in source), steps)
    return out


def _operators(averages: EventList) -> list[FunctionEventAvg]:
    """Operator entries: CPU ops, neither our ranges nor torch's own annotations."""
    return [
        e
        for e in averages
        if e.device_type == _CPU and not e.is_user_annotation and e.key != STEP_KEY
    ]


def top_operators(
    averages: EventList, steps: int, step_ms: float, cuda: bool
) -> list[dict[str, Any]]:
    """The operators with the most self time per step (CUDA time on CUDA, else CPU)."""
    ops = _operators(averages)
    ops.sort(
        key=lambda e: e.self_device_time_total if cuda else e.self_cpu_time_total, reverse=True
    )
    rows = []
    for e in ops[:TOP_OPERATORS]:
        row: dict[str, Any] = {
            "name": e.key,
            "calls_per_step": e.count / steps,
            "self_cpu_ms": _ms(e.self_cpu_time_total, steps),
        }
        if cuda:
            row["self_cuda_ms"] = _ms(e.self_device_time_total, steps)
        main = row["self_cuda_ms"] if cuda else row["self_cpu_ms"]
        row["share"] = main / step_ms if step_ms > 0 else 0.0
        rows.append(row)
    return rows


def communication_ms(averages: EventList, steps: int, cuda: bool) -> float | None:
    """Collective time per step (DDP's all-reduce, FSDP's all-gather and reduce-scatter).

    None when the window ran none.
    """
    hits = [e for e in averages if any(m in e.key.lower() for m in COLLECTIVE_MARKERS)]
    if not hits:
        return None
    if cuda:
        kernels = [e for e in hits if e.device_type != _CPU]
        if kernels:
            return _ms(sum(e.self_device_time_total for e in kernels), steps)
    # Self times: nested collectives (c10d::allreduce_ around gloo:all_reduce) count once.
    return _ms(sum(e.self_cpu_time_total for e in hits if e.device_type == _CPU), steps)


def kernel_stats(averages: EventList, steps: int) -> tuple[float, float, float]:
    """CUDA kernels per step, their mean microseconds and their milliseconds per step."""
    kernels = [e for e in averages if e.device_type != _CPU and not e.is_user_annotation]
    count = sum(e.count for e in kernels)
    total_us = sum(e.self_device_time_total for e in kernels)
    return count / steps, (total_us / count if count else 0.0), _ms(total_us, steps)


def peak_tflops(device_name: str, precision: str) -> tuple[float, str] | None:
    """The device's dense peak TFLOP/s for ``train.precision`` and what it is, or None."""
    for marker, (half, tf32, fp32) in PEAK_TFLOPS:
        if marker in device_name:
            if precision in ("bf16", "fp16"):
                return half, f"{precision} tensor cores"
            # cuDNN convolutions use TF32 by default; matmuls when torch allows it.
            if tf32 is not None and (
                torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
            ):
                return tf32, "TF32 tensor cores"
            return fp32, "FP32"
    return None


def _cacheable(trainer: Trainer) -> bool:
    """Whether the data source decodes files, the case data.cache speeds up."""
    from visiontrain.data.sources import PreparedSplit, base_splits

    return any(isinstance(s, PreparedSplit) for s in base_splits(trainer.bundle))


def build_report(
    trainer: Trainer,
    averages: EventList,
    steps: int,
    *,
    flops: float | None,
    flops_note: str | None,
    notes: list[str],
    window: tuple[int, int],
) -> dict[str, Any]:
    """Everything profile.json holds: phases, operators, throughput, CUDA numbers, advice."""
    cfg = trainer.cfg
    device = trainer.device
    cuda = device.type == "cuda"
    step_ms, ms = phase_times(averages, steps)
    shares = {k: (v / step_ms if step_ms > 0 else 0.0) for k, v in ms.items()}
    gpu = gpu_phase_times(averages, steps) if cuda else {}
    batch = cfg.data.batch_size if isinstance(cfg.data.batch_size, int) else None
    samples = batch * cfg.train.accumulate if batch else None
    report: dict[str, Any] = {
        "window": {"from_step": window[0], "to_step": window[1], "steps": steps},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "model": cfg.model.name,
        "data": cfg.data.name,
        "task": cfg.task,
        "precision": cfg.train.precision,
        "batch_size": batch,
        "accumulate": cfg.train.accumulate,
        "world_size": trainer.dist.world_size,
        "step_ms": step_ms,
        "samples_per_s": samples / (step_ms / 1000.0) if samples and step_ms > 0 else None,
        "phases": [
            {
                "name": name,
                "label": label,
                "ms": ms[name],
                "share": shares[name],
                **({"gpu_ms": gpu[name]} if cuda else {}),
            }
            for name, label in (*PHASES, ("other", OTHER_LABEL))
            if name != "eval" or ms[name] > 0
        ],
        "communication_ms": communication_ms(averages, steps, cuda)
        if trainer.dist.enabled
        else None,
        "top_operators": top_operators(averages, steps, step_ms, cuda),
        "notes": list(notes),
    }
    measured = Measurements(
        device=device.type,
        step_ms=step_ms,
        ms=ms,
        shares=shares,
        cfg=cfg,
        cpu_count=os.cpu_count() or 1,
        cacheable=_cacheable(trainer),
        communication_ms=report["communication_ms"],
    )
    if cuda:
        per_step, mean_us, kernel_ms = kernel_stats(averages, steps)
        total = torch.cuda.get_device_properties(device).total_memory
        peak = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        measured.kernels_per_step, measured.mean_kernel_us = per_step, mean_us
        measured.gpu_busy = kernel_ms / step_ms if step_ms > 0 else 0.0
        measured.peak_memory_share = reserved / total
        report["cuda"] = {
            "kernels_per_step": per_step,
            "mean_kernel_us": mean_us,
            "gpu_busy": measured.gpu_busy,
            "peak_allocated_mib": peak / 2**20,
            "peak_reserved_mib": reserved / 2**20,
            "memory_mib": total / 2**20,
            "peak_share": reserved / total,
        }
    report["flops"] = _flops_section(flops, flops_note, step_ms, report)
    report["advice"] = [a.to_dict() for a in advise(measured)]
    report["config"] = cfg.to_dict()
    return report


def _flops_section(
    flops: float | None, note: str | None, step_ms: float, report: dict[str, Any]
) -> dict[str, Any]:
    if flops is None:
        return {"skipped": note or "FLOPs were not counted"}
    achieved = flops / (step_ms / 1000.0) / 1e12 if step_ms > 0 else 0.0
    out: dict[str, Any] = {
        "per_step": flops,
        "achieved_tflops": achieved,
        "counted_by": "torch.utils.flop_counter.FlopCounterMode on the update after the window",
    }
    peak = peak_tflops(report["device_name"], report["precision"])
    if peak is None:
        out["mfu_skipped"] = (
            f"the peak FLOP rate of {report['device_name']} is not in tools/profile.py's "
            "PEAK_TFLOPS table"
        )
    else:
        out["peak_tflops"], out["peak_kind"] = peak
        out["mfu"] = achieved / peak[0]
    return out


# ----------------------------------------------------------------------------- printing


def print_report(report: dict[str, Any], console: Console, title: str, folder: Path) -> None:
    """The breakdown, top operators, throughput, CUDA numbers and advice, as tables."""
    w = report["window"]
    cuda = "cuda" in report
    batch = report["batch_size"]
    console.print(
        f"profile ({title}): {w['steps']} steps, from step {w['from_step']} to step "
        f"{w['to_step']}; {report['model']} on {report['data']}, batch {batch}"
        + (f" x {report['accumulate']} accumulated" if report["accumulate"] > 1 else "")
        + f", {report['device_name']}, precision {report['precision']}",
        highlight=False,
    )
    table = Table(title="where a step's time goes (ms per step, from vt/ ranges)")
    columns = ["phase", "ms/step", "share"] + (["GPU ms/step"] if cuda else [])
    for col in columns:
        table.add_column(col, justify="left" if col == "phase" else "right")
    for p in report["phases"]:
        cells = [p["label"], f"{p['ms']:.2f}", f"{p['share']:.1%}"]
        if cuda:
            cells.append("" if p["name"] == "other" else f"{p['gpu_ms']:.2f}")
        table.add_row(*cells)
    table.add_row("step", f"{report['step_ms']:.2f}", "100.0%", *([""] if cuda else []))
    console.print(table)
    if report["communication_ms"] is not None:
        console.print(
            "communication (DDP all-reduce, FSDP all-gather/reduce-scatter; inside forward, "
            f"backward and logging): {report['communication_ms']:.2f} ms per step",
            highlight=False,
        )
    rate = report["samples_per_s"]
    if rate is not None:
        world = report["world_size"]
        console.print(
            f"samples/s: {rate:.0f}" + (f" per process ({world} processes)" if world > 1 else ""),
            highlight=False,
        )
    ops = Table(title=f"top operators by self {'CUDA' if cuda else 'CPU'} time (per step)")
    op_cols = ["operator", "calls", "CPU ms"] + (["CUDA ms"] if cuda else []) + ["share"]
    for col in op_cols:
        if col == "operator":
            # One line per operator: long aten names are cut, trace.json has them whole.
            ops.add_column(col, no_wrap=True, overflow="ellipsis", max_width=40)
        else:
            ops.add_column(col, justify="right")
    for r in report["top_operators"]:
        cells = [r["name"], f"{r['calls_per_step']:.1f}", f"{r['self_cpu_ms']:.2f}"]
        cells += [f"{r['self_cuda_ms']:.2f}"] if cuda else []
        cells.append(f"{r['share']:.1%}")
        ops.add_row(*cells)
    console.print(ops)
    if cuda:
        c = report["cuda"]
        console.print(
            f"GPU: peak memory {c['peak_allocated_mib']:.0f} MiB allocated, "
            f"{c['peak_reserved_mib']:.0f} MiB reserved of {c['memory_mib']:.0f} MiB "
            f"({c['peak_share']:.0%}); {c['kernels_per_step']:.0f} kernels per step, "
            f"{c['mean_kernel_us']:.1f} µs on average, busy {c['gpu_busy']:.0%} of the step",
            highlight=False,
        )
    f = report["flops"]
    if "skipped" in f:
        console.print(f"note: {f['skipped']}", highlight=False)
    else:
        line = f"FLOPs: {f['per_step'] / 1e9:.2f} GFLOP per step, "
        line += f"{f['achieved_tflops']:.2f} TFLOP/s achieved"
        if "mfu" in f:
            line += f", MFU {f['mfu']:.1%} of {f['peak_tflops']:.0f} TFLOP/s ({f['peak_kind']})"
        else:
            line += f"; MFU: {f['mfu_skipped']}"
        console.print(line, highlight=False)
    for note in report["notes"]:
        console.print(f"note: {note}", highlight=False)
    if report["advice"]:
        console.print("advice:", highlight=False)
        for a in report["advice"]:
            console.print(f"  - {a['finding']} → {a['fix']}", highlight=False)
    else:
        console.print("advice: no phase stands out; nothing to change", highlight=False)
    console.print(
        f"wrote {folder}/{TRACE_FILE} (chrome://tracing, ui.perfetto.dev), "
        f"{folder}/{TB_PROFILE_DIR}/ (tensorboard --logdir {folder}/{TB_PROFILE_DIR}), "
        f"{folder}/{PROFILE_JSON}",
        highlight=False,
    )
