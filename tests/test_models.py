import pytest
import torch

from visiontrain.errors import ConfigError
from visiontrain.models import create_model, list_models, register_model
from visiontrain.models.init import INIT_SCHEMES, init_weights


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_model("simple_cnn")(lambda **kw: None)


@pytest.mark.parametrize("name", list_models("classification"))
def test_builtin_models_forward(name):
    model = create_model(name, num_classes=3, in_chans=1, width=4)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("norm", ["batch", "layer", "group", "none"])
def test_simple_cnn_norms_forward(norm):
    model = create_model("simple_cnn", num_classes=3, in_chans=1, width=4, depth=2, norm=norm)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize("name", ["resnet18", "timm:mobilenetv3_small_050", "torchvision:resnet18"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_external_models_by_name(name, in_chans):
    model = create_model(name, num_classes=5, in_chans=in_chans)
    model.eval()
    assert model(torch.randn(1, in_chans, 32, 32)).shape == (1, 5)


def test_timm_dropout_and_drop_path_reach_the_model():
    model = create_model("resnet18", num_classes=2, in_chans=3, dropout=0.3, drop_path=0.1)
    assert model.drop_rate == pytest.approx(0.3)
    assert any(type(m).__name__ == "DropPath" for m in model.modules())


def test_options_a_model_cannot_honour_are_refused():
    with pytest.raises(ConfigError, match=r"model\.width"):
        create_model("resnet18", num_classes=2, in_chans=3, width=8)
    with pytest.raises(ConfigError, match="drop-path"):
        create_model("torchvision:resnet18", num_classes=2, in_chans=3, drop_path=0.1)
    with pytest.raises(ConfigError, match="did you mean `simple_cnn`"):
        create_model("simple_cn", num_classes=2, in_chans=3)


@pytest.mark.parametrize("scheme", sorted(INIT_SCHEMES))
def test_init_schemes(scheme):
    model = create_model("simple_cnn", num_classes=10, in_chans=3, width=64, depth=1, norm="none")
    init_weights(model, scheme)
    conv = model.features[0]
    assert torch.count_nonzero(conv.bias) == 0
    std = conv.weight.std().item()
    fan_in = conv.weight[0].numel()
    expected = {
        "gpt": 0.02,
        "lecun": fan_in**-0.5,
        "kaiming": (2 / (conv.weight.shape[0] * 9)) ** 0.5,
        "xavier": (2 / (fan_in + conv.weight.shape[0] * 9)) ** 0.5,
    }[scheme]
    assert std == pytest.approx(expected, rel=0.15)
