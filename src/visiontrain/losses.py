"""Loss registry: ``loss.name`` → a :class:`Loss` for a task.

Only what torch and torchvision lack is written here: the multi-class softmax focal loss,
soft dice / jaccard with ignored pixels, class weights from class counts. Cross entropy,
BCE, the regression losses and the box losses are torch's and torchvision's own,
configured (label smoothing, class weights, ``pos_weight``) rather than rewritten.

Every loss returns a float32 scalar, mean-reduced, and never reads a value back from the
device, so the training loop can call it without a host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import (
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
)

from visiontrain.config import DEFAULT_LOSS, LossConfig, refuse_unused
from visiontrain.errors import ConfigError, did_you_mean
from visiontrain.registry import Registry

# The label of a segmentation pixel that no loss sees (VOC / Cityscapes convention).
IGNORE_INDEX = 255

# Floor of ``1 - p_t`` in the focal term: ``0 ** gamma`` has an infinite derivative for
# gamma < 1, and clamping to the smallest normal float keeps the gradient finite (and zero
# at that point) while changing the value by less than float32 can show.
_TINY = torch.finfo(torch.float32).tiny

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LossContext:
    """What a loss builder needs to know about the task and its training data.

    Attributes:
        task: ``classification``, ``multilabel``, ``regression`` or ``segmentation``.
        num_outputs: classes (classification, segmentation) or targets (regression).
        class_counts: int64 training samples (or pixels) per class; None for regression.
            Multilabel: the training images that carry each label.
        num_samples: training images, where they are not the sum of ``class_counts``
            (multilabel: an image may carry several labels, or none).

    """

    task: str
    num_outputs: int
    class_counts: torch.Tensor | None = None
    num_samples: int | None = None


@dataclass(frozen=True)
class Loss:
    """A built loss: call it as ``loss(output, target)`` for a float32 scalar.

    Attributes:
        name: the registered name (``loss.name``).
        activation: ``softmax``, ``sigmoid`` or ``identity``: how the task turns outputs
            into scores or probabilities consistent with what the loss trained.
        fn: ``(float32 output, target) -> scalar``; prefer calling the :class:`Loss`.
        raw_targets: regression only. True: the task passes de-standardised outputs and raw
            targets (``msle`` works in the targets' own units); False: standardised ones.
        info: JSON-able description of the weights in force, printed at start and written
            to ``summary.json``.

    """

    name: str
    activation: str
    fn: LossFn = field(repr=False)
    raw_targets: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the mean loss of a batch as a float32 scalar."""
        # Autocast may hand over bf16/fp16 outputs; log-probabilities and sums over a batch
        # lose too much precision in 16 bits, so the loss is always computed in float32.
        if target.is_floating_point():
            target = target.float()
        return self.fn(output.float(), target)


LossBuilder = Callable[[LossConfig, LossContext], Loss]


@dataclass(frozen=True)
class _Entry:
    builder: LossBuilder
    tasks: frozenset[str]
    uses: frozenset[str]


_LOSSES: Registry[_Entry] = Registry("loss", key="loss.name")


def register_loss(
    name: str, tasks: tuple[str, ...], uses: tuple[str, ...] = ()
) -> Callable[[LossBuilder], LossBuilder]:
    """Register a loss builder ``fn(cfg: LossConfig, ctx: LossContext) -> Loss``.

    Args:
        name: the value of ``loss.name`` that selects it.
        tasks: the tasks it applies to.
        uses: the :class:`~visiontrain.config.LossConfig` options it honours; any other
            option that is set is refused by :func:`build_loss`.

    Raises:
        ValueError: ``name`` is already registered.

    """
    return _LOSSES.decorator(name, lambda fn: _Entry(fn, frozenset(tasks), frozenset(uses)))


def list_losses(task: str) -> list[str]:
    """Names of the losses that apply to ``task``, sorted."""
    return [n for n, e in _LOSSES.items() if task in e.tasks]


def build_loss(cfg: LossConfig, ctx: LossContext) -> Loss:
    """Build the loss named by ``loss.name`` (the task's default when unset) for ``ctx``.

    Raises:
        ConfigError: the name is unknown or not for this task, an option is set that the
            loss does not use, or a per-class list does not have one value per class.

    """
    name = cfg.name or DEFAULT_LOSS.get(ctx.task, "cross_entropy")
    names = list_losses(ctx.task)
    if name not in _LOSSES:
        # Suggest and list only this task's losses: a segmentation loss is no fix for a
        # misspelt classification one.
        raise _LOSSES.unknown(name, among=names, tail=f"For task {ctx.task}: {', '.join(names)}.")
    entry = _LOSSES.get(name)
    if ctx.task not in entry.tasks:
        raise ConfigError(
            f"loss `{name}` does not apply to task {ctx.task} (it is for "
            f"{', '.join(sorted(entry.tasks))}); set `loss.name` to one of {', '.join(names)}."
        )
    _refuse_class_options(cfg, name, entry.uses, ctx.task)
    if cfg.effective_beta is not None and cfg.class_weights != "effective":
        raise ConfigError(
            "`loss.effective_beta` only applies with loss.class_weights=effective; remove it "
            "or set `loss.class_weights=effective`."
        )
    # effective_beta belongs to class_weights: a loss that weighs classes honours it too.
    uses = set(entry.uses) | ({"effective_beta"} if "class_weights" in entry.uses else set())
    refuse_unused(cfg, "loss", uses, f"loss {name}")
    return entry.builder(cfg, ctx)


def _refuse_class_options(cfg: LossConfig, name: str, uses: frozenset[str], task: str) -> None:
    """Refuse class weights and label smoothing for a loss that would ignore them.

    ``refuse_unused`` only sees options whose default is None; these two default to
    ``"none"`` and ``0.0``, so they are checked here.
    """
    for key, is_set in (
        ("class_weights", cfg.class_weights != "none"),
        ("label_smoothing", cfg.label_smoothing > 0),
    ):
        if not is_set or key in uses:
            continue
        if task == "regression":
            raise ConfigError(
                f"`loss.{key}` applies to classes; task regression has none. Remove it."
            )
        users = [n for n in list_losses(task) if key in _LOSSES.get(n).uses]
        raise ConfigError(
            f"`loss.{key}` set, but loss {name} does not use it, so it would be ignored. "
            f"Remove the key, or set `loss.name` to one that uses it: {', '.join(users)}."
        )


# --------------------------------------------------------------------------- weights


def class_weights(
    spec: str | list[float], counts: torch.Tensor, beta: float = 0.999
) -> torch.Tensor | None:
    """Per-class loss weights from ``loss.class_weights``, normalised to mean 1.

    Args:
        spec: ``none``; ``balanced``: inverse frequency ``N / (C * n_c)``; ``effective``:
            the inverse effective number of samples of Cui et al. 2019,
            ``(1 - beta) / (1 - beta ** n_c)``; or an explicit list, used as given.
        counts: training samples per class. A class without samples is counted as one, so
            its weight is large but finite.
        beta: the ``effective`` hyper-parameter in (0, 1) (``loss.effective_beta``); near 1
            it approaches ``balanced``, at 0 every class weighs the same.

    Returns:
        float32 weights of shape (C,), or None for ``none``.

    Raises:
        ConfigError: an explicit list does not hold one weight per class.

    """
    n = len(counts)
    if isinstance(spec, str) and spec == "none":
        return None
    if not isinstance(spec, str):
        _check_length("class_weights", spec, n)
        return torch.tensor(spec, dtype=torch.float32)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    n_c = counts.double().clamp(min=1)
    if spec == "balanced":
        weights = n_c.sum() / (n * n_c)
    elif spec == "effective":
        weights = (1.0 - beta) / (1.0 - beta**n_c)
    else:
        tip = did_you_mean(spec, ["none", "balanced", "effective"])
        raise ConfigError(
            f"unknown `loss.class_weights={spec}`{tip} Use none, balanced, effective or a "
            "list with one weight per class."
        )
    return (weights / weights.mean()).float()


def _check_length(key: str, values: list[float], num_classes: int) -> None:
    if len(values) != num_classes:
        raise ConfigError(
            f"`loss.{key}` has {len(values)} values but the task has {num_classes} classes; "
            "give one value per class, in class order."
        )


def _resolve_class_weights(cfg: LossConfig, ctx: LossContext) -> torch.Tensor | None:
    if cfg.class_weights == "none":
        return None
    if isinstance(cfg.class_weights, list):
        _check_length("class_weights", cfg.class_weights, ctx.num_outputs)
        return torch.tensor(cfg.class_weights, dtype=torch.float32)
    counts = _need_counts(ctx, f"loss.class_weights={cfg.class_weights}")
    beta = 0.999 if cfg.effective_beta is None else cfg.effective_beta
    return class_weights(cfg.class_weights, counts, beta)


def _resolve_pos_weight(cfg: LossConfig, ctx: LossContext) -> torch.Tensor | None:
    """``pos_weight`` per class: balanced ``(N - n_c) / n_c``, one number, or a list."""
    spec = cfg.pos_weight
    if spec is None:
        return None
    if spec == "balanced":
        counts = _need_counts(ctx, "loss.pos_weight=balanced").double()
        # With one integer label per sample, N - n_c are the negatives of class c.
        total = counts.sum() if ctx.num_samples is None else float(ctx.num_samples)
        return ((total - counts) / counts.clamp(min=1)).float()
    if isinstance(spec, list):
        _check_length("pos_weight", spec, ctx.num_outputs)
        return torch.tensor(spec, dtype=torch.float32)
    return torch.full((ctx.num_outputs,), float(spec))


def _need_counts(ctx: LossContext, what: str) -> torch.Tensor:
    if ctx.class_counts is None:
        raise ConfigError(
            f"`{what}` needs the class counts of the training data, which task {ctx.task} "
            "does not provide; give an explicit list with one value per class instead."
        )
    if len(ctx.class_counts) != ctx.num_outputs:
        raise ValueError(
            f"{len(ctx.class_counts)} class counts for {ctx.num_outputs} outputs; "
            "LossContext.class_counts needs one count per class"
        )
    return ctx.class_counts


class _PerDevice:
    """A constant tensor copied once to each device it is used on, not once per step."""

    def __init__(self, value: torch.Tensor | None) -> None:
        self._value = value
        self._copies: dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor | None:
        if self._value is None:
            return None
        copy = self._copies.get(device)
        if copy is None:
            copy = self._copies[device] = self._value.to(device)
        return copy


def _as_list(value: torch.Tensor | None) -> list[float] | None:
    return None if value is None else [round(float(v), 6) for v in value.tolist()]


# ----------------------------------------------------------------- pure loss functions


def smooth_labels(target: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """One-hot rows with label smoothing: ``one_hot * (1 - eps) + eps / C``.

    Args:
        target: int64 class indices, shape (N,).
        num_classes: C.
        eps: the smoothing, in [0, 1).

    Returns:
        float32 soft labels of shape (N, C), each row summing to 1.

    """
    return _smooth_soft(F.one_hot(target, num_classes).float(), eps)


def _smooth_soft(soft: torch.Tensor, eps: float) -> torch.Tensor:
    """Label smoothing of a soft target whose classes lie along dim 1."""
    if eps == 0:
        return soft
    return soft * (1.0 - eps) + eps / soft.shape[1]


def soft_target_cross_entropy(
    logits: torch.Tensor, soft_target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross entropy against a distribution over classes (soft labels, mixup).

    ``loss_i = -sum_c w_c * q_ic * log p_ic``, averaged over samples (not over the weights,
    unlike torch's weighted mean for class-index targets): a class weight scales the part of
    each sample's target that lies on that class.

    Args:
        logits: shape (N, C, ...).
        soft_target: float, same shape, each row a distribution over dim 1.
        weight: optional per-class weights, shape (C,).

    Returns:
        float32 scalar.

    """
    log_p = F.log_softmax(logits.float(), dim=1)
    q = soft_target.float()
    if weight is not None:
        q = q * _per_class(weight, logits.ndim)
    return -(q * log_p).sum(dim=1).mean()


def _per_class(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape (C,) to broadcast along dim 1 of an ``ndim``-dimensional tensor."""
    return values.view(1, -1, *([1] * (ndim - 2)))


def _alpha_per_class(
    alpha: float | torch.Tensor, num_classes: int, like: torch.Tensor
) -> torch.Tensor:
    if isinstance(alpha, torch.Tensor):
        return alpha.to(device=like.device, dtype=torch.float32)
    # RetinaNet's foreground convention: class 0 is the background ("ok"), all others are
    # foreground and share the weight alpha.
    weights = torch.full((num_classes,), float(alpha), device=like.device)
    weights[0] = 1.0 - float(alpha)
    return weights


def softmax_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | torch.Tensor | None = None,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Multi-class focal loss ``-alpha_t * (1 - p_t) ** gamma * log p_t`` (Lin et al. 2017).

    Computed from ``log_softmax`` so that a confident wrong prediction does not overflow.
    With ``gamma=0`` and ``alpha=None`` it equals cross entropy.

    Args:
        logits: shape (N, C) or (N, C, H, W).
        target: int64 class indices, shape (N,) or (N, H, W).
        gamma: focusing parameter; larger puts less weight on easy samples.
        alpha: None: no class weighting. A float in [0, 1]: class 0 (background, "ok")
            weighs ``1 - alpha`` and every other class ``alpha``, RetinaNet's foreground
            convention. A tensor of shape (C,): one weight per class.
        ignore_index: target value excluded from loss and mean (segmentation's 255).

    Returns:
        float32 scalar: the mean over samples (non-ignored pixels).

    """
    logits = logits.float()
    valid = None
    if ignore_index is not None:
        valid = target != ignore_index
        target = target.masked_fill(~valid, 0)
    log_p_t = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    # -expm1(log p) is 1 - p without the cancellation of 1 - exp(log p) when p is near 1.
    focal = (-torch.expm1(log_p_t)).clamp(min=_TINY) ** gamma
    loss = -focal * log_p_t
    if alpha is not None:
        loss = loss * _alpha_per_class(alpha, logits.shape[1], logits)[target]
    if valid is None:
        return loss.mean()
    # A masked mean, not boolean indexing, so that no count is read back from the device.
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def soft_softmax_focal_loss(
    logits: torch.Tensor,
    soft_target: torch.Tensor,
    gamma: float = 2.0,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax focal loss against a distribution over classes (MixUp/CutMix targets).

    ``loss_i = -sum_c a_c * q_ic * (1 - p_ic) ** gamma * log p_ic``: with a one-hot ``q``
    it is :func:`softmax_focal_loss`, and it is linear in ``q``, so a blended target gives
    the blend of the two labels' losses.

    Args:
        logits: shape (N, C).
        soft_target: float (N, C), each row a distribution.
        gamma: focusing parameter.
        alpha: optional per-class weights (C,).

    Returns:
        float32 scalar, the mean over samples.
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    focal = (-torch.expm1(log_p)).clamp(min=_TINY) ** gamma
    q = soft_target.float()
    if alpha is not None:
        q = q * _per_class(alpha.to(q.device, torch.float32), q.ndim)
    return -(q * focal * log_p).sum(dim=1).mean()


def sigmoid_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary / multi-label focal loss on independent sigmoids, mean over all elements.

    Equal to ``torchvision.ops.sigmoid_focal_loss(..., reduction="mean")`` for a scalar
    alpha (``alpha=None`` here is torchvision's ``alpha=-1``), and extended to a per-class
    weight, which torchvision lacks.

    Args:
        logits: shape (N, C, ...).
        target: float in [0, 1], same shape.
        gamma: focusing parameter.
        alpha: None: no weighting. A float in [0, 1]: positives weigh ``alpha`` and
            negatives ``1 - alpha``. A tensor of shape (C,): column c (positives and
            negatives alike) weighs ``alpha[c]``, as BCE's ``weight``.

    Returns:
        float32 scalar.

    """
    if target.shape != logits.shape:
        raise ValueError(
            f"sigmoid focal loss needs a target shaped like the logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    logits, target = logits.float(), target.float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t).clamp(min=_TINY) ** gamma
    if isinstance(alpha, torch.Tensor):
        loss = loss * _per_class(alpha.to(loss.device, torch.float32), loss.ndim)
    elif alpha is not None:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return loss.mean()


def asymmetric_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
) -> torch.Tensor:
    """Asymmetric loss (ASL, Ridnik et al. 2021), mean over all (sample, class) pairs.

    With ``p = sigmoid(x)`` and the shifted probability ``p_m = max(p - clip, 0)``::

        L = -y (1 - p) ** gamma_pos log p  -  (1 - y) p_m ** gamma_neg log(1 - p_m)

    Negatives are focused harder than positives (``gamma_neg > gamma_pos``), and a negative
    whose probability is below ``clip`` costs nothing (the margin discards easy negatives
    and, the paper argues, mislabelled ones). At ``gamma_neg = gamma_pos = clip = 0`` it is
    binary cross entropy. The loss is linear in ``y``, so a MixUp/CutMix target gives the
    blend of the two label sets' losses. The reference code sums over the batch; the mean
    here matches ``bce_with_logits`` (with Adam-style optimizers the scale barely matters).

    Args:
        logits: shape (N, C).
        target: float in [0, 1], same shape.
        gamma_neg: focusing exponent of the negative term.
        gamma_pos: focusing exponent of the positive term.
        clip: probability margin ``m`` of the negatives, in [0, 1).

    Returns:
        float32 scalar.

    """
    if target.shape != logits.shape:
        raise ValueError(
            f"asymmetric loss needs a target shaped like the logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    logits, target = logits.float(), target.float()
    # p and 1 - p each from its own sigmoid, log p and log(1 - p) from logsigmoid: exact
    # where p saturates to 0 or 1 (1 - sigmoid(x) would cancel to 0).
    p, not_p = torch.sigmoid(logits), torch.sigmoid(-logits)
    log_p = F.logsigmoid(logits)
    if clip > 0:
        # 1 - p_m = min(1 - p + m, 1) >= m: its log is finite without a floor.
        p_m = (p - clip).clamp(min=0)
        log_not_p_m = torch.log((not_p + clip).clamp(max=1.0))
    else:
        p_m, log_not_p_m = p, F.logsigmoid(-logits)
    pos = log_p
    if gamma_pos > 0:
        pos = pos * not_p.clamp(min=_TINY) ** gamma_pos
    neg = log_not_p_m
    if gamma_neg > 0:
        neg = neg * p_m.clamp(min=_TINY) ** gamma_neg
    return -(target * pos + (1 - target) * neg).mean()


def _dice_terms(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class intersection, predicted sum and target sum over the batch."""
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"segmentation target must be (N, H, W) for logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    logits = logits.float()
    valid = (target != ignore_index).unsqueeze(1)
    if logits.shape[1] == 1:
        probs = torch.sigmoid(logits)
        truth = (target == 1).unsqueeze(1)
    else:
        probs = logits.softmax(dim=1)
        classes = torch.arange(logits.shape[1], device=logits.device)
        # A comparison rather than F.one_hot: no range check read back from the device,
        # and the ignore label simply matches no class.
        truth = target.unsqueeze(1) == _per_class(classes, logits.ndim)
    probs = probs * valid
    truth = (truth & valid).float()
    dims = [0, *range(2, logits.ndim)]
    return (probs * truth).sum(dims), probs.sum(dims), truth.sum(dims)


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Soft dice loss, ``1 - mean_c (2 I_c + smooth) / (P_c + T_c + smooth)``.

    Sums run over the whole batch, not per image, so that a class absent from one image
    does not dominate; ignored pixels count in neither the intersection nor the sums.

    Args:
        logits: (N, C, H, W). C > 1: softmax probabilities against the one-hot target.
            C == 1: the sigmoid of the single channel against a target in {0, 1}, and the
            dice of that one foreground class.
        target: int64 class indices, (N, H, W); ``ignore_index`` marks unlabelled pixels.
        ignore_index: the label of pixels to leave out.
        smooth: added to numerator and denominator; a class absent from both prediction
            and target scores dice 1 instead of 0/0.

    Returns:
        float32 scalar in [0, 1].

    """
    inter, sum_p, sum_t = _dice_terms(logits, target, ignore_index)
    return 1.0 - ((2 * inter + smooth) / (sum_p + sum_t + smooth)).mean()


def soft_jaccard_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Soft Jaccard (IoU) loss, ``1 - mean_c (I_c + smooth) / (U_c + smooth)``.

    ``U_c = P_c + T_c - I_c``; everything else as :func:`soft_dice_loss`.

    Args:
        logits: (N, C, H, W), as :func:`soft_dice_loss`.
        target: int64 class indices, (N, H, W).
        ignore_index: the label of pixels to leave out.
        smooth: added to numerator and denominator.

    Returns:
        float32 scalar in [0, 1].

    """
    inter, sum_p, sum_t = _dice_terms(logits, target, ignore_index)
    return 1.0 - ((inter + smooth) / (sum_p + sum_t - inter + smooth)).mean()


def msle_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared log error, ``mean((log1p(max(pred, 0)) - log1p(target)) ** 2)``.

    Works in the targets' own units, which must be >= 0 (the task checks them). A negative
    prediction is clamped to 0 and then gets no gradient from this loss.
    """
    return (torch.log1p(pred.float().clamp(min=0)) - torch.log1p(target.float())).pow(2).mean()


# -------------------------------------------------------------------- registered losses


def _ignore_for(ctx: LossContext) -> int:
    # 255 is only a "no label" marker for segmentation masks; a classification dataset may
    # legitimately have a class 255. -100 is torch's own default, which no class index hits.
    return IGNORE_INDEX if ctx.task == "segmentation" else -100


@register_loss(
    "cross_entropy",
    tasks=("classification", "segmentation"),
    uses=("label_smoothing", "class_weights"),
)
def _cross_entropy(cfg: LossConfig, ctx: LossContext) -> Loss:
    """Torch's cross entropy; a float target of the logits' shape is a soft label."""
    weights = _resolve_class_weights(cfg, ctx)
    on_device = _PerDevice(weights)
    eps = cfg.label_smoothing
    ignore = _ignore_for(ctx)

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = on_device.on(logits.device)
        if target.is_floating_point():
            return soft_target_cross_entropy(logits, _smooth_soft(target, eps), w)
        return F.cross_entropy(logits, target, weight=w, label_smoothing=eps, ignore_index=ignore)

    info = {"label_smoothing": eps, "class_weights": _as_list(weights)}
    return Loss("cross_entropy", "softmax", fn, info=info)


@register_loss(
    "bce_with_logits",
    tasks=("classification", "multilabel"),
    uses=("label_smoothing", "class_weights", "pos_weight"),
)
def _bce(cfg: LossConfig, ctx: LossContext) -> Loss:
    """One-vs-rest BCE on C logits; a class index target becomes a (smoothed) one-hot row."""
    weights = _resolve_class_weights(cfg, ctx)
    pos_weight = _resolve_pos_weight(cfg, ctx)
    w_dev, pos_dev = _PerDevice(weights), _PerDevice(pos_weight)
    eps = cfg.label_smoothing

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not target.is_floating_point():
            target = F.one_hot(target, logits.shape[1]).float()
        # Each column is its own two-class problem, so smoothing pulls towards 0.5.
        target = target * (1.0 - eps) + 0.5 * eps
        return F.binary_cross_entropy_with_logits(
            logits, target, weight=w_dev.on(logits.device), pos_weight=pos_dev.on(logits.device)
        )

    info = {
        "label_smoothing": eps,
        "class_weights": _as_list(weights),
        "pos_weight": _as_list(pos_weight),
    }
    return Loss("bce_with_logits", "sigmoid", fn, info=info)


@register_loss(
    "focal",
    tasks=("classification", "multilabel", "segmentation"),
    uses=("focal_gamma", "focal_alpha", "class_weights"),
)
def _focal(cfg: LossConfig, ctx: LossContext) -> Loss:
    """Softmax focal loss for class indices and for soft (mixed) class distributions."""
    gamma = 2.0 if cfg.focal_gamma is None else cfg.focal_gamma
    if cfg.focal_alpha is not None and cfg.class_weights != "none":
        raise ConfigError(
            "`loss.focal_alpha` and `loss.class_weights` both weigh the classes of the focal "
            "loss; set only one of them (class weights act as the per-class alpha when "
            "focal_alpha is unset)."
        )
    alpha: float | torch.Tensor | None
    if isinstance(cfg.focal_alpha, list):
        _check_length("focal_alpha", cfg.focal_alpha, ctx.num_outputs)
        alpha = torch.tensor(cfg.focal_alpha, dtype=torch.float32)
    elif cfg.focal_alpha is not None:
        alpha = float(cfg.focal_alpha)
    else:
        alpha = _resolve_class_weights(cfg, ctx)
    alpha_dev = _PerDevice(alpha if isinstance(alpha, torch.Tensor) else None)
    ignore = IGNORE_INDEX if ctx.task == "segmentation" else None
    # Independent labels score each class by its own sigmoid; one label per image by softmax.
    multilabel = ctx.task == "multilabel"

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        a = alpha_dev.on(logits.device) if isinstance(alpha, torch.Tensor) else alpha
        if target.is_floating_point() and multilabel:
            return sigmoid_focal_loss(logits, target, gamma, a)
        if target.is_floating_point():
            # A distribution over classes (MixUp/CutMix): the softmax focal loss, soft.
            if isinstance(a, float):
                a = _alpha_per_class(a, logits.shape[1], logits)
            return soft_softmax_focal_loss(logits, target, gamma, a)
        return softmax_focal_loss(logits, target, gamma, a, ignore_index=ignore)

    info = {
        "focal_gamma": gamma,
        "focal_alpha": _as_list(alpha) if isinstance(alpha, torch.Tensor) else alpha,
        "class_weights": _as_list(alpha) if cfg.class_weights != "none" else None,
    }
    return Loss("focal", "sigmoid" if multilabel else "softmax", fn, info=info)


@register_loss("asl", tasks=("multilabel",), uses=("asl_gamma_neg", "asl_gamma_pos", "asl_clip"))
def _asl(cfg: LossConfig, ctx: LossContext) -> Loss:
    """The asymmetric loss of Ridnik et al. 2021 for multi-label targets."""
    gamma_neg = 4.0 if cfg.asl_gamma_neg is None else cfg.asl_gamma_neg
    gamma_pos = 0.0 if cfg.asl_gamma_pos is None else cfg.asl_gamma_pos
    clip = 0.05 if cfg.asl_clip is None else cfg.asl_clip
    fn = partial(asymmetric_loss, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
    info = {"asl_gamma_neg": gamma_neg, "asl_gamma_pos": gamma_pos, "asl_clip": clip}
    return Loss("asl", "sigmoid", fn, info=info)


def _regression(name: str, fn: LossFn, raw_targets: bool = False, **info: Any) -> Loss:
    return Loss(name, "identity", fn, raw_targets=raw_targets, info=info)


@register_loss("mse", tasks=("regression",))
def _mse(cfg: LossConfig, ctx: LossContext) -> Loss:
    return _regression("mse", F.mse_loss)


@register_loss("mae", tasks=("regression",))
def _mae(cfg: LossConfig, ctx: LossContext) -> Loss:
    return _regression("mae", F.l1_loss)


@register_loss("smooth_l1", tasks=("regression",), uses=("beta",))
def _smooth_l1(cfg: LossConfig, ctx: LossContext) -> Loss:
    beta = 1.0 if cfg.beta is None else cfg.beta
    return _regression("smooth_l1", partial(F.smooth_l1_loss, beta=beta), beta=beta)


@register_loss("huber", tasks=("regression",), uses=("delta",))
def _huber(cfg: LossConfig, ctx: LossContext) -> Loss:
    delta = 1.0 if cfg.delta is None else cfg.delta
    return _regression("huber", partial(F.huber_loss, delta=delta), delta=delta)


@register_loss("msle", tasks=("regression",))
def _msle(cfg: LossConfig, ctx: LossContext) -> Loss:
    # A log error only means something in the targets' own units, not standardised ones.
    return _regression("msle", msle_loss, raw_targets=True)


def _seg_activation(ctx: LossContext) -> str:
    # A single-channel mask is scored by its sigmoid; a softmax over one channel is all ones.
    return "sigmoid" if ctx.num_outputs == 1 else "softmax"


@register_loss("dice", tasks=("segmentation",))
def _dice(cfg: LossConfig, ctx: LossContext) -> Loss:
    return Loss("dice", _seg_activation(ctx), soft_dice_loss, info={"ignore_index": IGNORE_INDEX})


@register_loss("jaccard", tasks=("segmentation",))
def _jaccard(cfg: LossConfig, ctx: LossContext) -> Loss:
    info = {"ignore_index": IGNORE_INDEX}
    return Loss("jaccard", _seg_activation(ctx), soft_jaccard_loss, info=info)


def _dice_ce_weights(cfg: LossConfig, name: str) -> tuple[float, float]:
    dice_w = 1.0 if cfg.dice_weight is None else cfg.dice_weight
    ce_w = 1.0 if cfg.ce_weight is None else cfg.ce_weight
    if dice_w == 0 and ce_w == 0:
        raise ConfigError(
            f"`loss.dice_weight` and `loss.ce_weight` are both 0, so loss {name} would be a "
            "constant; set at least one of them above 0."
        )
    return dice_w, ce_w


@register_loss(
    "dice_ce", tasks=("segmentation",), uses=("dice_weight", "ce_weight", "class_weights")
)
def _dice_ce(cfg: LossConfig, ctx: LossContext) -> Loss:
    """``dice_weight * dice + ce_weight * cross entropy``, the default for segmentation."""
    if ctx.num_outputs < 2:
        raise ConfigError(
            "loss dice_ce needs at least two classes (a softmax over one channel is "
            "constant); for a single-channel binary mask set `loss.name=dice_bce`."
        )
    dice_w, ce_w = _dice_ce_weights(cfg, "dice_ce")
    weights = _resolve_class_weights(cfg, ctx)
    on_device = _PerDevice(weights)

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(
            logits, target, weight=on_device.on(logits.device), ignore_index=IGNORE_INDEX
        )
        return dice_w * soft_dice_loss(logits, target) + ce_w * ce

    info = {
        "dice_weight": dice_w,
        "ce_weight": ce_w,
        "class_weights": _as_list(weights),
        "ignore_index": IGNORE_INDEX,
    }
    return Loss("dice_ce", "softmax", fn, info=info)


@register_loss("dice_bce", tasks=("segmentation",), uses=("dice_weight", "ce_weight", "pos_weight"))
def _dice_bce(cfg: LossConfig, ctx: LossContext) -> Loss:
    """Binary masks: ``dice_weight * dice + ce_weight * BCE`` on one foreground logit."""
    if ctx.num_outputs > 2:
        raise ConfigError(
            f"loss dice_bce is for binary masks (one foreground logit), but the task has "
            f"{ctx.num_outputs} classes; set `loss.name=dice_ce`."
        )
    if cfg.pos_weight is not None and not isinstance(cfg.pos_weight, float):
        raise ConfigError(
            f"`loss.pos_weight={cfg.pos_weight}` for loss dice_bce must be one number, the "
            "weight of foreground pixels against background ones (e.g. loss.pos_weight=3.0)."
        )
    dice_w, ce_w = _dice_ce_weights(cfg, "dice_bce")
    pos_weight = None if cfg.pos_weight is None else torch.tensor([cfg.pos_weight])
    on_device = _PerDevice(pos_weight)

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != 1:
            raise ValueError(f"dice_bce needs logits (N, 1, H, W), got {tuple(logits.shape)}")
        valid = target != IGNORE_INDEX
        bce = F.binary_cross_entropy_with_logits(
            logits[:, 0],
            (target == 1).float(),
            pos_weight=on_device.on(logits.device),
            reduction="none",
        )
        bce = (bce * valid).sum() / valid.sum().clamp(min=1)
        return dice_w * soft_dice_loss(logits, target) + ce_w * bce

    info = {
        "dice_weight": dice_w,
        "ce_weight": ce_w,
        "pos_weight": cfg.pos_weight,
        "ignore_index": IGNORE_INDEX,
    }
    return Loss("dice_bce", "sigmoid", fn, info=info)


# ------------------------------------------------------------------------- box losses

_BOX_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "giou": generalized_box_iou_loss,
    "diou": distance_box_iou_loss,
    "ciou": complete_box_iou_loss,
}


def box_loss(name: str) -> Callable[..., torch.Tensor]:
    """Torchvision's IoU-based box regression loss for ``giou``, ``diou`` or ``ciou``.

    The returned function takes (N, 4) ``xyxy`` boxes and a ``reduction`` keyword.

    Raises:
        ConfigError: ``name`` is none of them.

    """
    fn = _BOX_LOSSES.get(name)
    if fn is None:
        tip = did_you_mean(name, list(_BOX_LOSSES))
        raise ConfigError(f"unknown box loss `{name}`{tip} Choose one of {', '.join(_BOX_LOSSES)}.")
    return fn
