"""Rank-based fitness shaping for the NES update of the assignment distribution."""

from __future__ import annotations

import torch
from torch import Tensor


def rank_utilities(losses: Tensor) -> Tensor:
    """Map λ losses to utilities equally spaced in [-1, 1] by rank.

    The highest loss gets rank 1 and the lowest rank λ, and ``u = 2 (rank - 1) / (λ - 1) - 1``.
    So the lowest loss gets +1 and the highest -1. Tied losses share the mean of their ranks and
    so get equal utilities. Only the order of the losses matters, which makes the NES step
    invariant to any monotone transformation of the loss.

    A NaN loss counts as infinitely high, so a diverged sample ranks last instead of stopping
    training.

    Raises:
        ValueError: If fewer than 2 losses are given.
    """
    losses = torch.as_tensor(losses).detach().flatten().to(torch.float64)
    count = losses.numel()
    if count < 2:
        raise ValueError(
            f"Rank-based utilities need at least 2 samples, got {count}. "
            "Set model.nes_samples to 2 or more."
        )
    losses = torch.nan_to_num(losses, nan=float("inf"))
    # Cast the counts, or the rank arithmetic below runs in the default dtype (float32).
    higher = (losses.unsqueeze(0) > losses.unsqueeze(1)).sum(1).to(losses.dtype)
    equal = (losses.unsqueeze(0) == losses.unsqueeze(1)).sum(1).to(losses.dtype)
    rank = 1.0 + higher + (equal - 1) / 2.0
    return 2.0 * (rank - 1.0) / (count - 1) - 1.0
