"""The typed config tree: YAML file plus dotted ``key=value`` overrides, validated once.

Every section is a pydantic model that forbids unknown keys, so a typo such as
``optim.lrr`` is an error that names the nearest valid key instead of a silent default.
Options that only one component understands (a generator's defect rate, the SGD
momentum) are ``None`` when unset so that the component's own default applies, and the
component refuses them when it cannot honour them (see :func:`refuse_unused`).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from visiontrain.errors import ConfigError


class _Section(BaseModel):
    # allow_inf_nan=False: no option means anything at nan or inf (an unset bound is None),
    # and letting one through fails far from the config, in torch or in round().
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # A NUL byte (YAML "\0") cannot be in a path or a name; os functions raise
        # ValueError on it wherever it ends up.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("the text holds a NUL character; remove it")
        return value


class DataConfig(_Section):
    """Where images come from and how they reach the model."""

    name: str = "defects"
    root: str | None = None
    image_size: int | None = Field(None, ge=8, le=4096)
    # `auto`: on CUDA the largest batch whose training step fits (engine/autobatch.py).
    batch_size: int | Literal["auto"] = 64
    # `auto`: a short loader measurement at build time picks the count (visiontrain.tools.bench).
    num_workers: int | Literal["auto"] = 0
    pin_memory: bool | None = None
    prefetch_factor: int = Field(2, ge=1, le=64)
    persistent_workers: bool = True
    drop_last: bool = True
    augment: Literal[
        "none", "light", "standard", "affine", "randaugment", "trivialaugment", "autoaugment"
    ] = "light"
    augment_on: Literal["loader", "device"] = "loader"
    # Policy knobs (None: torchvision's default), refused for a preset that ignores them.
    augment_magnitude: int | None = Field(None, ge=0, le=30)
    augment_ops: int | None = Field(None, ge=1, le=14)
    autoaugment_policy: Literal["imagenet", "cifar10", "svhn"] | None = None
    # Probability of erasing one rectangle to 0 after the augmentation (0: off).
    random_erasing: float = Field(0.0, ge=0.0, le=1.0)
    # MixUp / CutMix Beta alphas (0: off), applied to training batches on the device.
    mixup: float = Field(0.0, ge=0.0, le=10.0)
    cutmix: float = Field(0.0, ge=0.0, le=10.0)
    mix_prob: float = Field(1.0, ge=0.0, le=1.0)
    mix_switch_prob: float = Field(0.5, ge=0.0, le=1.0)
    cache: Literal["none", "memory", "disk"] = "none"
    val_split: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: int = Field(0, ge=0, le=2**63 - 1)
    on_error: Literal["raise", "skip"] = "raise"
    timeout: float = Field(120.0, ge=0.0, le=86_400.0)
    sampler: Literal["random", "weighted"] = "random"
    epoch_samples: int | None = Field(None, ge=1)
    download: bool = False
    cache_dir: str | None = None
    train_size: int | None = Field(None, ge=1)
    val_size: int | None = Field(None, ge=1)
    test_size: int | None = Field(None, ge=1)
    # A fixed stratified share of the training split (tune trials train on a fraction).
    train_fraction: float | None = Field(None, gt=0.0, le=1.0)
    defect_rate: float | None = Field(None, gt=0.0, lt=1.0)
    defect_classes: Literal["binary", "types", "multilabel"] | None = None

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_count_or_auto(cls, value: Any) -> Any:
        # As for num_workers: one error that names both accepted forms.
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)  # as the plain int field took it (a quoted YAML number)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
            raise ValueError(
                "use an integer from 1 to 65536 such as 64, or `auto` to search (on CUDA) "
                "for the largest batch whose training step fits in GPU memory"
            )
        return value

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers_count_or_auto(cls, value: Any) -> Any:
        # Checked before pydantic's union dispatch so that the error names the key itself
        # and says both forms it accepts (`auto5` would otherwise read as two union misses).
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                "use an integer from 0 to 128 such as 2, or `auto` to measure the loader "
                "and pick the fastest count"
            )
        if not 0 <= value <= 128:
            raise ValueError("use an integer from 0 to 128, or `auto` to measure and pick")
        return value


class ModelConfig(_Section):
    """Which network, how it is initialised and regularised."""

    name: str = "simple_cnn"
    pretrained: bool = False
    init: Literal["default", "kaiming", "xavier", "lecun", "gpt"] = "default"
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    drop_path: float | None = Field(None, ge=0.0, lt=1.0)
    width: int | None = Field(None, ge=1, le=1024)
    depth: int | None = Field(None, ge=1, le=8)
    norm: Literal["batch", "layer", "group", "none"] | None = None
    encoder: str | None = None
    # Start from these weights: a run directory, a visiontrain checkpoint, a state dict
    # (.pt/.pth, read with weights_only=True) or a .safetensors file (engine/weights.py).
    weights: str | None = None
    # Detection/segmentation: weights for the backbone/encoder alone (a classifier's).
    backbone_weights: str | None = None
    # Module-name prefixes whose parameters never train (`[stem, layer1]`).
    freeze: list[str] = []
    # BatchNorm statistics and affine parameters frozen (FrozenBatchNorm2d): small batches.
    freeze_bn: bool = False


class LossConfig(_Section):
    """The training objective; ``name`` defaults to the task's usual loss."""

    name: str | None = None
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: Literal["none", "balanced", "effective"] | list[float] = "none"
    effective_beta: float | None = Field(None, gt=0.0, lt=1.0)
    focal_gamma: float | None = Field(None, ge=0.0, le=10.0)
    focal_alpha: float | list[float] | None = None
    pos_weight: Literal["balanced"] | float | list[float] | None = None
    beta: float | None = Field(None, gt=0.0)
    delta: float | None = Field(None, gt=0.0)
    dice_weight: float | None = Field(None, ge=0.0)
    ce_weight: float | None = Field(None, ge=0.0)
    term_weights: dict[str, float] | None = None
    # Asymmetric loss (Ridnik et al. 2021): focusing of negatives / positives, and the
    # probability margin below which a negative costs nothing.
    asl_gamma_neg: float | None = Field(None, ge=0.0, le=10.0)
    asl_gamma_pos: float | None = Field(None, ge=0.0, le=10.0)
    asl_clip: float | None = Field(None, ge=0.0, lt=1.0)

    @field_validator("class_weights", "pos_weight")
    @classmethod
    def _positive_weights(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(w <= 0 for w in value)):
            raise ValueError("an explicit list needs one positive weight per class")
        if isinstance(value, float) and value <= 0:
            raise ValueError("a weight must be positive")
        return value

    @field_validator("focal_alpha")
    @classmethod
    def _alpha_range(cls, value: Any) -> Any:
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError("a scalar alpha is the foreground weight, between 0 and 1")
        if isinstance(value, list) and (not value or any(w < 0 for w in value)):
            raise ValueError("an alpha list needs one non-negative weight per class")
        return value


