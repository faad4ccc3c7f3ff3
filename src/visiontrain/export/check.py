"""The fresh-process check of an exported model: ``python -m visiontrain.export.check``.

``visiontrain export`` runs this module in a new Python process, so that the artifact is
proven to load from its file alone, through the same loader ``predict`` uses (nothing
from the exporting process, such as the traced module or a warm cache, can stand in for
it). The parent passes the validation images (uint8 NCHW) and the eager model's outputs
on them; this process runs the artifact, compares, times it, and writes a result JSON.
For detection (``--detection``) it also runs the Python post-processing with the anchors
file beside the artifact, as ``predict`` does, and compares the detections.

Exit codes: 0 the outputs agree within the tolerance, 1 they do not, 2 the artifact or
the inputs cannot be read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from visiontrain.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, UserError


def run_artifact(run: Callable[[torch.Tensor], Any], images: torch.Tensor, fixed: bool) -> Any:
    """Outputs for every image: one call per image for a fixed-batch artifact.

    Returns:
        A tensor with one row per image, or for detection a tuple of them (head outputs).
    """
    if not fixed:
        return run(images)
    outs = [run(images[i : i + 1]) for i in range(len(images))]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
    return torch.cat(outs)


def _failed(reason: str) -> dict[str, Any]:
    return {"passed": False, "max_abs_diff": float("inf"), "scale": 1.0, "reason": reason}


def compare(got: Any, expected: Any, tolerance: float) -> dict[str, Any]:
    """Largest absolute difference against the eager outputs, and whether it is tolerated.

    The tolerance is relative to the outputs' magnitude: ``max|diff| <= tolerance *
    max(1, max|eager|)``, so logits of 30 and probabilities of 0.3 are held to the same
    number of significant digits. Several outputs (a detector's head) are each compared.
    """
    gots = got if isinstance(got, tuple) else (got,)
    wants = expected if isinstance(expected, tuple) else (expected,)
    if len(gots) != len(wants):
        return _failed(f"{len(gots)} outputs vs eager {len(wants)}")
    diff, scale = 0.0, 1.0
    for a, b in zip(gots, wants, strict=True):
        if a.shape != b.shape:
            return _failed(f"output shape {tuple(a.shape)} vs eager {tuple(b.shape)}")
        if b.numel():
            diff = max(diff, float((a.double() - b.double()).abs().max()))
            scale = max(scale, float(b.double().abs().max()))
    passed = diff <= tolerance * scale
    return {"passed": passed, "max_abs_diff": diff, "scale": scale, "reason": None}


def _match(
    got: dict[str, torch.Tensor], boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Box and score differences, pairing each eager detection with one of ``got``'s.

    Detections come sorted by score, so two whose scores differ by float noise can swap
    places between the eager model and the artifact; pair them by label and the nearest
    box instead of by position. None when the labels cannot be paired one to one.
    """
    if len(got["labels"]) != len(labels):
        return None
    if torch.equal(got["labels"], labels):
        return (got["boxes"] - boxes).abs(), (got["scores"] - scores).abs()
    # L-infinity distance of every pair of boxes; another label is never a match.
    dist = (got["boxes"][:, None] - boxes[None]).abs().amax(-1)
    dist[got["labels"][:, None] != labels[None]] = float("inf")
    box_diff, score_diff = torch.zeros(len(labels)), torch.zeros(len(labels))
    for j in range(len(labels)):
        i = int(dist[:, j].argmin())
        if not torch.isfinite(dist[i, j]):
            return None
        box_diff[j], score_diff[j] = dist[i, j], (got["scores"][i] - scores[j]).abs()
        dist[i] = float("inf")  # each artifact detection pairs once
    return box_diff, score_diff


def compare_detections(
    got: list[dict[str, torch.Tensor]],
    expected: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    tolerance: float,
) -> dict[str, Any]:
    """The post-processed detections against the eager detector's, image by image.

    The same number of boxes with the same labels (paired by label and nearest box when
    near-equal scores swapped their order); boxes within ``tolerance * max(1, max|box|)``
    (pixels: the working size sets the scale), scores within ``tolerance``.
    """
    box_diff, score_diff, count, scale = 0.0, 0.0, 0, 1.0
    for i, (det, (boxes, scores, labels)) in enumerate(zip(got, expected, strict=True)):
        diffs = _match(det, boxes, scores, labels)
        if diffs is None:
            return {
                "passed": False,
                "reason": f"image {i}: {len(det['labels'])} detections with labels "
                f"{det['labels'].tolist()[:10]} vs eager {len(labels)} with "
                f"{labels.tolist()[:10]}",
            }
        count += len(labels)
        if len(labels):
            box_diff = max(box_diff, float(diffs[0].max()))
            score_diff = max(score_diff, float(diffs[1].max()))
            scale = max(scale, float(boxes.abs().max()))
    passed = box_diff <= tolerance * scale and score_diff <= tolerance
    reason = (
        None
        if passed
        else f"detections: box diff {box_diff:.3g} (allowed {tolerance * scale:.3g}), "
        f"score diff {score_diff:.3g} (allowed {tolerance:g})"
    )
    return {
        "passed": passed,
        "boxes": count,
        "box_diff": box_diff,
        "score_diff": score_diff,
        "reason": reason,
    }


def median_ms(fn: Callable[[], Any], runs: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def latency(
    run: Callable[[torch.Tensor], Any],
    images: torch.Tensor,
    fixed: bool,
    batch_sizes: Sequence[int],
    runs: int,
) -> dict[str, float]:
    """Median ms per batch; a fixed-batch artifact does a batch of n as n single calls."""
    out: dict[str, float] = {}
    for bs in batch_sizes:
        reps = -(-bs // len(images))
        x = images.repeat(reps, 1, 1, 1)[:bs].contiguous()
        out[str(bs)] = median_ms(lambda x=x: run_artifact(run, x, fixed), runs)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Check an artifact against the eager outputs; see the module docstring."""
    from visiontrain.export.artifact import load_runner

    p = argparse.ArgumentParser(prog="python -m visiontrain.export.check")
    p.add_argument("artifact")
    p.add_argument("--inputs", required=True, help="torch file: uint8 NCHW images")
    p.add_argument("--expected", required=True, help="torch file: the eager outputs")
    p.add_argument("--result", required=True, help="JSON file to write the result to")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--fixed-batch", action="store_true", help="the artifact takes batch 1")
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument(
        "--detection",
        help="JSON file: the detection entry of model.json (post-process and compare)",
    )
    args = p.parse_args(argv)
    try:
        run = load_runner(args.artifact)
        images = torch.load(args.inputs, weights_only=True)
        expected = torch.load(args.expected, weights_only=True)
        post = None
        if args.detection:
            from visiontrain.export.artifact import DetectionPost

            spec = json.loads(Path(args.detection).read_text())
            post = DetectionPost.from_folder(spec, Path(args.artifact).parent)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    torch.set_grad_enabled(False)
    try:
        got = run_artifact(run, images, args.fixed_batch)
    except Exception as exc:  # a corrupt graph fails at run time: not a tolerance question
        print(f"error: {args.artifact} failed to run: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    result: dict[str, Any] = {"images": len(images), "tolerance": args.tolerance}
    if post is None:
        result.update(compare(got, expected, args.tolerance))
    else:
        result.update(compare(got, expected["raw"], args.tolerance))
        if result["passed"]:
            dets = compare_detections(post(got), expected["detections"], args.tolerance)
            result.update({**dets, "passed": dets["passed"]})
    if result["passed"] and args.latency_runs > 0:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        result["latency_ms"] = latency(run, images, args.fixed_batch, sizes, args.latency_runs)
    Path(args.result).write_text(json.dumps(result))
    return EXIT_OK if result["passed"] else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
