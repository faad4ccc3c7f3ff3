"""Evaluation metrics for object detection (COCO mAP) and semantic segmentation (IoU, Dice).

Both classes follow the torchmetrics pattern: ``reset``, ``update`` per batch, ``compute``
once per evaluation. The module is standalone (torch, numpy, pycocotools only) so that it
can be tested and reused without the rest of the package.

Detection keeps the raw predictions and targets on the host and scores them with
pycocotools' ``COCOeval`` directly. That is the reference implementation that torchmetrics'
``MeanAveragePrecision(backend="pycocotools")`` wraps too, and reading its ``precision``
array gives per-class AP@.5 exactly, which torchmetrics does not report; one evaluation
thus gives every number, and ``coco_results`` / ``coco_ground_truth`` come for free.

Segmentation accumulates a confusion matrix on the device (a bincount of ``C * target + pred``
done with ``index_add_``) so that ``update`` never synchronises with the host; only
``compute`` reads it back.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from visiontrain.errors import DataError

# Indices into COCOeval.stats (see COCOeval.summarize): the standard 12-number summary.
_STATS_INDEX = {
    "map": 0,
    "map_50": 1,
    "map_75": 2,
    "map_small": 3,
    "map_medium": 4,
    "map_large": 5,
    "mar_100": 8,
}


def _quiet_coco(dataset: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` built from an in-memory dict, without its progress prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _mean_valid(values: np.ndarray) -> float:
    """Mean of the entries COCOeval filled in (it marks "no ground truth" with -1), else NaN."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else math.nan


