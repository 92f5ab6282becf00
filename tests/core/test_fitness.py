"""Rank-based utilities of the NES update."""

import math

import pytest
import torch

from lws_lightning.sharing import rank_utilities


def test_utilities_four_distinct_losses():
    # Ranks by descending loss: 0.4 -> 1, 0.3 -> 2, 0.2 -> 3, 0.1 -> 4.
    # u = 2 (rank - 1) / (λ - 1) - 1 with λ = 4 gives -1, -1/3, 1/3, 1.
    utilities = rank_utilities(torch.tensor([0.3, 0.1, 0.4, 0.2]))

    expected = torch.tensor([-1 / 3, 1.0, -1.0, 1 / 3], dtype=torch.float64)
    torch.testing.assert_close(utilities, expected)


def test_utilities_tie_shares_mean_rank():
    # Descending: 0.5 -> rank 1, the two 0.3 share ranks 2 and 3 -> 2.5, 0.1 -> rank 4.
    # u(2.5) = 2 * 1.5 / 3 - 1 = 0.
    utilities = rank_utilities(torch.tensor([0.3, 0.5, 0.1, 0.3]))

    assert utilities[0] == utilities[3]
    expected = torch.tensor([0.0, -1.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(utilities, expected)


def test_utilities_all_tied_are_zero():
    utilities = rank_utilities(torch.full((5,), 2.0))

    torch.testing.assert_close(utilities, torch.zeros(5, dtype=torch.float64))


def test_utilities_two_samples():
    utilities = rank_utilities(torch.tensor([1.0, 2.0]))

    torch.testing.assert_close(utilities, torch.tensor([1.0, -1.0], dtype=torch.float64))


def test_utilities_nan_ranks_as_highest_loss():
    utilities = rank_utilities(torch.tensor([0.2, math.nan, 5.0]))

    torch.testing.assert_close(utilities, torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))


def test_utilities_single_sample_raises():
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        rank_utilities(torch.tensor([0.5]))
