"""The batched engine reproduces the literal engine on every registered architecture.

Each case builds one tiny float64 net per architecture, copies it, and runs the same inputs
and assignments through both engines. "Equal" means a relative difference of at most 1e-5 per
tensor: the largest absolute difference over the largest absolute value, or over 1e-9 for
tensors that are 0 up to rounding. In float64 the measured differences are below 1e-10.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lws_lightning.engine import (
    ENGINES,
    BatchedEngine,
    LiteralEngine,
    StepConfig,
    _group_norm,
    _layer_weights,
    _pool_norm,
    build_engine,
    lws_step,
)
from lws_lightning.engine._plan import make_pairs
from lws_lightning.nets import ARCHITECTURES, MultiTaskNet, build_net
from lws_lightning.nets.resnets import RESNET_VARIANTS
from lws_lightning.sharing import AssignmentDistribution, WeightBank

RTOL = 1e-5
# Floor of the scale in relative differences: some true gradients are exactly 0, such as the
# bias of a layer followed by batch norm, and both engines return rounding noise for them.
SCALE_FLOOR = 1e-9
NUM_TASKS = 3
NUM_BANKS = 3
BATCH = 4
SIDE = 16
NUM_CLASSES = [5, 3, 4]

# Options that shrink an architecture, applied when its builder takes them.
TINY_OPTIONS = {"width": 4, "hidden": 8, "base_width": 4}
# Architectures whose builder has variants; every variant is tested.
VARIANTS: dict[str, tuple[str, ...]] = {"resnet18": RESNET_VARIANTS}


def _architecture_cases() -> list[Any]:
    cases = []
    for name in ARCHITECTURES:
        for variant in VARIANTS.get(name, (None,)):
            case_id = name if variant is None else f"{name}-{variant}"
            cases.append(pytest.param(name, variant, id=case_id))
    return cases


ARCHITECTURE_CASES = _architecture_cases()


def tiny_net(name: str, variant: str | None, num_banks: int = NUM_BANKS) -> MultiTaskNet:
    """Build a small float64 version of architecture ``name`` for 16×16 inputs."""
    builder = ARCHITECTURES[name]
    parameters = inspect.signature(builder).parameters
    options: dict[str, Any] = {k: v for k, v in TINY_OPTIONS.items() if k in parameters}
    if variant is not None:
        options["variant"] = variant
    default_shape = parameters["input_shape"].default if "input_shape" in parameters else None
    channels = default_shape[0] if isinstance(default_shape, tuple) else 3
    torch.manual_seed(0)
    net = build_net(name, num_banks, NUM_CLASSES, (channels, SIDE, SIDE), **options)
    return net.double()


def batch(net: MultiTaskNet, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(NUM_TASKS, BATCH, *net.input_shape, generator=generator, dtype=torch.float64)
    y = torch.stack(
        [torch.randint(classes, (BATCH,), generator=generator) for classes in NUM_CLASSES]
    )
    return x, y


def assignments_with_duplicates(net: MultiTaskNet) -> Tensor:
    """Return 6 assignments where bank 2 is never used and samples repeat paths and prefixes.

    Samples 0 and 3 are identical, samples 1 and 4 differ only in the last shareable layer,
    and sample 5 picks bank 0 everywhere.
    """
    generator = torch.Generator().manual_seed(7)
    layers = len(net.num_banks)
    samples = torch.randint(2, (6, layers, NUM_TASKS), generator=generator)
    samples[3] = samples[0]
    samples[4] = samples[1]
    samples[4, -1] = 1 - samples[1, -1]
    samples[5] = 0
    return samples


def relative_difference(actual: Tensor, expected: Tensor) -> float:
    scale = expected.abs().max().clamp_min(SCALE_FLOOR)
    return float((actual - expected).abs().max() / scale)


def assert_tensors_match(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if value.is_floating_point():
            assert relative_difference(actual[key], value) <= RTOL, key
        else:
            assert torch.equal(actual[key], value), key


def gradients(net: nn.Module) -> dict[str, Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in net.named_parameters()}


def test_registry_builds_batched_engine() -> None:
    assert ENGINES["batched"] is BatchedEngine
    assert isinstance(build_engine("batched"), BatchedEngine)


@pytest.mark.parametrize(("name", "variant"), ARCHITECTURE_CASES)
def test_evaluate_matches_literal(name: str, variant: str | None) -> None:
    net = tiny_net(name, variant).eval()
    x, y = batch(net, seed=1)
    assignments = assignments_with_duplicates(net)

    expected = LiteralEngine().evaluate(net, x, y, assignments)
    actual = BatchedEngine().evaluate(net, x, y, assignments)

    assert actual.shape == (len(assignments),)
    assert relative_difference(actual, expected) <= RTOL
    assert actual[0] == pytest.approx(actual[3].item(), rel=1e-12)


@pytest.fixture(params=["whole_tensor", "per_group", "patch_moments", "pool_first"])
def batch_norm_computation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each way of computing training-mode batch norm.

    whole_tensor and per_group normalize the convolution outputs with whole-tensor operations
    or with one native call per group. patch_moments folds batch norm into every convolution
    before it, with statistics from the input patches, which the default threshold allows
    only for convolutions with few inputs per output value. pool_first runs every batch norm
    before ReLU and max-pooling after the pooling, which the default threshold allows only
    for large groups, and folds batch norm into first convolutions on one-channel inputs
    (9 inputs per value for 4 output channels), as the default thresholds do for the SLO
    ConvNet on 105×105 images.
    """
    threshold = 2**62 if request.param == "whole_tensor" else 0
    monkeypatch.setattr(_group_norm, "PER_GROUP_MIN_ELEMENTS", threshold)
    ratios = {"patch_moments": math.inf, "pool_first": 3.0}
    monkeypatch.setattr(_layer_weights, "PATCH_MOMENTS_MAX_RATIO", ratios.get(request.param, 0.0))
    monkeypatch.setattr(_layer_weights, "PATCH_MOMENTS_MIN_ELEMENTS", 0)
    pooled_min = 0 if request.param == "pool_first" else 2**62
    monkeypatch.setattr(_pool_norm, "POOLED_MIN_ELEMENTS", pooled_min)
    return request.param