class DetectionMetrics:
    """COCO box mAP over a whole evaluation, overall and per class.

    Predictions and targets are copied to the host (detached) at ``update`` and scored at
    ``compute`` with pycocotools' ``COCOeval`` (``iouType="bbox"``, the standard COCO
    protocol: IoU thresholds .50:.05:.95, 101-point interpolated precision, at most 100
    detections per image, areas small < 32² <= medium < 96² <= large). Labels are 0-based
    class indices; the COCO category id of label ``k`` is ``category_ids[k]`` — the
    dataset's own ids (COCO's run 1-90 with gaps), or ``k + 1`` for a source without ids —
    in the ground truth, the evaluation and the results JSON alike.

    Per-class AP comes from ``COCOeval.eval["precision"]`` (shape ``[T, R, K, A, M]``):
    ``ap`` is the mean over all IoU thresholds and recall points of class ``k`` for area
    "all" and 100 detections, ``ap_50`` the same at the first IoU threshold (0.5). That is
    exactly how ``summarize`` computes ``stats[0]`` / ``stats[1]``, restricted to one class.

    A class with no ground-truth box anywhere has no defined AP: it gets NaN and, as in
    COCO, is left out of ``map``. An overall number COCO cannot define (for example no
    ground truth at all, or no small boxes for ``map_small``) is NaN as well, where
    pycocotools would report -1.

    Args:
        class_names: Names of the classes, in label order.
        device: The device the model runs on. Kept for symmetry with the other metrics;
            COCO evaluation itself runs on the host.
        category_ids: The category id of each class, in label order (default 1..K).
    """

    def __init__(
        self,
        class_names: list[str],
        device: torch.device,
        category_ids: list[int] | None = None,
    ) -> None:
        if not class_names:
            raise ValueError("DetectionMetrics needs at least one class name")
        self.class_names = list(class_names)
        self.device = device
        self.category_ids = list(category_ids or range(1, len(class_names) + 1))
        if len(self.category_ids) != len(self.class_names) or len(set(self.category_ids)) != len(
            self.category_ids
        ):
            raise ValueError(
                f"category_ids {self.category_ids} must give one distinct id per class "
                f"({len(self.class_names)})"
            )
        self.reset()

    def reset(self) -> None:
        """Forget every prediction and target seen so far."""
        self._image_ids: list[int] = []
        self._given_ids: list[Any] = []
        self._preds: list[dict[str, Tensor]] = []
        self._targets: list[dict[str, Tensor]] = []
        self._used_ids: set[int] = set()
        self._next_id = 0

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        """Add one batch of images.

        Args:
            preds: Per image ``{"boxes": (K, 4) xyxy pixels, "scores": (K,),
                "labels": (K,) int64 0-based}``.
            targets: Per image ``{"boxes": (M, 4) xyxy pixels, "labels": (M,) int64 0-based}``
                and optionally ``"image_id"`` (int or 0-d tensor); without it the image gets
                the next unused id of a running counter.

        Raises:
            ValueError: The lists differ in length, a tensor has the wrong shape, a label is
                outside ``[0, num_classes)``, or an ``image_id`` repeats (COCO would merge
                the two images silently).
        """
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
        n = len(self.class_names)
        for pred, target in zip(preds, targets, strict=True):
            # A host copy: evaluation only, and COCOeval works on Python objects anyway.
            p_boxes = pred["boxes"].detach().cpu().float().reshape(-1, 4)
            p_scores = pred["scores"].detach().cpu().float().reshape(-1)
            p_labels = pred["labels"].detach().cpu().long().reshape(-1)
            t_boxes = target["boxes"].detach().cpu().float().reshape(-1, 4)
            t_labels = target["labels"].detach().cpu().long().reshape(-1)
            if not len(p_boxes) == len(p_scores) == len(p_labels):
                raise ValueError(
                    f"prediction has {len(p_boxes)} boxes, {len(p_scores)} scores and "
                    f"{len(p_labels)} labels"
                )
            if len(t_boxes) != len(t_labels):
                raise ValueError(f"target has {len(t_boxes)} boxes and {len(t_labels)} labels")
            for what, labels in (("prediction", p_labels), ("target", t_labels)):
                if labels.numel() and (labels.min() < 0 or labels.max() >= n):
                    raise ValueError(
                        f"{what} label out of range [0, {n}): {sorted(set(labels.tolist()))}"
                    )
            self._given_ids.append(target.get("image_id"))
            self._image_ids.append(self._take_id(target.get("image_id")))
            self._preds.append({"boxes": p_boxes, "scores": p_scores, "labels": p_labels})
            self._targets.append({"boxes": t_boxes, "labels": t_labels})

    def sync(self, gather: Callable[[list[Any]], list[Any]]) -> None:
        """Hold every process's images instead of this one's (DDP evaluation).

        Args:
            gather: joins each process's per-image list in the dataset's order (as
                ``Dist.gather``), so that images without an ``image_id`` get the ids a
                single process would have given them.
        """
        everything = gather(list(zip(self._given_ids, self._preds, self._targets, strict=True)))
        self.reset()
        for given, pred, target in everything:
            self._given_ids.append(given)
            self._image_ids.append(self._take_id(given))
            self._preds.append(pred)
            self._targets.append(target)

    def _take_id(self, given: Any) -> int:
        """The COCO image id of the next image: the given one, else the next unused one."""
        if given is not None:
            image_id = int(given.item() if isinstance(given, Tensor) else given)
            if image_id in self._used_ids:
                raise ValueError(f"image_id {image_id} was already seen since reset()")
        else:
            while self._next_id in self._used_ids:
                self._next_id += 1
            image_id = self._next_id
        self._used_ids.add(image_id)
        return image_id

    def coco_ground_truth(self) -> dict[str, Any]:
        """The targets seen since ``reset`` as a COCO-format ground-truth dict.

        Returns:
            ``{"images", "annotations", "categories"}``; annotations carry ``bbox`` as
            ``[x, y, w, h]``, ``area = w * h``, ``iscrowd = 0``, category ids
            ``category_ids[label]`` and annotation ids from 1 (COCOeval treats a matched id
            of 0 as "unmatched").
        """
        images = [{"id": image_id} for image_id in self._image_ids]
        annotations: list[dict[str, Any]] = []
        for image_id, target in zip(self._image_ids, self._targets, strict=True):
            for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
                x1, y1, x2, y2 = box
                w, h = x2 - x1, y2 - y1
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": self.category_ids[label],
                        "bbox": [x1, y1, w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
        categories = [
            {"id": cid, "name": name}
            for cid, name in zip(self.category_ids, self.class_names, strict=True)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}

    def coco_results(self) -> list[dict[str, Any]]:
        """The predictions seen since ``reset`` as COCO results-JSON entries.

        Returns:
            One ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` per predicted
            box, with ``category_id = category_ids[label]`` (the dataset's own ids), as in
            :meth:`coco_ground_truth`.
        """
        results: list[dict[str, Any]] = []
        for image_id, pred in zip(self._image_ids, self._preds, strict=True):
            rows = zip(
                pred["boxes"].tolist(),
                pred["scores"].tolist(),
                pred["labels"].tolist(),
                strict=True,
            )
            for (x1, y1, x2, y2), score, label in rows:
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": self.category_ids[label],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": score,
                    }
                )
        return results

    def compute(self) -> dict[str, Any]:
        """Score everything seen since ``reset``.

        Returns:
            ``map`` (AP@[.5:.95]), ``map_50``, ``map_75``, ``map_small``, ``map_medium``,
            ``map_large``, ``mar_100``, ``per_class`` ``{name: {"ap", "ap_50"}}`` and
            ``images`` (count). All numbers are Python floats; undefined ones (a class with
            no ground truth, or nothing seen at all) are NaN.
        """
        result: dict[str, Any] = {key: math.nan for key in _STATS_INDEX}
        result["per_class"] = {
            name: {"ap": math.nan, "ap_50": math.nan} for name in self.class_names
        }
        result["images"] = len(self._image_ids)
        if not self._image_ids:
            return result

        gt = _quiet_coco(self.coco_ground_truth())
        results = self.coco_results()
        if results:
            with contextlib.redirect_stdout(io.StringIO()):
                dt = gt.loadRes(results)
        else:
            # loadRes indexes results[0]; with no detections an empty result set scores 0
            # for every class that has ground truth, which is the right answer.
            dt = _quiet_coco(
                {
                    "images": list(gt.dataset["images"]),
                    "annotations": [],
                    "categories": list(gt.dataset["categories"]),
                }
            )
        evaluator = COCOeval(gt, dt, iouType="bbox")
        # Score every class, including ones with no ground truth (they come out as -1).
        evaluator.params.catIds = list(self.category_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()

        for key, index in _STATS_INDEX.items():
            value = float(evaluator.stats[index])
            result[key] = value if value > -1 else math.nan
        # [T, R, K, A, M]; area index 0 is "all", the last maxDets is 100.
        precision = evaluator.eval["precision"]
        # COCOeval sorts catIds: its axis K runs over the ids in ascending order.
        order = {cid: k for k, cid in enumerate(sorted(self.category_ids))}
        for cid, name in zip(self.category_ids, self.class_names, strict=True):
            k = order[cid]
            result["per_class"][name] = {
                "ap": _mean_valid(precision[:, :, k, 0, -1]),
                "ap_50": _mean_valid(precision[0, :, k, 0, -1]),
            }
        return result


class SegmentationMetrics:
    """Confusion-matrix metrics for semantic segmentation, accumulated on the device.

    ``update`` adds the bincount of ``C * target + pred`` over the valid pixels (target not
    ``ignore_index``) to a ``C x C`` int64 matrix (rows target, columns prediction) without
    any host synchronisation; ``compute`` reads it back once. The count is an ``index_add_``
    into a fixed-size buffer rather than ``torch.bincount``, whose CUDA kernel reads the
    input's min and max back to the host.

    A class that appears neither in the target nor in the prediction has an undefined IoU
    and Dice: they are NaN and left out of ``miou`` / ``dice`` (the means run over the
    classes that appear in either). Precision (recall) of a class never predicted (never
    in the target) is NaN likewise.

    With ``num_classes == 1`` the model is a binary one with a single logit channel: the
    metrics use two classes internally, background (0) and foreground (1), and
    ``class_names`` must name both.

    A target value that is neither ``ignore_index`` nor a class index, or a prediction
    outside ``[0, C)``, is counted on the device and raises at ``compute`` (checking it at
    ``update`` would need a host sync).

    Args:
        num_classes: Number of classes the model predicts (1 for a single-logit binary model).
        class_names: Names of the classes in label order (2 names when ``num_classes == 1``).
        device: Device of the logits; the confusion matrix lives there.
        ignore_index: Target value of pixels that are not scored.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: list[str],
        device: torch.device,
        ignore_index: int = 255,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = 2 if num_classes == 1 else num_classes
        if len(class_names) != self.num_classes:
            raise ValueError(
                f"expected {self.num_classes} class names for num_classes={num_classes}, "
                f"got {len(class_names)}: {class_names}"
            )
        self.class_names = list(class_names)
        self.device = torch.device(device)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Zero the confusion matrix."""
        c = self.num_classes
        # C*C confusion cells, then three tally bins: ignored, bad target, bad prediction.
        self._counts = torch.zeros(c * c + 3, dtype=torch.int64, device=self.device)

    def sync(self, sum_: Callable[[Tensor], Tensor]) -> None:
        """Add every process's counts into this one's (DDP evaluation): exact integers."""
        sum_(self._counts)

    def update(self, logits_or_preds: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            logits_or_preds: Logits ``(N, C, H, W)`` (floating point; argmax over ``C``, or
                for ``C == 1`` class 1 where ``sigmoid >= 0.5``) or predicted classes
                ``(N, H, W)`` (integer).
            target: Class indices ``(N, H, W)``, with ``ignore_index`` where not scored.

        Raises:
            ValueError: Shapes or the channel count do not match.
        """
        c = self.num_classes
        x = logits_or_preds.detach().to(self.device)
        target = target.detach().to(self.device)
        if x.is_floating_point():
            if x.dim() != 4:
                raise ValueError(f"logits must be (N, C, H, W), got {tuple(x.shape)}")
            if x.shape[1] == 1 and c == 2:
                preds = (torch.sigmoid(x[:, 0]) >= 0.5).long()
            elif x.shape[1] == c:
                preds = x.argmax(dim=1)
            else:
                raise ValueError(f"logits have {x.shape[1]} channels for {c} classes")
        else:
            preds = x.long()
        if preds.shape != target.shape:
            raise ValueError(
                f"predictions {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape"
            )
        c2 = c * c
        target = target.long()
        target_ok = (target >= 0) & (target < c)
        preds_ok = (preds >= 0) & (preds < c)
        # Every pixel gets a bin, the ones not scored or out of range a tally bin past the
        # matrix: boolean-mask indexing (t[valid]) and torch.bincount both read back to the
        # host on CUDA (nonzero's size; bincount's min/max), index_add_ into a fixed-size
        # buffer does not, and counting integers stays deterministic.
        index = torch.where(preds_ok, c * target + preds, c2 + 2)
        index = torch.where(target_ok, index, c2 + 1)
        index = torch.where(target == self.ignore_index, c2, index)
        index = index.reshape(-1)
        self._counts.index_add_(0, index, torch.ones_like(index))

    def compute(self) -> dict[str, Any]:
        """Metrics of everything seen since ``reset``.

        Returns:
            ``miou``, ``dice`` (means over the classes present in target or prediction),
            ``pixel_accuracy`` (correct / valid pixels), ``per_class`` ``{name: {"iou",
            "dice", "precision", "recall", "support"}}`` (support: target pixels, int),
            ``confusion_matrix`` (rows target, columns prediction, ints) and ``pixels``
            (valid pixels, int). Undefined values are NaN.

        Raises:
            DataError: A target pixel held a value that is neither a class nor
                ``ignore_index``, or a prediction was outside ``[0, C)``.
        """
        c = self.num_classes
        counts = self._counts.cpu()
        bad_target, bad_pred = counts[c * c + 1 :].tolist()
        if bad_target or bad_pred:
            raise DataError(
                f"segmentation metrics saw {bad_target} target pixels outside [0, {c}) that "
                f"are not ignore_index={self.ignore_index}, and {bad_pred} predictions "
                f"outside [0, {c}); check the mask values and num_classes"
            )
        matrix_int = counts[: c * c].reshape(c, c)
        matrix = matrix_int.to(torch.float64)
        tp = matrix.diagonal()
        support = matrix.sum(dim=1)
        predicted = matrix.sum(dim=0)
        union = support + predicted - tp
        total = matrix.sum()
        nan = torch.full_like(tp, math.nan)
        # Division guarded by where: 0/0 would be NaN anyway, but say which cases are undefined.
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        dice = torch.where(union > 0, 2 * tp / (support + predicted).clamp(min=1), nan)
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), nan)
        recall = torch.where(support > 0, tp / support.clamp(min=1), nan)
        present = union > 0
        per_class = {
            name: {
                "iou": float(iou[i]),
                "dice": float(dice[i]),
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(self.class_names)
        }
        return {
            "miou": float(iou[present].mean()) if present.any() else math.nan,
            "dice": float(dice[present].mean()) if present.any() else math.nan,
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
            "per_class": per_class,
            "confusion_matrix": matrix_int.tolist(),
            "pixels": int(total),
        }
