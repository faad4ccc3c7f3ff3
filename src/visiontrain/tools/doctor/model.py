"""Checks that look at the model: activation statistics through depth, BatchNorm."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from visiontrain.tools.doctor.base import (
    ACT_EXPLODE,
    ACT_VANISH,
    BN_MIN_BATCH,
    DoctorContext,
    Finding,
    register_check,
)

# --------------------------------------------------------------------------------- model


_ACT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@register_check("model.init")
def check_model_init(ctx: DoctorContext) -> list[Finding]:
    """Activation std through depth on a real batch, parameter count, BatchNorm batch size."""
    name = "model.init"
    model = ctx.model_copy()
    model.train()  # the statistics training starts from: BatchNorm on batch statistics
    stats: list[tuple[str, float, float]] = []

    def hook(label: str) -> Callable[..., None]:
        def record(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                o = out.detach().float()
                stats.append((label, float(o.mean()), float(o.std())))

        return record

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, _ACT_LAYERS)
    ]
    batch = ctx.train_batch()
    x, y = ctx.prep(batch["image"]), ctx.prep.target(batch["target"])
    try:
        with torch.no_grad():
            ctx.parts.task.forward(model, x, y)
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    evidence: dict[str, Any] = {
        "parameters": params,
        "trainable_parameters": trainable,
        "layers_measured": len(stats),
    }
    findings: list[Finding] = []
    if stats:
        first = stats[0][2]
        rel = [s / first if first > 0 else math.inf for _, _, s in stats]
        evidence["activation_std"] = {
            "first": first,
            "last": stats[-1][2],
            "min_relative": min(rel),
            "max_relative": max(rel),
        }
        evidence["layers"] = [
            {"layer": n, "mean": round(m, 6), "std": s}
            for n, m, s in stats[:: max(1, len(stats) // 20)]
        ]
        vanish = [stats[i][0] for i, r in enumerate(rel) if r < ACT_VANISH]
        explode = [stats[i][0] for i, r in enumerate(rel) if r > ACT_EXPLODE]
        if vanish:
            findings.append(
                Finding(
                    name,
                    "warning",
                    f"activations vanish through depth: std falls below {ACT_VANISH:g}x the "
                    f"first layer's in {len(vanish)} layer(s), first at {vanish[0]} "
                    f"(min {min(rel):.2e}x).",
                    evidence,
                    "Use an init matched to the activation (model.init=kaiming for ReLU), add "
                    "normalisation (model.norm=batch|group|layer) or residual connections.",
                )
            )
        if explode:
            findings.append(
                Finding(
                    name,
                    "warning",
                    f"activations explode through depth: std grows above {ACT_EXPLODE:g}x the "
                    f"first layer's in {len(explode)} layer(s), first at {explode[0]} "
                    f"(max {max(rel):.2e}x).",
                    evidence,
                    "Use a smaller-gain init (model.init=kaiming or lecun) or add "
                    "normalisation layers (model.norm=batch|group|layer).",
                )
            )
    has_bn = any(isinstance(m, _BATCH_NORMS) for m in model.modules())
    batch = ctx.cfg.data.batch_size
    if has_bn and batch < BN_MIN_BATCH:
        findings.append(
            Finding(
                name,
                "warning",
                f"BatchNorm with {batch} samples per device batch: its batch statistics are "
                "noisy and differ from the running statistics used at evaluation.",
                {**evidence, "batch_size": batch},
                f"Use model.norm=group or model.norm=layer, or data.batch_size>={BN_MIN_BATCH}.",
            )
        )
    if not findings:
        findings.append(
            Finding(
                name,
                "ok",
                f"{params:,} parameters; activation std stays within "
                f"[{ACT_VANISH:g}, {ACT_EXPLODE:g}]x of the first layer's",
                evidence,
            )
        )
    return findings
