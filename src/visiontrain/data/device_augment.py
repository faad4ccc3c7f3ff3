"""Augmentation of whole batches on the device (``data.augment_on=device``).

For machines with few CPU cores per accelerator: the loader only decodes and fits each
image to the working size, and the random part runs here, on the uint8 batch after its
copy to the device, with a different draw for every sample (torchvision's v2 transforms
on a batch tensor draw one set of parameters for the whole batch).

The draws come from a generator seeded by (seed, epoch, batch, rank), so a run repeats
them, and a resumed run repeats them from the batch where it stopped.

Presets mirror the loader's (:mod:`visiontrain.data.transforms`):

* ``light``: a crop of the reflect-padded image (padding ``size // 8``) and a horizontal
  flip: integer pixel shifts, done by indexing, so no interpolation.
* ``standard``: a random resized crop (area 25-100%, aspect 3/4-4/3) with bilinear
  sampling (``affine_grid`` + ``grid_sample``; no antialiasing, unlike the loader's
  resize), a horizontal flip, then brightness, contrast and (colour) saturation jitter of
  ±30% with the loader's :func:`~visiontrain.data.transforms.jitter_colour`.
* ``affine``: the loader's ranges (rotation ±10°, shift ±10% of each side, scale
  0.9-1.1, no flip), one bilinear ``grid_sample`` per batch, outside filled with 0. The
  loader's ``v2.RandomAffine`` rounds the shift to whole pixels; this one does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from visiontrain.data.transforms import (
    AFFINE_DEGREES,
    AFFINE_SCALE,
    AFFINE_TRANSLATE,
    jitter_colour,
)
from visiontrain.errors import ConfigError
from visiontrain.seed import sample_seed

JITTER = 0.3
SCALE = (0.25, 1.0)
RATIO = (3 / 4, 4 / 3)


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device):
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def light(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Padded random crop and horizontal flip of a float (N, C, H, W) batch."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
    flip = torch.rand(n, generator=g, device=x.device) < 0.5
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = dy[:, None] + ar_h  # (N, H)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (N, W)
    idx = torch.arange(n, device=x.device)[:, None, None]
    # (N, H, W, C) gathered with advanced indexing, back to NCHW.
    out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def standard(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random resized crop, flip and colour jitter of a float (N, C, H, W) batch in 0-255."""
    n = x.shape[0]
    dev = x.device
    area = _uniform(n, *SCALE, g, dev)
    log_ratio = _uniform(n, math.log(RATIO[0]), math.log(RATIO[1]), g, dev)
    ratio = log_ratio.exp()
    # Crop width and height as fractions of the side (clamped: the crop stays inside).
    cw = (area * ratio).sqrt().clamp(max=1.0)
    ch = (area / ratio).sqrt().clamp(max=1.0)
    cx = _uniform(n, -1.0, 1.0, g, dev) * (1 - cw)
    cy = _uniform(n, -1.0, 1.0, g, dev) * (1 - ch)
    flip = torch.where(torch.rand(n, generator=g, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = cw * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    b, k, s = (_uniform(n, 1 - JITTER, 1 + JITTER, g, dev).view(n, 1, 1, 1) for _ in range(3))
    return jitter_colour(x, b, k, s)


def affine(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random rotation, shift and scale of a float (N, C, H, W) batch; no flip."""
    n = x.shape[0]
    dev = x.device
    angle = _uniform(n, -AFFINE_DEGREES, AFFINE_DEGREES, g, dev).deg2rad()
    scale = _uniform(n, *AFFINE_SCALE, g, dev)
    # Shifts in affine_grid's normalised units, where the whole side spans 2.
    shift = _uniform(2 * n, -AFFINE_TRANSLATE, AFFINE_TRANSLATE, g, dev).view(n, 2) * 2
    # affine_grid maps output to input coordinates, so theta is the inverse of the
    # content's motion: input = R(-angle) / scale @ (output - shift).
    cos, sin = angle.cos() / scale, angle.sin() / scale
    inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    theta = torch.cat([inv, -(inv @ shift[:, :, None])], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


PRESETS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "light": light,
    "standard": standard,
    "affine": affine,
}


class DeviceAugment:
    """Augments training batches on the device; a draw per sample, seeded per batch.

    Args:
        preset: ``light``, ``standard`` or ``affine`` (``data.augment``).
        seed: the run's seed.
        rank: the DDP rank (ranks hold different samples, so they draw differently).
    """

    def __init__(self, preset: str, seed: int, rank: int = 0) -> None:
        self.fn = PRESETS[preset]
        self.seed, self.rank = seed, rank

    def __call__(self, images: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        """A float (N, C, H, W) batch in 0-255 from a uint8 batch on the device."""
        g = torch.Generator(device=images.device)
        g.manual_seed(sample_seed(self.seed, epoch, batch * 4096 + self.rank))
        return self.fn(images.float(), g)


def check_augment_on(augment_on: str, augment: str, task: str) -> None:
    """Refuse device augmentation where it would do nothing or cannot follow the targets."""
    if augment_on != "device":
        return
    if task not in ("classification", "multilabel", "regression"):
        raise ConfigError(
            f"data.augment_on=device augments images only; task {task} must move its boxes "
            "or masks with them, which the loader's transforms do. Use data.augment_on=loader."
        )
    if augment == "none":
        raise ConfigError(
            f"data.augment_on=device with data.augment={augment}: there is nothing to "
            f"augment. Choose data.augment={' or '.join(PRESETS)}, or drop data.augment_on."
        )
    if augment not in PRESETS:
        # The policies (randaugment, trivialaugment, autoaugment) are torchvision's
        # per-image transforms; they have no batched version with a draw per sample here.
        raise ConfigError(
            f"data.augment={augment} runs in the loader only (torchvision's per-image "
            f"policy); data.augment_on=device supports data.augment={' or '.join(PRESETS)}. "
            "Use data.augment_on=loader, or one of those presets."
        )
