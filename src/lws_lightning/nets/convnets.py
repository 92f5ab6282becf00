"""Small ConvNets of the LWS experiments."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lws_lightning.nets.blocks import conv_block, dense_block
from lws_lightning.nets.multitask import MultiTaskNet
from lws_lightning.sharing.bank import WeightBank, init_he_uniform


def dkl_convnet(
    num_banks: int,
    num_classes: Sequence[int],
    input_shape: Sequence[int] = (1, 28, 28),
    width: int = 32,
    hidden: int = 128,
) -> MultiTaskNet:
    """The DKL-MNIST ConvNet: 3 conv blocks and a dense layer, all shareable, then task heads.

    Each conv block is conv 3×3 with ``width`` filters and no bias, BatchNorm, ReLU and 2×2
    max-pooling; the dense layer has ``hidden`` units and ReLU; each head is a linear layer.
    """
    channels, height, width_px = input_shape
    side_h, side_w = height, width_px
    for _ in range(3):
        side_h, side_w = side_h // 2, side_w // 2
    if side_h < 1 or side_w < 1:
        raise ValueError(f"input_shape={tuple(input_shape)} is too small for 3 max-pools.")
    layers = [
        WeightBank(lambda: conv_block(channels, width), num_banks),
        WeightBank(lambda: conv_block(width, width), num_banks),
        WeightBank(lambda: conv_block(width, width), num_banks),
        WeightBank(lambda: dense_block(width * side_h * side_w, hidden, flatten=True), num_banks),
    ]
    heads = [nn.Linear(hidden, classes) for classes in num_classes]
    net = MultiTaskNet(layers, heads, input_shape, num_classes)
    init_he_uniform(net)
    return net
