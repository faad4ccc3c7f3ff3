"""``data.cache``: decode once, reuse, rebuild on change or damage, and change no batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from test_data import data_cfg, folder_overrides, make_folder, rng_image, write_image
from test_det_seg_data import coco, coco_tree, mask_tree, masks, write_json
from visiontrain.data import build_data, images
from visiontrain.data.cache import IMAGES_FILE
from visiontrain.data.loaders import build_loader


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("VISIONTRAIN_CACHE", str(cache))
    return cache


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every ``decode_file`` call (the one decode path of file sources), by path."""
    calls: list[Path] = []
    real = images.decode_file

    def counting(path, channels=3, target=None):
        calls.append(Path(path))
        return real(path, channels, target)

    monkeypatch.setattr(images, "decode_file", counting)
    return calls


def folder(root: Path) -> Path:
    """train/ (10 images, held-out val) and test/ (3), PNG and JPEG of varying sizes."""
    make_folder(root, "train", {"a": 5, "b": 5}, size=(20, 14))
    make_folder(root, "test", {"a": 2, "b": 1}, size=(18, 24))
    return root


N_FILES = 13


def bundle_for(root: Path, *extra: str, workers: int = 0):
    cfg = data_cfg(*folder_overrides(root, "data.batch_size=4", *extra))
    cfg.num_workers = workers
    return cfg, build_data(cfg)


def batches(root: Path, *extra: str, epochs=(0, 1), workers: int = 0) -> list[torch.Tensor]:
    cfg, bundle = bundle_for(root, *extra, workers=workers)
    loader = build_loader(bundle.train, bundle, cfg, train=True, seed=3, pin_memory=False)
    out = []
    for epoch in epochs:
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            out.append(batch["image"].clone())
            out.append(batch["target"].clone())
    return out


def cache_folders(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "images").iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cache_decodes_each_file_once(tmp_path, cache_dir, decodes, mode):
    root = folder(tmp_path / "data")
    cfg, bundle = bundle_for(root, f"data.cache={mode}")
    assert sorted(decodes) == sorted(p for p in root.rglob("*") if p.is_file())
    assert len(decodes) == N_FILES
    assert any(f"data.cache={mode}" in note for note in bundle.notes)
    decodes.clear()
    loader = build_loader(bundle.train, bundle, cfg, train=True, seed=0, pin_memory=False)
    for epoch in (0, 1):
        loader.batch_sampler.set_epoch(epoch)
        assert sum(len(b["image"]) for b in loader) > 0
    assert decodes == []  # no decode in either epoch
    # Images come back at the working size (shorter side 16), resized once at build.
    image, _ = bundle.train.load(0)
    assert image.dtype == torch.uint8 and min(image.shape[-2:]) == 16
    # Only the disk cache survives the process: a second build decodes nothing.
    _, again = bundle_for(root, f"data.cache={mode}")
    if mode == "disk":
        assert decodes == []
        assert any("nothing decoded" in note for note in again.notes)
    else:
        assert len(decodes) == N_FILES


