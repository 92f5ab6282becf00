"""Shapes, gradients and bank independence of every registered architecture."""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lws_lightning.nets import ARCHITECTURES, MultiTaskNet, build_net
from lws_lightning.sharing import WeightBank

NUM_CLASSES = [5, 3, 7]
BATCH = 2

# (architecture, tiny options, input shapes). Tiny widths keep every case fast on CPU.
TINY_CASES: list[tuple[str, dict[str, Any], list[tuple[int, int, int]]]] = [
    ("dkl_convnet", {"width": 4, "hidden": 8}, [(1, 28, 28), (3, 16, 16), (1, 8, 12)]),
    ("routing_convnet", {"width": 4, "hidden": 8}, [(3, 32, 32), (1, 16, 16), (3, 20, 36)]),
    ("slo_convnet", {"width": 4}, [(1, 105, 105), (1, 28, 28), (3, 16, 20)]),
    (
        "resnet18",
        {"variant": "cifar", "base_width": 4},
        [(3, 32, 32), (1, 8, 8), (3, 17, 23)],
    ),
    (
        "resnet18",
        {"variant": "omniglot", "base_width": 4},
        [(1, 105, 105), (1, 28, 28), (3, 33, 40)],
    ),
]

# Shareable layer count of each architecture.
SHAREABLE_LAYERS = {
    "dkl_convnet": 4,
    "routing_convnet": 3,
    "slo_convnet": 4,
    "resnet18": 8,
}


def _case_id(architecture: str, options: dict[str, Any]) -> str:
    return f"{architecture}-{options['variant']}" if "variant" in options else architecture


TINY_IDS = [_case_id(name, options) for name, options, _ in TINY_CASES]


def _random_path(net: MultiTaskNet, generator: torch.Generator) -> list[int]:
    return [int(torch.randint(banks, (1,), generator=generator)) for banks in net.num_banks]


def _trunk_map_sides(net: MultiTaskNet, x: Tensor) -> list[int]:
    """Run ``x`` through the trunk on bank 0 and return the map height after each layer."""
    sides = []
    h = x
    for layer in net.layers:
        h = layer.banks[0](h) if isinstance(layer, WeightBank) else layer(h)
        sides.append(h.shape[-2])
    return sides


def test_registry_lists_all_architectures() -> None:
    assert set(ARCHITECTURES) == set(SHAREABLE_LAYERS)


@pytest.mark.parametrize(("architecture", "options", "input_shapes"), TINY_CASES, ids=TINY_IDS)
@pytest.mark.parametrize("num_banks", [1, 3])
def test_logit_shapes_per_task(
    architecture: str,
    options: dict[str, Any],
    input_shapes: list[tuple[int, int, int]],
    num_banks: int,
) -> None:
    generator = torch.Generator().manual_seed(0)
    for input_shape in input_shapes:
        net = build_net(architecture, num_banks, NUM_CLASSES, input_shape, **options)
        assert net.num_banks == [num_banks] * SHAREABLE_LAYERS[architecture]
        x = torch.randn(BATCH, *input_shape, generator=generator)
        for train in (True, False):
            net.train(train)
            for task, classes in enumerate(NUM_CLASSES):
                path = _random_path(net, generator)
                logits = net.forward_task(x, task, path)
                assert logits.shape == (BATCH, classes), (input_shape, train, task, path)
                assert torch.isfinite(logits).all(), (input_shape, train, task, path)


@pytest.mark.parametrize(
    ("architecture", "options", "input_shape"),
    [
        ("dkl_convnet", {}, (1, 28, 28)),
        ("routing_convnet", {}, (3, 32, 32)),
        ("slo_convnet", {}, (1, 105, 105)),
        pytest.param("resnet18", {"variant": "cifar"}, (3, 32, 32), marks=pytest.mark.slow),
        pytest.param("resnet18", {"variant": "omniglot"}, (1, 105, 105), marks=pytest.mark.slow),
    ],
    ids=["dkl_convnet", "routing_convnet", "slo_convnet", "resnet18-cifar", "resnet18-omniglot"],
)
def test_logit_shapes_at_default_size(
    architecture: str, options: dict[str, Any], input_shape: tuple[int, int, int]
) -> None:
    net = build_net(architecture, 2, [5, 5], input_shape, **options)
    x = torch.randn(BATCH, *input_shape)
    for train in (True, False):
        net.train(train)
        logits = net.forward_task(x, 1, [1] * len(net.num_banks))
        assert logits.shape == (BATCH, 5)


def test_multitasknet_forward_all_tasks() -> None:
    net = build_net("resnet18", 2, NUM_CLASSES, (3, 32, 32), variant="cifar", base_width=4)
    inputs = [torch.randn(BATCH, 3, 32, 32) for _ in NUM_CLASSES]
    assignment = torch.randint(2, (len(net.num_banks), len(NUM_CLASSES)))
    outputs = net(inputs, assignment)
    assert [tuple(logits.shape) for logits in outputs] == [(BATCH, c) for c in NUM_CLASSES]


@pytest.mark.parametrize(
    ("variant", "input_shape", "expected_sides"),
    [
        # stem, then the 8 residual blocks: stages 2 to 4 halve the map in their first block.
        ("cifar", (3, 32, 32), [32, 32, 32, 16, 16, 8, 8, 4, 4]),
        # stem: 7×7 stride-2 conv 105 -> 53, 3×3 stride-2 max-pool 53 -> 27.
        ("omniglot", (1, 105, 105), [27, 27, 27, 14, 14, 7, 7, 4, 4]),
    ],
)
def test_resnet18_map_sizes(
    variant: str, input_shape: tuple[int, int, int], expected_sides: list[int]
) -> None:
    net = build_net("resnet18", 1, [5], input_shape, variant=variant, base_width=4).eval()
    with torch.no_grad():
        sides = _trunk_map_sides(net, torch.randn(1, *input_shape))
    assert sides == expected_sides


