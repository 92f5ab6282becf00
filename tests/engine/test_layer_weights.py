"""Weights prepared once per pass: channels-last copies and folded batch norm."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from copy import deepcopy

import pytest
import torch
from torch import nn

from lws_lightning.engine import _layer_weights
from lws_lightning.engine._group_norm import GroupedBatchNorm, to_channels_last
from lws_lightning.engine._layer_weights import PatchMoments, _folding_pays, prepared_layers


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


def grouped_reference_and_folded(
    net: nn.Sequential, x: torch.Tensor, groups: list[list[int]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bool]:
    """Run ``net`` on ``x`` with grouped batch norm, once plain and once with patch moments.

    Returns, for each run, the output, the gradients of a fixed loss and the buffers after the
    running-statistics update, and whether the folded run folded the first pair.
    """
    results = []
    folded = False
    for fold in (False, True):
        copy = deepcopy(net)
        x_copy = x.detach().clone().requires_grad_()
        norm = GroupedBatchNorm()
        with norm.patch(copy), prepared_layers(copy, False, norm) if fold else nullcontext():
            norm.groups = groups
            out = copy(x_copy)
            if fold:
                folded = "forward" in vars(copy[1]) and copy[1](x_copy) is x_copy
        norm.update_running_stats()
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        (out * weights).sum().backward()
        values = {"out": out.detach(), "grad_x": x_copy.grad}
        values.update({f"grad_{k}": p.grad for k, p in copy.named_parameters()})
        values.update(dict(copy.named_buffers()))
        results.append(values)
    return results[0], results[1], folded


BATCH_FOLD_CASES = {
    "one_group": (nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), 1),
    "conv_bias_plain_norm_stride": (
        nn.Conv2d(2, 5, 3, stride=2, padding=1),
        nn.BatchNorm2d(5, affine=False),
        3,
    ),
    "cumulative_average": (
        nn.Conv2d(3, 4, (3, 2), dilation=2),
        nn.BatchNorm2d(4, momentum=None),
        2,
    ),
}


@pytest.mark.parametrize(
    ("conv", "norm", "num_groups"), list(BATCH_FOLD_CASES.values()), ids=list(BATCH_FOLD_CASES)
)
def test_batch_fold_matches_grouped_batch_norm(
    conv: nn.Conv2d, norm: nn.BatchNorm2d, num_groups: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Patch moments give grouped batch norm's output, gradients and running statistics."""
    monkeypatch.setattr(_layer_weights, "PATCH_MOMENTS_MAX_RATIO", math.inf)
    monkeypatch.setattr(_layer_weights, "PATCH_MOMENTS_MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    if norm.affine:
        norm.weight.data.uniform_(-2, 2)
        norm.bias.data.normal_()
    net = nn.Sequential(conv, norm, nn.ReLU()).double().train()
    x = torch.randn(4 * num_groups, conv.in_channels, 9, 8, dtype=torch.float64) + 0.5
    groups = [[group] for group in range(num_groups)]

    expected, actual, folded = grouped_reference_and_folded(net, x, groups)

    assert folded
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-10, atol=1e-12, msg=key)


def smooth_offset_images(generator: torch.Generator) -> torch.Tensor:
    ramp = torch.linspace(0, 50, 28)
    noise = 0.01 * torch.randn(16, 1, 28, 28, generator=generator)
    return 100 + ramp.view(1, 1, -1, 1) + ramp.view(1, 1, 1, -1) + noise


def binary_strokes(generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(16, 1, 105, 105, generator=generator) > 0.1).float()


