"""Layer blocks that the architectures stack into shareable or always-shared layers."""

from __future__ import annotations

from torch import Tensor, nn


def conv_block(in_channels: int, out_channels: int, bias: bool = False) -> nn.Sequential:
    """Conv 3×3 (padding 1), BatchNorm, ReLU, then 2×2 max-pooling."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=bias),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def dense_block(in_features: int, out_features: int, flatten: bool = False) -> nn.Sequential:
    """Dense layer and ReLU; ``flatten`` first flattens a feature map."""
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    layers += [nn.Linear(in_features, out_features), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def pooled_head(in_channels: int, num_classes: int) -> nn.Sequential:
    """Task head: global average pooling over the feature map, then a linear layer."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(in_channels, num_classes),
    )


class ResidualBlock(nn.Module):
    """Basic residual block of ResNet-18: two 3×3 convs with BatchNorm and a shortcut.

    The first conv applies ``stride``. Where the block downsamples or changes width, the shortcut
    is a 1×1 conv with the same stride followed by BatchNorm. Elsewhere it is the identity. The
    block returns ``relu(main(x) + shortcut(x))``.

    Args:
        in_channels: Channels of the input map.
        out_channels: Channels of the output map.
        stride: Stride of the first conv and of the projection shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.main(x) + self.shortcut(x))