# The loss a task trains with when `loss.name` is not set.
DEFAULT_LOSS = {
    "classification": "cross_entropy",
    "multilabel": "bce_with_logits",
    "regression": "mse",
    "segmentation": "dice_ce",
    "detection": "detector",
}
# The metric that picks best.pt when `train.monitor` is not set. A detector computes its
# losses only in training mode, so detection has no val/loss.
DEFAULT_MONITOR = {"detection": "val/map", "segmentation": "val/miou", "multilabel": "val/map"}


class OptimConfig(_Section):
    """The optimizer and its parameter groups."""

    name: str = "adamw"
    # `find`: `visiontrain train` runs the LR range test first and trains with its suggestion.
    lr: float | Literal["find"] = 1e-3
    weight_decay: float = Field(0.01, ge=0.0, le=10.0)
    momentum: float | None = Field(None, ge=0.0, lt=1.0)
    nesterov: bool | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = Field(None, gt=0.0, le=1.0)
    decay_norm_bias: bool = False
    # Transfer learning: the backbone trains at this factor x optim.lr, the head at optim.lr.
    backbone_lr_factor: float | None = Field(None, gt=0.0, le=1.0)
    # Layer-wise LR decay (timm's grouping): layer k of L trains at layer_decay^(L-1-k) x lr.
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    # Scale optim.lr with the batch per update: lr x (batch / lr_batch), or its square root.
    lr_scale: Literal["none", "linear", "sqrt"] = "none"
    # The batch per update (images over all processes and accumulation) optim.lr is for.
    lr_batch: int | None = Field(None, ge=1, le=10_000_000)

    @model_validator(mode="after")
    def _lr_scale_rule(self) -> OptimConfig:
        if self.lr_scale != "none" and self.lr_batch is None:
            raise ValueError(
                f"optim.lr_scale={self.lr_scale} needs optim.lr_batch, the batch size (images "
                "per update) that optim.lr was tuned for, e.g. optim.lr_batch=256"
            )
        if self.lr_scale == "none" and self.lr_batch is not None:
            raise ValueError(
                "optim.lr_batch is set but optim.lr_scale=none, so it would be ignored; set "
                "optim.lr_scale=linear or sqrt, or remove optim.lr_batch"
            )
        if self.lr_scale != "none" and self.lr == "find":
            raise ValueError(
                "optim.lr=find measures the LR at the run's own batch; scaling it "
                f"(optim.lr_scale={self.lr_scale}) would move it off the measurement. Remove "
                "optim.lr_scale and optim.lr_batch, or give optim.lr a number"
            )
        return self

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        # torch refuses these only when the optimizer is built; say it here, by key.
        if value is not None and not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("each beta lies in [0, 1), such as [0.9, 0.999]")
        return value

    @field_validator("lr", mode="before")
    @classmethod
    def _lr_number_or_find(cls, value: Any) -> Any:
        # Checked before pydantic's union dispatch so that an error names `optim.lr` itself,
        # not a union branch, and says both forms the key accepts.
        if isinstance(value, str) and value.strip().lower() == "find":
            return "find"
        number = value
        if isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ValueError("use a number in (0, 10] such as 3e-4, or `find` to run the LR test")
        if not 0.0 < number <= 10.0:
            raise ValueError("the learning rate must be in (0, 10], or `find` to run the LR test")
        return float(number)


