"""Multi-task architectures built from shared layers, weight banks and per-task heads."""

from lws_lightning.nets.factory import ARCHITECTURES, build_net
from lws_lightning.nets.multitask import MultiTaskNet

__all__ = ["ARCHITECTURES", "MultiTaskNet", "build_net"]
