"""Layer blocks that the architectures stack into shareable or always-shared layers."""

from __future__ import annotations

from torch import nn


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