class ScheduleConfig(_Section):
    """How the learning rate moves during training."""

    name: str = "warmup_cosine"
    warmup_epochs: float | None = Field(None, ge=0.0)
    warmup_start_factor: float | None = Field(None, gt=0.0, le=1.0)
    min_lr: float | None = Field(None, ge=0.0)
    step_size: int | None = Field(None, ge=1)
    gamma: float | None = Field(None, gt=0.0, le=1.0)
    t0: int | None = Field(None, ge=1)
    t_mult: int | None = Field(None, ge=1)
    patience: int | None = Field(None, ge=0)
    factor: float | None = Field(None, gt=0.0, lt=1.0)
    max_lr: float | None = Field(None, gt=0.0)
    pct_start: float | None = Field(None, gt=0.0, lt=1.0)


class EarlyStoppingConfig(_Section):
    """Stop when the monitored metric stops improving."""

    patience: int | None = Field(None, ge=1)
    min_delta: float = Field(0.0, ge=0.0)


class TrainConfig(_Section):
    """The loop: length, precision, accumulation, clipping, seeding, monitoring."""

    epochs: int = Field(12, ge=1, le=100_000)
    # A budget in optimizer updates that holds whatever the data's size: when train.epochs
    # would give fewer updates, the run trains ceil(min_updates / updates per epoch) epochs.
    min_updates: int | None = Field(None, ge=1, le=100_000_000)
    precision: Literal["32", "bf16", "fp16"] = "32"
    accumulate: int = Field(1, ge=1, le=4096)
    grad_clip_norm: float | None = Field(None, gt=0.0)
    grad_clip_value: float | None = Field(None, gt=0.0)
    seed: int = Field(42, ge=0, le=2**32 - 1)
    deterministic: bool = False
    # Fine-tuning: only the head trains for this many epochs, then the whole model.
    freeze_epochs: int = Field(0, ge=0, le=100_000)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: bool = False
    compile: bool = False
    activation_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0)
    sync_bn: bool = False
    # Under torchrun: `ddp` replicates the model, `fsdp` shards parameters, gradients and
    # optimizer state (FSDP2) and writes sharded checkpoints (engine/fsdp.py, sharded.py).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    monitor: str | None = None
    # `auto`: chosen on val after training (best_f1) where a task has decision thresholds
    # (binary classification, multilabel per class), the remedy for a rare class.
    threshold: float | str = "auto"
    # Fit one temperature on val after training (classification): calibrated probabilities.
    calibrate: Literal["none", "temperature"] = "none"
    monitor_mode: Literal["auto", "min", "max"] = "auto"
    eval_every: int = Field(1, ge=1)
    log_every: int = Field(10, ge=1)
    progress: Literal["auto", "bar", "plain", "none"] = "auto"
    # `a:b`: profile the updates from step a to step b with torch.profiler (tools/profile.py).
    profile_steps: str | None = None
    on_nan: Literal["raise", "skip", "rollback"] = "raise"
    max_nan_skips: int = Field(3, ge=1, le=10_000)
    nan_lr_factor: float = Field(0.5, gt=0.0, lt=1.0)
    max_rollbacks: int = Field(3, ge=0, le=1000)
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()

    @field_validator("threshold")
    @classmethod
    def _threshold_rule(cls, value: Any) -> Any:
        if isinstance(value, float | int) and not isinstance(value, bool):
            if not 0.0 < value < 1.0:
                raise ValueError("a fixed threshold lies strictly between 0 and 1")
            return float(value)
        if value in ("auto", "best_f1") or THRESHOLD_TARGET.fullmatch(str(value)):
            return value
        raise ValueError(
            "use auto, a number in (0, 1), best_f1, or a target such as recall>=0.9 or "
            "precision>=0.95"
        )

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: Any) -> Any:
        # YAML reads `precision: 32` as an int; the key is a name, so accept both.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("profile_steps", mode="before")
    @classmethod
    def _profile_window_text(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 60:
            # YAML 1.1 reads `1:3` as the base-60 integer 63 (and `10:20` as 620); its
            # base-60 digits are the numbers that were written.
            sign, rest, digits = "-" if value < 0 else "", abs(value), []
            while rest:
                rest, digit = divmod(rest, 60)
                digits.append(str(digit))
            value = sign + ":".join(reversed(digits))
        elif isinstance(value, list | tuple):
            value = ":".join(str(v) for v in value)
        text = str(value).strip()
        match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
        if match is None:
            raise ValueError(
                f"read as {text!r}; write two step numbers a:b such as 10:20 (profiles from "
                "step 10 to step 20), non-negative integers with a < b"
            )
        first, last = int(match[1]), int(match[2])
        if first >= last:
            raise ValueError(
                f"{first}:{last} profiles nothing: the first step must come before the last "
                f"(a < b), such as {first}:{first + 10}"
            )
        return f"{first}:{last}"

    def profile_window(self) -> tuple[int, int] | None:
        """``train.profile_steps`` as ``(a, b)``: profile from step a to step b; or None."""
        if self.profile_steps is None:
            return None
        first, last = self.profile_steps.split(":")
        return int(first), int(last)


# `recall>=0.9`: the highest threshold that keeps val recall at or above 0.9.
THRESHOLD_TARGET = re.compile(r"(recall|precision)>=(0?\.\d+|1(\.0*)?)")


class RunConfig(_Section):
    """Where the run lives and how it resumes."""

    dir: str = "runs"
    name: str | None = None
    resume: str | None = None
    keep_last: int = Field(2, ge=0, le=1000)
    save_every_steps: int | None = Field(None, ge=1)
    save_every_minutes: float | None = Field(None, gt=0.0, le=10_080.0)
    # Copy the state to host memory at the step, write the file on a background thread.
    async_save: bool = False
    report: bool = True
    loggers: list[Literal["jsonl", "tensorboard", "mlflow"]] = ["jsonl", "tensorboard"]
    mlflow_uri: str | None = None
    mlflow_experiment: str | None = None

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, value: str | None) -> str | None:
        # The run folder is run.dir/run.name: a separator or `..` would put it elsewhere.
        if value is not None and (
            not value.strip() or value in (".", "..") or "/" in value or "\\" in value
        ):
            raise ValueError(
                "run.name is one folder name inside run.dir (no '/', '\\', '.' or '..'); "
                "set run.dir to choose where runs go"
            )
        return value

    @field_validator("loggers")
    @classmethod
    def _jsonl_always(cls, value: list[str]) -> list[str]:
        # metrics.jsonl is the run's own record: resume, report and compare read it.
        if "jsonl" not in value:
            raise ValueError(
                "jsonl must stay in the list (resume, report and compare read metrics.jsonl); "
                "add tensorboard or mlflow next to it"
            )
        if len(set(value)) != len(value):
            raise ValueError("each logger once")
        return value

    @model_validator(mode="after")
    def _mlflow_options(self) -> RunConfig:
        if "mlflow" not in self.loggers and (self.mlflow_uri or self.mlflow_experiment):
            raise ValueError(
                "run.mlflow_uri/run.mlflow_experiment set but mlflow is not in run.loggers; "
                "add it: run.loggers=[jsonl,tensorboard,mlflow]"
            )
        return self


