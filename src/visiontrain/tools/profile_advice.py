"""Advice from a step profile: a small registry of rules, each tied to one measurement.

Every rule reads the :class:`Measurements` of a profiled window and returns an
:class:`Advice` (what was measured, which config keys to change) or None when its
measurement is within bounds. ``visiontrain profile`` and ``train.profile_steps`` print
every advice that fires, in registration order. A new rule is one decorated function:

    @register_rule("my_rule")
    def _my_rule(m: Measurements) -> Advice | None: ...

Only keys that exist (docs/config.md) and that would change something are named: a key
already at the suggested value is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from visiontrain.config import Config
from visiontrain.registry import Registry

# Share of the step above which a phase is called the bottleneck. A step that waits a
# quarter of its time for data leaves the device idle that long (doctor warns at 30%).
LOADER_BOUND = 0.25
H2D_BOUND = 0.15
OPTIMIZER_HEAVY = 0.25
LOGGING_HEAVY = 0.10
UNATTRIBUTED = 0.25
COMMUNICATION_HEAVY = 0.20
COMPUTE_BOUND = 0.50
# CUDA: a step of many short kernels is bound by their launches, not by their math.
SMALL_KERNEL_US = 20.0
MANY_KERNELS = 200.0
GPU_IDLE = 0.6
# CUDA: the allocator's peak above this share of the device's memory leaves no room.
MEMORY_NEAR_LIMIT = 0.85
# Augmentation presets that data.augment_on=device runs (docs/config.md).
DEVICE_AUGMENTS = ("light", "standard", "affine")
DEVICE_AUGMENT_TASKS = ("classification", "regression")


@dataclass
class Measurements:
    """What the rules read: one profiled window, per optimizer update (a step).

    Attributes:
        device: ``cpu`` or ``cuda``.
        step_ms: Wall time of a step.
        ms: Phase name (``loader_wait``, ``h2d``, ``forward``, ``backward``,
            ``optimizer``, ``logging``, ``eval``, ``other``) → host milliseconds per step.
        shares: Phase name → share of the step (0..1).
        cfg: The run's config (the keys the advice names, and their current values).
        cpu_count: CPUs of this machine (for worker counts).
        cacheable: Whether the data source decodes files (``data.cache`` applies).
        communication_ms: Collectives per step (DDP all-reduce, FSDP all-gather and
            reduce-scatter), else None.
        kernels_per_step: CUDA kernels launched per step (None on the CPU).
        mean_kernel_us: Their mean duration.
        gpu_busy: Kernel time over step time (CUDA).
        peak_memory_share: The allocator's peak over the device's memory (CUDA).
    """

    device: str
    step_ms: float
    ms: dict[str, float]
    shares: dict[str, float]
    cfg: Config
    cpu_count: int = 1
    cacheable: bool = False
    communication_ms: float | None = None
    kernels_per_step: float | None = None
    mean_kernel_us: float | None = None
    gpu_busy: float | None = None
    peak_memory_share: float | None = None


@dataclass
class Advice:
    """One finding with its fix.

    Attributes:
        rule: The rule's registered name.
        finding: What was measured, with the numbers.
        fix: What to change, naming config keys as ``key=value``.
        keys: The config keys the fix names (for tests and tools).
    """

    rule: str
    finding: str
    fix: str
    keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for profile.json."""
        return asdict(self)


# A rule returns its advice with ``rule`` left empty; :func:`advise` fills in the name.
Rule = Callable[[Measurements], Advice | None]
_RULES: Registry[Rule] = Registry("profile advice rule")


def register_rule(name: str) -> Callable[[Rule], Rule]:
    """Register a rule under ``name``; rules run in registration order."""
    return _RULES.decorator(name)


def list_rules() -> list[str]:
    """Registered rule names, in the order they run."""
    return list(_RULES)


def advise(m: Measurements) -> list[Advice]:
    """Every advice whose rule fires on ``m``, in registration order."""
    out = []
    for name in _RULES:
        advice = _RULES.get(name)(m)
        if advice is not None:
            advice.rule = name
            out.append(advice)
    return out


def _pct(share: float) -> str:
    return f"{share:.0%}"


def _fix(changes: list[tuple[str, str, str]]) -> tuple[str, list[str]]:
    """``key=value (why)`` clauses joined, and the keys."""
    text = "; ".join(f"{key}={value} ({why})" for key, value, why in changes)
    return text, [key for key, _, _ in changes]


