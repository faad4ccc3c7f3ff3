"""Detections leave visiontrain with the dataset's own COCO category ids (issue 18).

A generated COCO dataset with sparse, unordered ids (7, 3, 12, and 20 with no training
box): the ``--coco-results`` file scored by pycocotools against the dataset's own
``instances_test.json`` equals what visiontrain reports, after a resume, under a
2-process evaluation, and ``predict`` (checkpoint or exported artifact) names the same ids.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from tests.conftest import run_subprocess

CATEGORIES = [
    {"id": 7, "name": "cat"},
    {"id": 3, "name": "dog"},
    {"id": 12, "name": "zebra"},
    {"id": 20, "name": "unicorn"},  # no box in train: only the test split has one
]
COLOURS = {7: (230, 40, 40), 3: (40, 220, 40), 12: (40, 40, 230), 20: (230, 230, 40)}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SIZE = 48


def _split(root: Path, name: str, n: int, seed: int, first_id: int) -> None:
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(n):
        image_id = first_id + 3 * i  # sparse image ids too
        canvas = Image.new("RGB", (SIZE, SIZE), (90, 90, 90))
        draw = ImageDraw.Draw(canvas)
        ids = [7, 3, 12] + ([20] if name == "test" and i == 0 else [])
        for cid in rng.choice(ids, size=2, replace=False) if i else ids[-2:]:
            w, h = (int(v) for v in rng.integers(10, 20, 2))
            x, y = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLOURS[int(cid)])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cid),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        file = f"{name}_{i}.png"
        canvas.save(root / file)
        images.append({"id": image_id, "file_name": file, "width": SIZE, "height": SIZE})
    if name == "train":
        annotations = [a for a in annotations if a["category_id"] != 20]
    ann = root / "annotations" / f"instances_{name}.json"
    # The categories listed out of id order, as real files may.
    ann.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES})
    )


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco_ids")
    (root / "annotations").mkdir()
    _split(root, "train", 16, 0, 100)
    _split(root, "val", 6, 1, 500)
    _split(root, "test", 6, 2, 900)
    return root


def _train_args(root: Path, runs: Path, name: str) -> list[str]:
    return [
        "task=detection",
        "data.name=coco",
        f"data.root={root}",
        f"data.image_size={SIZE}",
        "data.batch_size=4",
        "data.augment=none",
        "model.name=fcos_tiny",
        "model.width=8",
        "train.progress=none",
        "run.report=false",
        f"run.dir={runs}",
        f"run.name={name}",
    ]


def _cocoeval(gt_file: Path, results: list[dict]) -> dict:
    """mAP, mAP@.5 and per-class AP of a results list by pycocotools alone."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.catIds = sorted(c["id"] for c in CATEGORIES)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]
    per_class = {}
    for k, cid in enumerate(ev.params.catIds):
        name = next(c["name"] for c in CATEGORIES if c["id"] == cid)
        valid = precision[:, :, k, 0, -1]
        valid = valid[valid > -1]
        per_class[name] = float(valid.mean()) if valid.size else float("nan")
    return {"map": float(ev.stats[0]), "map_50": float(ev.stats[1]), "per_class": per_class}


def _round_trip(run: Path, root: Path, tmp: Path, scores: bool = False) -> dict:
    """eval --coco-results, then pycocotools on that file equals the reported numbers."""
    dets = tmp / f"{run.name}_dets.json"
    ev = run_subprocess(
        "eval", run, "--split", "test", "--coco-results", dets, "--format", "json", env=ENV
    )
    assert ev.returncode == 0, ev.stderr
    reported = json.loads(ev.stdout[ev.stdout.index("{") :])
    results = json.loads(dets.read_text())
    assert results and {r["category_id"] for r in results} <= {c["id"] for c in CATEGORIES}
    ours = _cocoeval(root / "annotations" / "instances_test.json", results)
    assert reported["map"] == pytest.approx(ours["map"], abs=1e-6)
    assert reported["map_50"] == pytest.approx(ours["map_50"], abs=1e-6)
    for name, ap in ours["per_class"].items():
        assert reported["per_class"][name]["ap"] == pytest.approx(ap, abs=1e-6, nan_ok=True)
    if scores:
        assert reported["map"] > 0  # so that a wrong id mapping would show
    return reported


@pytest.mark.slow
def test_coco_results_score_the_same_by_pycocotools_after_a_resume(coco_root, tmp_path):
    runs = tmp_path / "runs"
    args = _train_args(coco_root, runs, "r")
    first = run_subprocess("train", *args, "train.epochs=4", env=ENV)
    assert first.returncode == 0, first.stderr
    before = _round_trip(runs / "r", coco_root, tmp_path)
    resumed = run_subprocess("train", *args, "train.epochs=8", "run.resume=auto", env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    after = _round_trip(runs / "r", coco_root, tmp_path, scores=True)
    assert after["map"] != before["map"]  # it trained on, and still scores right

    # predict names the dataset's ids, from the checkpoint and from an exported artifact.
    images = sorted(coco_root.glob("test_*.png"))
    ck = run_subprocess("predict", runs / "r", *images, "--format", "json",
                        "--score-threshold", "0.05", env=ENV)  # fmt: skip
    assert ck.returncode == 0, ck.stderr
    rows = json.loads(ck.stdout)
    ids = {c["name"]: c["id"] for c in CATEGORIES}
    dets = [d for r in rows for d in r["detections"]]
    assert dets and all(d["category_id"] == ids[d["class"]] for d in dets)
    ex = run_subprocess("export", runs / "r", "--format", "pt2", "--latency-runs", "0", env=ENV)
    assert ex.returncode == 0, ex.stderr
    meta = json.loads((runs / "r" / "export" / "model.json").read_text())
    assert meta["categories"] == [
        {"id": ids[n], "name": n} for n in ("dog", "cat", "zebra", "unicorn")
    ]
    art = run_subprocess("predict", runs / "r" / "export" / "model.pt2", *images,
                         "--format", "json", "--score-threshold", "0.05", env=ENV)  # fmt: skip
    assert art.returncode == 0, art.stderr
    art_dets = [d for r in json.loads(art.stdout) for d in r["detections"]]
    assert [(d["class"], d["category_id"]) for d in art_dets] == [
        (d["class"], d["category_id"]) for d in dets
    ]


@pytest.mark.slow
def test_two_process_evaluation_reports_what_pycocotools_scores(coco_root, tmp_path):
    runs = tmp_path / "runs"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "visiontrain", "train"]  # fmt: skip
    proc = subprocess.run(
        [*torchrun, *_train_args(coco_root, runs, "d"), "train.epochs=8"],
        capture_output=True,
        text=True,
        timeout=400,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((runs / "d" / "summary.json").read_text())
    assert summary["world_size"] == 2
    one = _round_trip(runs / "d", coco_root, tmp_path)
    test = summary["metrics"]["test"]
    assert test["map"] == pytest.approx(one["map"], abs=1e-6)
    for name, row in one["per_class"].items():
        assert test["per_class"][name]["ap"] == pytest.approx(row["ap"], abs=1e-6, nan_ok=True)