def test_resnet18_stage_widths_and_shortcuts() -> None:
    net = build_net("resnet18", 1, [5], (3, 32, 32), base_width=64)
    blocks = [layer.banks[0] for layer in net.shareable_layers]
    widths = [block.main[0].out_channels for block in blocks]
    assert widths == [64, 64, 128, 128, 256, 256, 512, 512]
    projections = [not isinstance(block.shortcut, nn.Identity) for block in blocks]
    assert projections == [False, False, True, False, True, False, True, False]


@pytest.mark.parametrize(("architecture", "options", "input_shapes"), TINY_CASES, ids=TINY_IDS)
def test_only_selected_banks_get_gradients(
    architecture: str, options: dict[str, Any], input_shapes: list[tuple[int, int, int]]
) -> None:
    net = build_net(architecture, 3, NUM_CLASSES, input_shapes[0], **options).train()
    path = _random_path(net, torch.Generator().manual_seed(1))
    task = 1

    net.forward_task(torch.randn(BATCH, *input_shapes[0]), task, path).sum().backward()

    for layer_index, (layer, picked) in enumerate(zip(net.shareable_layers, path, strict=True)):
        for bank_index, bank in enumerate(layer.banks):
            grads_missing = [p.grad is None for p in bank.parameters()]
            if bank_index == picked:
                assert not any(grads_missing), (layer_index, bank_index)
            else:
                assert all(grads_missing), (layer_index, bank_index)
    for position, layer in enumerate(net.layers):
        if position not in net.shareable_positions:
            assert all(p.grad is not None for p in layer.parameters()), position
    for head_index, head in enumerate(net.heads):
        got_grad = [p.grad is not None for p in head.parameters()]
        assert all(got_grad) if head_index == task else not any(got_grad), head_index


@pytest.mark.parametrize(("architecture", "options", "input_shapes"), TINY_CASES, ids=TINY_IDS)
def test_banks_are_independent_copies(
    architecture: str, options: dict[str, Any], input_shapes: list[tuple[int, int, int]]
) -> None:
    net = build_net(architecture, 3, NUM_CLASSES, input_shapes[0], **options)
    for layer_index, layer in enumerate(net.shareable_layers):
        for first, second in combinations(range(layer.num_banks), 2):
            params_a = list(layer.banks[first].parameters())
            params_b = list(layer.banks[second].parameters())
            assert len(params_a) == len(params_b)
            for a, b in zip(params_a, params_b, strict=True):
                assert a is not b, (layer_index, first, second)
                assert a.data_ptr() != b.data_ptr(), (layer_index, first, second)
                if a.ndim >= 2:  # conv and linear weights are random; BatchNorm starts at 1 and 0
                    assert not torch.equal(a, b), (layer_index, first, second)
    unique = {id(p) for p in net.parameters()}
    total = sum(1 for module in net.modules() for _ in module.parameters(recurse=False))
    assert len(unique) == total


@pytest.mark.parametrize(("architecture", "options", "input_shapes"), TINY_CASES, ids=TINY_IDS)
def test_weights_use_he_uniform_init(
    architecture: str, options: dict[str, Any], input_shapes: list[tuple[int, int, int]]
) -> None:
    net = build_net(architecture, 2, NUM_CLASSES, input_shapes[0], **options)
    for name, module in net.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        fan_in = module.weight[0].numel()
        he_bound = math.sqrt(6.0 / fan_in)
        assert module.weight.abs().max() <= he_bound, name
        # PyTorch's default init stays within 1/sqrt(fan_in); He init exceeds it with
        # probability 1 - (1/sqrt(6))**numel, which is near 1 for every layer here.
        assert module.weight.abs().max() > 1.0 / math.sqrt(fan_in), name
        if module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0, name


def test_build_net_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown") as error:
        build_net("vgg16", 2, [5], (3, 32, 32))
    for name in ARCHITECTURES:
        assert name in str(error.value)


def test_build_net_drops_none_options() -> None:
    net = build_net("dkl_convnet", 1, [10], (1, 28, 28), width=None, hidden=None)
    first_conv = net.shareable_layers[0].banks[0][0]
    assert first_conv.out_channels == 32
    assert net.heads[0].in_features == 128


def test_resnet18_unknown_variant_lists_choices() -> None:
    with pytest.raises(ValueError, match="cifar, omniglot"):
        build_net("resnet18", 1, [5], (3, 32, 32), variant="imagenet")


@pytest.mark.parametrize(
    ("architecture", "input_shape"),
    [
        ("dkl_convnet", (1, 7, 28)),
        ("routing_convnet", (3, 15, 32)),
        ("slo_convnet", (1, 105, 8)),
    ],
)
def test_convnet_rejects_too_small_input(
    architecture: str, input_shape: tuple[int, int, int]
) -> None:
    with pytest.raises(ValueError, match="too small"):
        build_net(architecture, 1, [5], input_shape)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_builder_rejects_input_shape_without_channels(architecture: str) -> None:
    with pytest.raises(ValueError, match="expected \\(channels, height, width\\)"):
        build_net(architecture, 1, [5], (32, 32))
