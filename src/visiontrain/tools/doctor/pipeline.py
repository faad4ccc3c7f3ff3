"""Checks that time the pipeline and the precision: loader waits, bf16/fp16 steps."""

from __future__ import annotations

import math
import time

import torch

from visiontrain.data.pipeline import build_loaders
from visiontrain.engine.optim import build_optimizer
from visiontrain.engine.parts import buildable_optim
from visiontrain.engine.precision import Precision
from visiontrain.tools.doctor.base import (
    LOADER_BUDGET_S,
    LOADER_STEPS,
    LOADER_WAIT_SHARE,
    DoctorContext,
    Finding,
    _batches,
    register_check,
)

# ----------------------------------------------------------------------------- pipeline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@register_check("data.loader_speed")
def check_loader_speed(ctx: DoctorContext) -> list[Finding]:
    """Time spent waiting for batches vs computing training steps (a short run on a copy)."""
    name = "data.loader_speed"
    device = ctx.parts.device
    model = ctx.model_copy()
    model.train()
    opt = build_optimizer(buildable_optim(ctx.cfg.optim), model)
    step = ctx.step(model, opt)
    accumulate = ctx.cfg.train.accumulate
    loader = build_loaders(ctx.cfg, ctx.parts.bundle, device).train
    waits: list[float] = []
    computes: list[float] = []
    batches = _batches(loader)
    started = time.perf_counter()
    try:
        # The first batch pays for worker start-up and lazy init: measured but not counted.
        for i in range(LOADER_STEPS + 1):
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            # Training's own micro-batch and, every train.accumulate batches, its update.
            last = (i + 1) % accumulate == 0
            step.forward_backward(batch, 1.0 / accumulate, last, 0, i)
            if last:
                step.update()
            _sync(device)  # without it CUDA time would hide in the next wait
            t2 = time.perf_counter()
            if i:
                waits.append(t1 - t0)
                computes.append(t2 - t1)
            if i >= 3 and time.perf_counter() - started > LOADER_BUDGET_S:
                break
    finally:
        batches.close()
    wait, compute = sum(waits), sum(computes)
    share = wait / (wait + compute) if wait + compute > 0 else 0.0
    evidence = {
        "batches_timed": len(waits),
        "wait_ms_per_batch": round(1000 * wait / max(1, len(waits)), 3),
        "compute_ms_per_batch": round(1000 * compute / max(1, len(computes)), 3),
        "wait_share": round(share, 3),
        "num_workers": ctx.cfg.data.num_workers,
        "pin_memory": loader.pin_memory,
    }
    if share > LOADER_WAIT_SHARE:
        return [
            Finding(
                name,
                "warning",
                f"the step waits for data {share:.0%} of the time "
                f"({evidence['wait_ms_per_batch']} ms/batch waiting vs "
                f"{evidence['compute_ms_per_batch']} ms/batch computing).",
                evidence,
                "Raise data.num_workers (now "
                f"{ctx.cfg.data.num_workers}), keep data.pin_memory=true on GPU, use lighter "
                "augmentation (data.augment) or pre-resize/cache the images.",
            )
        ]
    return [
        Finding(
            name,
            "ok",
            f"waiting for data {share:.0%} of the step time",
            evidence,
        )
    ]


@register_check("precision")
def check_precision(ctx: DoctorContext) -> list[Finding]:
    """One step under bf16 autocast (CPU, CUDA) and fp16 + GradScaler (CUDA): all finite."""
    name = "precision"
    device = ctx.parts.device
    batch = ctx.train_batch()
    findings = []
    modes: list[tuple[str, torch.dtype]] = [("bf16", torch.bfloat16)]
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            modes = []
            findings.append(Finding(f"{name}.bf16", "ok", "not applicable: no bf16 on this GPU"))
        modes.append(("fp16", torch.float16))
    else:
        findings.append(
            Finding(
                f"{name}.fp16",
                "ok",
                "not applicable on CPU (fp16 with GradScaler is a CUDA mode)",
                {"device": str(device)},
            )
        )
    for mode, _dtype in modes:
        model = ctx.model_copy()
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        step = ctx.step(model, opt, Precision(mode, device))
        loss_value, grads_finite, tries = math.nan, False, 0
        # fp16's first scale (65536) may overflow; the scaler then halves it and skips the
        # step, which is normal. Only gradients that stay non-finite are a fault.
        while tries < 5:
            tries += 1
            loss_value = float(step.forward_backward(batch)["loss"].float())
            if not math.isfinite(loss_value):
                opt.zero_grad(set_to_none=True)
                break
            result = step.update(want_norm=True)
            grads_finite = result.grad_norm is None or bool(torch.isfinite(result.grad_norm))
            if grads_finite or mode != "fp16":
                break
        evidence = {
            "device": str(device),
            "loss": loss_value,
            "grads_finite": grads_finite,
            "tries": tries,
        }
        if math.isfinite(loss_value) and grads_finite:
            findings.append(
                Finding(f"{name}.{mode}", "ok", f"{mode} step: loss {loss_value:.4g}", evidence)
            )
        else:
            what = "loss" if not math.isfinite(loss_value) else "gradients"
            findings.append(
                Finding(
                    f"{name}.{mode}",
                    "error",
                    f"one {mode} step gives non-finite {what} on {device.type}.",
                    evidence,
                    "Train with train.precision=32 (or bf16 instead of fp16); look for ops that "
                    "overflow in half precision (exp, large sums) and keep them in float32.",
                )
            )
    return findings
