"""Multi-task architectures built from shared layers, weight banks and per-task heads."""

from lws_lightning.nets.convnets import dkl_convnet, routing_convnet, slo_convnet
from lws_lightning.nets.factory import ARCHITECTURES, build_net
from lws_lightning.nets.multitask import MultiTaskNet
from lws_lightning.nets.resnets import RESNET_VARIANTS, resnet18

__all__ = [
    "ARCHITECTURES",
    "RESNET_VARIANTS",
    "MultiTaskNet",
    "build_net",
    "dkl_convnet",
    "resnet18",
    "routing_convnet",
    "slo_convnet",
]
