"""Augmentation presets (torchvision.transforms.v2 on uint8 tensors) and device normalisation.

Augmentation runs on uint8 CHW tensors in the loader; conversion to float and
normalisation happen once, on the device, after the copy (:class:`Normalizer`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

Transform = Callable[[torch.Tensor], torch.Tensor]


def _fit(size: int) -> list[v2.Transform]:
    # Files come in any size: shorter side to `size`, then the centre square.
    return [v2.Resize(size, antialias=True), v2.CenterCrop(size)]


def _light(size: int, channels: int) -> list[v2.Transform]:
    return [
        v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"),
        v2.RandomHorizontalFlip(),
    ]


def _standard(size: int, channels: int) -> list[v2.Transform]:
    jitter = {"brightness": 0.3, "contrast": 0.3}
    if channels == 3:
        jitter["saturation"] = 0.3
    return [
        v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(**jitter),
    ]


PRESETS: dict[str, Callable[[int, int], list[v2.Transform]]] = {
    "none": lambda size, channels: [],
    "light": _light,
    "standard": _standard,
}


def build_transform(
    preset: str, size: int, channels: int, same_size: bool, train: bool
) -> Transform | None:
    """The transform for one split; evaluation never augments.

    Args:
        preset: ``none``, ``light`` or ``standard``.
        size: working image size.
        channels: image channels (colour jitter on saturation needs 3).
        same_size: images already are ``size`` x ``size`` (arrays resized at load).
        train: whether this is the training split.

    Returns:
        A callable on uint8 CHW tensors, or None when nothing is to be done.
    """
    steps: list[v2.Transform] = []
    if not same_size and not (train and preset == "standard"):
        steps.extend(_fit(size))
    if train:
        steps.extend(PRESETS[preset](size, channels))
    return v2.Compose(steps) if steps else None


class Normalizer(torch.nn.Module):
    """uint8 NCHW batch on the device → normalised float, in one fused pass."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.register_buffer("scale", 1.0 / s, persistent=False)
        self.register_buffer("shift", -m / s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.addcmul(self.shift, x.float(), self.scale)
