"""Detection and segmentation models: torchvision detectors, smp and torchvision segmenters.

Every model is built without pretrained weights unless ``model.pretrained=true`` (then the
backbone's ImageNet weights are fetched, which needs the network). Detectors get the
working image size for their internal resize, so that they never upsample a 128 px image
to 800 px, and identity normalisation, because the trainer has already normalised the
batch on the device. Class indices in the data are 0-based; detectors reserve index 0
for the background, so they are built with ``num_classes + 1`` outputs and the detection
task shifts labels by one on the way in and out.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from visiontrain.errors import ConfigError
from visiontrain.models.registry import register_model

TORCHVISION_DETECTORS = (
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
)
SMP_ARCHS = {"unet": "Unet", "fpn": "FPN", "deeplabv3plus": "DeepLabV3Plus"}
TORCHVISION_SEGMENTERS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")


def _no_options(name: str, opts: dict[str, Any], allowed: tuple[str, ...] = ()) -> None:
    extra = sorted(k for k in opts if k not in allowed)
    if extra:
        keys = ", ".join(f"`model.{k}`" for k in extra)
        raise ConfigError(f"{keys} set, but model {name} does not use it. Remove the key.")


def _three_channels(name: str, in_chans: int) -> None:
    if in_chans != 3:
        raise ConfigError(f"model {name} takes RGB images; the data has {in_chans} channels.")


def _detector_kwargs(num_classes: int, image_size: int | None, default_size: int) -> dict:
    """What every detector here shares: a background class, the data's size, no normalisation.

    The trainer has already normalised the batch; the detector's own resize is set to
    the working size so that it never upsamples.
    """
    size = image_size or default_size
    return {
        "num_classes": num_classes + 1,
        "min_size": size,
        "max_size": size,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
    }


def _check_tiny(name: str, in_chans: int, pretrained: bool, opts: dict[str, Any]) -> None:
    """The CPU-sized detectors: RGB input, no pretrained weights, no foreign options."""
    _no_options(name, opts)
    _three_channels(name, in_chans)
    if pretrained:
        raise ConfigError(f"model {name} has no pretrained weights; set model.pretrained=false.")


def _torchvision_builder(task: str, name: str):
    """A builder for a torchvision detector or segmenter, without pretrained weights."""

    def build(
        num_classes: int, in_chans: int, pretrained: bool, image_size: int | None, **opts: Any
    ) -> nn.Module:
        from torchvision.models import detection, segmentation

        _no_options(name, opts)
        _three_channels(name, in_chans)
        kwargs: dict[str, Any] = {
            "weights": None,
            "weights_backbone": "DEFAULT" if pretrained else None,
        }
        if task == "segmentation":
            return _OutOnly(getattr(segmentation, name)(num_classes=num_classes, **kwargs))
        kwargs.update(_detector_kwargs(num_classes, image_size, 320))
        if name.startswith("ssd"):
            # SSD's input size is fixed by its builder (320); the others take the data's.
            del kwargs["min_size"], kwargs["max_size"]
        return getattr(detection, name)(**kwargs)

    return build


for _name in TORCHVISION_DETECTORS:
    register_model(_name, tasks=("detection",))(_torchvision_builder("detection", _name))


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions, the first with stride 2: one pyramid level down."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 2, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _tiny_stages(module: nn.Module, in_chans: int, width: int) -> None:
    """The convolutional stages shared by :class:`TinyBackbone` and :class:`TinyNet`."""
    module.stem = nn.Sequential(_block(in_chans, width), _block(width, width * 2))  # stride 4
    module.c3 = _block(width * 2, width * 4)  # stride 8
    module.c4 = _block(width * 4, width * 4)  # stride 16
    module.c5 = _block(width * 4, width * 8)  # stride 32


class TinyNet(nn.Module):
    """A classifier on the tiny detectors' backbone: the same stages, pooled, one linear head.

    Its weights (``stem``, ``c3``-``c5``) load into ``fasterrcnn_tiny``'s or ``fcos_tiny``'s
    backbone by name through ``model.backbone_weights``: pretrain on image labels, then
    start a detector from it.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32) -> None:
        super().__init__()
        _tiny_stages(self, in_chans, width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.c5(self.c4(self.c3(self.stem(x))))
        return self.head(self.pool(x).flatten(1))


@register_model("tinynet")
def tinynet(num_classes: int, in_chans: int, width: int = 32) -> nn.Module:
    """Build :class:`TinyNet` (classification or regression)."""
    return TinyNet(num_classes, in_chans, width)


class TinyBackbone(nn.Module):
    """A small CNN with an FPN over strides 8, 16 and 32: enough for simple scenes on a CPU."""

    def __init__(self, width: int = 32, fpn_channels: int = 64) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        _tiny_stages(self, 3, width)
        self.fpn = FeaturePyramidNetwork([width * 4, width * 4, width * 8], fpn_channels)
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:  # noqa: D102
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        return self.fpn(OrderedDict([("0", c3), ("1", c4), ("2", c5)]))


@register_model("fcos_tiny", tasks=("detection",))
def fcos_tiny(
    num_classes: int,
    in_chans: int,
    pretrained: bool,
    image_size: int | None,
    width: int = 32,
    **opts: Any,
) -> nn.Module:
    """FCOS (anchor-free, torchvision's) on :class:`TinyBackbone`: ~50 img/s at 128 px on 2 cores.

    One anchor size per level (16, 32, 64 px) only tells FCOS which level a box belongs
    to; boxes are regressed per location, so no aspect ratios are needed.
    """
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    _check_tiny("fcos_tiny", in_chans, pretrained, opts)
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,)), aspect_ratios=((1.0,),) * 3)
    return FCOS(
        TinyBackbone(width),
        anchor_generator=anchors,
        **_detector_kwargs(num_classes, image_size, 128),
    )


