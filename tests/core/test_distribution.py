"""The assignment distribution π: sampling, the NES update, the p_min floor and entropy."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from lws_lightning.sharing import AssignmentDistribution, clamp_to_simplex, rank_utilities


def test_nes_update_hand_computed():
    # One layer, one task, K = 3, π = (0.5, 0.3, 0.2), p_min = 0.05, lr = 0.5.
    # Samples a_1 = bank 0 with u_1 = +1 and a_2 = bank 2 with u_2 = -1:
    #   mean_i u_i (onehot(a_i) - π) = ((1, 0, 0) - π - (0, 0, 1) + π) / 2 = (0.5, 0, -0.5)
    #   π + lr * that = (0.75, 0.3, -0.05)
    # The clamp fixes bank 2 at p_min = 0.05 and rescales the free entries, whose mass is 1.05,
    # to carry the remaining 0.95:
    #   0.75 * 0.95 / 1.05 = 19/28 and 0.3 * 0.95 / 1.05 = 19/70.
    prior = torch.tensor([[[0.5, 0.3, 0.2]]], dtype=torch.float64)
    distribution = AssignmentDistribution([3], 1, p_min=0.05, prior=prior)
    assignments = torch.tensor([[[0]], [[2]]])

    distribution.nes_update(assignments, torch.tensor([1.0, -1.0]), lr=0.5)

    expected = torch.tensor([[[19 / 28, 19 / 70, 0.05]]], dtype=torch.float64)
    torch.testing.assert_close(distribution.probs, expected, rtol=0, atol=1e-12)


def test_nes_update_zero_utilities_keeps_pi():
    prior = torch.tensor([[[0.5, 0.3, 0.2]]], dtype=torch.float64)
    distribution = AssignmentDistribution([3], 1, p_min=0.05, prior=prior)

    distribution.nes_update(torch.tensor([[[0]], [[2]]]), torch.zeros(2), lr=0.5)

    torch.testing.assert_close(distribution.probs, prior, rtol=0, atol=1e-12)


def test_nes_update_nonpositive_lr_raises():
    distribution = AssignmentDistribution([2], 1)

    with pytest.raises(ValueError, match="nes_lr=0.0 is invalid"):
        distribution.nes_update(torch.tensor([[[0]], [[1]]]), torch.tensor([1.0, -1.0]), lr=0.0)


def test_clamp_needs_second_round():
    # Row (0.9, 0.12, -0.02), p_min = 0.11. Round 1 fixes bank 2 at 0.11 and scales the free
    # mass 1.02 to 0.89, which puts bank 1 at 0.12 * 0.89 / 1.02 ≈ 0.1047 < p_min. Round 2
    # fixes bank 1 too, so bank 0 carries 1 - 2 * 0.11 = 0.78.
    probs = torch.tensor([[[0.9, 0.12, -0.02]]], dtype=torch.float64)
    mask = torch.ones_like(probs, dtype=torch.bool)

    clamped = clamp_to_simplex(probs, mask, p_min=0.11)

    expected = torch.tensor([[[0.78, 0.11, 0.11]]], dtype=torch.float64)
    torch.testing.assert_close(clamped, expected, rtol=0, atol=1e-12)


def test_clamp_zeroes_entries_outside_mask():
    probs = torch.tensor([[[0.7, 0.3, 0.5]]], dtype=torch.float64)
    mask = torch.tensor([[[True, True, False]]])

    clamped = clamp_to_simplex(probs, mask, p_min=0.01)

    assert clamped[0, 0, 2] == 0
    torch.testing.assert_close(clamped[0, 0, :2], probs[0, 0, :2])


def test_entropy_uniform_three_banks():
    distribution = AssignmentDistribution([3], 1)

    torch.testing.assert_close(
        distribution.entropy(), torch.full((1, 1), math.log(3), dtype=torch.float64)
    )


def test_entropy_one_hot_is_zero():
    distribution = AssignmentDistribution.from_assignment(torch.tensor([[1, 0]]), [2])

    torch.testing.assert_close(distribution.entropy(), torch.zeros(1, 2, dtype=torch.float64))


def test_most_likely_ignores_padding():
    prior = torch.tensor([[[0.2, 0.8, 0.0]], [[0.1, 0.3, 0.6]]], dtype=torch.float64)
    distribution = AssignmentDistribution([2, 3], 1, prior=prior)

    assert torch.equal(distribution.most_likely(), torch.tensor([[1], [2]]))


def test_zero_banks_raises():
    with pytest.raises(ValueError, match=r"num_banks=\[2, 0\] is invalid"):
        AssignmentDistribution([2, 0], 1)


def test_no_layers_raises():
    with pytest.raises(ValueError, match="num_banks is empty"):
        AssignmentDistribution([], 1)


def test_zero_tasks_raises():
    with pytest.raises(ValueError, match="num_tasks=0 is invalid"):
        AssignmentDistribution([2], 0)


@pytest.mark.parametrize("p_min", [0.25, 0.3])
def test_p_min_times_k_at_least_one_raises(p_min):
    with pytest.raises(ValueError, match=f"p_min={p_min} is invalid for K=4"):
        AssignmentDistribution([2, 4], 1, p_min=p_min)


def test_negative_p_min_raises():
    with pytest.raises(ValueError, match="p_min=-0.01 is invalid"):
        AssignmentDistribution([2], 1, p_min=-0.01)


def test_prior_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"prior has shape \(1, 1, 2\), expected \(1, 1, 3\)"):
        AssignmentDistribution([3], 1, prior=torch.tensor([[[0.5, 0.5]]]))


def test_prior_mass_past_k_raises():
    prior = torch.tensor([[[0.5, 0.5, 0.0]], [[0.4, 0.4, 0.2]]])

    with pytest.raises(ValueError, match="zero past each layer's bank count"):
        AssignmentDistribution([3, 2], 1, prior=prior)


def test_prior_not_normalised_raises():
    with pytest.raises(ValueError, match="must sum to 1"):
        AssignmentDistribution([2], 1, prior=torch.tensor([[[0.5, 0.4]]]))


def test_samples_follow_pi():
    # Two layers with different K and two tasks, so each (layer, task) row has its own π.
    prior = torch.tensor(
        [
            [[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]],
            [[0.8, 0.2, 0.0, 0.0], [0.35, 0.65, 0.0, 0.0]],
        ],
        dtype=torch.float64,
    )
    num_banks = [4, 2]
    num_draws = 20_000
    distribution = AssignmentDistribution(num_banks, 2, prior=prior)

    samples = distribution.sample(num_draws, torch.Generator().manual_seed(1234))

    assert samples.shape == (num_draws, 2, 2)
    assert samples.dtype == torch.long
    for layer, k in enumerate(num_banks):
        for task in range(2):
            counts = torch.bincount(samples[:, layer, task], minlength=prior.shape[-1])
            assert counts[k:].sum() == 0, f"layer {layer}, task {task} drew a padding bank"
            expected = (num_draws * prior[layer, task, :k]).numpy()
            p_value = chisquare(counts[:k].numpy(), expected).pvalue
            assert p_value > 1e-3, f"layer {layer}, task {task}: chi-square p = {p_value:.2e}"


@st.composite
def update_runs(draw, min_distinct_k=1):
    """Draw a distribution's shape, p_min and a sequence of NES updates to apply to it."""
    num_banks = draw(
        st.lists(st.integers(1, 5), min_size=max(1, min_distinct_k), max_size=3).filter(
            lambda ks: len(set(ks)) >= min_distinct_k
        )
    )
    num_tasks = draw(st.integers(1, 3))
    p_min = draw(st.floats(0.0, 0.9)) / max(num_banks)
    loss_values = st.floats(0.0, 10.0) | st.sampled_from([1.0, 2.0])
    updates = []
    for _ in range(draw(st.integers(1, 12))):
        num_samples = draw(st.integers(2, 8))
        losses = draw(st.lists(loss_values, min_size=num_samples, max_size=num_samples))
        lr = draw(st.floats(0.0, 1.0, exclude_min=True))
        seed = draw(st.integers(0, 2**31 - 1))
        updates.append((losses, lr, seed))
    return num_banks, num_tasks, p_min, updates