# How a `tune.space` entry samples a value: the one key names the distribution.
SPACE_KINDS = ("log_uniform", "uniform", "int", "choice")
# Keys a search may not sample: tune sets them for every trial itself (epochs, fraction,
# progress, run folder), or they change what the score means (task, monitor).
TUNE_RESERVED = (
    "task",
    "train.epochs",
    "train.min_updates",
    "train.progress",
    "train.monitor",
    "train.monitor_mode",
    "data.train_fraction",
    "run.",
    "tune.",
)


class TuneConfig(_Section):
    """The hyperparameter search of ``visiontrain tune``; ``train`` does not read it."""

    space: dict[str, dict[str, list[Any]]] = {}
    sampler: Literal["random", "tpe"] = "random"
    trials: int = Field(8, ge=1, le=100_000)
    epochs: int = Field(3, ge=1, le=100_000)
    data_fraction: float = Field(1.0, gt=0.0, le=1.0)
    pruner: Literal["none", "median", "asha"] = "asha"
    storage: str | None = None
    study: str | None = None
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @field_validator("space")
    @classmethod
    def _check_space(
        cls, space: dict[str, dict[str, list[Any]]]
    ) -> dict[str, dict[str, list[Any]]]:
        keys = all_keys()
        sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
        for key, spec in space.items():
            if key not in keys:
                hint = suggest_key(key)
                tip = f" — did you mean `{hint}`?" if hint else ""
                raise ValueError(f"unknown key `{key}` in tune.space{tip}")
            if key in sections:
                raise ValueError(f"`{key}` is a section; search one of its keys such as `{key}.*`")
            if any(key == r or (r.endswith(".") and key.startswith(r)) for r in TUNE_RESERVED):
                raise ValueError(
                    f"`{key}` cannot be searched: tune sets it for every trial (or it would "
                    "change what the score means); use tune.epochs / tune.data_fraction"
                )
            space[key] = _check_spec(key, spec)
        return space