@pytest.mark.parametrize(("name", "variant"), ARCHITECTURE_CASES)
def test_backward_matches_literal(
    name: str, variant: str | None, batch_norm_computation: str
) -> None:
    literal_net = tiny_net(name, variant).train()
    batched_net = copy.deepcopy(literal_net)
    x, y = batch(literal_net, seed=2)
    assignments = assignments_with_duplicates(literal_net)

    expected = LiteralEngine().backward(literal_net, x, y, assignments, Tensor.backward)
    actual = BatchedEngine().backward(batched_net, x, y, assignments, Tensor.backward)

    assert relative_difference(actual, expected) <= RTOL
    expected_grads = gradients(literal_net)
    actual_grads = gradients(batched_net)
    for key, grad in expected_grads.items():
        if grad is None:
            # Bank 2 is never picked, so its weights get no gradient in either engine.
            assert actual_grads[key] is None, key
        else:
            assert relative_difference(actual_grads[key], grad) <= RTOL, key
    assert any(grad is None for grad in expected_grads.values())
    assert_tensors_match(dict(batched_net.named_buffers()), dict(literal_net.named_buffers()))


def _run_step(
    net: MultiTaskNet,
    engine: LiteralEngine | BatchedEngine,
    make_optimizer: Callable[[Any], torch.optim.Optimizer],
    prior: Tensor,
):
    distribution = AssignmentDistribution(net.num_banks, NUM_TASKS, p_min=0.0, prior=prior)
    optimizer = make_optimizer(net.parameters())
    generator = torch.Generator().manual_seed(3)
    result = lws_step(
        net,
        distribution,
        optimizer,
        batch(net, seed=4),
        batch(net, seed=5),
        StepConfig(nes_samples=8, sgd_samples=8, nes_lr=0.1),
        generator,
        engine=engine,
    )
    return result, distribution


OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize(("name", "variant"), ARCHITECTURE_CASES)
def test_lws_step_matches_literal(
    name: str, variant: str | None, optimizer: str, batch_norm_computation: str
) -> None:
    literal_net = tiny_net(name, variant)
    batched_net = copy.deepcopy(literal_net)
    # π puts no mass on bank 2, and most on bank 0 of the last layer, so the 8 samples of a
    # task repeat prefixes and paths.
    layers = len(literal_net.num_banks)
    prior = torch.zeros(layers, NUM_TASKS, NUM_BANKS, dtype=torch.float64)
    prior[..., :2] = 0.5
    prior[-1, :, :2] = torch.tensor([0.9, 0.1], dtype=torch.float64)

    expected, expected_pi = _run_step(literal_net, LiteralEngine(), OPTIMIZERS[optimizer], prior)
    actual, actual_pi = _run_step(batched_net, BatchedEngine(), OPTIMIZERS[optimizer], prior)

    assert torch.equal(actual.nes_assignments, expected.nes_assignments)
    assert relative_difference(actual.nes_losses, expected.nes_losses) <= RTOL
    assert relative_difference(actual_pi.probs, expected_pi.probs) <= RTOL
    assert torch.equal(actual.sgd_assignments, expected.sgd_assignments)
    assert relative_difference(actual.sgd_losses, expected.sgd_losses) <= RTOL
    assert_tensors_match(batched_net.state_dict(), literal_net.state_dict())


@pytest.mark.parametrize(("name", "variant"), ARCHITECTURE_CASES)
def test_memory_chunks_change_no_result(name: str, variant: str | None) -> None:
    """A memory ratio small enough to split the pass into many chunks changes no result."""
    literal_net = tiny_net(name, variant).train()
    batched_net = copy.deepcopy(literal_net)
    x, y = batch(literal_net, seed=6)
    assignments = assignments_with_duplicates(literal_net)
    engine = BatchedEngine(memory_ratio=0.05, min_chunk_bytes=0)
    assert len(engine._plan(batched_net, x, make_pairs(assignments), keep_graph=True)) > 2

    expected = LiteralEngine().backward(literal_net, x, y, assignments, Tensor.backward)
    actual = engine.backward(batched_net, x, y, assignments, Tensor.backward)

    assert relative_difference(actual, expected) <= RTOL
    for key, grad in gradients(literal_net).items():
        if grad is not None:
            assert relative_difference(gradients(batched_net)[key], grad) <= RTOL, key
    assert_tensors_match(dict(batched_net.named_buffers()), dict(literal_net.named_buffers()))


@pytest.mark.parametrize(("name", "variant"), ARCHITECTURE_CASES)
def test_one_group_per_call_changes_no_result(name: str, variant: str | None) -> None:
    """Calls limited to one group each, so that every module runs per group, agree too."""
    literal_net = tiny_net(name, variant).train()
    batched_net = copy.deepcopy(literal_net)
    x, y = batch(literal_net, seed=12)
    assignments = assignments_with_duplicates(literal_net)

    expected = LiteralEngine().backward(literal_net, x, y, assignments, Tensor.backward)
    actual = BatchedEngine(max_call_bytes=1).backward(
        batched_net, x, y, assignments, Tensor.backward
    )

    assert relative_difference(actual, expected) <= RTOL
    for key, grad in gradients(literal_net).items():
        if grad is not None:
            assert relative_difference(gradients(batched_net)[key], grad) <= RTOL, key
    assert_tensors_match(dict(batched_net.named_buffers()), dict(literal_net.named_buffers()))


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_running_stats_match_literal(
    channels_last: bool, momentum: float | None, batch_norm_computation: str
) -> None:
    """Running statistics follow the literal order of updates, also for cumulative averages."""
    literal_net = tiny_net("dkl_convnet", None).train()
    for module in literal_net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = momentum
            module.num_batches_tracked.fill_(5)
            module.running_mean.normal_()
    batched_net = copy.deepcopy(literal_net)
    x, y = batch(literal_net, seed=8)
    assignments = assignments_with_duplicates(literal_net)

    LiteralEngine().backward(literal_net, x, y, assignments, Tensor.backward)
    BatchedEngine(channels_last=channels_last).backward(
        batched_net, x, y, assignments, Tensor.backward
    )

    assert_tensors_match(dict(batched_net.named_buffers()), dict(literal_net.named_buffers()))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(("name", "variant"), ARCHITECTURE_CASES)
