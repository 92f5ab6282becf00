"""Training-mode batch norm run after max-pooling matches batch norm, ReLU, then max-pooling."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lws_lightning.engine import BatchedEngine, LiteralEngine, _pool_norm
from lws_lightning.engine._group_norm import GroupedBatchNorm, to_channels_last
from lws_lightning.engine._pool_first import pool_before_relu
from lws_lightning.engine._pool_norm import pooled_batch_norm, pooling_applies
from lws_lightning.nets import build_net
from lws_lightning.nets.blocks import conv_block

GROUPS = 3
ROWS = 4


def reference(x: Tensor, norm: nn.BatchNorm2d, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize each group with its own statistics, then max-pool 2×2 (no ReLU)."""
    outputs, means, variances = [], [], []
    for rows in x.chunk(num_groups):
        outputs.append(F.batch_norm(rows, None, None, norm.weight, norm.bias, True, 0.0, norm.eps))
        means.append(rows.mean((0, 2, 3)))
        variances.append(rows.var((0, 2, 3), unbiased=True))
    return F.max_pool2d(torch.cat(outputs), 2), torch.stack(means), torch.stack(variances)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("binary", [False, True], ids=["gaussian", "binary_ties"])
@pytest.mark.parametrize("channels", [5, 1])
def test_matches_normalize_then_pool(
    channels_last: bool, affine: bool, binary: bool, channels: int
) -> None:
    """Outputs, statistics and gradients for x, scale and shift agree to float64 rounding."""
    generator = torch.Generator().manual_seed(0)
    shape = (GROUPS * ROWS, channels, 7, 6)
    if binary:
        # Binary maps make exact ties in almost every window.
        x = torch.randint(2, shape, generator=generator).double()
    else:
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 2
    if channels_last:
        x = to_channels_last(x)
    norm = nn.BatchNorm2d(channels, affine=affine).double()
    if affine:
        norm.weight.data.uniform_(0.5, 2.0, generator=generator)
        norm.bias.data.normal_(generator=generator)
    upstream = torch.randn(GROUPS * ROWS, channels, 3, 3, generator=generator, dtype=torch.float64)
    pool = nn.MaxPool2d(2)

    results = []
    for compute in (reference, lambda x, norm, groups: pooled_batch_norm(norm, pool, x, groups)):
        leaf = x.clone().requires_grad_()
        for parameter in norm.parameters():
            parameter.grad = None
        out, mean, var = compute(leaf, norm, GROUPS)
        out.backward(upstream)
        grads = [leaf.grad] + [parameter.grad for parameter in norm.parameters()]
        results.append((out.detach(), mean.detach(), var.detach(), grads))

    (expected, *expected_stats, expected_grads), (actual, *actual_stats, actual_grads) = results
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for stat, expected_stat in zip(actual_stats, expected_stats, strict=True):
        torch.testing.assert_close(stat, expected_stat, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("case", "pool", "dtype"),
    [
        ("negative_scale", nn.MaxPool2d(2), torch.float64),
        ("overlapping_windows", nn.MaxPool2d(3, stride=2), torch.float64),
        ("padding", nn.MaxPool2d(2, padding=1), torch.float64),
        ("ceil_mode", nn.MaxPool2d(2, ceil_mode=True), torch.float64),
        ("half_precision", nn.MaxPool2d(2), torch.bfloat16),
        ("1d_pool", nn.MaxPool1d(2), torch.float64),
    ],
)
def test_does_not_apply(
    case: str, pool: nn.Module, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_pool_norm, "POOLED_MIN_ELEMENTS", 0)
    norm = nn.BatchNorm2d(4).to(dtype)
    if case == "negative_scale":
        norm.weight.data[1] = -0.5
    x = torch.randn(GROUPS * ROWS, 4, 6, 6).to(dtype)
    assert not pooling_applies(norm, pool, x, GROUPS)
    assert pooling_applies(nn.BatchNorm2d(4).to(torch.float64), nn.MaxPool2d(2), x.double(), 3)


def test_small_groups_keep_batch_norm() -> None:
    norm, pool = nn.BatchNorm2d(4), nn.MaxPool2d(2)
    large_norm = nn.BatchNorm2d(8)
    x = torch.randn(GROUPS * ROWS, 4, 6, 6)
    assert not pooling_applies(norm, pool, x, GROUPS)
    large = torch.randn(2 * 16, 8, 100, 100)
    assert pooling_applies(large_norm, pool, large, 2)


def test_block_records_running_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """A conv block under the patches updates running statistics as separate passes do."""
    monkeypatch.setattr(_pool_norm, "POOLED_MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    block = conv_block(2, 4).double().train()
    block[1].momentum = None
    separate = copy.deepcopy(block)
    x = torch.randn(GROUPS * ROWS, 2, 8, 8, dtype=torch.float64)
    expected = torch.cat([separate(rows) for rows in x.chunk(GROUPS)])
    norm = GroupedBatchNorm()
    with norm.patch(block), pool_before_relu(block, norm):
        norm.groups = [[group] for group in range(GROUPS)]
        actual = block(x)
    norm.update_running_stats()
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for name, buffer in separate[1].named_buffers():
        torch.testing.assert_close(dict(block[1].named_buffers())[name], buffer, rtol=1e-12, atol=0)


def test_negative_scale_matches_literal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bank whose batch norm has a negative scale runs unpooled and matches the literal engine."""
    monkeypatch.setattr(_pool_norm, "POOLED_MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    net = build_net("slo_convnet", 2, [3, 4], (1, 16, 16), width=4).double().train()
    net.layers[1].banks[0][1].weight.data[0] = -1.0
    literal_net = copy.deepcopy(net)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 1, 16, 16, generator=generator, dtype=torch.float64)
    y = torch.stack([torch.randint(3, (4,), generator=generator)] * 2)
    assignments = torch.tensor([[[0, 1]] * 4, [[1, 0]] * 4, [[0, 0]] * 4])

    expected = LiteralEngine().backward(literal_net, x, y, assignments, Tensor.backward)
    actual = BatchedEngine().backward(net, x, y, assignments, Tensor.backward)

    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=0)
    for (name, parameter), literal in zip(
        net.named_parameters(), literal_net.parameters(), strict=True
    ):
        if literal.grad is None:
            assert parameter.grad is None, name
        else:
            torch.testing.assert_close(parameter.grad, literal.grad, rtol=1e-8, atol=1e-12)