def _check_spec(key: str, spec: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Check one distribution and return it with numeric bounds as numbers.

    Raises:
        ValueError: not exactly one of :data:`SPACE_KINDS`, or bounds that are not numbers,
            not ordered, or not positive for a log scale.

    """
    form = "{log_uniform: [lo, hi]}, {uniform: [lo, hi]}, {int: [lo, hi]} or {choice: [a, b]}"
    if len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
        raise ValueError(f"tune.space `{key}` = {spec}: write one of {form}")
    kind, values = next(iter(spec.items()))
    if kind == "choice":
        if not values or any(isinstance(v, list | dict) for v in values):
            raise ValueError(f"tune.space `{key}`: choice needs a list of plain values")
        return spec
    if isinstance(values, list):
        # YAML 1.1 reads `1e-4` (no dot) as a string; a bound is a number either way.
        values = [_as_number(v) for v in values]
    numbers = isinstance(values, list) and len(values) == 2
    if not numbers or any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        raise ValueError(f"tune.space `{key}`: {kind} needs two numbers [lo, hi], got {values}")
    lo, hi = values
    if kind == "int" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise ValueError(f"tune.space `{key}`: int bounds must be whole numbers, got {values}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"tune.space `{key}`: {kind} bounds must be finite, got {values}")
    if not lo < hi:
        raise ValueError(f"tune.space `{key}`: lo must be below hi, got {values}")
    if kind == "log_uniform" and lo <= 0:
        raise ValueError(f"tune.space `{key}`: log_uniform needs positive bounds, got {values}")
    if kind == "int":
        return {kind: [int(lo), int(hi)]}
    return {kind: [float(lo), float(hi)]}


def _as_number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class Config(_Section):
    """The whole resolved configuration of a run."""

    task: str = "classification"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    run: RunConfig = RunConfig()
    # Read by `visiontrain tune` only; `train` accepts it so that one YAML serves both.
    tune: TuneConfig = TuneConfig()

    @model_validator(mode="after")
    def _task_defaults(self) -> Config:
        if self.loss.name is None:
            self.loss.name = DEFAULT_LOSS.get(self.task, "cross_entropy")
        if self.train.monitor is None:
            self.train.monitor = DEFAULT_MONITOR.get(self.task, "val/loss")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every key, defaults included."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved config as YAML, in section order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def all_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key of a config model, sections included."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.extend(all_keys(sub, dotted + "."))
    return keys


def suggest_key(key: str) -> str | None:
    """Nearest valid dotted key for a misspelt one, or None."""
    keys = all_keys()
    depth = key.count(".")
    same_depth = [k for k in keys if k.count(".") == depth]
    close = difflib.get_close_matches(key, same_depth, n=1, cutoff=0.8)
    if close:
        return close[0]
    # A right leaf under the wrong section ("train.lr") deserves the right section.
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if by_leaf:
        return by_leaf[0]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return close[0] if close else None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        # Drop pydantic's union-branch markers such as "literal['none','balanced']".
        key = ".".join(
            str(p) for p in item["loc"] if not (isinstance(p, str) and ("[" in p or "(" in p))
        )
        if item["type"] == "extra_forbidden":
            hint = suggest_key(key)
            tip = f" — did you mean `{hint}`?" if hint else ""
            lines.append(f"unknown key `{key}`{tip}")
        else:
            lines.append(f"`{key}` = {item.get('input')!r} is not allowed: {item['msg']}")
    unique = list(dict.fromkeys(lines))
    return (
        f"invalid config ({source}): "
        + "; ".join(unique)
        + ("" if unique[-1].endswith("?") else ".")
        + " Fix the key in the YAML file or pass it as key=value "
        "(see `visiontrain train --help` and configs/)."
    )


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise ConfigError(
                f"cannot set `{key}`: `{prefix}` is a value, not a section. "
                "Use a key such as `optim.lr=3e-4`."
            )
        node = child
    node[parts[-1]] = value


def set_values(tree: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a raw config tree with typed values set at dotted keys.

    Args:
        tree: raw config tree (as read from YAML).
        values: dotted key → value (a sampled hyperparameter, a best.json override).

    Returns:
        The new tree; ``tree`` itself is not changed.

    """
    out = _deep_copy(dict(tree))
    for key, value in values.items():
        _set_dotted(out, key, value)
    return out


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are read as YAML scalars or lists."""
    parsed = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"cannot read override `{item}`: write it as key=value, e.g. `optim.lr=3e-4`."
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"cannot read the value of `{key}` ({text!r}): {_one_line(exc)}. Write a number, "
                "true/false, a word, or a list such as [1,2]; quote text with special "
                "characters."
            ) from None
        parsed.append((key, value))
    return parsed


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file with ``safe_load``; object tags are refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist. Pass a YAML file (see configs/) "
            "or only key=value overrides."
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {_one_line(exc)}. Only plain YAML (maps, lists, "
            "numbers, strings) is accepted; Python object tags are refused (!!python/...). "
            "Fix or remove the line it names."
        ) from None
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections (task, data, model, ...), "
            f"not a {type(data).__name__}."
        )
    return data


def _one_line(exc: BaseException) -> str:
    """A YAML error (which spans several lines with a caret) as one line."""
    return " ".join(str(exc).split())


def build_config(
    tree: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    source: str = "command line",
) -> Config:
    """Validate a raw config tree plus dotted overrides into a :class:`Config`."""
    raw: dict[str, Any] = _deep_copy(dict(tree or {}))
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML file (optional) and apply ``key=value`` overrides."""
    tree = read_yaml(path) if path is not None else {}
    source = f"{path} + overrides" if path is not None else "command line"
    return build_config(tree, overrides, source)


def split_items(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """The first item without '=' is the YAML file; the rest are key=value overrides."""
    config, overrides = None, []
    for item in items:
        if "=" not in item and config is None and not overrides:
            config = item
        else:
            overrides.append(item)
    return config, overrides


def load_tool_config(items: Sequence[str], verb: str, why: str) -> Config:
    """The config of a verb that builds the run fresh (lr-find, doctor, bench).

    Such a verb has no use for ``run.resume``; it is refused rather than ignored.

    Args:
        items: ``[CONFIG.yaml] [key=value ...]`` as on the command line.
        verb: the command, for the message.
        why: what the verb does instead of resuming, for the message.
    """
    path, overrides = split_items(items)
    cfg = load_config(path, overrides)
    if cfg.run.resume is not None:
        raise ConfigError(
            f"run.resume={cfg.run.resume} has no meaning for {verb}, which {why}. "
            "Remove run.resume."
        )
    return cfg


def refuse_unused(section: BaseModel, section_name: str, used: Iterable[str], owner: str) -> None:
    """Refuse options that were set but that ``owner`` does not use.

    Args:
        section: the config section holding the options.
        section_name: its dotted name, for the message (``"optim"``).
        used: the field names ``owner`` honours.
        owner: what is being built (``"optimizer sgd"``), for the message.

    """
    always = {"name"}
    unused = sorted(
        name
        for name in section.model_fields_set
        if name not in set(used) | always
        and getattr(section, name) is not None
        and name in _OPTIONAL_FIELDS.get(type(section), set())
    )
    if unused:
        keys = ", ".join(f"`{section_name}.{k}`" for k in unused)
        raise ConfigError(
            f"{keys} set, but {owner} does not use it, so it would be ignored. Remove the "
            f"key, or change `{section_name}.name` to one that uses it."
        )


def _optional_fields(model: type[BaseModel]) -> set[str]:
    """Fields whose default is None: the component-specific options."""
    return {n for n, f in model.model_fields.items() if f.default is None}


_OPTIONAL_FIELDS: dict[type[BaseModel], set[str]] = {
    m: _optional_fields(m)
    for m in (DataConfig, ModelConfig, LossConfig, OptimConfig, ScheduleConfig)
}
# The LR rule's reference batch is read for every optimizer, not an option of one.
_OPTIONAL_FIELDS[OptimConfig].discard("lr_batch")


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


# Keys a resumed run may change: how long it runs, how it logs and saves, where its data
# lives and how it is loaded, and speed options that do not change what is computed.
# Every other key (task, data, model, loss, optim, schedule, seed, precision ...) is
# fixed by the checkpoint: changing it mid-run would train a different run.
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.progress",
    "train.log_every",
    "train.eval_every",
    "train.early_stopping.",
    "train.device",
    "train.compile",
    "train.channels_last",
    "train.activation_checkpointing",
    "train.deterministic",
    "train.threshold",
    "train.calibrate",
    "train.on_nan",
    "train.max_nan_skips",
    "train.max_rollbacks",
    "train.nan_lr_factor",
    "train.profile_steps",
    "data.root",
    # The initial weights are read only when a run starts, never on a resume.
    "model.weights",
    "model.backbone_weights",
    "data.num_workers",
    "data.pin_memory",
    "data.prefetch_factor",
    "data.persistent_workers",
    "data.timeout",
    "data.on_error",
    "data.cache",
    "data.cache_dir",
    "data.download",
    "run.",
    "tune.",
)


def flatten_keys(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested config tree: ``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(
    saved: Mapping[str, Any], cfg: Config
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """How ``cfg`` differs from the config a checkpoint was written with.

    Args:
        saved: The ``config`` stored in the checkpoint.
        cfg: The config of the resuming command.

    Returns:
        ``(fixed, allowed)``: ``(key, old, new)`` for keys a resume may not change, and for
        those it may (:data:`RESUMABLE_CHANGES`). Keys the checkpoint does not have (it is
        older than them) are not compared.
    """
    old, new = flatten_keys(saved), flatten_keys(cfg.to_dict())
    fixed, allowed = [], []
    for key, value in new.items():
        if key not in old or old[key] == value or old[key] is None:
            # A key the checkpoint lacks (it is older) or left unset ("the default", which
            # this config has now resolved) is not a change.
            continue
        change = (key, old[key], value)
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES):
            allowed.append(change)
        else:
            fixed.append(change)
    return fixed, allowed
