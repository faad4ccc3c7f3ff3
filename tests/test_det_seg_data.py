"""Detection and segmentation data sources: ``shapes`` (generated), ``coco`` and ``masks``.

The COCO and mask folders are written here in the real formats (JSON, PNG, palette PNG),
so the parsers are exercised exactly as a user's files would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visiontrain.config import build_config
from visiontrain.data import build_data, shapes
from visiontrain.data.sources import DataBundle, cache_key, cache_root
from visiontrain.errors import DataError

SHAPES = [
    "data.name=shapes",
    "data.image_size=48",
    "data.train_size=40",
    "data.val_size=12",
    "data.test_size=12",
]


def build(task: str, *overrides: str) -> DataBundle:
    return build_data(build_config({}, list(overrides)).data, task)


def bbox_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# ---------------------------------------------------------------- shapes


def test_shapes_detection_targets_and_determinism() -> None:
    a = build("detection", *SHAPES)
    b = build("detection", *SHAPES, "data.split_seed=0")
    seg = build("segmentation", *SHAPES)
    assert a.class_names == ["circle", "square", "triangle"]
    assert seg.class_names == ["background", "circle", "square", "triangle"]
    assert (a.in_channels, a.image_size, a.same_size) == (3, 48, True)
    assert len(a.train) == 40 and len(a.val) == 12 and len(a.test) == 12
    assert a.train.labels is None
    checked = 0
    for i in range(len(a.train)):
        image, target = a.train.load(i)
        image_b, target_b = b.train.load(i)
        assert image.dtype == torch.uint8 and image.shape == (3, 48, 48)
        assert torch.equal(image, image_b)
        assert torch.equal(target["boxes"], target_b["boxes"])
        assert target["image_id"] == i
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert len(boxes) == len(labels) >= 1
        assert int(labels.min()) >= 0 and int(labels.max()) < 3
        assert bool((boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all())
        assert float(boxes.min()) >= 0 and float(boxes.max()) <= 48
        seg_image, mask = seg.train.load(i)
        assert torch.equal(seg_image, image)
        assert mask.dtype == torch.int64 and mask.shape == (48, 48)
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255}
        m = mask.numpy()
        for cls in range(3):
            of_class = boxes[labels == cls]
            present = m == cls + 1
            assert present.any() == (len(of_class) > 0)
            if len(of_class) == 0:
                continue
            # The pixels of a class span exactly the union of its boxes...
            union = (*of_class.min(0).values[:2].tolist(), *of_class.max(0).values[2:].tolist())
            assert bbox_of(present) == tuple(int(v) for v in union)
            if len(of_class) == 1:
                # ...and a single instance's box is exactly the box of its visible pixels.
                assert bbox_of(present) == tuple(int(v) for v in of_class[0].tolist())
                checked += 1
            for box in of_class.long().tolist():
                # Every box holds pixels of its class.
                assert present[box[1] : box[3], box[0] : box[2]].any()
    assert checked > 10


def test_shapes_regression_counts_match_boxes() -> None:
    det = build("detection", *SHAPES)
    reg = build("regression", *SHAPES)
    assert reg.class_names == []
    assert reg.target_names == ["count_circle", "count_square", "count_triangle"]
    assert reg.num_outputs == 3
    for i in range(len(reg.val)):
        _, counts = reg.val.load(i)
        _, target = det.val.load(i)
        assert counts.dtype == np.float32
        expected = np.bincount(target["labels"].numpy(), minlength=3)
        np.testing.assert_array_equal(counts, expected.astype(np.float32))
        assert counts.sum() >= 1


def test_shapes_boxes_are_copies() -> None:
    det = build("detection", *SHAPES)
    _, target = det.train.load(0)
    target["boxes"] += 100
    _, again = det.train.load(0)
    assert float(again["boxes"].max()) <= 48


def test_shapes_cache_reused_and_corrupt_cache_regenerated(monkeypatch) -> None:
    overrides = [*SHAPES, "data.split_seed=7", "data.train_size=30"]
    cfg = build_config({}, overrides).data
    first = build("detection", *overrides)
    key = cache_key(shapes.GENERATOR_VERSION, 30, 48, 7 * 1000 + 0)
    cached = cache_root(cfg) / "shapes" / f"train-{key}.npz"
    assert cached.is_file()
    # The second build reads the cache: the generator must not run again.
    real = shapes.generate_shapes
    monkeypatch.setattr(shapes, "generate_shapes", lambda *a, **k: pytest.fail("regenerated"))
    second = build("detection", *overrides)
    monkeypatch.setattr(shapes, "generate_shapes", real)
    assert torch.equal(first.train.images, second.train.images)
    # A truncated cache file: the next build regenerates the same data and rewrites it.
    cached.write_bytes(cached.read_bytes()[:1000])
    third = build("detection", *overrides)
    assert torch.equal(first.train.images, third.train.images)
    for i in range(len(first.train)):
        assert torch.equal(first.train.load(i)[1]["boxes"], third.train.load(i)[1]["boxes"])
    with np.load(cached) as z:
        assert z["images"].shape == (30, 48, 48, 3)


def test_shapes_other_seed_differs() -> None:
    a = build("segmentation", *SHAPES)
    b = build("segmentation", *SHAPES, "data.split_seed=3")
    assert not torch.equal(a.train.images, b.train.images)
    assert a.mean != b.mean


# ---------------------------------------------------------------- coco


def write_png(path: Path, w: int, h: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def coco_tree(tmp_path: Path, images: list[dict] | None = None) -> tuple[Path, dict]:
    root = tmp_path / "coco"
    write_png(root / "a.png", 40, 30)
    write_png(root / "images" / "b.png", 20, 20, seed=1)  # found via root/images/
    write_png(root / "c.png", 16, 16, seed=2)
    write_png(root / "d.png", 16, 16, seed=3)
    data = {
        "images": images
        or [
            {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 11, "file_name": "b.png", "width": 20, "height": 20},
            {"id": 12, "file_name": "c.png", "width": 16, "height": 16},
            {"id": 13, "file_name": "d.png", "width": 16, "height": 16},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 3, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [30, 20, 20, 20]},  # clipped
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},
            {"id": 4, "image_id": 11, "category_id": 3, "bbox": [1, 1, 0, 4]},  # zero width
            {"id": 5, "image_id": 11, "category_id": 3, "bbox": [25, 25, 5, 5]},  # outside
            {"id": 6, "image_id": 11, "category_id": 3, "bbox": [4, 5, 6, 7]},
        ],
        # Sparse ids, listed out of order: classes follow the ids.
        "categories": [
            {"id": 7, "name": "zebra"},
            {"id": 1, "name": "cat"},
            {"id": 3, "name": "dog"},
        ],
    }
    return root, data


def write_json(root: Path, data: dict, split: str = "train") -> Path:
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def coco(root: Path, *extra: str) -> DataBundle:
    return build("detection", "data.name=coco", f"data.root={root}", *extra)


def test_coco_parses_boxes_classes_and_notes(tmp_path: Path) -> None:
    root, data = coco_tree(tmp_path)
    val = {**data, "images": data["images"][2:], "annotations": []}
    write_json(root, {**data, "images": data["images"][:2]}, "train")
    write_json(root, val, "val")
    bundle = coco(root)
    assert bundle.class_names == ["cat", "dog", "zebra"]
    assert (bundle.in_channels, bundle.same_size) == (3, False)
    assert len(bundle.train) == 2 and len(bundle.val) == 2 and bundle.test is None
    notes = "\n".join(bundle.notes)
    assert "1 crowd" in notes and "1 boxes with zero width" in notes
    assert "1 boxes entirely outside" in notes and "clipped 1" in notes
    image, target = bundle.train.load_decoded(0)  # at the file's resolution
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    assert target["image_id"] == 10
    assert target["boxes"].tolist() == [[2, 3, 12, 8], [30, 20, 40, 30]]
    assert target["labels"].tolist() == [2, 0]  # zebra (id 7), cat (id 1)
    image, target = bundle.train.load_decoded(1)
    assert image.shape == (3, 20, 20)
    assert target["boxes"].tolist() == [[4, 5, 10, 12]] and target["labels"].tolist() == [1]
    assert bundle.train.describe(1).endswith(str(Path("images") / "b.png"))
    # Images without annotations are kept, with no boxes.
    image, target = bundle.val.load(0)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_coco_holds_out_val_when_no_val_file(tmp_path: Path) -> None:
    root, data = coco_tree(tmp_path)
    write_json(root, data)
    bundle = coco(root, "data.val_split=0.25")
    assert len(bundle.train) == 3 and len(bundle.val) == 1
    assert any("held out 1" in n for n in bundle.notes)
    again = coco(root, "data.val_split=0.25")
    assert bundle.val.describe(0) == again.val.describe(0)


@pytest.mark.parametrize("name", ["../evil.png", "ABSOLUTE", "link.png"])
def test_coco_refuses_files_outside_root(tmp_path: Path, name: str) -> None:
    root, data = coco_tree(tmp_path)
    evil = tmp_path / "evil.png"
    write_png(evil, 8, 8)
    if name == "ABSOLUTE":
        name = str(evil)
    if name == "link.png":
        (root / "link.png").symlink_to(evil)
    data["images"][0]["file_name"] = name
    path = write_json(root, data)
    with pytest.raises(DataError, match="outside") as err:
        coco(root)
    assert str(path) in str(err.value) and "image id 10" in str(err.value)


def test_coco_missing_image_names_it(tmp_path: Path) -> None:
    root, data = coco_tree(tmp_path)
    data["images"][0]["file_name"] = "nope.png"
    write_json(root, data)
    with pytest.raises(DataError, match=r"nope\.png"):
        coco(root)


def test_coco_unknown_category_or_image_names_annotation(tmp_path: Path) -> None:
    root, data = coco_tree(tmp_path)
    data["annotations"][0]["category_id"] = 99
    write_json(root, data)
    with pytest.raises(DataError, match=r"annotation 1 .*category_id 99"):
        coco(root)
    root, data = coco_tree(tmp_path)
    data["annotations"][5]["image_id"] = 555
    write_json(root, data)
    with pytest.raises(DataError, match=r"annotation 6 .*image_id 555"):
        coco(root)


def test_coco_malformed_json_and_missing_keys(tmp_path: Path) -> None:
    root, data = coco_tree(tmp_path)
    path = write_json(root, data)
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"instances_train\.json"):
        coco(root)
    del data["categories"]
    write_json(root, data)
    with pytest.raises(DataError, match="'categories'"):
        coco(root)
    root, data = coco_tree(tmp_path)
    del data["images"][1]["file_name"]
    write_json(root, data)
    with pytest.raises(DataError, match=r"images\[1\] has no 'file_name'"):
        coco(root)
    with pytest.raises(DataError, match=r"instances_train\.json"):
        coco(tmp_path / "empty")


def test_coco_image_size_mismatch_at_load(tmp_path: Path) -> None:
    root, data = coco_tree(tmp_path)
    data["images"][0]["width"] = 41
    write_json(root, data)
    bundle = coco(root, "data.val_split=0.25")
    loads = [bundle.train, bundle.val]
    with pytest.raises(DataError, match=r"a\.png is 40x30"):
        for split in loads:
            for i in range(len(split)):
                split.load(i)


# ---------------------------------------------------------------- masks


def mask_tree(tmp_path: Path, n: int = 4, classes: bool = True) -> Path:
    root = tmp_path / "seg"
    for split, count in (("train", n), ("test", 2)):
        for i in range(count):
            write_png(root / split / "images" / f"im{i}.jpg", 12, 10, seed=i)
            mask = np.zeros((10, 12), np.uint8)
            mask[2:5, 3:9] = 1 + i % 2
            mask[8:, :] = 255  # an ignore band
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
            # A palette PNG whose indices are the classes, as in Pascal VOC.
            pal = Image.frombytes("P", (12, 10), mask.tobytes())
            pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [200] * (253 * 3))
            pal.save(root / split / "masks" / f"im{i}.png")
    if classes:
        (root / "classes.txt").write_text("background\nroad\ncar\n")
    return root


def masks(root: Path, *extra: str) -> DataBundle:
    return build("segmentation", "data.name=masks", f"data.root={root}", *extra)


def load_all(bundle: DataBundle) -> None:
    for split in (bundle.train, bundle.val, bundle.test):
        for i in range(len(split)):
            split.load(i)


def test_masks_palette_png_and_ignore(tmp_path: Path) -> None:
    root = mask_tree(tmp_path)
    bundle = masks(root)
    assert bundle.class_names == ["background", "road", "car"]
    assert len(bundle.train) == 3 and len(bundle.val) == 1 and len(bundle.test) == 2
    assert bundle.same_size is False
    image, mask = bundle.test.load_decoded(1)  # at the file's resolution
    assert image.shape == (3, 10, 12) and image.dtype == torch.uint8
    assert mask.shape == (10, 12) and mask.dtype == torch.int64
    assert int(mask[3, 4]) == 2 and int(mask[0, 0]) == 0 and int(mask[9, 0]) == 255
    load_all(bundle)


def test_masks_classes_from_train_masks(tmp_path: Path) -> None:
    root = mask_tree(tmp_path, classes=False)
    # Mode L works as well as palette masks.
    Image.fromarray(np.full((10, 12), 3, np.uint8)).save(root / "train/masks/im0.png")
    bundle = masks(root)
    assert bundle.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert any("no classes.txt" in n for n in bundle.notes)
    load_all(bundle)


def test_masks_value_out_of_range(tmp_path: Path) -> None:
    root = mask_tree(tmp_path)
    bad = root / "test/masks/im0.png"
    Image.fromarray(np.full((10, 12), 5, np.uint8)).save(bad)
    bundle = masks(root)
    with pytest.raises(DataError, match=r"im0.png has value 5.*classes.txt"):
        bundle.test.load(0)


def test_masks_rgb_mask_refused(tmp_path: Path) -> None:
    root = mask_tree(tmp_path)
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "test/masks/im1.png")
    bundle = masks(root)
    with pytest.raises(DataError, match="single-channel class-index PNGs"):
        bundle.test.load(1)


def test_masks_size_mismatch(tmp_path: Path) -> None:
    root = mask_tree(tmp_path)
    Image.fromarray(np.zeros((11, 12), np.uint8)).save(root / "test/masks/im1.png")
    bundle = masks(root)
    with pytest.raises(DataError, match=r"masks/im1.png is 12x11.*images/im1.jpg is 12x10"):
        bundle.test.load(1)


def test_masks_missing_mask_and_missing_train(tmp_path: Path) -> None:
    root = mask_tree(tmp_path)
    (root / "train/masks/im2.png").unlink()
    with pytest.raises(DataError, match=r"im2.jpg has no mask"):
        masks(root)
    with pytest.raises(DataError, match="no train/"):
        masks(tmp_path / "nothing")
