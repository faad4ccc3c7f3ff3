"""DetectionMetrics against pycocotools run directly, and SegmentationMetrics by hand."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from visiontrain.errors import DataError
from visiontrain.tasks.metrics import DetectionMetrics, SegmentationMetrics

CPU = torch.device("cpu")
NAMES = ["cat", "dog", "bird"]


# --------------------------------------------------------------------------- detection


def _random_case(seed: int = 0, images: int = 8, classes: int = 3):
    """Jittered GT boxes with random scores, some misses, some false positives, some mislabels."""
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(images):
        m = int(torch.randint(1, 7, (1,), generator=g))
        # Sizes from 8 to 200 px so that small, medium and large boxes all occur.
        xy = torch.rand(m, 2, generator=g) * 300
        wh = 8 + torch.rand(m, 2, generator=g) * 192
        gt_boxes = torch.cat([xy, xy + wh], dim=1)
        gt_labels = torch.randint(0, classes, (m,), generator=g)
        keep = torch.rand(m, generator=g) > 0.25  # misses
        jitter = (torch.rand(m, 4, generator=g) - 0.5) * 0.3 * wh.repeat(1, 2)
        p_boxes = (gt_boxes + jitter)[keep]
        p_labels = gt_labels.clone()
        flip = torch.rand(m, generator=g) < 0.15  # mislabels
        p_labels[flip] = (p_labels[flip] + 1) % classes
        p_labels = p_labels[keep]
        f = int(torch.randint(0, 4, (1,), generator=g))  # false positives
        fxy = torch.rand(f, 2, generator=g) * 300
        fwh = 8 + torch.rand(f, 2, generator=g) * 100
        p_boxes = torch.cat([p_boxes, torch.cat([fxy, fxy + fwh], dim=1)])
        p_labels = torch.cat([p_labels, torch.randint(0, classes, (f,), generator=g)])
        p_scores = torch.rand(len(p_boxes), generator=g)
        preds.append({"boxes": p_boxes, "scores": p_scores, "labels": p_labels})
        targets.append({"boxes": gt_boxes, "labels": gt_labels})
    return preds, targets


def _reference_cocoeval(preds, targets, classes: int, cat_ids: list[int] | None = None):
    """COCOeval on a GT dict and results list built here, independently of the module."""
    images, anns, results = [], [], []
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        images.append({"id": i})
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": label + 1,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for box, score, label in zip(
            p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": i,
                    "category_id": label + 1,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": score,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": k + 1, "name": str(k)} for k in range(classes)],
        }
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _metrics(preds, targets, names=NAMES, batch: int = 3) -> dict:
    m = DetectionMetrics(names, CPU)
    for s in range(0, len(preds), batch):
        m.update(preds[s : s + batch], targets[s : s + batch])
    return m.compute()


def test_map_equals_pycocotools_on_random_case():
    preds, targets = _random_case()
    out = _metrics(preds, targets)
    stats = _reference_cocoeval(preds, targets, 3)
    assert out["images"] == 8
    keys = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]
    for key, index in zip(keys, range(6), strict=True):
        assert out[key] == pytest.approx(stats[index], abs=1e-6), key
    assert out["mar_100"] == pytest.approx(stats[8], abs=1e-6)
    # The case is not degenerate: a real mix of hits and errors.
    assert 0.2 < out["map_50"] < 0.95
    # Per class: COCOeval restricted to that one category is an independent route.
    for k, name in enumerate(NAMES):
        one = _reference_cocoeval(preds, targets, 3, cat_ids=[k + 1])
        assert out["per_class"][name]["ap"] == pytest.approx(one[0], abs=1e-6)
        assert out["per_class"][name]["ap_50"] == pytest.approx(one[1], abs=1e-6)
    values = [out[k] for k in keys] + [out["mar_100"]]
    assert all(type(v) is float for v in values)


def test_map_matches_torchmetrics_pycocotools_backend():
    from torchmetrics.detection import MeanAveragePrecision

    preds, targets = _random_case(seed=1, images=5)
    out = _metrics(preds, targets)
    tm = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", backend="pycocotools", class_metrics=True
    )
    tm.update(preds, targets)
    with contextlib.redirect_stdout(io.StringIO()):
        ref = tm.compute()
    assert out["map"] == pytest.approx(float(ref["map"]), abs=1e-6)
    assert out["map_50"] == pytest.approx(float(ref["map_50"]), abs=1e-6)
    per_class = dict(zip(ref["classes"].tolist(), ref["map_per_class"].tolist(), strict=True))
    for k, name in enumerate(NAMES):
        assert out["per_class"][name]["ap"] == pytest.approx(per_class[k], abs=1e-6)


def test_perfect_predictions_score_one():
    _, targets = _random_case(seed=2)
    preds = [
        {"boxes": t["boxes"].clone(), "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
        for t in targets
    ]
    out = _metrics(preds, targets)
    assert out["map"] == pytest.approx(1.0)
    assert out["map_50"] == pytest.approx(1.0)
    assert out["map_75"] == pytest.approx(1.0)
    assert out["mar_100"] == pytest.approx(1.0)
    for name in NAMES:
        assert out["per_class"][name] == pytest.approx({"ap": 1.0, "ap_50": 1.0})


def test_swapped_labels_score_zero_for_the_swapped_classes():
    boxes = torch.tensor([[0.0, 0, 50, 50], [60, 60, 120, 120], [130, 0, 200, 90]])
    labels = torch.tensor([0, 1, 2])
    targets = [{"boxes": boxes, "labels": labels}] * 2
    swapped = torch.tensor([1, 0, 2])
    preds = [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": swapped}] * 2
    out = _metrics(preds, targets)
    assert out["per_class"]["cat"] == {"ap": 0.0, "ap_50": 0.0}
    assert out["per_class"]["dog"] == {"ap": 0.0, "ap_50": 0.0}
    assert out["per_class"]["bird"] == pytest.approx({"ap": 1.0, "ap_50": 1.0})
    assert out["map"] == pytest.approx(1 / 3)


def test_half_recall_gives_coco_101_point_value():
    # One class, two GT boxes, one detected exactly. Precision is 1 up to recall 0.5, and
    # nothing reaches beyond. COCO averages interpolated precision at the 101 recall points
    # 0, 0.01, ..., 1: the 51 points <= 0.5 get 1, the 50 above get 0, so AP = 51/101
    # (0.50495...), not 0.5. The match is exact, so every IoU threshold gives the same.
    gt = torch.tensor([[0.0, 0, 40, 40], [100, 100, 160, 160]])
    targets = [{"boxes": gt, "labels": torch.tensor([0, 0])}]
    preds = [{"boxes": gt[:1], "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    out = _metrics(preds, targets, names=["thing"])
    assert out["per_class"]["thing"]["ap_50"] == pytest.approx(51 / 101, abs=1e-12)
    assert out["per_class"]["thing"]["ap"] == pytest.approx(51 / 101, abs=1e-12)
    assert out["map"] == pytest.approx(51 / 101, abs=1e-12)
    assert out["mar_100"] == pytest.approx(0.5)

    # A false positive scored above the hit: precision 0.5 at recall 0.5, and the
    # interpolated (max-to-the-right) precision at recall 0 is 0.5 too: AP = 51/101 * 0.5.
    fp = torch.tensor([[300.0, 300, 340, 340]])
    preds = [
        {
            "boxes": torch.cat([fp, gt[:1]]),
            "scores": torch.tensor([0.95, 0.9]),
            "labels": torch.tensor([0, 0]),
        }
    ]
    out = _metrics(preds, targets, names=["thing"])
    assert out["per_class"]["thing"]["ap_50"] == pytest.approx(51 / 202, abs=1e-12)
    assert out["per_class"]["thing"]["ap_50"] == pytest.approx(
        _reference_cocoeval(preds, targets, 1)[1], abs=1e-12
    )


def test_class_without_ground_truth_is_nan_and_left_out_of_map():
    preds, targets = _random_case(seed=3)
    # A fourth class that never occurs in the GT, though one image predicts it.
    preds[0] = {
        "boxes": torch.cat([preds[0]["boxes"], torch.tensor([[1.0, 1, 30, 30]])]),
        "scores": torch.cat([preds[0]["scores"], torch.tensor([0.99])]),
        "labels": torch.cat([preds[0]["labels"], torch.tensor([3])]),
    }
    out = _metrics(preds, targets, names=[*NAMES, "fish"])
    assert math.isnan(out["per_class"]["fish"]["ap"])
    assert math.isnan(out["per_class"]["fish"]["ap_50"])
    aps = [out["per_class"][n]["ap"] for n in NAMES]
    assert out["map"] == pytest.approx(sum(aps) / 3, abs=1e-12)


def test_no_predictions_and_nothing_seen():
    _, targets = _random_case(seed=4, images=3)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0).long()}
    out = _metrics([empty] * 3, targets)
    assert out["map"] == 0.0
    assert out["images"] == 3
    fresh = DetectionMetrics(NAMES, CPU).compute()
    assert fresh["images"] == 0
    assert math.isnan(fresh["map"])
    assert math.isnan(fresh["per_class"]["cat"]["ap"])


def test_reset_and_image_ids():
    preds, targets = _random_case(seed=5, images=4)
    m = DetectionMetrics(NAMES, CPU)
    m.update(preds, targets)
    m.reset()
    for i, t in enumerate(targets):
        t["image_id"] = torch.tensor(100 + i) if i % 2 else 100 + i
    m.update(preds, targets)
    assert {img["id"] for img in m.coco_ground_truth()["images"]} == {100, 101, 102, 103}
    assert m.compute()["images"] == 4
    with pytest.raises(ValueError, match="already seen"):
        m.update(preds[:1], targets[:1])
    with pytest.raises(ValueError, match="out of range"):
        bad = {"boxes": torch.zeros(1, 4), "labels": torch.tensor([3])}
        DetectionMetrics(NAMES, CPU).update([preds[0]], [bad])


def test_coco_results_round_trip_through_load_res():
    preds, targets = _random_case(seed=6, images=4)
    m = DetectionMetrics(NAMES, CPU)
    m.update(preds, targets)
    gt_dict = m.coco_ground_truth()
    results = m.coco_results()
    assert [c["id"] for c in gt_dict["categories"]] == [1, 2, 3]
    assert [c["name"] for c in gt_dict["categories"]] == NAMES
    ann = gt_dict["annotations"][0]
    assert ann["iscrowd"] == 0
    assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3])
    assert len(gt_dict["annotations"]) == sum(len(t["labels"]) for t in targets)
    assert len(results) == sum(len(p["labels"]) for p in preds)
    first = results[0]
    assert set(first) == {"image_id", "category_id", "bbox", "score"}
    x1, y1, x2, y2 = preds[0]["boxes"][0].tolist()
    assert first["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert first["category_id"] == int(preds[0]["labels"][0]) + 1
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        dt = gt.loadRes(results)
    assert len(dt.getAnnIds()) == len(results)
    assert sorted(dt.getCatIds()) == [1, 2, 3]


# ------------------------------------------------------------------------ segmentation

SEG_T = torch.tensor([[[0, 0, 1, 1], [2, 2, 1, 0]]])
SEG_P = torch.tensor([[[0, 1, 1, 1], [2, 0, 1, 0]]])
FOUR = ["a", "b", "c", "d"]


def _seg(preds, target, num_classes=4, names=FOUR, **kw) -> dict:
    m = SegmentationMetrics(num_classes, names, CPU, **kw)
    m.update(preds, target)
    return m.compute()


def test_segmentation_hand_computed():
    out = _seg(SEG_P, SEG_T)
    # Pairs (t, p): (0,0) (0,1) (1,1) (1,1) / (2,2) (2,0) (1,1) (0,0). Class 3 never occurs.
    assert out["confusion_matrix"] == [[2, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert out["pixels"] == 8
    assert out["pixel_accuracy"] == pytest.approx(6 / 8)
    pc = out["per_class"]
    # tp = [2, 3, 1], support (row sums) = [3, 3, 2], predicted (column sums) = [3, 4, 1]
    assert pc["a"] == pytest.approx(
        {"iou": 2 / 4, "dice": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "support": 3}
    )
    assert pc["b"] == pytest.approx(
        {"iou": 3 / 4, "dice": 6 / 7, "precision": 3 / 4, "recall": 1.0, "support": 3}
    )
    assert pc["c"] == pytest.approx(
        {"iou": 1 / 2, "dice": 2 / 3, "precision": 1.0, "recall": 1 / 2, "support": 2}
    )
    assert all(math.isnan(pc["d"][k]) for k in ("iou", "dice", "precision", "recall"))
    assert pc["d"]["support"] == 0
    assert type(pc["a"]["support"]) is int
    assert out["miou"] == pytest.approx((1 / 2 + 3 / 4 + 1 / 2) / 3)
    assert out["dice"] == pytest.approx((2 / 3 + 6 / 7 + 2 / 3) / 3)


def test_ignore_index_pixels_change_nothing():
    base = _seg(SEG_P, SEG_T)
    # Two more columns of ignored target pixels with arbitrary (even out-of-range) predictions.
    target = torch.cat([SEG_T, torch.full((1, 2, 2), 255)], dim=2)
    preds = torch.cat([SEG_P, torch.tensor([[[3, 0], [1, 9]]])], dim=2)
    out = _seg(preds, target)
    assert out["confusion_matrix"] == base["confusion_matrix"]
    assert out["pixels"] == 8
    assert out["miou"] == pytest.approx(base["miou"])
    other = _seg(SEG_P.masked_fill(SEG_T == 1, 2), SEG_T.masked_fill(SEG_T == 1, 7), ignore_index=7)
    assert other["per_class"]["b"]["support"] == 0


def test_segmentation_updates_accumulate():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (6, 5, 7), generator=g)
    target[torch.rand(6, 5, 7, generator=g) < 0.1] = 255
    logits = torch.randn(6, 4, 5, 7, generator=g)
    whole = _seg(logits, target)
    m = SegmentationMetrics(4, FOUR, CPU)
    for s in (slice(0, 1), slice(1, 4), slice(4, 6)):
        m.update(logits[s], target[s])
    split = m.compute()
    assert split["confusion_matrix"] == whole["confusion_matrix"]
    assert split["miou"] == whole["miou"]
    # Logits and their argmax are the same input.
    assert _seg(logits.argmax(1), target) == whole
    m.reset()
    assert m.compute()["pixels"] == 0
    assert math.isnan(m.compute()["miou"])


def test_binary_single_logit():
    m = SegmentationMetrics(1, ["background", "crack"], CPU)
    # sigmoid(0) = 0.5 >= 0.5 -> foreground.
    logits = torch.tensor([[[[-3.0, 0.0], [2.0, -0.1]]]])
    target = torch.tensor([[[0, 1], [0, 255]]])
    m.update(logits, target)
    out = m.compute()
    assert out["confusion_matrix"] == [[1, 1], [0, 1]]
    assert out["per_class"]["crack"]["iou"] == pytest.approx(1 / 2)
    assert out["per_class"]["background"]["iou"] == pytest.approx(1 / 2)
    assert out["pixel_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="class names"):
        SegmentationMetrics(1, ["crack"], CPU)


def test_segmentation_rejects_bad_input():
    with pytest.raises(DataError, match="target pixels"):
        _seg(SEG_P, SEG_T.masked_fill(SEG_T == 2, 4))
    m = SegmentationMetrics(4, FOUR, CPU)
    with pytest.raises(ValueError, match="channels"):
        m.update(torch.randn(1, 3, 2, 4), SEG_T)
    with pytest.raises(ValueError, match="shape"):
        m.update(SEG_P[:, :1], SEG_T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_segmentation_update_does_not_sync_on_cuda():
    dev = torch.device("cuda")
    m = SegmentationMetrics(4, FOUR, dev)
    logits = torch.randn(2, 4, 16, 16, device=dev)
    target = torch.randint(0, 4, (2, 16, 16), device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m.update(logits, target)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = _seg(logits.cpu(), target.cpu())
    assert m.compute()["confusion_matrix"] == cpu["confusion_matrix"]


def test_undefined_class_ap_is_nan_never_minus_one():
    # COCOeval marks "no ground truth" with -1 in its precision array; -1 never reaches output.
    out = _metrics(*_random_case(seed=7, images=2), names=[*NAMES, "x", "y"])
    assert all(np.isnan(v["ap"]) or 0.0 <= v["ap"] <= 1.0 for v in out["per_class"].values())
