"""Learned weight sharing (LWS) core, in plain PyTorch.

LWS (Prellberg & Kramer, "Learned Weight Sharing for Deep Multi-Task Learning by Natural
Evolution Strategy and Stochastic Gradient Descent", IJCNN 2020, arXiv:2003.10159) gives every
shareable layer K weight banks and lets each task's copy of the layer pick one bank. The pick is a
categorical distribution per (layer, task), updated by NES with rank-based utilities, while a
gradient optimizer trains the banks on assignments sampled from it.
"""

from lws_lightning.sharing.bank import WeightBank, init_he_uniform
from lws_lightning.sharing.distribution import AssignmentDistribution, clamp_to_simplex
from lws_lightning.sharing.fitness import rank_utilities
from lws_lightning.sharing.modes import SharingMode, bank_count, build_distribution

__all__ = [
    "AssignmentDistribution",
    "SharingMode",
    "WeightBank",
    "bank_count",
    "build_distribution",
    "clamp_to_simplex",
    "init_he_uniform",
    "rank_utilities",
]
