"""Build a multi-task net by architecture name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lws_lightning.nets.convnets import dkl_convnet, routing_convnet, slo_convnet
from lws_lightning.nets.multitask import MultiTaskNet
from lws_lightning.nets.resnets import resnet18

ARCHITECTURES: dict[str, Callable[..., MultiTaskNet]] = {
    "dkl_convnet": dkl_convnet,
    "routing_convnet": routing_convnet,
    "slo_convnet": slo_convnet,
    "resnet18": resnet18,
}


def build_net(
    architecture: str,
    num_banks: int,
    num_classes: Sequence[int],
    input_shape: Sequence[int],
    **options: Any,
) -> MultiTaskNet:
    """Build ``architecture`` with ``num_banks`` banks in every shareable layer.

    Options whose value is ``None`` are dropped, so a config can leave an architecture's
    optional settings unset.
    """
    if architecture not in ARCHITECTURES:
        choices = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(
            f"model.architecture={architecture!r} is unknown; choose one of: {choices}."
        )
    options = {key: value for key, value in options.items() if value is not None}
    return ARCHITECTURES[architecture](
        num_banks=num_banks,
        num_classes=list(num_classes),
        input_shape=tuple(input_shape),
        **options,
    )
