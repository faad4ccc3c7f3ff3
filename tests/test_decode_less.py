"""Decode less: large JPEGs decoded at reduced scale equal the full decode within a bound."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from visiontrain.data import images
from visiontrain.data.images import decode_file, prepare_image
from visiontrain.data.sources import FileSplit
from visiontrain.data.synthetic import photo_like
from visiontrain.errors import DataError


def photo(path: Path, width: int, height: int, quality: int = 90) -> Path:
    """A smooth, photo-like JPEG: gradients, discs and some texture (seeded)."""
    Image.fromarray(photo_like(width, height)).save(path, quality=quality)
    return path


@pytest.mark.parametrize(("channels", "fit"), [(3, "short"), (1, "short"), (3, "long")])
def test_reduced_decode_equals_full_decode_after_the_resize(tmp_path, channels, fit):
    path = photo(tmp_path / "big.jpg", 1600, 1200)
    full = prepare_image(decode_file(path, channels), 128, fit)[0]
    reduced = decode_file(path, channels, (128, fit))
    assert reduced.shape[-1] < 1600 / 2  # decoded at a reduced scale (1/4 or 1/8 here)
    fast = prepare_image(reduced, 128, fit)[0]
    assert fast.shape == full.shape and fast.dtype == torch.uint8
    diff = (fast.int() - full.int()).abs().float()
    assert diff.mean() < 1.5, diff.mean()
    assert (diff > 16).float().mean() < 0.002


def test_small_files_and_other_formats_decode_exactly_as_before(tmp_path):
    small = photo(tmp_path / "small.jpg", 200, 150)  # less than twice the prepared size
    assert torch.equal(decode_file(small, 3, (128, "short")), decode_file(small, 3))
    png = tmp_path / "big.png"
    Image.open(photo(tmp_path / "x.jpg", 1600, 1200)).save(png)
    assert torch.equal(decode_file(png, 3, (128, "short")), decode_file(png, 3))


def test_the_loader_path_decodes_less_and_the_cache_key_says_so(tmp_path, monkeypatch):
    path = photo(tmp_path / "big.jpg", 1600, 1200)
    split = FileSplit([path], [0], 3)
    split.working_size = 128
    seen = []
    real = images._decode_pil
    monkeypatch.setattr(
        images, "_decode_pil", lambda p, c, draft=None: seen.append(draft) or real(p, c, draft)
    )
    image, _ = split.load(0)
    h, w = images.prepared_size(1200, 1600, 128, "short")
    assert image.shape == (3, h, w) and seen == [(w, h)]
    assert "draft2" in split.prepare_settings()


def test_a_broken_large_jpeg_is_still_named(tmp_path):
    path = photo(tmp_path / "broken.jpg", 1600, 1200)
    path.write_bytes(path.read_bytes()[:2000])  # header intact, scan data cut off
    with pytest.raises(DataError, match=r"broken\.jpg"):
        prepare_image(decode_file(path, 3, (128, "short")), 128, "short")
