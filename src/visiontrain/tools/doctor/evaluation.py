"""Checks that look at the evaluation path: eval mode, determinism, buffers."""

from __future__ import annotations

from typing import Any

import torch

from visiontrain.engine.evaluate import infer_batches
from visiontrain.engine.precision import Precision
from visiontrain.tools.doctor.base import DoctorContext, Finding, register_check

# ---------------------------------------------------------------------------------- eval


def _same(a: Any, b: Any) -> bool:
    """Exactly equal outputs: tensors, or lists/dicts of them (a detector's output)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@register_check("eval.mode")
def check_eval_mode(ctx: DoctorContext) -> list[Finding]:
    """The evaluation path must be in eval mode, deterministic, and leave buffers alone."""
    name = "eval.mode"
    model = ctx.model_copy()
    batch = ctx.train_batch()
    before = {k: v.detach().clone() for k, v in model.named_buffers()}
    precision = Precision(ctx.cfg.train.precision, ctx.parts.device)
    model.eval()
    not_eval_after_eval = [n or "(model)" for n, m in model.named_modules() if m.training]
    outputs: list[Any] = []
    training_during: list[str] = []

    def record(_batch: dict[str, Any], out: Any) -> None:
        outputs.append(out)
        if not training_during:
            training_during.extend(n or "(model)" for n, m in model.named_modules() if m.training)

    # The evaluation loop itself (engine.evaluate), over the same batch twice.
    infer_batches(model, [batch, batch], ctx.parts.task, ctx.prep, precision, record)
    first, second = outputs
    changed = [
        k
        for k, v in model.named_buffers()
        if k in before and (v.shape != before[k].shape or not torch.equal(v, before[k]))
    ]
    same = _same(first, second)
    evidence = {
        "modules_in_train_mode_after_eval": not_eval_after_eval[:10],
        "modules_in_train_mode_after_forward": training_during[:10],
        "buffers_changed": changed[:10],
        "buffers_checked": len(before),
        "outputs_identical": same,
    }
    problems = []
    if not_eval_after_eval:
        problems.append(f"{len(not_eval_after_eval)} module(s) stay in train mode after eval()")
    if training_during:
        problems.append(
            f"the forward switches {len(training_during)} module(s) back to train mode "
            f"({', '.join(training_during[:3])})"
        )
    if changed:
        problems.append(f"evaluation changed {len(changed)} buffer(s) ({', '.join(changed[:3])})")
    if not same:
        problems.append("two evaluation forwards of the same batch differ")
    if problems:
        return [
            Finding(
                name,
                "error",
                "; ".join(problems) + ": validation scores are noisy and BatchNorm statistics "
                "drift with every evaluation.",
                evidence,
                "Do not call self.train() (or set .training) inside forward; keep dropout and "
                "BatchNorm behaviour tied to module.training; do not update buffers in eval.",
            )
        ]
    return [
        Finding(
            name,
            "ok",
            f"eval mode holds, outputs repeat exactly, {len(before)} buffers unchanged",
            evidence,
        )
    ]