def test_disk_cache_rebuilds_when_a_file_changes(tmp_path, cache_dir, decodes):
    root = folder(tmp_path / "data")
    bundle_for(root, "data.cache=disk")
    first = cache_folders(cache_dir)
    assert len(first) == 2  # train (with its held-out val) and test
    changed = root / "train" / "a" / "a_0.png"
    write_image(changed, rng_image(999, 20, 14))
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    decodes.clear()
    _, bundle = bundle_for(root, "data.cache=disk")
    assert len(decodes) == 10  # train rebuilt under a new key; test reused
    assert len(cache_folders(cache_dir)) == 3  # the old cache is left in place
    uncached = bundle_for(root)[1]
    for split in ("train", "val"):
        new, plain = getattr(bundle, split), getattr(uncached, split)
        assert all(torch.equal(new.load(i)[0], plain.load(i)[0]) for i in range(len(new)))


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_damaged_disk_cache_is_noted_and_rebuilt(tmp_path, cache_dir, decodes, damage):
    root = folder(tmp_path / "data")
    _, good = bundle_for(root, "data.cache=disk")
    # Copies: a loaded image is a view of the memory-mapped file this test then damages.
    expected = [good.train.load(i)[0].clone() for i in range(len(good.train))]
    target = next(f for f in cache_folders(cache_dir) if (f / IMAGES_FILE).stat().st_size > 4000)
    buffer = target / IMAGES_FILE
    if damage == "truncate":
        with open(buffer, "r+b") as fh:
            fh.truncate(buffer.stat().st_size // 2)
    elif damage == "flip":
        data = bytearray(buffer.read_bytes())
        data[len(data) // 3] ^= 0xFF
        buffer.write_bytes(bytes(data))
    else:
        (target / "meta.json").write_text("{not json")
    decodes.clear()
    _, bundle = bundle_for(root, "data.cache=disk")
    notes = "\n".join(bundle.notes)
    assert "damaged" in notes and str(target) in notes
    assert decodes  # rebuilt by decoding
    assert all(torch.equal(a, bundle.train.load(i)[0]) for i, a in enumerate(expected))
    decodes.clear()
    bundle_for(root, "data.cache=disk")  # the rebuilt cache verifies
    assert decodes == []
    meta = json.loads((target / "meta.json").read_text())
    assert meta["files"][IMAGES_FILE]["bytes"] == (target / IMAGES_FILE).stat().st_size
    assert not [p for p in (cache_dir / "images").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("augment", ["light", "standard"])
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_and_uncached_loaders_give_the_same_batches(tmp_path, cache_dir, augment, mode):
    root = folder(tmp_path / "data")
    plain = batches(root, f"data.augment={augment}")
    cached = batches(root, f"data.augment={augment}", f"data.cache={mode}")
    assert len(plain) == len(cached) > 0
    for a, b in zip(plain, cached, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_disk_cache_with_loader_workers(tmp_path, cache_dir):
    root = folder(tmp_path / "data")
    plain = batches(root, "data.augment=standard", epochs=(0,))
    cached = batches(root, "data.augment=standard", "data.cache=disk", epochs=(0,), workers=2)
    assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))


def test_cache_skips_broken_files_like_the_uncached_loader(tmp_path, cache_dir):
    root = folder(tmp_path / "data")
    (root / "train" / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    plain = batches(root, "data.on_error=skip")
    for mode in ("memory", "disk"):
        cached = batches(root, "data.on_error=skip", f"data.cache={mode}")
        assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))
    with pytest.raises(Exception, match=r"broken\.jpg"):
        bundle_for(root, "data.cache=memory")  # data.on_error=raise: refused at build


def test_array_sources_note_that_they_are_in_memory(cache_dir):
    bundle = build_data(data_cfg("data.image_size=16", "data.train_size=20", "data.cache=disk"))
    assert any("already holds its images in memory" in note for note in bundle.notes)
    assert not (cache_dir / "images").exists()


def test_coco_cached_equals_uncached(tmp_path, cache_dir, decodes):
    root, data = coco_tree(tmp_path)
    write_json(root, data)
    plain = coco(root, "data.image_size=32")
    decodes.clear()
    cached = coco(root, "data.image_size=32", "data.cache=disk")
    assert len(decodes) == 4
    decodes.clear()
    again = coco(root, "data.image_size=32", "data.cache=disk")
    assert decodes == []
    for split in ("train", "val"):
        for i in range(len(getattr(plain, split))):
            (a, ta), (b, tb) = getattr(plain, split).load(i), getattr(again, split).load(i)
            assert torch.equal(a, b) and max(a.shape[-2:]) == 32
            assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
    # Boxes scale with the image: a.png (40x30, box [2, 3, 12, 8]) is prepared to 32x24.
    _, target = cached.train.load(0)
    assert target["boxes"][0].tolist() == pytest.approx([1.6, 2.4, 9.6, 6.4])


def test_masks_cached_equals_uncached(tmp_path, cache_dir, decodes):
    root = mask_tree(tmp_path)
    plain = masks(root, "data.image_size=24")
    decodes.clear()
    cached = masks(root, "data.image_size=24", "data.cache=memory")
    assert len(decodes) == 6
    for split in ("train", "val", "test"):
        for i in range(len(getattr(plain, split))):
            (a, ma), (b, mb) = getattr(plain, split).load(i), getattr(cached, split).load(i)
            assert torch.equal(a, b) and torch.equal(ma, mb) and ma.dtype == torch.int64
            assert tuple(ma.shape) == tuple(a.shape[-2:]) and max(a.shape[-2:]) == 24


def test_train_cached_and_uncached_give_the_same_metrics(tmp_path, cache_dir):
    from visiontrain.cli import main

    root = folder(tmp_path / "data")
    summaries = []
    for mode in ("none", "disk"):
        code = main(
            [
                "train",
                *folder_overrides(root, "data.batch_size=4", f"data.cache={mode}"),
                "model.width=4",
                "model.depth=2",
                "train.epochs=2",
                "train.progress=none",
                "run.report=false",
                f"run.dir={tmp_path / 'runs'}",
                f"run.name={mode}",
            ]
        )
        assert code == 0
        records = (tmp_path / "runs" / mode / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in records]
        summaries.append(
            [
                {k: v for k, v in r.items() if k in ("loss", "accuracy", "epoch", "split", "step")}
                for r in rows
                if r["split"] in ("train", "val", "test") and "loss" in r
            ]
        )
    assert summaries[0] == summaries[1] and summaries[0]


# ---------------------------------------------------------------- decoders


def test_decode_image_and_pil_paths_agree(tmp_path):
    """torchvision's decoders (libpng, libjpeg-turbo) against the PIL fallback."""
    for i, (h, w) in enumerate([(37, 53), (64, 48), (120, 90)]):
        arr = rng_image(i, h, w)
        # Smooth content, as photos are: JPEG of pure noise is a worst case for IDCT rounding.
        arr = np.cumsum(arr.astype(np.int64), axis=1) // (np.arange(w) + 1)[None, :, None]
        arr = arr.astype(np.uint8)
        png = write_image(tmp_path / f"{i}.png", arr)
        assert torch.equal(images.decode_file(png, 3), images._decode_pil(png, 3))
        grey = write_image(tmp_path / f"{i}-grey.png", arr[..., 0])
        assert torch.equal(images.decode_file(grey, 1), images._decode_pil(grey, 1))
        # RGB to grey: both use the ITU-R 601 weights but round differently, by one level.
        diff = (images.decode_file(png, 1).int() - images._decode_pil(png, 1).int()).abs()
        assert diff.max() <= 1
        jpg = write_image(tmp_path / f"{i}.jpg", arr, quality=90)
        a = images.decode_file(jpg, 3).to(torch.int16)
        b = images._decode_pil(jpg, 3).to(torch.int16)
        assert a.shape == b.shape == (3, h, w)
        diff = (a - b).abs().float()
        assert diff.mean() < 1.0 and diff.max() <= 4


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_no_transform_writes_into_the_cache(tmp_path, cache_dir, mode):
    """Loaded images are views of the store (no per-epoch copies): every preset's
    transforms must leave the stored pixels as they were."""
    from visiontrain.data.transforms import PRESETS

    root = folder(tmp_path / "data")
    for preset in PRESETS:
        extra = ["data.random_erasing=1.0"] if preset == "standard" else []
        cfg, bundle = bundle_for(root, f"data.augment={preset}", f"data.cache={mode}", *extra)
        store = bundle.train.base.store  # train is a subset: val is held out of it
        before = [store.get(i)[0].clone() for i in range(len(store))]
        loader = build_loader(bundle.train, bundle, cfg, train=True, seed=3, pin_memory=False)
        for batch in loader:
            batch["image"].add_(1)  # the batch is the loader's own memory, not the store's
        assert all(torch.equal(b, store.get(i)[0]) for i, b in enumerate(before)), preset
