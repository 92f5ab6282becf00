"""Small ConvNets of the LWS experiments."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import nn

from lws_lightning.nets.blocks import conv_block, dense_block, pooled_head
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
    channels = input_shape[0]
    side_h, side_w = _pooled_size(input_shape, num_pools=3)
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


def routing_convnet(
    num_banks: int,
    num_classes: Sequence[int],
    input_shape: Sequence[int] = (3, 32, 32),
    width: int = 32,
    hidden: int = 128,
) -> MultiTaskNet:
    """Build the CIFAR-100 ConvNet of routing networks: shared conv blocks, shareable dense layers.

    Four conv blocks (conv 3×3 with ``width`` filters and no bias, BatchNorm, ReLU, 2×2
    max-pooling) are always shared. Three dense layers of ``hidden`` units with ReLU are
    shareable, and each task has a linear head. A 32×32 input leaves a 2×2 map after the conv
    blocks, so the first dense layer takes ``4 * width`` features.
    """
    channels = input_shape[0]
    side_h, side_w = _pooled_size(input_shape, num_pools=4)
    layers: list[nn.Module] = [conv_block(channels, width)]
    layers += [conv_block(width, width) for _ in range(3)]
    layers += [
        WeightBank(partial(dense_block, width * side_h * side_w, hidden, flatten=True), num_banks),
        WeightBank(partial(dense_block, hidden, hidden), num_banks),
        WeightBank(partial(dense_block, hidden, hidden), num_banks),
    ]
    heads = [nn.Linear(hidden, classes) for classes in num_classes]
    net = MultiTaskNet(layers, heads, input_shape, num_classes)
    init_he_uniform(net)
    return net


def slo_convnet(
    num_banks: int,
    num_classes: Sequence[int],
    input_shape: Sequence[int] = (1, 105, 105),
    width: int = 53,
) -> MultiTaskNet:
    """Build the Omniglot ConvNet of soft layer ordering: 4 shareable conv blocks, pooled heads.

    Each conv block is conv 3×3 with ``width`` filters and no bias, BatchNorm, ReLU and 2×2
    max-pooling, and all four are shareable. Each task's head averages the last map globally
    and applies a linear layer. A 105×105 input gives maps of 52, 26, 13 and 6 pixels a side.
    """
    channels = input_shape[0]
    _pooled_size(input_shape, num_pools=4)
    layers = [WeightBank(partial(conv_block, channels, width), num_banks)]
    layers += [WeightBank(partial(conv_block, width, width), num_banks) for _ in range(3)]
    heads = [pooled_head(width, classes) for classes in num_classes]
    net = MultiTaskNet(layers, heads, input_shape, num_classes)
    init_he_uniform(net)
    return net


def _pooled_size(input_shape: Sequence[int], num_pools: int) -> tuple[int, int]:
    """Return the map height and width after ``num_pools`` 2×2 max-pools, or raise if empty."""
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape={tuple(input_shape)} is invalid: expected (channels, height, width)."
        )
    _, height, width = input_shape
    side_h, side_w = height // 2**num_pools, width // 2**num_pools
    if side_h < 1 or side_w < 1:
        raise ValueError(
            f"input_shape={tuple(input_shape)} is too small for {num_pools} 2×2 max-pools; "
            f"height and width must be at least {2**num_pools}."
        )
    return side_h, side_w