def _smp(arch: str):
    def build(
        num_classes: int,
        in_chans: int,
        pretrained: bool,
        image_size: int | None,
        encoder: str = "resnet18",
        **opts: Any,
    ) -> nn.Module:
        import segmentation_models_pytorch as smp

        _no_options(arch, opts)
        try:
            return getattr(smp, SMP_ARCHS[arch])(
                encoder_name=encoder,
                encoder_weights="imagenet" if pretrained else None,
                in_channels=in_chans,
                classes=num_classes,
            )
        except (KeyError, ValueError) as exc:
            raise ConfigError(
                f"segmentation-models-pytorch cannot build {arch} with encoder "
                f"`model.encoder={encoder}` ({str(exc).splitlines()[0][:200]}). See "
                "smp.encoders.get_encoder_names() for the encoder names."
            ) from None

    return build


for _arch in SMP_ARCHS:
    register_model(_arch, tasks=("segmentation",))(_smp(_arch))


class _OutOnly(nn.Module):
    """torchvision segmenters return ``{"out": logits}``; the task wants the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


for _name in TORCHVISION_SEGMENTERS:
    register_model(_name, tasks=("segmentation",))(_torchvision_builder("segmentation", _name))


@register_model("fasterrcnn_tiny", tasks=("detection",))
def fasterrcnn_tiny(
    num_classes: int,
    in_chans: int,
    pretrained: bool,
    image_size: int | None,
    width: int = 32,
    **opts: Any,
) -> nn.Module:
    """Faster R-CNN (torchvision's) on :class:`TinyBackbone`, with CPU-sized sampling.

    Fewer proposals (300 before NMS, 150 after in training) and 64 sampled RoIs per image
    instead of 2000/2000/512: the RoI head's fully connected layers dominate the step
    otherwise, and small scenes hold a handful of objects.
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    _check_tiny("fasterrcnn_tiny", in_chans, pretrained, opts)
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),) * 3)
    return FasterRCNN(
        TinyBackbone(width),
        **_detector_kwargs(num_classes, image_size, 128),
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2),
        rpn_pre_nms_top_n_train=300,
        rpn_post_nms_top_n_train=150,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=64,
    )
