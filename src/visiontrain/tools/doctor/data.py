"""Checks that look at the data: class balance, duplicates, readability, image sizes."""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

from visiontrain.tools.doctor.base import (
    IMBALANCE_WARN,
    SCAN_CAP,
    DoctorContext,
    Finding,
    _is_file_based,
    _not_applicable,
    register_check,
)

# ---------------------------------------------------------------------------------- data


@register_check("data.class_balance")
def check_class_balance(ctx: DoctorContext) -> list[Finding]:
    """Class counts per split and the max/min imbalance ratio on train."""
    name = "data.class_balance"
    if ctx.task != "classification":
        return _not_applicable(name, ctx.task, "no per-image class labels")
    classes = ctx.parts.bundle.class_names
    counts: dict[str, dict[str, int]] = {}
    for split_name, split in ctx.splits().items():
        labels = split.labels
        if labels is None or labels.ndim != 1:
            continue
        valid = labels[(labels >= 0) & (labels < len(classes))]
        bins = np.bincount(valid, minlength=len(classes))
        counts[split_name] = {c: int(k) for c, k in zip(classes, bins, strict=True)}
    train = counts.get("train", {})
    lo, hi = min(train.values(), default=0), max(train.values(), default=0)
    ratio = hi / lo if lo else math.inf
    evidence = {"counts": counts, "train_imbalance_ratio": ratio}
    fix = (
        "Weight the loss (loss.class_weights=effective), use loss.name=focal, or draw classes "
        "evenly (data.sampler=weighted); judge the run by macro_f1 and per-class recall."
    )
    if lo == 0:
        empty = [c for c, k in train.items() if k == 0]
        return [
            Finding(
                name,
                "error",
                f"class(es) {', '.join(empty)} have no training samples; the model can never "
                "learn to predict them.",
                evidence,
                "Add training images of those classes or remove the classes from the data.",
            )
        ]
    if ratio > IMBALANCE_WARN:
        return [
            Finding(
                name,
                "warning",
                f"training classes are imbalanced {ratio:.1f}:1 (largest/smallest); a plain "
                "loss learns to predict the majority class.",
                evidence,
                fix,
            )
        ]
    return [Finding(name, "ok", f"train imbalance ratio {ratio:.1f}:1", evidence)]


@register_check("data.duplicates")
def check_duplicates(ctx: DoctorContext) -> list[Finding]:
    """Identical decoded images across splits (leakage) and within train."""
    name = "data.duplicates"
    scans = ctx.scan()
    splits = ctx.splits()
    capped = {s: sc.scanned for s, sc in scans.items() if sc.scanned < sc.total}
    owner: dict[str, list[tuple[str, int]]] = {}
    for split_name, sc in scans.items():
        for digest, idx in sc.hashes.items():
            owner.setdefault(digest, []).extend((split_name, i) for i in idx)
    cross_pairs: dict[str, int] = {}
    examples: list[str] = []
    for entries in owner.values():
        names = sorted({s for s, _ in entries})
        if len(names) < 2:
            continue
        key = "/".join(names)
        cross_pairs[key] = cross_pairs.get(key, 0) + 1
        if len(examples) < 5:
            examples.append(" = ".join(splits[s].describe(i) for s, i in entries[:3]))
    train_dups = sum(len(idx) - 1 for idx in scans["train"].hashes.values() if len(idx) > 1)
    evidence: dict[str, Any] = {
        "scanned": {s: sc.scanned for s, sc in scans.items()},
        "cross_split_duplicate_images": cross_pairs,
        "train_internal_duplicates": train_dups,
        "examples": examples,
    }
    note = f" (hashed only the first {SCAN_CAP} images of {', '.join(capped)})" if capped else ""
    findings = []
    if cross_pairs:
        total = sum(cross_pairs.values())
        findings.append(
            Finding(
                name,
                "error",
                f"{total} image(s) appear in more than one split ({cross_pairs}): the "
                f"evaluation scores them after training on them (leakage){note}.",
                evidence,
                "Remove each duplicate from all but one split (see the examples), or "
                "de-duplicate the folder before splitting.",
            )
        )
    if train_dups:
        train_examples = [
            " = ".join(splits["train"].describe(i) for i in idx[:3])
            for idx in scans["train"].hashes.values()
            if len(idx) > 1
        ][:5]
        findings.append(
            Finding(
                name,
                "warning",
                f"{train_dups} duplicate image(s) within train: they weigh more in the loss{note}.",
                {**evidence, "train_examples": train_examples},
                "Remove the extra copies unless the over-weighting is intended.",
            )
        )
    if not findings:
        findings.append(Finding(name, "ok", f"no duplicate images{note}", evidence))
    return findings


