"""Weights prepared once per pass: channels-last copies and folded eval-mode batch norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lws_lightning.engine._group_norm import to_channels_last
from lws_lightning.engine._layer_weights import _folding_pays, prepared_layers


def with_running_stats(norm: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    norm.running_mean.normal_(generator=generator)
    norm.running_var.uniform_(0.5, 2.0, generator=generator)
    if norm.affine:
        norm.weight.data.normal_(generator=generator)
        norm.bias.data.normal_(generator=generator)
    return norm


CASES = {
    "conv2d": (nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), (2, 3, 5, 5)),
    "conv2d_bias_plain_norm": (
        nn.Conv2d(3, 4, 3, stride=2),
        nn.BatchNorm2d(4, affine=False),
        (2, 3, 6, 6),
    ),
    "conv1d": (nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), (2, 3, 7)),
    "linear": (nn.Linear(3, 4), nn.BatchNorm1d(4), (5, 3)),
}


@pytest.mark.parametrize(("layer", "norm", "shape"), list(CASES.values()), ids=list(CASES))
def test_folded_pair_matches_unfolded(layer: nn.Module, norm: nn.Module, shape: tuple) -> None:
    net = nn.Sequential(layer, with_running_stats(norm), nn.ReLU()).double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        expected = net(x)
        with prepared_layers(net, fold=True):
            assert "forward" in vars(norm)
            actual = net(x)
    torch.testing.assert_close(actual, expected)
    assert "forward" not in vars(layer)
    assert "forward" not in vars(norm)


def test_conv_reuses_channels_last_weight_with_gradients() -> None:
    """Two calls in one pass share the channels-last weight, and its gradient reaches w."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = to_channels_last(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    expected = torch.autograd.grad(conv(x).sum() + conv(2 * x).sum(), conv.weight)[0]
    with prepared_layers(conv, fold=False):
        assert "forward" in vars(conv)
        total = conv(x).sum() + conv(2 * x).sum()
    (actual,) = torch.autograd.grad(total, conv.weight)
    torch.testing.assert_close(actual, expected)
    assert "forward" not in vars(conv)


def test_conv_subclass_is_not_patched() -> None:
    class ScaledConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    conv = ScaledConv(3, 4, 3)
    with prepared_layers(conv, fold=False):
        assert "forward" not in vars(conv)


def test_small_output_keeps_batch_norm() -> None:
    """A call whose output is smaller than the weight runs the batch norm instead of folding."""
    conv, norm = nn.Conv2d(8, 8, 3, padding=1), with_running_stats(nn.BatchNorm2d(8))
    net = nn.Sequential(conv, norm).double().eval()
    small = torch.randn(1, 8, 2, 2, dtype=torch.float64)  # 32 output elements, 576 weights
    large = torch.randn(2, 8, 20, 20, dtype=torch.float64)
    assert not _folding_pays(conv, small)
    assert _folding_pays(conv, large)
    with torch.no_grad():
        expected = [net(small), net(large), net(small)]
        with prepared_layers(net, fold=True):
            actual = [net(small), net(large), net(small)]
    for actual_output, expected_output in zip(actual, expected, strict=True):
        torch.testing.assert_close(actual_output, expected_output)


def test_training_norm_is_not_folded() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with torch.no_grad(), prepared_layers(net, fold=True):
        assert "forward" not in vars(net[1])


def test_shared_or_hooked_modules_are_not_folded() -> None:
    conv = nn.Conv2d(3, 4, 3)
    shared = nn.Sequential(nn.Sequential(conv, nn.BatchNorm2d(4)), conv).eval()
    hooked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    hooked[1].register_forward_hook(lambda *_: None)
    with torch.no_grad(), prepared_layers(shared, True), prepared_layers(hooked, True):
        assert "forward" not in vars(shared[0][1])
        assert "forward" not in vars(hooked[1])


def test_fold_rejects_gradients() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(RuntimeError, match="needs gradients off"), prepared_layers(net, fold=True):
        pass
