"""Policy augmentation (RandAugment, TrivialAugmentWide, AutoAugment) and random erasing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from conftest import TINY
from visiontrain.config import build_config
from visiontrain.data import build_data
from visiontrain.data.device_augment import check_augment_on
from visiontrain.data.loaders import build_loader
from visiontrain.data.transforms import (
    AUGMENT_KEYS,
    PRESETS,
    AugmentOptions,
    CropFlipJitter,
    augment_options,
    build_pair_transform,
    build_transform,
)
from visiontrain.errors import ConfigError

POLICIES = ["randaugment", "trivialaugment", "autoaugment"]
POLICY_CLASSES = {
    "randaugment": v2.RandAugment,
    "trivialaugment": v2.TrivialAugmentWide,
    "autoaugment": v2.AutoAugment,
}


def data_cfg(*overrides: str):
    return build_config(overrides=list(overrides)).data


def steps_of(transform) -> list[v2.Transform]:
    assert isinstance(transform, v2.Compose)
    return list(transform.transforms)


def the(kind: type, transform) -> v2.Transform:
    (found,) = [t for t in steps_of(transform) if isinstance(t, kind)]
    return found


# ------------------------------------------------------------------ images in, images out


@pytest.mark.parametrize("preset", POLICIES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("height", "width"), [(16, 16), (23, 31)])
def test_policy_presets_give_uint8_images_of_the_working_size(preset, channels, height, width):
    size = 16
    opts = AugmentOptions(preset, random_erasing=0.5)
    transform = build_transform(
        opts, size, channels, same_size=(height, width) == (16, 16), train=True
    )
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=gen)
    torch.manual_seed(0)
    outs = [transform(image) for _ in range(30)]
    for out in outs:
        assert out.dtype == torch.uint8 and out.shape == (channels, size, size)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # it does draw


@pytest.mark.parametrize("preset", POLICIES)
def test_policy_presets_keep_the_standard_geometry_instead_of_colour_jitter(preset):
    steps = steps_of(build_transform(preset, 16, 3, same_size=False, train=True))
    kinds = [type(t) for t in steps]
    # The resized crop ends at the working size, so nothing fits the image first.
    assert kinds == [CropFlipJitter, POLICY_CLASSES[preset]]
    assert steps[0].jitter == 0  # the policy replaces standard's colour jitter
    assert steps[-1].interpolation == v2.InterpolationMode.BILINEAR
    assert build_transform(preset, 16, 3, same_size=True, train=False) is None  # eval


@pytest.mark.parametrize("policy", [v2.RandAugment(), v2.TrivialAugmentWide(), v2.AutoAugment()])
def test_every_policy_op_runs_on_grey_images(policy):
    # Op by op, through the policy's own dispatch, as each draw would apply it: the colour
    # ops (Color, Solarize, Posterize, Equalize, AutoContrast, ...) take 1-channel uint8
    # and treat it as each channel of the same grey image in RGB.
    grey = torch.randint(
        0, 256, (1, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    rgb = grey.expand(3, -1, -1).clone()
    for name, (magnitudes, _) in policy._AUGMENTATION_SPACE.items():
        bins = magnitudes(31, 24, 24)
        magnitude = float(bins[20]) if bins is not None and bins.ndim > 0 else 0.0
        kw = {"interpolation": v2.InterpolationMode.BILINEAR, "fill": policy._fill}
        out = policy._apply_image_or_video_transform(grey, name, magnitude, **kw)
        out_rgb = policy._apply_image_or_video_transform(rgb, name, magnitude, **kw)
        assert out.dtype == torch.uint8 and out.shape == grey.shape, name
        assert (out.int() - out_rgb.int()).abs().max() <= 1, name


# ------------------------------------------------------------------------------- knobs


def test_randaugment_knobs_reach_torchvision():
    cfg = data_cfg("data.augment=randaugment", "data.augment_magnitude=13", "data.augment_ops=3")
    op = the(v2.RandAugment, build_transform(augment_options(cfg), 16, 3, True, True))
    assert (op.num_ops, op.magnitude) == (3, 13)
    default = the(v2.RandAugment, build_transform("randaugment", 16, 3, True, True))
    assert (default.num_ops, default.magnitude) == (2, 9)


@pytest.mark.parametrize("policy", ["imagenet", "cifar10", "svhn"])
def test_autoaugment_policy_reaches_torchvision(policy):
    cfg = data_cfg("data.augment=autoaugment", f"data.autoaugment_policy={policy}")
    op = the(v2.AutoAugment, build_transform(augment_options(cfg), 16, 3, True, True))
    assert op.policy == v2.AutoAugmentPolicy(policy)
    default = the(v2.AutoAugment, build_transform("autoaugment", 16, 3, True, True))
    assert default.policy == v2.AutoAugmentPolicy.IMAGENET


@pytest.mark.parametrize(
    ("augment", "key", "value"),
    [
        ("light", "augment_magnitude", "5"),
        ("standard", "augment_ops", "3"),
        ("trivialaugment", "augment_magnitude", "5"),
        ("autoaugment", "augment_ops", "1"),
        ("randaugment", "autoaugment_policy", "cifar10"),
        ("none", "autoaugment_policy", "svhn"),
    ],
)
def test_a_knob_the_preset_does_not_use_is_refused(augment, key, value):
    cfg = data_cfg(f"data.augment={augment}", f"data.{key}={value}")
    with pytest.raises(ConfigError, match=rf"data\.{key}=.*data\.augment={augment}"):
        augment_options(cfg)


def test_every_knob_is_a_data_key_unset_by_default():
    cfg = data_cfg()
    assert {"augment_magnitude", "augment_ops", "autoaugment_policy"} == AUGMENT_KEYS
    assert all(getattr(cfg, key) is None for key in AUGMENT_KEYS)
    assert set(PRESETS) == set(POLICY_CLASSES) | {"none", "light", "standard", "affine"}


@pytest.mark.parametrize(
    "override",
    ["data.augment_magnitude=31", "data.augment_ops=0", "data.autoaugment_policy=coco"],
)
def test_knob_values_out_of_range_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[1]):
        data_cfg("data.augment=randaugment", override)


# ------------------------------------------------------------------------ random erasing


def test_random_erasing_erases_one_rectangle_to_zero_last():
    image = torch.full((3, 16, 16), 200, dtype=torch.uint8)
    transform = build_transform(AugmentOptions("light", random_erasing=1.0), 16, 3, True, True)
    assert isinstance(steps_of(transform)[-1], v2.RandomErasing)  # after the preset
    torch.manual_seed(0)
    for _ in range(10):
        out = transform(image)
        erased = (out == 0).all(dim=0)
        assert erased.any() and ((out == 0) | (out == 200)).all()
        ys, xs = torch.nonzero(erased, as_tuple=True)
        box = erased[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        assert box.all()  # one solid rectangle


@pytest.mark.parametrize("channels", [1, 3])
def test_random_erasing_works_with_no_preset_and_on_grey(channels):
    image = torch.full((channels, 16, 16), 90, dtype=torch.uint8)
    transform = build_transform(
        AugmentOptions("none", random_erasing=1.0), 16, channels, True, True
    )
    torch.manual_seed(3)
    assert (transform(image) == 0).any()
    assert build_transform(AugmentOptions("none", random_erasing=1.0), 16, 1, True, False) is None


def test_random_erasing_is_off_at_zero():
    assert data_cfg().random_erasing == 0
    assert build_transform(AugmentOptions("none"), 16, 3, True, True) is None
    steps = steps_of(build_transform(augment_options(data_cfg()), 16, 3, True, True))
    assert not any(isinstance(t, v2.RandomErasing) for t in steps)


def test_the_training_loader_erases_and_validation_does_not(tmp_path: Path):
    base = ["data.image_size=16", "data.train_size=16", "data.val_size=8", "data.augment=none"]
    plain, erasing = data_cfg(*base), data_cfg(*base, "data.random_erasing=1.0")
    bundle = build_data(plain)

    def first_batch(cfg, train: bool) -> torch.Tensor:
        split = bundle.train if train else bundle.val
        loader = build_loader(split, bundle, cfg, train=train, seed=1, pin_memory=False)
        return next(iter(loader))["image"]

    before, after = first_batch(plain, True), first_batch(erasing, True)
    changed = before != after
    assert changed.any() and (after[changed] == 0).all()  # only erased pixels differ
    assert torch.equal(first_batch(plain, False), first_batch(erasing, False))


# -------------------------------------------------- where the policies are refused


@pytest.mark.parametrize("task", ["detection", "segmentation"])
@pytest.mark.parametrize("preset", POLICIES)
def test_detection_and_segmentation_refuse_the_policies(task, preset):
    with pytest.raises(ConfigError, match=rf"data\.augment={preset}.*none, light, standard"):
        build_pair_transform(task, preset, 16, same_size=True, train=True)


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_detection_and_segmentation_refuse_random_erasing(task):
    opts = AugmentOptions("standard", random_erasing=0.5)
    with pytest.raises(ConfigError, match=r"data\.random_erasing"):
        build_pair_transform(task, opts, 16, same_size=True, train=True)


@pytest.mark.parametrize("policy", [v2.RandAugment(), v2.TrivialAugmentWide(), v2.AutoAugment()])
def test_torchvision_policies_still_cannot_move_boxes_or_masks(policy):
    # Why detection and segmentation refuse the policies. When a torchvision upgrade
    # moves boxes and masks with the policies' geometric ops, this fails: then allow
    # them in transforms._dense_presets and test the alignment instead.
    image = tv_tensors.Image(torch.zeros(3, 16, 16, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[2.0, 2.0, 8.0, 8.0]], format="XYXY", canvas_size=(16, 16))
    mask = tv_tensors.Mask(torch.zeros(16, 16, dtype=torch.uint8))
    for target in (boxes, mask):
        with pytest.raises(TypeError, match="not supported"):
            policy(image, target)


@pytest.mark.parametrize("preset", POLICIES)
def test_device_augmentation_refuses_the_policies(preset):
    with pytest.raises(ConfigError, match=f"data.augment={preset} runs in the loader only"):
        check_augment_on("device", preset, "classification")
    check_augment_on("loader", preset, "classification")


def test_random_erasing_is_refused_with_device_augmentation():
    cfg = data_cfg("data.augment=light", "data.augment_on=device", "data.random_erasing=0.2")
    with pytest.raises(ConfigError, match=r"data\.random_erasing.*data\.augment_on=loader"):
        augment_options(cfg)


# ------------------------------------------------------------------------- end to end


def test_train_with_randaugment_and_random_erasing(cli, tmp_path: Path):
    res = cli(
        "train",
        *TINY,
        "data.augment=randaugment",
        "data.random_erasing=0.25",
        f"run.dir={tmp_path}",
    )
    assert res.code == 0, res.err
    saved = (res.run_dir / "config.yaml").read_text()
    assert "augment: randaugment" in saved and "random_erasing: 0.25" in saved


def test_train_with_a_knob_and_refusal_by_key(cli, tmp_path: Path):
    # Needs data/sources.py to accept the knobs for every source (COMMON_DATA_KEYS):
    # the preset, not the source, decides whether a knob is used.
    res = cli(
        "train",
        *TINY,
        "data.augment=autoaugment",
        "data.autoaugment_policy=svhn",
        f"run.dir={tmp_path}",
    )
    assert res.code == 0, res.err
    res = cli("train", *TINY, "data.augment=light", "data.augment_ops=3", f"run.dir={tmp_path}")
    assert res.code == 2
    assert "data.augment_ops=3 is set, but data.augment=light" in res.err
