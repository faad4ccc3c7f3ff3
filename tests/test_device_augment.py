"""data.augment_on=device: per-sample draws on whole batches, repeatable, resumable."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from test_resume import _metrics, _weights, assert_same_weights
from visiontrain.config import load_config
from visiontrain.data import build_data
from visiontrain.data.device_augment import DeviceAugment, check_augment_on
from visiontrain.data.pipeline import build_loaders
from visiontrain.errors import ConfigError


def batch(n: int = 6, c: int = 3, size: int = 16, same: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1 if same else n, c, size, size), generator=g, dtype=torch.uint8)
    return x.expand(n, -1, -1, -1).contiguous() if same else x


def test_light_is_an_exact_shifted_or_flipped_crop_of_the_padded_image():
    x = batch()
    out = DeviceAugment("light", seed=1)(x, epoch=0, batch=0)
    pad = 16 // 8
    padded = F.pad(x.float(), (pad,) * 4, mode="reflect")
    for i in range(len(x)):
        candidates = [
            padded[i, :, dy : dy + 16, dx : dx + 16] for dy in range(5) for dx in range(5)
        ]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates), i


def test_draws_repeat_for_the_same_batch_and_differ_per_sample_and_batch():
    x = batch(same=True)
    aug = DeviceAugment("standard", seed=7)
    a = aug(x, epoch=1, batch=3)
    assert torch.equal(a, aug(x, epoch=1, batch=3))
    assert not torch.equal(a, aug(x, epoch=1, batch=4))
    assert not torch.equal(a, aug(x, epoch=2, batch=3))
    # One image repeated six times: every sample gets its own crop, flip and jitter.
    assert len({tuple(a[i].flatten()[:64].tolist()) for i in range(len(a))}) == len(a)
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 255
    assert not torch.equal(a, DeviceAugment("standard", seed=7, rank=1)(x, 1, 3))


def test_standard_works_on_grey_images():
    out = DeviceAugment("standard", seed=0)(batch(c=1), 0, 0)
    assert out.shape == (6, 1, 16, 16)


@pytest.mark.parametrize(
    ("augment", "task", "message"),
    [
        ("light", "detection", "boxes"),
        ("standard", "segmentation", "masks"),
        ("none", "classification", "nothing to augment"),
    ],
)
def test_device_augmentation_is_refused_where_it_cannot_apply(augment, task, message):
    with pytest.raises(ConfigError, match=message):
        check_augment_on("device", augment, task)
    check_augment_on("loader", augment, task)  # the loader handles every case


def test_the_loader_leaves_the_random_part_to_the_device():
    cfg = load_config(None, [*TINY, "data.augment=light", "data.augment_on=device"])
    bundle = build_data(cfg.data, cfg.task)
    loaders = build_loaders(cfg, bundle, torch.device("cpu"))
    first = next(iter(loaders.train))
    # Unaugmented: exactly the stored images of the batch's indices.
    sampler = loaders.train.batch_sampler
    sampler.set_epoch(0)
    indices = [i for _, i in next(iter(sampler))]
    expected = torch.stack([bundle.train.load(i)[0] for i in indices])
    assert torch.equal(first["image"], expected)


@pytest.mark.parametrize("preset", ["light", "standard", "affine"])
def test_training_on_the_device_trains_and_resumes_exactly(cli, tmp_path, preset):
    args = [*TINY, "data.augment_on=device", f"data.augment={preset}", "train.deterministic=true",
            "train.log_every=2", "schedule.name=none", f"run.dir={tmp_path}"]  # fmt: skip
    full = cli("train", *args, "train.epochs=2", "run.name=full")
    assert full.code == 0, full.err
    half = cli("train", *args, "train.epochs=1", "run.name=half")
    resumed = cli("train", *args, "train.epochs=2", "run.name=half", "run.resume=auto")
    assert half.code == 0 and resumed.code == 0, resumed.err
    assert_same_weights(_weights(tmp_path / "full"), _weights(tmp_path / "half"))
    assert [m for m in _metrics(tmp_path / "full") if m["split"] != "test"] == [
        m for m in _metrics(tmp_path / "half") if m["split"] != "test"
    ]
    plain = cli("train", *TINY, f"data.augment={preset}", "train.epochs=2",
                f"run.dir={tmp_path}", "run.name=loader")  # fmt: skip
    assert plain.code == 0
    # A different augmentation stream from the loader's: the losses differ.
    losses = [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").open()]
    other = [json.loads(x)["loss"] for x in (tmp_path / "loader" / "metrics.jsonl").open()]
    assert losses != other


def test_affine_rotates_shifts_and_scales_within_its_ranges_without_flipping():
    # A centred square: rotation about the centre keeps its centre of mass, so the centre
    # moves by the shift alone (at most 10% of the side), and its area by the scale².
    x = torch.zeros(64, 1, 40, 40, dtype=torch.uint8)
    x[:, :, 14:26, 14:26] = 255
    out = DeviceAugment("affine", seed=3)(x, epoch=0, batch=0)
    mass = out.sum(dim=(1, 2, 3))
    assert ((mass / (255 * 144)).sub(1).abs() <= 0.21 + 0.02).all()
    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    cy = (out[:, 0] * ys).sum(dim=(1, 2)) / mass
    cx = (out[:, 0] * xs).sum(dim=(1, 2)) / mass
    assert (cy - 19.5).abs().max() <= 4.0 + 0.1 and (cx - 19.5).abs().max() <= 4.0 + 0.1
    assert (cx - 19.5).abs().max() > 2.0  # it does shift
    # An L shape is never mirrored: its corner stays on the left and at the bottom.
    ell = torch.zeros(32, 1, 40, 40, dtype=torch.uint8)
    ell[:, :, 8:32, 8:14] = 255
    ell[:, :, 26:32, 8:32] = 255
    moved = DeviceAugment("affine", seed=4)(ell, epoch=0, batch=0)[:, 0]
    left, right = moved[:, :, :20].sum(dim=(1, 2)), moved[:, :, 20:].sum(dim=(1, 2))
    top, bottom = moved[:, :20].sum(dim=(1, 2)), moved[:, 20:].sum(dim=(1, 2))
    assert (left > right).all() and (bottom > top).all()