@register_rule("loader_bound")
def _loader_bound(m: Measurements) -> Advice | None:
    share = m.shares.get("loader_wait", 0.0)
    if share <= LOADER_BOUND:
        return None
    d = m.cfg.data
    changes = []
    if isinstance(d.num_workers, int) and d.num_workers < m.cpu_count:
        changes.append(
            (
                "data.num_workers",
                "auto",
                f"now {d.num_workers}, {m.cpu_count} CPUs: measures 0/2/4 workers and keeps "
                "the fastest; `visiontrain bench loader` shows the sweep",
            )
        )
    if m.cacheable and d.cache == "none":
        changes.append(("data.cache", "memory", "or disk: decode each file once, not per epoch"))
    if (
        d.augment_on == "loader"
        and d.augment in DEVICE_AUGMENTS
        and m.cfg.task in DEVICE_AUGMENT_TASKS
    ):
        changes.append(("data.augment_on", "device", "augment whole batches off the loader"))
    fix, keys = _fix(changes)
    if not changes:
        fix = "lighter per-sample work in the dataset (decoding, augmentation)"
    return Advice(
        "",
        f"loader-bound: the step waits {_pct(share)} of its time "
        f"({m.ms['loader_wait']:.1f} of {m.step_ms:.1f} ms) for the next batch",
        fix,
        keys,
    )


@register_rule("h2d_bound")
def _h2d_bound(m: Measurements) -> Advice | None:
    share = m.shares.get("h2d", 0.0)
    if m.device != "cuda" or share <= H2D_BOUND:
        return None
    changes = []
    if m.cfg.data.pin_memory is False:
        changes.append(("data.pin_memory", "true", "page-locked batches copy asynchronously"))
    if m.cfg.data.augment_on == "device":
        changes.append(("data.augment_on", "loader", "device augmentation is in this phase"))
    fix, keys = _fix(changes)
    if not changes:
        fix = "batches cross as uint8 from pinned memory already; a smaller data.image_size "
        fix += "moves fewer bytes"
        keys = ["data.image_size"]
    return Advice(
        "",
        f"host→device copy and batch preparation take {_pct(share)} of the step "
        f"({m.ms['h2d']:.1f} ms)",
        fix,
        keys,
    )


@register_rule("small_kernels")
def _small_kernels(m: Measurements) -> Advice | None:
    if m.device != "cuda" or m.kernels_per_step is None or m.mean_kernel_us is None:
        return None
    launch_bound = m.kernels_per_step >= MANY_KERNELS and m.mean_kernel_us < SMALL_KERNEL_US
    idle = m.gpu_busy is not None and m.gpu_busy < GPU_IDLE
    if not (launch_bound or idle):
        return None
    t = m.cfg.train
    changes = []
    if not t.compile:
        changes.append(("train.compile", "true", "fuses small kernels into few"))
    if not t.channels_last:
        changes.append(("train.channels_last", "true", "NHWC convolutions on tensor cores"))
    batch = m.cfg.data.batch_size
    if isinstance(batch, int):
        changes.append(("data.batch_size", str(batch * 2), f"now {batch}: more work per launch"))
    fix, keys = _fix(changes)
    busy = f", the GPU busy {_pct(m.gpu_busy)} of the step" if m.gpu_busy is not None else ""
    return Advice(
        "",
        f"many small kernels: {m.kernels_per_step:.0f} per step averaging "
        f"{m.mean_kernel_us:.1f} µs{busy}",
        fix,
        keys,
    )


