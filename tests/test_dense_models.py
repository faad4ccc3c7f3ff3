"""Every registered detection and segmentation model builds for the data's classes and runs."""

from __future__ import annotations

import pytest
import torch

from visiontrain.errors import ConfigError
from visiontrain.models import create_model
from visiontrain.models.registry import list_models

DETECTORS = list_models("detection")
SEGMENTERS = list_models("segmentation")


def test_registries_hold_the_documented_models():
    assert {
        "fasterrcnn_mobilenet_v3_large_fpn",
        "fasterrcnn_resnet50_fpn_v2",
        "retinanet_resnet50_fpn_v2",
        "fcos_resnet50_fpn",
        "ssdlite320_mobilenet_v3_large",
        "fcos_tiny",
        "fasterrcnn_tiny",
    } <= set(DETECTORS)
    assert {
        "unet",
        "fpn",
        "deeplabv3plus",
        "lraspp_mobilenet_v3_large",
        "deeplabv3_mobilenet_v3_large",
    } <= set(SEGMENTERS)


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_trains_and_predicts(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=3, task="detection", image_size=64)
    images = list(torch.rand(2, 3, 64, 64))
    # Labels as the detection task passes them: 1..C, 0 being the background.
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 10.0, 20.0, 25.0]]), "labels": torch.tensor([3])},
    ]
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and {"boxes", "scores", "labels"} <= out[0].keys()
    assert out[0]["labels"].numel() == 0 or int(out[0]["labels"].max()) <= 3


@pytest.mark.parametrize("name", SEGMENTERS)
def test_segmenter_gives_logits_per_class_and_pixel(name):
    model = create_model(name, num_classes=4, in_chans=3, task="segmentation", image_size=64)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 4, 64, 64)


def test_dense_models_refuse_foreign_options_and_tasks():
    with pytest.raises(ConfigError, match=r"`model\.depth`"):
        create_model("fcos_tiny", 3, 3, task="detection", image_size=64, depth=3)
    with pytest.raises(ConfigError, match="not a classification model"):
        create_model("unet", 3, 3)
    with pytest.raises(ConfigError, match="unknown detection model"):
        create_model("resnet18", 3, 3, task="detection", image_size=64)
    with pytest.raises(ConfigError, match="RGB"):
        create_model("fcos_tiny", 3, 1, task="detection", image_size=64)