@register_check("data.readable")
def check_readable(ctx: DoctorContext) -> list[Finding]:
    """Unreadable files per split, and class labels inside ``[0, num_classes)``."""
    name = "data.readable"
    scans = ctx.scan()
    splits = ctx.splits()
    unreadable = {s: len(sc.unreadable) for s, sc in scans.items()}
    examples = [
        f"{splits[s].describe(i)}: {msg}" for s, sc in scans.items() for i, msg in sc.unreadable
    ][:5]
    findings = []
    if any(unreadable.values()):
        on_error = ctx.cfg.data.on_error
        findings.append(
            Finding(
                name,
                "error" if on_error == "raise" else "warning",
                f"{sum(unreadable.values())} file(s) cannot be decoded "
                f"(data.on_error={on_error}: "
                f"{'training stops at the first' if on_error == 'raise' else 'they are skipped'}).",
                {"unreadable": unreadable, "examples": examples},
                "Delete or re-encode the files listed, or set data.on_error=skip to train "
                "without them.",
            )
        )
    if ctx.task == "classification":
        classes = ctx.parts.bundle.num_classes
        bad: dict[str, int] = {}
        for s, split in splits.items():
            labels = split.labels
            n_bad = 0 if labels is None else int(((labels < 0) | (labels >= classes)).sum())
            n_bad = max(n_bad, len(scans[s].bad_labels))
            if n_bad:
                bad[s] = n_bad
        if bad:
            findings.append(
                Finding(
                    name,
                    "error",
                    f"labels outside [0, {classes}) in {bad}: cross-entropy fails or trains "
                    "on the wrong class.",
                    {"out_of_range": bad, "num_classes": classes},
                    "Fix the label files/folder names so that every label is one of the "
                    f"{classes} classes.",
                )
            )
    if not findings:
        findings.append(
            Finding(
                name,
                "ok",
                "every scanned sample decodes"
                + (" and every label is a valid class" if ctx.task == "classification" else ""),
                {"scanned": {s: sc.scanned for s, sc in scans.items()}},
            )
        )
    return findings


@register_check("data.image_sizes")
def check_image_sizes(ctx: DoctorContext) -> list[Finding]:
    """Decoded sizes (min/median/max) of file-based splits against ``data.image_size``."""
    name = "data.image_sizes"
    if not _is_file_based(ctx.parts.bundle.train):
        return [
            Finding(
                name,
                "ok",
                "not applicable: the images are generated or held as one array (one size)",
                {"image_size": ctx.parts.bundle.image_size},
            )
        ]
    working = ctx.parts.bundle.image_size
    sizes = [min(h, w) for sc in ctx.scan().values() for h, w in sc.sizes]
    if not sizes:
        return [Finding(name, "ok", "no decodable images to measure", {})]
    smaller = sum(s < working for s in sizes) / len(sizes)
    evidence = {
        "shorter_side_min": min(sizes),
        "shorter_side_median": statistics.median(sizes),
        "shorter_side_max": max(sizes),
        "image_size": working,
        "share_smaller_than_image_size": round(smaller, 3),
        "measured": len(sizes),
    }
    if smaller > 0.5:
        return [
            Finding(
                name,
                "warning",
                f"{smaller:.0%} of the images are smaller than data.image_size={working}: "
                "they are upsampled, which costs compute and adds no detail.",
                evidence,
                f"Set data.image_size near the median shorter side ({statistics.median(sizes):g}).",
            )
        ]
    return [Finding(name, "ok", f"median shorter side {statistics.median(sizes):g}", evidence)]
