"""LightningDataModules of the multi-task benchmarks.

Each yields ``(x [2, T, B, C, H, W], y [2, T, B])`` per LWS iteration for training and one
test loader per task for validation and testing, as :class:`MultiTaskDataModule` describes.
"""

from lws_lightning.data.cifar100 import Cifar100TasksDataModule
from lws_lightning.data.dkl_mnist import DklMnistDataModule
from lws_lightning.data.mnist_trio import MnistTrioDataModule
from lws_lightning.data.multitask import MultiTaskDataModule
from lws_lightning.data.omniglot import OmniglotAlphabetsDataModule

__all__ = [
    "Cifar100TasksDataModule",
    "DklMnistDataModule",
    "MnistTrioDataModule",
    "MultiTaskDataModule",
    "OmniglotAlphabetsDataModule",
]
