"""Detection and segmentation end to end: the same CLI, trainer, checkpoints and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_det_seg_data import coco_tree, mask_tree, write_json
from visiontrain.data.transforms import build_pair_transform
from visiontrain.engine.checkpoint import load_checkpoint

SHAPES = [
    "data.name=shapes",
    "data.image_size=64",
    "data.train_size=48",
    "data.val_size=8",
    "data.test_size=8",
    "data.batch_size=8",
    "train.progress=none",
    "train.log_every=2",
]
DET = ["task=detection", *SHAPES, "model.name=fcos_tiny", "model.width=8"]
SEG = ["task=segmentation", *SHAPES, "model.name=unet", "model.encoder=resnet18"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("args", "headline", "per_class"),
    [(DET, ("map", "map_50", "map_75"), "ap"), (SEG, ("miou", "dice", "pixel_accuracy"), "iou")],
    ids=["detection", "segmentation"],
)
def test_trains_from_the_cli_with_metrics_and_checkpoints(cli, tmp_path, args, headline, per_class):
    res = cli("train", *args, "train.epochs=3", "optim.lr=3e-3", f"run.dir={tmp_path}")
    assert res.code == 0, res.err
    run = res.run_dir
    steps = [r for r in records(run) if r["kind"] == "train_step"]
    assert steps[-1]["loss"] < steps[0]["loss"]
    summary = json.loads((run / "summary.json").read_text())
    for split in ("val", "test"):
        m = summary["metrics"][split]
        assert all(isinstance(m[k], float) for k in headline)
        assert set(m["per_class"]) >= {"circle", "square", "triangle"}
        assert all(per_class in row for row in m["per_class"].values())
    assert (run / "checkpoints" / "best.pt").is_file()
    if args is DET:
        # Every term of the detector's loss is logged.
        assert {"loss_classification", "loss_bbox_regression", "loss_bbox_ctrness"} <= set(steps[0])


@pytest.mark.parametrize("task_args", [DET, SEG], ids=["detection", "segmentation"])
def test_resume_equals_uninterrupted(cli, tmp_path, task_args):
    # A schedule that does not depend on train.epochs, so 1 + 1 epochs is 2 epochs.
    common = [
        *task_args,
        "train.deterministic=true",
        "data.augment=standard",
        "schedule.name=step",
        "schedule.step_size=1",
        "schedule.gamma=0.7",
        f"run.dir={tmp_path}",
    ]
    assert cli("train", *common, "train.epochs=2", "run.name=whole").code == 0
    assert cli("train", *common, "train.epochs=1", "run.name=part").code == 0
    res = cli("train", *common, "train.epochs=2", "run.name=part", "run.resume=auto")
    assert res.code == 0, res.err
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _square_scene(h=40, w=60):
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[:, 10:20, 30:45] = 255
    mask = torch.zeros(h, w, dtype=torch.long)
    mask[10:20, 30:45] = 1
    boxes = torch.tensor([[30.0, 10.0, 45.0, 20.0]])
    return image, mask, boxes


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("same_size", [True, False])
@pytest.mark.parametrize("preset", ["standard", "affine"])
def test_boxes_and_masks_move_with_the_image(seed, same_size, preset):
    image, mask, boxes = _square_scene()
    size = 64
    det = build_pair_transform("detection", preset, size, same_size, train=True)
    seg = build_pair_transform("segmentation", preset, size, same_size, train=True)
    torch.manual_seed(seed)
    img_d, target = det(image, {"boxes": boxes, "labels": torch.tensor([0])})
    torch.manual_seed(seed)
    img_s, out_mask = seg(image, mask)
    assert torch.equal(img_d, img_s)  # same random draws, same geometry
    bright = img_s[0] > 127
    if not bright.any():  # cropped away: the box must be gone too
        assert len(target["boxes"]) == 0
        return
    ys, xs = torch.nonzero(bright, as_tuple=True)
    x1, y1, x2, y2 = target["boxes"][0].tolist()
    # The box covers the object's pixels, give or take the interpolation's soft edge.
    assert x1 <= xs.min() + 1.5 and y1 <= ys.min() + 1.5
    assert x2 >= xs.max() + 1 - 1.5 and y2 >= ys.max() + 1 - 1.5
    assert x2 - x1 <= (xs.max() - xs.min() + 1) + 3
    # The mask labels the same pixels as the object (up to the edge).
    agree = ((out_mask == 1) == bright) | (out_mask == 255)
    assert agree.float().mean() > 0.97


def test_predict_detection_json_and_drawn_images(cli, tmp_path):
    res = cli("train", *DET, "train.epochs=1", f"run.dir={tmp_path / 'runs'}")
    assert res.code == 0, res.err
    img = tmp_path / "in" / "scene.png"
    img.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 80, 3), np.uint8)).save(img)
    out = cli(
        "predict",
        res.run_dir,
        img,
        "--format",
        "json",
        "--score-threshold",
        "0.0",
        "--draw",
        "--out",
        tmp_path / "drawn",
    )
    assert out.code == 0, out.err
    rows = json.loads(out.out[out.out.index("[") :])
    assert rows[0]["file"] == str(img)
    for det in rows[0]["detections"]:
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 <= x2 <= 80 and 0 <= y1 <= y2 <= 50  # in the file's own pixels
        assert det["class"] in ("circle", "square", "triangle")
    drawn = Image.open(tmp_path / "drawn" / "scene.png")
    assert drawn.size == (80, 50)
    bad = cli("predict", res.run_dir, img, "--top-k", "3")
    assert bad.code == 2 and "--top-k" in bad.err
    ev = cli("eval", res.run_dir, "--coco-results", tmp_path / "results.json", "--format", "json")
    assert ev.code == 0, ev.err
    metrics = json.loads(ev.out[ev.out.index("{") :])
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert metrics["map"] == pytest.approx(summary["metrics"]["test"]["map"], nan_ok=True)
    results = json.loads((tmp_path / "results.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score"} <= r.keys() for r in results)


def test_predict_segmentation_writes_masks(cli, tmp_path):
    res = cli("train", *SEG, "train.epochs=1", f"run.dir={tmp_path / 'runs'}")
    assert res.code == 0, res.err
    img = tmp_path / "in" / "scene.png"
    img.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 70, 3), np.uint8)).save(img)
    out = cli("predict", res.run_dir, img, "--out", tmp_path / "masks", "--format", "csv")
    assert out.code == 0, out.err
    mask = np.array(Image.open(tmp_path / "masks" / "scene.png"))
    assert mask.shape == (30, 70) and mask.max() <= 3
    # Same file names in two folders, and one name with two suffixes: no output is lost,
    # and the listing names what is on disk.
    rng = np.random.default_rng(1)
    inputs = [tmp_path / "two" / p for p in ("a/000.png", "b/000.png", "b/x.png", "b/x.jpg")]
    for path in inputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(path)
    out = cli("predict", res.run_dir, *inputs, "--out", tmp_path / "m2", "--format", "json")
    assert out.code == 0, out.err
    listed = [row["mask"] for row in json.loads(out.out[out.out.index("[") :])]
    on_disk = sorted(str(p) for p in (tmp_path / "m2").rglob("*.png"))
    assert sorted(listed) == on_disk and len(set(listed)) == 4
    assert str(tmp_path / "m2" / "a" / "000.png") in listed


def test_coco_and_masks_folders_train_from_the_cli(cli, tmp_path):
    root, data = coco_tree(tmp_path)
    write_json(root, data)
    common = ["data.image_size=32", "data.batch_size=2", "train.epochs=1", "train.progress=none"]
    res = cli(
        "train",
        "task=detection",
        "data.name=coco",
        f"data.root={root}",
        "data.val_split=0.25",
        "model.name=fcos_tiny",
        "model.width=8",
        *common,
        f"run.dir={tmp_path / 'runs'}",
    )
    assert res.code == 0, res.err
    assert "crowd" in res.out or "crowd" in res.err
    seg_root = mask_tree(tmp_path, n=6)
    res = cli(
        "train",
        "task=segmentation",
        "data.name=masks",
        f"data.root={seg_root}",
        "data.val_split=0.34",
        "model.name=unet",
        *common,
        f"run.dir={tmp_path / 'runs'}",
    )
    assert res.code == 0, res.err
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert list(summary["metrics"]["test"]["per_class"]) == ["background", "road", "car"]


def test_coco_path_traversal_exits_2(cli, tmp_path):
    root, data = coco_tree(tmp_path)
    data["images"][0]["file_name"] = "../../etc/passwd"
    write_json(root, data)
    res = cli(
        "train",
        "task=detection",
        "data.name=coco",
        f"data.root={root}",
        "model.name=fcos_tiny",
        f"run.dir={tmp_path / 'runs'}",
    )
    assert res.code == 2 and "outside" in res.err and "Traceback" not in res.err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["task=detection", "model.name=simple_cnn"], "not a detection model"),
        (["task=detection", "model.name=fcos_tiny", "loss.name=focal"], "detector's own losses"),
        (["task=detection", "model.name=fcos_tiny", "train.monitor=val/loss"], "val/map"),
        (["task=segmentation", "model.name=unet", "model.encoder=resnet_eighteen"], "encoder"),
        (["task=segmentation", "model.name=unet", "model.width=8"], "`model.width`"),
        (["task=detection", "data.name=defects"], "has no targets for task detection"),
    ],
)
def test_bad_dense_config_exits_2(cli, tmp_path, extra, expected):
    args = [a for a in SHAPES if not a.startswith("data.name")] + ["data.name=shapes"]
    res = cli("train", *args, *extra, f"run.dir={tmp_path / 'runs'}")
    assert res.code == 2, res.err
    assert expected in res.err and "Traceback" not in res.err
