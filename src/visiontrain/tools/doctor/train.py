"""Checks that train a copy through the training step: overfit, gradients, LR."""

from __future__ import annotations

import dataclasses
import math

import torch

from visiontrain.data.loaders import AugmentedDataset, collate
from visiontrain.data.pipeline import build_loaders
from visiontrain.engine.optim import build_optimizer
from visiontrain.engine.parts import buildable_optim
from visiontrain.errors import DataError
from visiontrain.tools.doctor.base import (
    GRAD_EXPLODE,
    GRAD_STEPS,
    GRAD_VANISH,
    LR_END,
    LR_START,
    LR_STEPS,
    OVERFIT_LR,
    OVERFIT_SAMPLES,
    OVERFIT_STEPS,
    OVERFIT_TARGET,
    DoctorContext,
    Finding,
    _batches,
    _not_applicable,
    register_check,
)

# --------------------------------------------------------------------------------- train


@register_check("train.overfit_one_batch")
def check_overfit(ctx: DoctorContext) -> list[Finding]:
    """A copy of the model must drive the loss of one small batch close to zero."""
    name = "train.overfit_one_batch"
    if ctx.task == "detection":
        return _not_applicable(name, ctx.task, "a detector needs far more steps than a preflight")
    model = ctx.model_copy()
    model.train()
    frozen = sum(1 for p in model.parameters() if not p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return [
            Finding(
                name,
                "error",
                "every parameter has requires_grad=False: nothing can train.",
                {"frozen_tensors": frozen},
                "Unfreeze the parameters (check the model builder and any freezing code).",
            )
        ]
    # Adam at a fixed, moderate LR, independent of optim.*: this isolates "can the model
    # and loss learn these labels" from the LR question, which train.learning_rate asks.
    opt = torch.optim.Adam(params, lr=OVERFIT_LR)
    step = ctx.step(model, opt)
    dataset = _train_dataset(ctx)
    n = min(ctx.cfg.data.batch_size, OVERFIT_SAMPLES, len(dataset))
    indices = list(range(n))
    losses: list[float] = []
    for _ in range(OVERFIT_STEPS):
        # The same samples are loaded again every step (same augmentation seed): a label
        # that is not a function of its image (misaligned, reshuffled) cannot be learned.
        batch = collate([dataset[(0, i)] for i in indices])
        if batch["image"] is None:
            raise DataError("the samples of the overfit batch could not be read.")
        # The training step itself; batch 0 of epoch 0 each time, so device augmentation
        # draws the same crops too.
        loss = step.forward_backward(batch)["loss"]
        step.update()
        value = float(loss)
        losses.append(value)
        if not math.isfinite(value):
            break
        if value < OVERFIT_TARGET * losses[0] or value < 1e-3:
            break
    start, best, last = losses[0], min(losses), losses[-1]
    evidence = {
        "samples": n,
        "steps": len(losses),
        "lr": OVERFIT_LR,
        "optimizer": "adam",
        "loss_start": start,
        "loss_min": best,
        "loss_last": last,
        "loss_curve": [round(v, 5) for v in losses[:: max(1, len(losses) // 10)]],
        "frozen_tensors": frozen,
    }
    reached = math.isfinite(last) and (last < OVERFIT_TARGET * start or last < 1e-3)
    if reached:
        return [
            Finding(
                name,
                "ok",
                f"loss of {n} samples fell from {start:.4g} to {last:.4g} in {len(losses)} steps",
                evidence,
            )
        ]
    return [
        Finding(
            name,
            "error",
            f"could not overfit {n} samples: loss {start:.4g} → {last:.4g} (min {best:.4g}) in "
            f"{len(losses)} Adam steps at lr {OVERFIT_LR:g}; a model that cannot memorise one "
            f"batch will not learn the data set.",
            evidence,
            "Likely causes: labels misaligned with images (a shuffle applied to one but not the "
            f"other, or labels read per call); frozen parameters ({frozen} tensors with "
            "requires_grad=False); a loss that does not match the targets (loss.name, class "
            "indices vs one-hot); a model too small or wrongly wired (model.width/depth).",
        )
    ]


def _config_lr(ctx: DoctorContext) -> float | None:
    lr = ctx.cfg.optim.lr
    return None if lr == "find" else float(lr)


def _train_dataset(ctx: DoctorContext) -> AugmentedDataset:
    loader = build_loaders(ctx.cfg, ctx.parts.bundle, ctx.parts.device).train
    return loader.dataset


def _layer_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


@register_check("train.gradients")
def check_gradients(ctx: DoctorContext) -> list[Finding]:
    """Global and per-layer gradient norms over the first updates with the configured optimizer."""
    name = "train.gradients"
    model = ctx.model_copy()
    model.train()
    opt = build_optimizer(buildable_optim(ctx.cfg.optim), model)
    step = ctx.step(model, opt)
    scaler = step.precision.scaler
    accumulate = ctx.cfg.train.accumulate
    loader = build_loaders(ctx.cfg, ctx.parts.bundle, ctx.parts.device).train
    global_norms: list[float] = []
    per_layer: dict[str, float] = {}
    non_finite: set[str] = set()
    no_grad = 0
    batches = _batches(loader)
    try:
        for update in range(GRAD_STEPS):
            # The micro-batches of one training update, then its gradients before the step.
            for i in range(accumulate):
                step.forward_backward(
                    next(batches), 1.0 / accumulate, True, 0, update * accumulate + i
                )
            # fp16 gradients carry GradScaler's scale until the update unscales them.
            unscale = 1.0 / scaler.get_scale() if scaler.is_enabled() else 1.0
            sq: dict[str, float] = {}
            no_grad = 0
            for pname, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    no_grad += 1
                    continue
                norm = float(p.grad.detach().float().norm()) * unscale
                layer = _layer_of(pname)
                if not math.isfinite(norm):
                    non_finite.add(layer)
                sq[layer] = sq.get(layer, 0.0) + norm * norm
            for layer, s in sq.items():
                per_layer[layer] = max(per_layer.get(layer, 0.0), math.sqrt(s))
            global_norms.append(math.sqrt(sum(sq.values())))
            step.update()
    finally:
        batches.close()
    top = sorted(per_layer.items(), key=lambda kv: -kv[1] if math.isfinite(kv[1]) else -math.inf)
    finite = {k: v for k, v in per_layer.items() if math.isfinite(v)}
    vanishing = sorted(k for k, v in finite.items() if v < GRAD_VANISH)
    evidence = {
        "steps": len(global_norms),
        "global_norm": global_norms,
        "top_layers": [{"layer": k, "grad_norm": v} for k, v in top[:5]],
        "smallest_layers": [
            {"layer": k, "grad_norm": v}
            for k, v in sorted(finite.items(), key=lambda kv: kv[1])[:5]
        ],
        "params_without_grad": no_grad,
    }
    findings = []
    if non_finite or not all(math.isfinite(g) for g in global_norms):
        findings.append(
            Finding(
                name,
                "error",
                f"non-finite gradients in {len(non_finite)} layer(s) "
                f"({', '.join(sorted(non_finite)[:5])}) within {len(global_norms)} updates.",
                evidence,
                "Lower optim.lr, clip (train.grad_clip_norm=1.0), check the data for NaN/inf "
                "and the loss for log(0).",
            )
        )
    elif max(global_norms) > GRAD_EXPLODE:
        findings.append(
            Finding(
                name,
                "warning",
                f"exploding gradients: global norm up to {max(global_norms):.3g} "
                f"(> {GRAD_EXPLODE:g}); largest in {top[0][0]}.",
                evidence,
                "Clip gradients (train.grad_clip_norm=1.0), lower optim.lr, or add normalisation.",
            )
        )
    if vanishing:
        findings.append(
            Finding(
                name,
                "warning",
                f"vanishing gradients: {len(vanishing)} layer(s) below {GRAD_VANISH:g} "
                f"({', '.join(vanishing[:5])}); they barely train.",
                evidence,
                "Use model.init=kaiming for ReLU nets, add normalisation or residual "
                "connections, or check for saturated activations.",
            )
        )
    if not findings:
        findings.append(
            Finding(
                name,
                "ok",
                f"global grad norm {min(global_norms):.3g}..{max(global_norms):.3g} over "
                f"{len(global_norms)} updates",
                evidence,
            )
        )
    return findings


@register_check("train.learning_rate")
def check_learning_rate(ctx: DoctorContext) -> list[Finding]:
    """A short LR range test on a copy; the configured LR against divergence and suggestion."""
    from visiontrain.tools.lr_find import run_on_parts

    name = "train.learning_rate"
    model = ctx.model_copy()
    probe = build_optimizer(buildable_optim(ctx.cfg.optim), model)
    parts = dataclasses.replace(ctx.parts, model=model, optimizer=probe)
    result = run_on_parts(ctx.cfg, parts, probe, LR_START, LR_END, LR_STEPS)
    diverged = result.stopped_early
    lr = _config_lr(ctx)
    evidence = {
        "configured_lr": ctx.cfg.optim.lr,
        "suggestion": result.suggestion,
        "suggestion_rule": result.suggestion_rule,
        "min_loss_lr_div10": result.min_loss_lr_div10,
        "diverged_at_lr": result.last_lr if diverged else None,
        "ended": result.reason,
        "steps": len(result.lrs),
        "sweep": [LR_START, LR_END],
    }
    fix = (
        f"Set optim.lr near {max(result.suggestion, result.min_loss_lr_div10):.2g} (or "
        "optim.lr=find to measure it with a full-length test at train time)."
    )
    if lr is None:
        return [
            Finding(
                name,
                "ok",
                f"optim.lr=find; a short test suggests {result.suggestion:.2g}",
                evidence,
            )
        ]
    if diverged and lr >= result.last_lr:
        return [
            Finding(
                name,
                "error",
                f"optim.lr={lr:g} is at or above the LR where the loss diverged "
                f"({result.last_lr:.2g}, {result.reason}).",
                evidence,
                fix,
            )
        ]
    # A 40-step curve is short: its steepest descent can sit at the very start of the sweep
    # while the EMA settles. The larger of the two usual rules is the safer yardstick.
    reference = max(result.suggestion, result.min_loss_lr_div10)
    evidence["reference_lr"] = reference
    if lr > 10 * reference:
        return [
            Finding(
                name,
                "warning",
                f"optim.lr={lr:g} is more than 10x what the range test suggests "
                f"({reference:.2g}: the larger of steepest descent and min-loss/10).",
                evidence,
                fix,
            )
        ]
    return [
        Finding(
            name,
            "ok",
            f"optim.lr={lr:g}; the range test suggests {result.suggestion:.2g}",
            evidence,
        )
    ]
