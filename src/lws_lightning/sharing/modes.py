"""Sharing modes: how many banks each shareable layer has and how tasks pick them."""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from lws_lightning.sharing.distribution import AssignmentDistribution


class SharingMode(str, Enum):
    """How the tasks' copies of each shareable layer pick their weight bank.

    - ``learned``: K banks per layer; the assignment is sampled from π, which NES learns.
    - ``full``: one bank per layer, used by every task (the usual hard-shared trunk).
    - ``none``: one bank per task and layer; task t always uses bank t (independent networks).
    - ``fixed``: K banks and a given assignment, for ablations and inference.
    """

    LEARNED = "learned"
    FULL = "full"
    NONE = "none"
    FIXED = "fixed"

    @classmethod
    def parse(cls, value: str | SharingMode) -> SharingMode:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(mode.value for mode in cls)
            raise ValueError(
                f"model.sharing={value!r} is invalid; choose one of: {choices}."
            ) from None


def bank_count(mode: SharingMode, num_tasks: int, num_banks: int) -> int:
    """Return the bank count K of every shareable layer under ``mode``."""
    if mode is SharingMode.FULL:
        return 1
    if mode is SharingMode.NONE:
        return num_tasks
    return num_banks


def build_distribution(
    mode: SharingMode,
    num_banks: list[int],
    num_tasks: int,
    p_min: float,
    assignment: Tensor | None = None,
) -> AssignmentDistribution:
    """Build the assignment distribution of a sharing mode.

    Only ``learned`` gives a distribution that NES updates; the others are frozen one-hot
    distributions, so the same training step serves every mode.
    """
    num_layers = len(num_banks)
    if mode is SharingMode.LEARNED:
        return AssignmentDistribution(num_banks, num_tasks, p_min=p_min)
    if mode is SharingMode.FULL:
        fixed = torch.zeros(num_layers, num_tasks, dtype=torch.long)
    elif mode is SharingMode.NONE:
        fixed = torch.arange(num_tasks).expand(num_layers, num_tasks).clone()
    else:
        if assignment is None:
            raise ValueError(
                "model.sharing=fixed needs model.assignment: one bank index per layer and task."
            )
        fixed = torch.as_tensor(assignment, dtype=torch.long)
    return AssignmentDistribution.from_assignment(fixed, num_banks)
