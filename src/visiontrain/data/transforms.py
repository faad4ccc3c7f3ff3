"""Augmentation presets (torchvision.transforms.v2 on uint8 tensors) and device normalisation.

Presets are a registry (:data:`PRESETS`): ``none``, ``light``, ``standard``, ``affine``
(small rotations, shifts and scaling without flips: digits, text, other data that is
not mirror-symmetric) and the
torchvision policies ``randaugment``, ``trivialaugment``, ``autoaugment`` (``standard``'s
crop and flip, then the policy); ``data.random_erasing`` follows any of them.

Augmentation runs on uint8 CHW tensors in the loader; conversion to float and
normalisation happen once, on the device, after the copy (:class:`Normalizer`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from visiontrain.config import DataConfig
from visiontrain.errors import ConfigError

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AugmentOptions:
    """The training augmentation: a preset and its knobs (``data.augment*``).

    Args:
        preset: the ``data.augment`` preset, a key of :data:`PRESETS`.
        magnitude: RandAugment's magnitude, 0-30 (``data.augment_magnitude``; None: 9).
        ops: RandAugment's ops per image (``data.augment_ops``; None: 2).
        policy: AutoAugment's policy (``data.autoaugment_policy``; None: imagenet).
        random_erasing: probability of erasing one rectangle after the preset (0: off).
    """

    preset: str = "none"
    magnitude: int | None = None
    ops: int | None = None
    policy: str | None = None
    random_erasing: float = 0.0


def _fit(size: int) -> list[v2.Transform]:
    # Files come in any size: shorter side to `size`, then the centre square.
    return [v2.Resize(size, antialias=True), v2.CenterCrop(size)]


def _light(size: int, channels: int, opts: AugmentOptions) -> list[v2.Transform]:
    return [
        v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"),
        v2.RandomHorizontalFlip(),
    ]


class FusedColorJitter(v2.Transform):
    """Brightness, contrast and (colour) saturation jitter in one float pass over uint8.

    ``v2.ColorJitter`` converts to float and back and clamps once per adjustment, in a
    random order; on a 224 px image that is 0.9 ms of a loader worker's time per sample.
    This draws the three factors in ``[1 - amount, 1 + amount]``, applies them in a fixed
    order (brightness, contrast about the mean grey, saturation about each pixel's grey;
    grey is ITU-R 601 luma, as torchvision's) in one float pass, and clamps once: about
    0.3 ms. The draws come from torch's global generator, which the loader seeds per
    sample. Tensors only (the classification pipeline; detection and segmentation keep
    ``v2.ColorJitter``, which moves with their boxes and masks).
    """

    def __init__(self, amount: float) -> None:
        super().__init__()
        self.amount = amount

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, c, s = (1 + (torch.rand(3) * 2 - 1) * self.amount).tolist()
        return jitter_colour(image.float(), b, c, s).to(torch.uint8)


Factor = float | torch.Tensor


def jitter_colour(x: torch.Tensor, b: Factor, c: Factor, s: Factor) -> torch.Tensor:
    """Brightness ``b``, contrast ``c``, saturation ``s`` of float images in 0-255, in place.

    ``x`` is (C, H, W) or (N, C, H, W); the factors are numbers or tensors broadcasting to
    (N, 1, 1, 1) (a draw per sample). Applied in that order (contrast about the mean
    grey, saturation about each pixel's grey; grey is ITU-R 601 luma, as torchvision's),
    the three compose into one affine map per pixel, computed in one pass and clamped
    once:  out = s·c·b·x + c·b·(1 - s)·grey + (1 - c)·b·mean(grey).
    """
    if x.shape[-3] == 3:
        grey = x[..., 0:1, :, :] * 0.299
        grey.add_(x[..., 1:2, :, :], alpha=0.587).add_(x[..., 2:3, :, :], alpha=0.114)
    else:
        grey, s = x.clone(), 1.0  # one channel: no saturation to change
    mean = grey.mean(dim=(-3, -2, -1), keepdim=True)
    grey.mul_(c * b * (1 - s)).add_((1 - c) * b * mean)
    return x.mul_(s * c * b).add_(grey).clamp_(0, 255)


# The random resized crop's share of the image's area (`standard` and the policies).
CROP_SCALE = (0.25, 1.0)
JITTER = 0.3


class CropFlipJitter(v2.Transform):
    """``RandomResizedCrop``, ``RandomHorizontalFlip`` and :class:`FusedColorJitter` at once.

    The parameters are drawn exactly as ``v2.Compose([v2.RandomResizedCrop(size, scale,
    antialias=True), v2.RandomHorizontalFlip(), FusedColorJitter(jitter)])`` draws them,
    from the same generator in the same order (the crop by ``v2.RandomResizedCrop``'s own
    ``make_params``), so a seed gives the same crops, flips and factors. The pixels are
    made by OpenCV kernels on the channels-last image (:mod:`visiontrain.data.kernels`):
    the crop resized once, flipped, and jittered by one colour matrix in one saturating
    pass; within about one grey level of the torchvision path (bounds tested in
    ``tests/test_kernels.py``). Plain uint8 tensors only: the classification pipeline.

    Args:
        size: the output side.
        scale: the crop's share of the image's area.
        jitter: brightness, contrast and saturation amount (0: no colour jitter).
    """

    def __init__(self, size: int, scale: tuple[float, float] = CROP_SCALE, jitter: float = 0.0):
        super().__init__()
        self.crop = v2.RandomResizedCrop(size, scale=scale, antialias=True)
        self.size = (size, size)
        self.jitter = jitter

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # noqa: D102
        from visiontrain.data import kernels

        box = self.crop.make_params([image])
        # v2.RandomHorizontalFlip flips unless rand >= p. Plain floats from here on: per
        # sample, tensor arithmetic on one to three numbers costs more than the pixels.
        flip = torch.rand(1).item() < 0.5
        out = kernels.resized_crop(
            kernels.hwc_view(image),
            box["top"],
            box["left"],
            box["height"],
            box["width"],
            self.size,
        )
        if flip:
            out = kernels.hflip(out)
        if self.jitter:
            b, c, s = (1 + (2 * u - 1) * self.jitter for u in torch.rand(3).tolist())
            if out.shape[2] in (1, 3):
                kernels.jitter(out, b, c, s)
            else:  # cv2.transform takes at most 4 channels: the torch path for the rest
                x = kernels.as_chw(out).float()
                return jitter_colour(x, b, c, s).to(torch.uint8)
        return kernels.as_chw(out)


def _crop_flip(size: int) -> list[v2.Transform]:
    # The geometry of `standard` (its resized crop ends at the working size by itself).
    return [CropFlipJitter(size)]


def _standard(size: int, channels: int, opts: AugmentOptions) -> list[v2.Transform]:
    return [CropFlipJitter(size, jitter=JITTER)]


# `affine`: rotation, shift and scale, never a flip (a mirrored 2 is no digit). The same
# ranges are drawn per sample by the device version (visiontrain.data.device_augment).
AFFINE_DEGREES = 10.0
AFFINE_TRANSLATE = 0.1
AFFINE_SCALE = (0.9, 1.1)


def _affine(size: int, channels: int, opts: AugmentOptions) -> list[v2.Transform]:
    return [
        v2.RandomAffine(
            degrees=AFFINE_DEGREES,
            translate=(AFFINE_TRANSLATE, AFFINE_TRANSLATE),
            scale=AFFINE_SCALE,
            interpolation=v2.InterpolationMode.BILINEAR,
        )
    ]


# The policies' own shears, translations and rotations interpolate bilinearly (as
# torchvision's reference recipes do; their default is nearest) and fill with 0 on any
# channel count. Every op of the three policies takes 1- and 3-channel uint8 (tested).
_POLICY = {"interpolation": v2.InterpolationMode.BILINEAR}


def _randaugment(size: int, channels: int, opts: AugmentOptions) -> list[v2.Transform]:
    ops = 2 if opts.ops is None else opts.ops
    magnitude = 9 if opts.magnitude is None else opts.magnitude
    return [*_crop_flip(size), v2.RandAugment(num_ops=ops, magnitude=magnitude, **_POLICY)]


def _trivialaugment(size: int, channels: int, opts: AugmentOptions) -> list[v2.Transform]:
    return [*_crop_flip(size), v2.TrivialAugmentWide(**_POLICY)]


def _autoaugment(size: int, channels: int, opts: AugmentOptions) -> list[v2.Transform]:
    policy = v2.AutoAugmentPolicy(opts.policy or "imagenet")
    return [*_crop_flip(size), v2.AutoAugment(policy, **_POLICY)]


@dataclass(frozen=True)
class Preset:
    """One ``data.augment`` preset for classification and regression.

    Args:
        build: ``(size, channels, options) -> transforms`` on uint8 CHW tensors.
        resizes: the transforms end at the working size themselves (a resized crop), so
            images of another size are not fitted first.
        uses: the optional ``data.*`` knobs it reads; any other one set is refused.
    """

    build: Callable[[int, int, AugmentOptions], list[v2.Transform]]
    resizes: bool = False
    uses: frozenset[str] = frozenset()


PRESETS: dict[str, Preset] = {
    "none": Preset(lambda size, channels, opts: []),
    "light": Preset(_light),
    "standard": Preset(_standard, resizes=True),
    "affine": Preset(_affine),
    "randaugment": Preset(
        _randaugment, resizes=True, uses=frozenset({"augment_magnitude", "augment_ops"})
    ),
    "trivialaugment": Preset(_trivialaugment, resizes=True),
    "autoaugment": Preset(_autoaugment, resizes=True, uses=frozenset({"autoaugment_policy"})),
}
# The optional data.* keys that belong to a preset: None unless set, refused when set for
# a preset that does not read them.
AUGMENT_KEYS: frozenset[str] = frozenset().union(*(p.uses for p in PRESETS.values()))


def augment_options(cfg: DataConfig) -> AugmentOptions:
    """The ``data.augment*`` and ``data.random_erasing`` options, checked against the preset.

    Raises:
        ConfigError: a knob is set that the preset does not use (it would be ignored), or
            ``data.random_erasing`` is set with ``data.augment_on=device``.
    """
    preset = PRESETS[cfg.augment]
    for key in sorted(AUGMENT_KEYS - preset.uses):
        if getattr(cfg, key) is not None:
            users = [name for name, p in PRESETS.items() if key in p.uses]
            raise ConfigError(
                f"data.{key}={getattr(cfg, key)} is set, but data.augment={cfg.augment} "
                f"does not use it, so it would be ignored. Remove data.{key}, or set "
                f"data.augment={' or '.join(users)}."
            )
    if cfg.random_erasing > 0 and cfg.augment_on == "device":
        raise ConfigError(
            f"data.random_erasing={cfg.random_erasing} erases in the loader, after the "
            "loader's augmentation; with data.augment_on=device the loader does not "
            "augment, so it would be skipped. Use data.augment_on=loader, or remove "
            "data.random_erasing."
        )
    return AugmentOptions(
        cfg.augment,
        cfg.augment_magnitude,
        cfg.augment_ops,
        cfg.autoaugment_policy,
        cfg.random_erasing,
    )


def build_transform(
    augment: AugmentOptions | str, size: int, channels: int, same_size: bool, train: bool
) -> Transform | None:
    """The transform for one split; evaluation never augments.

    Args:
        augment: the options (:func:`augment_options`), or a preset name with its defaults.
        size: working image size.
        channels: image channels (colour jitter on saturation needs 3).
        same_size: images already are ``size`` x ``size`` (arrays resized at load).
        train: whether this is the training split.

    Returns:
        A callable on uint8 CHW tensors, or None when nothing is to be done.
    """
    opts = AugmentOptions(augment) if isinstance(augment, str) else augment
    preset = PRESETS[opts.preset]
    steps: list[v2.Transform] = []
    if not same_size and not (train and preset.resizes):
        steps.extend(_fit(size))
    if train:
        steps.extend(preset.build(size, channels, opts))
        if opts.random_erasing > 0:
            # After every other step, on the uint8 image: one rectangle (2-33% of the area,
            # aspect 0.3-3.3) set to 0. torchvision's value="random" draws N(0, 1), noise
            # only for normalised floats; cast to uint8 it is not noise.
            steps.append(v2.RandomErasing(p=opts.random_erasing, value=0))
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
        # A float copy, then scale and shift in place: on the CPU this is 2x faster than
        # one out-of-place addcmul (whose broadcast kernel is slower than mul_ and add_,
        # and which allocates a second batch-sized buffer). The copy is explicit so that a
        # float input is never modified.
        return x.to(torch.float32, copy=True).mul_(self.scale).add_(self.shift)


# ----------------------------------------------------------------- detection, segmentation

PairTransform = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]
# Padding and crops fill masks with the ignore label, so filled pixels are never scored.
_FILL = {tv_tensors.Mask: 255, "others": 0}


def _dense_presets(size: int) -> dict[str, list[v2.Transform]]:
    return {
        "none": [],
        "light": [v2.RandomHorizontalFlip()],
        "standard": [
            v2.ScaleJitter((size, size), scale_range=(0.6, 1.4), antialias=True),
            v2.RandomCrop(size, pad_if_needed=True, fill=_FILL),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
        ],
        # RandomAffine moves boxes (to the box around the moved corners) and masks
        # (nearest) with the image; the area it uncovers is ignore in a mask.
        "affine": [
            v2.RandomAffine(
                degrees=AFFINE_DEGREES,
                translate=(AFFINE_TRANSLATE, AFFINE_TRANSLATE),
                scale=AFFINE_SCALE,
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=_FILL,
            )
        ],
    }


class _FitSquare(v2.Transform):
    """Longer side to ``size`` (aspect kept), then pad right and bottom to a square.

    Boxes keep their pixels' coordinates; a batch of any-size files stacks.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        image = sample[0]
        h, w = image.shape[-2:]
        scale = self.size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        sample = v2.Resize((nh, nw), antialias=True)(sample)
        pad = [0, 0, self.size - nw, self.size - nh]
        return v2.Pad(pad, fill=_FILL)(sample)


def fit_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 CHW image of any size as the ``size`` x ``size`` square the model was fed."""
    return _FitSquare(size)(tv_tensors.Image(image)).as_subclass(torch.Tensor)


def build_pair_transform(
    task: str, augment: AugmentOptions | str, size: int, same_size: bool, train: bool
) -> PairTransform | None:
    """Joint image/target transform for detection and segmentation (torchvision v2).

    Boxes and masks move with the image (flip, scale jitter, crop); boxes are clamped to
    the image and those left empty are removed with their labels.

    Args:
        task: ``detection`` or ``segmentation``.
        augment: the options (:func:`augment_options`) or a preset name: ``none``,
            ``light`` (flip), ``standard`` (scale jitter, crop, flip, colour) or
            ``affine`` (rotation, shift, scale).
        size: working image size (square).
        same_size: images already are ``size`` x ``size``.
        train: whether this is the training split (evaluation never augments).

    Returns:
        A callable ``(uint8 CHW image, target) -> (image, target)`` on plain tensors, or
        None when there is nothing to do.

    Raises:
        ConfigError: a preset or ``data.random_erasing`` that cannot move the targets.
    """
    opts = AugmentOptions(augment) if isinstance(augment, str) else augment
    presets = _dense_presets(size)
    if opts.preset not in presets:
        # torchvision 0.26's RandAugment, TrivialAugmentWide and AutoAugment raise
        # TypeError on BoundingBoxes and Mask: their shears, shifts and rotations would
        # leave the targets behind.
        raise ConfigError(
            f"data.augment={opts.preset} is an image-only policy: torchvision's policy "
            f"transforms cannot move bounding boxes or masks, so task {task} cannot use "
            f"it. Use data.augment={', '.join(presets)} (standard: scale jitter, crop, "
            "flip and colour jitter, with the targets)."
        )
    if opts.random_erasing > 0:
        raise ConfigError(
            f"data.random_erasing={opts.random_erasing} erases image pixels and leaves "
            f"the {'boxes' if task == 'detection' else 'masks'} as they were, so task "
            f"{task} would learn objects that are not there; it is for classification "
            "and regression. Remove data.random_erasing."
        )
    steps: list[v2.Transform] = [] if same_size else [_FitSquare(size)]
    if train:
        steps.extend(presets[opts.preset])
    if task == "detection":
        steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)]
    if not steps:
        return None
    compose = v2.Compose(steps)

    def apply(image: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any]:
        if task == "detection":
            boxes = tv_tensors.BoundingBoxes(
                target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:])
            )
            wrapped = {**target, "boxes": boxes}
            out_image, out = compose(tv_tensors.Image(image), wrapped)
            out = {
                **out,
                "boxes": out["boxes"].as_subclass(torch.Tensor).float(),
                "labels": out["labels"],
            }
        else:
            out_image, mask = compose(tv_tensors.Image(image), tv_tensors.Mask(target))
            out = mask.as_subclass(torch.Tensor).long()
        return out_image.as_subclass(torch.Tensor), out

    return apply
