"""Checks that an augmentation keeps the label: horizontal flips and mirror-symmetric classes.

A flip is a free extra sample only when a mirrored image still shows its class: a defect,
a cat, a texture, yes; a digit, a letter, a road sign with an arrow, no. The check trains a
copy of the model briefly on unflipped training images through the run's training step,
then compares its validation accuracy on the images as they are and mirrored. A model
that learnt the classes from unflipped images and loses much accuracy on their mirror
images is telling that the classes are not mirror-symmetric, and flipping in training
would teach it to confuse them.
"""

from __future__ import annotations

import math
import time

import torch

from visiontrain.config import Config
from visiontrain.data.pipeline import build_loaders
from visiontrain.data.transforms import augment_options, build_transform
from visiontrain.engine.optim import build_optimizer
from visiontrain.engine.parts import build_step, buildable_optim
from visiontrain.tools.doctor.base import (
    DoctorContext,
    Finding,
    _batches,
    _not_applicable,
    register_check,
)

FLIP_STEPS = 150
FLIP_BUDGET_S = 20.0
FLIP_VAL_IMAGES = 512
# Warn when mirrored images lose this much accuracy, and by more than 3 standard errors.
FLIP_DROP = 0.1
# ... and the model has learnt something: accuracy this far above chance on the originals.
FLIP_LEARNT = 0.15


def flips_images(ctx: DoctorContext) -> bool:
    """Whether the run's training augmentation mirrors images horizontally."""
    cfg = ctx.cfg.data
    if cfg.augment_on == "device":
        return cfg.augment in ("light", "standard")
    b = ctx.parts.bundle
    transform = build_transform(augment_options(cfg), b.image_size, b.in_channels, False, True)
    # The training transform is a v2.Compose: its repr lists every step by class name.
    return "RandomHorizontalFlip" in repr(transform)


@register_check("data.flip_symmetry")
def check_flip_symmetry(ctx: DoctorContext) -> list[Finding]:
    """Mirrored validation images must be classified as well as the originals when flipping."""
    name = "data.flip_symmetry"
    if ctx.task != "classification":
        return _not_applicable(name, ctx.task, "the check compares class accuracy")
    if not flips_images(ctx):
        return [Finding(name, "ok", "the augmentation does not flip images", {})]
    plain: Config = ctx.cfg.model_copy(deep=True)
    plain.data.augment, plain.data.augment_on = "none", "loader"
    plain.data.mixup = plain.data.cutmix = plain.data.random_erasing = 0.0
    plain.data.augment_magnitude = plain.data.augment_ops = plain.data.autoaugment_policy = None
    model = ctx.model_copy()
    model.train()
    opt = build_optimizer(buildable_optim(plain.optim), model)
    step = build_step(plain, ctx.parts, model, opt)
    loaders = build_loaders(plain, ctx.parts.bundle, ctx.parts.device)
    start, steps = time.perf_counter(), 0
    for steps, batch in enumerate(_batches(loaders.train), 1):
        step.forward_backward(batch)
        step.update()
        if steps >= FLIP_STEPS or time.perf_counter() - start > FLIP_BUDGET_S:
            break
    model.eval()
    prep = step.prep
    right = {"original": 0, "mirrored": 0}
    seen = 0
    with torch.inference_mode():
        for batch in loaders.val:
            if batch["image"] is None:
                continue
            x, y = prep(batch["image"]), prep.target(batch["target"])
            for kind, images in (("original", x), ("mirrored", x.flip(-1))):
                right[kind] += int((model(images).argmax(1) == y).sum())
            seen += len(y)
            if seen >= FLIP_VAL_IMAGES:
                break
    acc = {k: v / max(seen, 1) for k, v in right.items()}
    chance = 1.0 / ctx.parts.bundle.num_classes
    drop = acc["original"] - acc["mirrored"]
    # Paired on the same images; a binomial standard error of the gap is enough here.
    spread = max(acc["original"] * (1 - acc["original"]), 1e-6)
    se = math.sqrt(2 * spread / max(seen, 1))
    evidence = {
        "train_steps": steps,
        "val_images": seen,
        "accuracy_original": acc["original"],
        "accuracy_mirrored": acc["mirrored"],
        "chance": chance,
    }
    if acc["original"] < chance + FLIP_LEARNT:
        return [
            Finding(
                name,
                "ok",
                f"inconclusive: after {steps} updates without flips the model reached "
                f"{acc['original']:.3f} val accuracy (chance {chance:.3f}), too little to "
                "compare with mirrored images",
                evidence,
            )
        ]
    if drop > FLIP_DROP and drop > 3 * se:
        return [
            Finding(
                name,
                "warning",
                f"the classes look mirror-asymmetric: a model trained {steps} updates on "
                f"unflipped images scores {acc['original']:.3f} on {seen} val images and "
                f"{acc['mirrored']:.3f} on the same images mirrored, yet data.augment="
                f"{ctx.cfg.data.augment} flips training images horizontally",
                evidence,
                "Train without horizontal flips: data.augment=none (every other preset "
                "flips); flips teach the model that a class and its mirror image are the "
                "same (a 2 and a mirrored 2, a left and a right arrow).",
            )
        ]
    return [
        Finding(
            name,
            "ok",
            f"mirrored val images score {acc['mirrored']:.3f} against {acc['original']:.3f} "
            f"as they are ({seen} images, {steps} updates without flips): flips keep the class",
            evidence,
        )
    ]