def apply_updates(num_banks, num_tasks, p_min, updates):
    """Apply each update and return the distribution and every assignment it sampled."""
    distribution = AssignmentDistribution(num_banks, num_tasks, p_min=p_min)
    drawn = []
    for losses, lr, seed in updates:
        generator = torch.Generator().manual_seed(seed)
        assignments = distribution.sample(len(losses), generator)
        distribution.nes_update(assignments, rank_utilities(torch.tensor(losses)), lr)
        drawn.append(assignments)
    drawn.append(distribution.sample(64, torch.Generator().manual_seed(0)))
    return distribution, torch.cat(drawn)


@settings(max_examples=60, deadline=None)
@given(run=update_runs())
def test_updates_stay_on_simplex(run):
    num_banks, num_tasks, p_min, updates = run

    distribution, _ = apply_updates(num_banks, num_tasks, p_min, updates)

    probs = distribution.probs
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]), rtol=0, atol=1e-6)
    assert probs[distribution.bank_mask].min() >= p_min * (1 - 1e-6)


@settings(max_examples=40, deadline=None)
@given(run=update_runs(min_distinct_k=2))
def test_updates_keep_padding_zero(run):
    num_banks, num_tasks, p_min, updates = run

    distribution, drawn = apply_updates(num_banks, num_tasks, p_min, updates)

    probs = distribution.probs
    assert (probs[~distribution.bank_mask] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]), rtol=0, atol=1e-6)
    assert probs[distribution.bank_mask].min() >= p_min * (1 - 1e-6)
    for layer, k in enumerate(num_banks):
        assert drawn[:, layer].max() < k, f"layer {layer} with K={k} drew a padding bank"
