"""The OpenCV augmentation kernels draw what transforms.v2 draws and stay near its pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.datasets import load_sample_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from visiontrain.data import kernels
from visiontrain.data.images import channels_last, prepare_image
from visiontrain.data.transforms import CROP_SCALE, JITTER, CropFlipJitter, jitter_colour

SEEDS = range(150)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """A real photo (scikit-learn ships it), prepared to a 64 px short side as the loader does."""
    image = torch.from_numpy(np.array(load_sample_image("china.jpg"))).permute(2, 0, 1)
    return prepare_image(image, 64, "short")[0]


class Recorder:
    """Records the parameters each path applies, by wrapping what applies them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.boxes: list[tuple[int, int, int, int]] = []
        self.flips: list[bool] = []
        self.factors: list[tuple[float, float, float]] = []
        self.monkeypatch = monkeypatch

    def ours(self) -> None:
        real_crop, real_flip, real_jitter = kernels.resized_crop, kernels.hflip, kernels.jitter

        def crop(image, top, left, height, width, size):
            self.boxes.append((top, left, height, width))
            self.flips.append(False)
            return real_crop(image, top, left, height, width, size)

        def flip(image):
            self.flips[-1] = True
            return real_flip(image)

        def jitter(image, b, c, s):
            self.factors.append((b, c, s))
            real_jitter(image, b, c, s)

        self.monkeypatch.setattr(kernels, "resized_crop", crop)
        self.monkeypatch.setattr(kernels, "hflip", flip)
        self.monkeypatch.setattr(kernels, "jitter", jitter)


def reference(size: int) -> v2.Compose:
    """What ``standard`` was before the kernels: torchvision's transforms, recorded."""
    from visiontrain.data.transforms import FusedColorJitter

    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=CROP_SCALE, antialias=True),
            v2.RandomHorizontalFlip(),
            FusedColorJitter(JITTER),
        ]
    )


def test_parameters_are_drawn_exactly_as_torchvision_draws_them(photo, monkeypatch):
    """Same seed, same crop boxes, flips and jitter factors; their histograms are v2's."""
    ref = reference(48)
    ref_boxes, ref_flips, ref_factors = [], [], []
    crop_params = ref.transforms[0].make_params
    for seed in SEEDS:
        torch.manual_seed(seed)
        box = crop_params([photo])
        ref_boxes.append((box["top"], box["left"], box["height"], box["width"]))
        ref_flips.append(bool(torch.rand(1) < 0.5))
        ref_factors.append(tuple((1 + (torch.rand(3) * 2 - 1) * JITTER).tolist()))

    rec = Recorder(monkeypatch)
    rec.ours()
    ours = CropFlipJitter(48, jitter=JITTER)
    for seed in SEEDS:
        torch.manual_seed(seed)
        ours(photo)
    assert rec.boxes == ref_boxes
    assert rec.flips == ref_flips
    assert np.allclose(rec.factors, ref_factors)

    # And those draws are what torchvision's own transforms apply, checked on their
    # histograms: v2.RandomResizedCrop's crop area and aspect, the flip rate, the factors.
    h, w = photo.shape[-2:]
    boxes = np.array(rec.boxes, float)
    area = boxes[:, 2] * boxes[:, 3] / (h * w)
    aspect = boxes[:, 3] / boxes[:, 2]
    assert area.min() >= CROP_SCALE[0] * 0.9 and area.max() <= 1.0
    assert aspect.min() >= 0.7 and aspect.max() <= 1.45
    v2_areas = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        out = ref.transforms[0].make_params([photo])
        v2_areas.append(out["height"] * out["width"] / (h * w))
    assert np.histogram(area, bins=10, range=(0, 1))[0].tolist() == (
        np.histogram(v2_areas, bins=10, range=(0, 1))[0].tolist()
    )
    assert 0.35 < np.mean(rec.flips) < 0.65
    factors = np.array(rec.factors)
    for column in factors.T:
        uniform = stats.kstest(column, "uniform", args=(1 - JITTER, 2 * JITTER))
        assert uniform.pvalue > 0.01


def _torchvision_pixels(image, size, box, flip, factors):
    out = F.resized_crop(image, box[0], box[1], box[2], box[3], [size, size], antialias=True)
    if flip:
        out = F.horizontal_flip(out)
    return jitter_colour(out.float(), *factors).round_().to(torch.uint8)


@pytest.mark.parametrize("size", [224, 48])
def test_pixels_stay_within_a_grey_level_of_torchvision(size, monkeypatch):
    """On the same parameters: enlarged crops within 4 levels everywhere, shrunk ones close.

    Enlarging, OpenCV's bilinear is torch's filter with other rounding; shrinking (by at
    most 1.5x, beyond which torch's antialiased kernel runs), bilinear reads fewer
    source pixels than the antialiased filter, which shows at sharp edges only.
    """
    image = torch.from_numpy(np.array(load_sample_image("china.jpg"))).permute(2, 0, 1)
    image = prepare_image(image, size, "short")[0]
    rec = Recorder(monkeypatch)
    rec.ours()
    ours = CropFlipJitter(size, jitter=JITTER)
    worst = {"up": 0.0, "down": 0.0}
    for seed in range(60):
        torch.manual_seed(seed)
        got = ours(image)
        box, flip, factors = rec.boxes[-1], rec.flips[-1], rec.factors[-1]
        want = _torchvision_pixels(image, size, box, flip, factors)
        assert got.shape == want.shape == (3, size, size) and got.dtype == torch.uint8
        diff = (got.int() - want.int()).abs().float()
        if max(box[2], box[3]) <= size:
            assert diff.max() <= 4, (box, diff.max())
            worst["up"] = max(worst["up"], diff.mean().item())
        else:
            assert (diff > 8).float().mean() <= 0.03, box
            worst["down"] = max(worst["down"], diff.mean().item())
    assert worst["up"] <= 0.5 and worst["down"] <= 1.5, worst


def test_grey_images_and_other_layouts():
    """One channel stays one channel; a contiguous CHW input gives what an HWC one gives."""
    rng = np.random.default_rng(0)
    grey = torch.from_numpy(rng.integers(0, 256, (1, 40, 50), dtype=np.uint8))
    ours = CropFlipJitter(32, jitter=JITTER)
    torch.manual_seed(1)
    out = ours(grey)
    assert out.shape == (1, 32, 32) and out.dtype == torch.uint8
    colour = torch.from_numpy(rng.integers(0, 256, (3, 40, 50), dtype=np.uint8))
    torch.manual_seed(2)
    a = ours(colour.contiguous())
    torch.manual_seed(2)
    b = ours(channels_last(colour))
    assert torch.equal(a, b)


def test_jitter_matrix_is_the_fused_float_jitter():
    """One colour matrix per image = jitter_colour's arithmetic, rounded once.

    Within one level everywhere (OpenCV rounds its uint8 matrix product in its own
    precision) and about a quarter level on average: no bias.
    """
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for b, c, s in [(1.2, 0.8, 1.3), (0.7, 1.3, 0.7), (1.0, 1.0, 1.0)]:
        want = jitter_colour(torch.from_numpy(image).permute(2, 0, 1).float(), b, c, s)
        got = image.copy()
        kernels.jitter(got, b, c, s)
        diff = got.astype(float) - want.permute(1, 2, 0).numpy()
        assert np.abs(diff).max() <= 1.0 and np.abs(diff).mean() <= 0.3
        assert abs(diff.mean()) <= 0.05
