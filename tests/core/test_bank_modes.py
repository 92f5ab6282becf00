"""Weight banks and the sharing modes that fix or learn which bank each task uses."""

import pytest
import torch
from torch import nn

from lws_lightning.sharing import (
    AssignmentDistribution,
    SharingMode,
    WeightBank,
    bank_count,
    build_distribution,
)


@pytest.fixture
def bank() -> WeightBank:
    torch.manual_seed(0)
    return WeightBank(lambda: nn.Linear(4, 3), num_banks=3)


def test_bank_copies_start_different(bank):
    assert not torch.equal(bank.banks[0].weight, bank.banks[2].weight)


@pytest.mark.parametrize("assignment", [[2, 0], torch.tensor([2, 0])], ids=["list", "tensor"])
def test_bank_routes_each_task_to_its_copy(bank, assignment):
    inputs = [torch.randn(5, 4), torch.randn(6, 4)]

    outputs = bank(inputs, assignment)

    torch.testing.assert_close(outputs[0], bank.banks[2](inputs[0]))
    torch.testing.assert_close(outputs[1], bank.banks[0](inputs[1]))


def test_bank_length_mismatch_raises(bank):
    with pytest.raises(ValueError, match="2 task inputs but 3 bank indices"):
        bank([torch.randn(1, 4), torch.randn(1, 4)], [0, 1, 2])


def test_bank_zero_copies_raises():
    with pytest.raises(ValueError, match="num_banks=0"):
        WeightBank(lambda: nn.Linear(2, 2), num_banks=0)


def test_full_sharing_one_bank_for_all():
    num_tasks = 3
    num_banks = [bank_count(SharingMode.FULL, num_tasks, num_banks=4)] * 2

    distribution = build_distribution(SharingMode.FULL, num_banks, num_tasks, p_min=1e-3)

    assert num_banks == [1, 1]
    assert distribution.frozen
    assert torch.equal(distribution.most_likely(), torch.zeros(2, num_tasks, dtype=torch.long))
    assert torch.equal(distribution.sample(10), torch.zeros(10, 2, num_tasks, dtype=torch.long))


def test_no_sharing_task_uses_own_bank():
    num_tasks = 3
    num_banks = [bank_count(SharingMode.NONE, num_tasks, num_banks=4)] * 2

    distribution = build_distribution(SharingMode.NONE, num_banks, num_tasks, p_min=1e-3)

    assert num_banks == [3, 3]
    assert distribution.frozen
    expected = torch.tensor([[0, 1, 2], [0, 1, 2]])
    assert torch.equal(distribution.most_likely(), expected)
    assert torch.equal(distribution.sample(10), expected.expand(10, 2, 3))


def test_fixed_sharing_uses_given_assignment():
    assignment = torch.tensor([[1, 0], [2, 2]])

    distribution = build_distribution(SharingMode.FIXED, [2, 3], 2, 1e-3, assignment)

    assert bank_count(SharingMode.FIXED, num_tasks=2, num_banks=3) == 3
    assert distribution.frozen
    assert torch.equal(distribution.sample(10), assignment.expand(10, 2, 2))


def test_fixed_sharing_missing_assignment_raises():
    with pytest.raises(ValueError, match="needs model.assignment"):
        build_distribution(SharingMode.FIXED, [2], 2, 1e-3)


def test_fixed_sharing_out_of_range_raises():
    with pytest.raises(ValueError, match=r"assignment \[1, 2\] of layer 0 is invalid"):
        build_distribution(SharingMode.FIXED, [2], 2, 1e-3, torch.tensor([[1, 2]]))


def test_fixed_sharing_negative_index_raises():
    with pytest.raises(ValueError, match="bank indices must lie in 0..1"):
        build_distribution(SharingMode.FIXED, [2], 2, 1e-3, torch.tensor([[-1, 0]]))


def test_fixed_sharing_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"shape \(1, 2\), expected \(2, num_tasks\)"):
        build_distribution(SharingMode.FIXED, [2, 2], 2, 1e-3, torch.tensor([[0, 1]]))


def test_learned_sharing_starts_uniform():
    distribution = build_distribution(SharingMode.LEARNED, [4], 2, 1e-3)

    assert not distribution.frozen
    torch.testing.assert_close(distribution.probs, torch.full((1, 2, 4), 0.25, dtype=torch.float64))


def test_frozen_distribution_rejects_update():
    distribution = AssignmentDistribution.from_assignment(torch.tensor([[0, 1]]), [2])
    assignments = torch.tensor([[[0, 1]], [[1, 0]]])

    with pytest.raises(RuntimeError, match="frozen"):
        distribution.nes_update(assignments, torch.tensor([1.0, -1.0]), lr=0.1)


def test_sharing_mode_parse_invalid_raises():
    with pytest.raises(ValueError, match="model.sharing='partial' is invalid"):
        SharingMode.parse("partial")