def test_predict_matches_literal(name: str, variant: str | None, train: bool) -> None:
    literal_net = tiny_net(name, variant).train(train)
    batched_net = copy.deepcopy(literal_net)
    x, _ = batch(literal_net, seed=9)
    path = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0][: len(literal_net.num_banks)])

    with torch.no_grad():
        expected = LiteralEngine().predict(literal_net, x[2], 2, path)
        actual = BatchedEngine().predict(batched_net, x[2], 2, path)

    assert actual.shape == (BATCH, NUM_CLASSES[2])
    assert relative_difference(actual, expected) <= RTOL
    assert_tensors_match(dict(batched_net.named_buffers()), dict(literal_net.named_buffers()))


def test_feature_inputs_with_batchnorm1d_match_literal() -> None:
    """Nets on feature vectors with BatchNorm1d in banks, shared layers and heads work too."""
    features, hidden = 6, 8
    torch.manual_seed(0)

    def bank_block() -> nn.Module:
        return nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU())

    layers = [
        WeightBank(bank_block, 3),
        nn.Sequential(nn.Linear(hidden, features), nn.BatchNorm1d(features, affine=False)),
        WeightBank(bank_block, 3),
    ]
    heads = [nn.Sequential(nn.BatchNorm1d(hidden), nn.Linear(hidden, c)) for c in NUM_CLASSES]
    literal_net = MultiTaskNet(layers, heads, (features,), NUM_CLASSES).double().train()
    batched_net = copy.deepcopy(literal_net)
    x, y = batch(literal_net, seed=10)
    assignments = torch.randint(3, (5, 2, NUM_TASKS), generator=torch.Generator().manual_seed(0))

    expected = LiteralEngine().backward(literal_net, x, y, assignments, Tensor.backward)
    actual = BatchedEngine().backward(batched_net, x, y, assignments, Tensor.backward)

    assert relative_difference(actual, expected) <= RTOL
    for key, grad in gradients(literal_net).items():
        if grad is not None:
            assert relative_difference(gradients(batched_net)[key], grad) <= RTOL, key
    assert_tensors_match(dict(batched_net.named_buffers()), dict(literal_net.named_buffers()))


class ScaleInPlace(nn.Module):
    """Doubles its input in place, which is not idempotent, unlike an in-place ReLU."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(2.0)


def test_bank_that_modifies_its_input_in_place() -> None:
    """Rows that several banks read reach each bank unmodified by the others."""
    features, hidden = 6, 8
    torch.manual_seed(0)
    layers = [
        WeightBank(lambda: nn.Sequential(nn.Linear(features, hidden), nn.ReLU()), 2),
        WeightBank(lambda: nn.Sequential(ScaleInPlace(), nn.Linear(hidden, hidden)), 3),
    ]
    heads = [nn.Sequential(nn.BatchNorm1d(hidden), nn.Linear(hidden, c)) for c in NUM_CLASSES]
    net = MultiTaskNet(layers, heads, (features,), NUM_CLASSES).double().eval()
    x, y = batch(net, seed=11)
    # Every task's samples share bank 0 in layer 1 and then split over all 3 banks of layer 2.
    assignments = torch.zeros(6, 2, NUM_TASKS, dtype=torch.long)
    assignments[:, 1] = torch.arange(6).remainder(3).unsqueeze(1)

    expected = LiteralEngine().evaluate(net, x, y, assignments)
    actual = BatchedEngine().evaluate(net, x, y, assignments)

    assert relative_difference(actual, expected) <= RTOL


def test_rejects_assignments_of_wrong_shape() -> None:
    net = tiny_net("dkl_convnet", None)
    x, y = batch(net, seed=0)
    with pytest.raises(ValueError, match="expected \\(samples, 4, 3\\)"):
        BatchedEngine().evaluate(net, x, y, torch.zeros(2, 3, NUM_TASKS, dtype=torch.long))


def test_predict_rejects_path_of_wrong_length() -> None:
    net = tiny_net("dkl_convnet", None)
    x, _ = batch(net, seed=0)
    with pytest.raises(ValueError, match="path has 2 bank indices"):
        BatchedEngine().predict(net, x[0], 0, torch.tensor([0, 1]))


def test_rejects_nonpositive_memory_ratio() -> None:
    with pytest.raises(ValueError, match="memory_ratio=0 is invalid"):
        BatchedEngine(memory_ratio=0)


def test_rejects_nonpositive_max_call_bytes() -> None:
    with pytest.raises(ValueError, match="max_call_bytes=0 is invalid"):
        BatchedEngine(max_call_bytes=0)