@pytest.mark.parametrize("images", [smooth_offset_images, binary_strokes])
def test_batch_fold_in_single_precision(images: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    """In float32, patch moments are about as accurate as native batch norm, or more.

    Errors are measured against float64. The smooth images with a large offset and filters
    whose weights sum to 0 make the output variance a nearly cancelling quadratic form, and
    the offset would cancel in the scale's gradient without the centered convolution.
    """
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(1, 32, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.sub_(conv.weight.mean((1, 2, 3), keepdim=True))
    net = nn.Sequential(conv, nn.BatchNorm2d(32)).train()
    x = to_channels_last(images(generator))
    assert x.shape[1] * 9 <= _layer_weights.PATCH_MOMENTS_MAX_RATIO * 32
    monkeypatch.setattr(_layer_weights, "PATCH_MOMENTS_MIN_ELEMENTS", 0)

    native, folded, was_folded = grouped_reference_and_folded(net, x, [[0]])
    exact, _, _ = grouped_reference_and_folded(net.double(), x.double(), [[0]])

    assert was_folded
    for key, value in exact.items():
        scale = value.abs().max()
        native_error = float((native[key].double() - value).abs().max() / scale)
        folded_error = float((folded[key].double() - value).abs().max() / scale)
        assert folded_error <= 10 * native_error + 1e-6, (key, folded_error, native_error)


def test_batch_fold_thresholds() -> None:
    """The defaults fold a 1-channel 3×3 conv of 32 filters on a large map, nothing else."""
    grayscale = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)).train()
    color = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)).train()
    large_map, small_map = (2, 182, 182), (2, 28, 28)  # 2.1M and 50k output elements
    cases = [
        (grayscale, (1, *large_map), True),
        (grayscale, (1, *small_map), False),
        (color, (3, *large_map), False),
    ]
    for net, (channels, *shape), expected in cases:
        norm = GroupedBatchNorm()
        x = torch.randn(shape[0], channels, *shape[1:])
        with torch.no_grad(), norm.patch(net), prepared_layers(net, False, norm):
            norm.groups = [[0]]
            state = _layer_weights._FoldState(net[1], norm, PatchMoments())
            assert _layer_weights._moments_pay(net[0], x, state) == expected
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert not _layer_weights._moments_pay(net[0], x, state)
            assert not _layer_weights._moments_pay(net[0], x.half(), state)
        assert "forward" not in vars(net[1])


def test_patch_moments_once_per_distinct_group() -> None:
    """Repeated groups reuse their moments, and the values equal a fresh computation."""
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(1, 8, 3, padding=1)
    first, second = (torch.randn(4, 1, 9, 9, generator=generator) for _ in range(2))
    moments = PatchMoments()

    mean, covariance = moments(conv, torch.cat([first, second, first]), 3, torch.float64)
    assert moments.computed_groups == 2
    mean_again, covariance_again = moments(conv, torch.cat([second, first]), 2, torch.float64)
    assert moments.computed_groups == 2

    expected_mean, expected_covariance = _layer_weights._patch_moments(
        conv, torch.cat([first, second, first]), 3, torch.float64
    )
    torch.testing.assert_close(mean, expected_mean, rtol=0, atol=0)
    torch.testing.assert_close(covariance, expected_covariance, rtol=0, atol=0)
    torch.testing.assert_close(mean_again, expected_mean[[1, 0]], rtol=0, atol=0)
    torch.testing.assert_close(covariance_again, expected_covariance[[1, 0]], rtol=0, atol=0)


def test_patch_moments_match_content_and_geometry() -> None:
    """Equal sums, another kernel geometry or inputs with gradients compute anew."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 1, 9, 9, generator=generator)
    # The same values in another order: the sum matches, the patches do not.
    mirrored = images.flip(-1)
    padded, unpadded = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(1, 8, 3, padding=0)
    moments = PatchMoments()

    moments(padded, images, 1, torch.float64)
    mirrored_mean, _ = moments(padded, mirrored, 1, torch.float64)
    assert moments.computed_groups == 2
    expected_mean, _ = _layer_weights._patch_moments(padded, mirrored, 1, torch.float64)
    torch.testing.assert_close(mirrored_mean, expected_mean, rtol=0, atol=0)

    moments(unpadded, images, 1, torch.float64)
    assert moments.computed_groups == 3
    moments(padded, images.clone().requires_grad_(), 1, torch.float64)
    assert moments.computed_groups == 4