@register_rule("memory_near_limit")
def _memory_near_limit(m: Measurements) -> Advice | None:
    share = m.peak_memory_share
    if m.device != "cuda" or share is None or share < MEMORY_NEAR_LIMIT:
        return None
    t = m.cfg.train
    changes = []
    if not t.activation_checkpointing:
        changes.append(
            ("train.activation_checkpointing", "true", "recompute activations: less memory")
        )
    if t.precision == "32":
        changes.append(("train.precision", "bf16", "half the activation memory"))
    batch = m.cfg.data.batch_size
    if isinstance(batch, int) and batch > 1:
        changes.append(
            (
                "data.batch_size",
                str(batch // 2),
                f"now {batch}, with train.accumulate={t.accumulate * 2} for the same update",
            )
        )
    fix, keys = _fix(changes)
    return Advice(
        "", f"memory near the limit: the peak reaches {_pct(share)} of the GPU's memory", fix, keys
    )


@register_rule("optimizer_heavy")
def _optimizer_heavy(m: Measurements) -> Advice | None:
    share = m.shares.get("optimizer", 0.0)
    if share <= OPTIMIZER_HEAVY:
        return None
    t = m.cfg.train
    changes = [
        (
            "train.accumulate",
            str(t.accumulate * 2),
            "one update per twice the batches: half the optimizer's share, a batch twice as big",
        ),
    ]
    if t.ema:
        changes.append(("train.ema", "false", "the EMA update is part of this phase"))
    fix, keys = _fix(changes)
    return Advice(
        "",
        f"optimizer-heavy: the update (unscale, clip, step, EMA, schedule) takes "
        f"{_pct(share)} of the step ({m.ms['optimizer']:.1f} ms)",
        fix + "; a larger data.batch_size does the same; torch's fused optimizer kernels "
        "are not a config key here (the default foreach implementation runs)",
        keys,
    )


@register_rule("communication_heavy")
def _communication_heavy(m: Measurements) -> Advice | None:
    comm = m.communication_ms
    if comm is None or comm <= COMMUNICATION_HEAVY * m.step_ms:
        return None
    t = m.cfg.train
    fix, keys = _fix(
        [
            (
                "train.accumulate",
                str(t.accumulate * 2),
                "gradients cross once per twice the batches; the batch per update doubles",
            )
        ]
    )
    return Advice(
        "",
        f"communication-heavy: collectives take {comm:.1f} ms per step ({_pct(comm / m.step_ms)})",
        fix + "; a larger data.batch_size per process does the same",
        keys,
    )


@register_rule("logging_heavy")
def _logging_heavy(m: Measurements) -> Advice | None:
    share = m.shares.get("logging", 0.0)
    if share <= LOGGING_HEAVY:
        return None
    every = m.cfg.train.log_every
    fix, keys = _fix([("train.log_every", str(every * 5), f"now {every}")])
    return Advice(
        "",
        f"logging takes {_pct(share)} of the step: a record reads the loss back from the "
        "device and writes every logger",
        fix,
        keys,
    )


@register_rule("epoch_end_in_window")
def _epoch_end_in_window(m: Measurements) -> Advice | None:
    share = m.shares.get("eval", 0.0)
    if share <= 0.0:
        return None
    fix, keys = _fix(
        [("train.profile_steps", "a window inside one epoch", "to see the steps alone")]
    )
    return Advice(
        "",
        f"the window crosses an epoch end: evaluation takes {_pct(share)} of the average step",
        fix,
        keys,
    )


@register_rule("unattributed")
def _unattributed(m: Measurements) -> Advice | None:
    share = m.shares.get("other", 0.0)
    if share <= UNATTRIBUTED:
        return None
    return Advice(
        "",
        f"{_pct(share)} of the step is outside the named phases: callbacks (checkpoint "
        "saves), an epoch's start (loader workers starting) or your own code",
        "look up the gaps between vt/ ranges in trace.json; run.save_every_steps saves inside "
        "steps",
        ["run.save_every_steps"],
    )


@register_rule("compute_bound")
def _compute_bound(m: Measurements) -> Advice | None:
    share = m.shares.get("forward", 0.0) + m.shares.get("backward", 0.0)
    if share < COMPUTE_BOUND or m.shares.get("loader_wait", 0.0) > LOADER_BOUND:
        return None  # a loader-bound step is the loader's rule's to explain
    t = m.cfg.train
    changes = []
    if m.device == "cuda":
        if t.precision == "32":
            changes.append(("train.precision", "bf16", "tensor-core math"))
        if not t.channels_last:
            changes.append(("train.channels_last", "true", "NHWC convolutions"))
        if not t.compile:
            changes.append(("train.compile", "true", "fused kernels"))
    fix, keys = _fix(changes)
    if not changes:
        fix = (
            "a smaller data.image_size or model.name, or a CUDA device, shortens the step"
            if m.device == "cpu"
            else "the step is the model's math, already in its fast settings"
        )
        keys = ["data.image_size", "model.name"] if m.device == "cpu" else []
    return Advice(
        "", f"compute-bound: forward and backward take {_pct(share)} of the step", fix, keys
    )
