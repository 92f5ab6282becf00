"""ResNet-18 with every residual block as one shareable layer."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import nn

from lws_lightning.nets.blocks import ResidualBlock, pooled_head
from lws_lightning.nets.multitask import MultiTaskNet
from lws_lightning.sharing.bank import WeightBank, init_he_uniform

RESNET_VARIANTS = ("cifar", "omniglot")

# ResNet-18 has 4 stages of 2 basic blocks; stage s has base_width * 2**s channels.
_BLOCKS_PER_STAGE = 2
_NUM_STAGES = 4


def resnet18(
    num_banks: int,
    num_classes: Sequence[int],
    input_shape: Sequence[int],
    variant: str = "cifar",
    base_width: int = 64,
) -> MultiTaskNet:
    """Build a ResNet-18 whose 8 residual blocks are shareable, with a shared stem and pooled heads.

    Each residual block holds two 3×3 convs with BatchNorm and, where it downsamples or changes
    width, a 1×1 conv + BatchNorm projection shortcut. The four stages have ``base_width`` times
    1, 2, 4 and 8 channels (64-128-256-512 by default) and two blocks each. The stem is always
    shared. Each task's head averages the last map globally and applies a linear layer.

    The variants differ in the stem and in which stages downsample:

    - ``"cifar"``: 3×3 stem conv with stride 1 and no max-pool, and only the first block of
      stages 2 to 4 has stride 2. A 32×32 input gives maps of 32 (stem), 32, 16, 8 and 4 pixels
      a side after the stem and each stage.
    - ``"omniglot"``: 7×7 stem conv with stride 2 and padding 3, then 3×3 max-pooling with
      stride 2 and padding 1, and stages 2 to 4 downsample as in ``"cifar"``. A 105×105
      grayscale input gives maps of 53 (stem conv), 27 (max-pool), 27, 14, 7 and 4 pixels a
      side, so the heads pool a 4×4 map as in the CIFAR variant.

    Args:
        num_banks: Banks K in each of the 8 shareable blocks.
        num_classes: Class count of each task.
        input_shape: ``(channels, height, width)`` of one example.
        variant: ``"cifar"`` or ``"omniglot"``, which sets the stem as described above.
        base_width: Channels of the stem and the first stage; smaller values make test nets.
    """
    if variant not in RESNET_VARIANTS:
        raise ValueError(
            f"variant={variant!r} is unknown for resnet18; choose one of: "
            f"{', '.join(RESNET_VARIANTS)}."
        )
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape={tuple(input_shape)} is invalid: expected (channels, height, width)."
        )
    layers: list[nn.Module] = [_stem(input_shape[0], base_width, variant)]
    in_channels = base_width
    for stage in range(_NUM_STAGES):
        out_channels = base_width * 2**stage
        for block in range(_BLOCKS_PER_STAGE):
            stride = 2 if stage > 0 and block == 0 else 1
            factory = partial(ResidualBlock, in_channels, out_channels, stride)
            layers.append(WeightBank(factory, num_banks))
            in_channels = out_channels
    heads = [pooled_head(in_channels, classes) for classes in num_classes]
    net = MultiTaskNet(layers, heads, input_shape, num_classes)
    init_he_uniform(net)
    return net


def _stem(in_channels: int, out_channels: int, variant: str) -> nn.Sequential:
    if variant == "cifar":
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )
