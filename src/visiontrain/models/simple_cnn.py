"""``simple_cnn``: stages of conv-norm-ReLU (x2) and max-pool, global pool, dropout, linear."""

from __future__ import annotations

from torch import nn

from visiontrain.errors import ConfigError
from visiontrain.models.registry import register_model


def norm_layer(kind: str, channels: int) -> nn.Module:
    """A normalisation layer for conv features.

    ``layer`` is GroupNorm with one group: it normalises over (C, H, W) per sample,
    which is what LayerNorm means for conv features and needs no batch statistics.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class SimpleCNN(nn.Module):
    """A small VGG-style classifier."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        width: int = 16,
        depth: int = 3,
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_chans
        for stage in range(depth):
            c_out = width * 2**stage
            for _ in range(2):
                # No conv bias in front of a norm layer: the norm's shift makes it redundant.
                layers += [
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"),
                    norm_layer(norm, c_out),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, num_classes)
        # He init suits the ReLU stack; PyTorch's default (uniform, a=sqrt(5)) starts the
        # deeper stages with shrinking activations.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):  # noqa: D102
        x = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(x))


@register_model("simple_cnn")
def simple_cnn(
    num_classes: int,
    in_chans: int,
    width: int = 16,
    depth: int = 3,
    norm: str = "batch",
    dropout: float = 0.0,
    drop_path: float | None = None,
) -> nn.Module:
    """Build :class:`SimpleCNN`; it has no residual branches, so drop-path is refused."""
    if drop_path:
        raise ConfigError(
            "model.drop_path needs residual branches, and simple_cnn has none. Use a residual "
            "model (e.g. model.name=resnet18 through timm) or unset model.drop_path."
        )
    return SimpleCNN(num_classes, in_chans, width, depth, norm, dropout)
