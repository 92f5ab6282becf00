"""Batch norm per group of rows, and the closed-form update of running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lws_lightning.engine import _group_norm
from lws_lightning.engine._group_norm import (
    GroupedBatchNorm,
    is_channels_last,
    normalize_groups,
    to_channels_last,
)

GROUPS = 3
ROWS_PER_GROUP = 4


@pytest.fixture(params=["whole_tensor", "per_group"])
def computation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with whole-tensor operations and once with one native call per group."""
    threshold = 2**62 if request.param == "whole_tensor" else 0
    monkeypatch.setattr(_group_norm, "PER_GROUP_MIN_ELEMENTS", threshold)
    return request.param


def reference(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Batch-normalize each group of rows with its own statistics, one F.batch_norm call each."""
    return torch.cat(
        [F.batch_norm(part, None, None, weight, bias, training=True) for part in x.chunk(GROUPS)]
    )


SHAPES = {
    "features": (GROUPS * ROWS_PER_GROUP, 5),
    "sequence": (GROUPS * ROWS_PER_GROUP, 5, 7),
    "map": (GROUPS * ROWS_PER_GROUP, 5, 6, 7),
    "one_channel_map": (GROUPS * ROWS_PER_GROUP, 1, 6, 7),
    "one_pixel_map": (GROUPS * ROWS_PER_GROUP, 5, 1, 1),
}


# (shape, channels_last): the channels-last layout exists for 4-D maps only.
LAYOUT_CASES = [
    pytest.param(
        shape, channels_last, id=f"{name}-{'channels_last' if channels_last else 'contiguous'}"
    )
    for name, shape in SHAPES.items()
    for channels_last in ([False, True] if len(shape) == 4 else [False])
]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize(("shape", "channels_last"), LAYOUT_CASES)
def test_normalize_groups_matches_per_group_batch_norm(
    shape: tuple[int, ...], channels_last: bool, affine: bool, computation: str
) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 2
    if channels_last:
        x = to_channels_last(x)
    x.requires_grad_()
    channels = shape[1]
    weight = torch.rand(channels, dtype=torch.float64, requires_grad=True) if affine else None
    bias = torch.randn(channels, dtype=torch.float64, requires_grad=True) if affine else None
    grad_out = torch.randn(shape, generator=generator, dtype=torch.float64)
    inputs = [t for t in (x, weight, bias) if t is not None]

    out, mean, var = normalize_groups(x, GROUPS, weight, bias, eps=1e-5)
    expected = reference(x, weight, bias)

    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert is_channels_last(out) == is_channels_last(x)
    parts = x.detach().chunk(GROUPS)
    dims = [0, *range(2, len(shape))]
    torch.testing.assert_close(mean, torch.stack([p.mean(dims) for p in parts]))
    torch.testing.assert_close(var, torch.stack([p.var(dims, correction=1) for p in parts]))
    actual_grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for actual_grad, expected_grad in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-9, atol=1e-10)


def test_normalize_groups_takes_gradients_in_another_layout(computation: str) -> None:
    """A channels-last input whose gradient arrives contiguous still gets the right gradient."""
    x = to_channels_last(torch.randn(GROUPS * 2, 3, 4, 5, dtype=torch.float64))
    x.requires_grad_()
    out, _, _ = normalize_groups(x, GROUPS, None, None, eps=1e-5)
    grad_out = torch.randn(out.shape, dtype=torch.float64).contiguous()
    (actual,) = torch.autograd.grad(out, x, grad_out)
    (expected,) = torch.autograd.grad(reference(x, None, None), x, grad_out)
    torch.testing.assert_close(actual, expected)


def test_normalize_groups_allows_inplace_activation_after_it() -> None:
    x = torch.randn(GROUPS * 2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    out, _, _ = normalize_groups(to_channels_last(x), GROUPS, None, None, eps=1e-5)
    F.relu(out, inplace=True).sum().backward()
    assert x.grad is not None


def test_normalize_groups_rejects_unequal_groups() -> None:
    with pytest.raises(ValueError, match="10 rows, which do not split into 3 equal groups"):
        normalize_groups(torch.randn(10, 2), 3, None, None, eps=1e-5)


def test_normalize_groups_rejects_single_value_groups() -> None:
    with pytest.raises(ValueError, match="more than 1 value per channel and group, got 1"):
        normalize_groups(torch.randn(3, 2), 3, None, None, eps=1e-5)


def run_literal_updates(module: nn.BatchNorm2d, inputs: list[Tensor]) -> None:
    for x in inputs:
        module(x)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None], ids=["0.1", "0.5", "cumulative"])
def test_running_stats_follow_literal_order(momentum: float | None, computation: str) -> None:
    """Groups standing for several pairs, in any row order, update as the literal sequence."""
    generator = torch.Generator().manual_seed(1)
    literal = nn.BatchNorm2d(3, momentum=momentum).double()
    literal.running_mean.normal_(generator=generator)
    literal.num_batches_tracked.fill_(2)
    grouped = nn.Sequential(nn.BatchNorm2d(3, momentum=momentum).double())
    grouped[0].load_state_dict(literal.state_dict())

    # Three groups; group 1 stands for pairs 0 and 4, group 0 for pair 2, group 2 for pair 1.
    x = torch.randn(GROUPS * ROWS_PER_GROUP, 3, 5, 5, generator=generator, dtype=torch.float64)
    groups = x.chunk(GROUPS)
    pairs_of_groups = [[2], [0, 4], [1]]
    literal_order = {pair: group for group, pairs in enumerate(pairs_of_groups) for pair in pairs}
    run_literal_updates(literal, [groups[literal_order[pair]] for pair in sorted(literal_order)])

    initial_mean = grouped[0].running_mean.clone()
    norm = GroupedBatchNorm()
    with norm.patch(grouped):
        norm.groups = pairs_of_groups
        out = grouped(x)
    # The patch only lasts for the pass, and the updates wait for update_running_stats.
    assert "forward" not in vars(grouped[0])
    assert torch.equal(grouped[0].running_mean, initial_mean)
    norm.update_running_stats()

    torch.testing.assert_close(out, reference(x, grouped[0].weight, grouped[0].bias))
    torch.testing.assert_close(grouped[0].running_mean, literal.running_mean)
    torch.testing.assert_close(grouped[0].running_var, literal.running_var)
    assert int(grouped[0].num_batches_tracked) == int(literal.num_batches_tracked) == 6


def test_running_stats_of_repeated_calls_interleave_per_pair() -> None:
    """A module called twice per forward pass updates in the literal order (pair, then call)."""
    generator = torch.Generator().manual_seed(2)
    literal = nn.BatchNorm1d(2).double()
    grouped = nn.BatchNorm1d(2).double()
    first = torch.randn(2 * ROWS_PER_GROUP, 2, generator=generator, dtype=torch.float64)
    second = torch.randn(2 * ROWS_PER_GROUP, 2, generator=generator, dtype=torch.float64)
    # Pair 0 calls the module on its rows of `first`, then of `second`; then pair 1 does.
    for pair in range(2):
        rows = slice(pair * ROWS_PER_GROUP, (pair + 1) * ROWS_PER_GROUP)
        literal(first[rows])
        literal(second[rows])

    norm = GroupedBatchNorm()
    with norm.patch(grouped):
        norm.groups = [[0], [1]]
        grouped(first)
        grouped(second)
    norm.update_running_stats()

    torch.testing.assert_close(grouped.running_mean, literal.running_mean)
    torch.testing.assert_close(grouped.running_var, literal.running_var)


def test_eval_mode_batch_norm_is_not_patched() -> None:
    module = nn.BatchNorm2d(3).eval()
    norm = GroupedBatchNorm()
    with norm.patch(module):
        assert "forward" not in vars(module)


def test_batch_norm_without_running_stats_is_patched_in_eval_mode() -> None:
    module = nn.BatchNorm2d(3, track_running_stats=False).eval().double()
    x = torch.randn(GROUPS * ROWS_PER_GROUP, 3, 2, 2, dtype=torch.float64)
    norm = GroupedBatchNorm()
    with norm.patch(module):
        norm.groups = [[0], [1], [2]]
        out = module(x)
    torch.testing.assert_close(out, reference(x, module.weight, module.bias))


def test_rejects_instance_norm_with_running_stats() -> None:
    net = nn.Sequential(nn.InstanceNorm2d(3, track_running_stats=True)).train()
    with pytest.raises(NotImplementedError, match="instance norm"), GroupedBatchNorm().patch(net):
        pass


def test_to_channels_last_sets_strides_for_one_channel() -> None:
    x = torch.randn(2, 1, 3, 4)
    converted = to_channels_last(x)
    assert converted.stride() == (12, 1, 4, 1)
    assert is_channels_last(converted)
    assert not is_channels_last(x)
    torch.testing.assert_close(converted, x)
