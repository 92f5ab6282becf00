"""The batched engine does less work than the literal one: shared prefixes and one call per bank."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lws_lightning.engine import BatchedEngine, LiteralEngine
from lws_lightning.nets import MultiTaskNet, build_net
from lws_lightning.sharing import AssignmentDistribution, WeightBank

NUM_TASKS = 3
BATCH = 4


def count_flops(run: Callable[[], object]) -> int:
    """Count the FLOPs of ``run()`` after one uncounted call.

    The first batched pass on a new input shape also measures activation sizes on one
    example, which the counts leave out.
    """
    run()
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def tiny_net(architecture: str, num_banks: int = 3) -> MultiTaskNet:
    torch.manual_seed(0)
    shape = (3, 16, 16)
    return build_net(architecture, num_banks, [5] * NUM_TASKS, shape, width=4, hidden=8).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_TASKS, BATCH, 3, 16, 16, generator=generator)
    return x, torch.randint(5, (NUM_TASKS, BATCH), generator=generator)


def test_identical_samples_cost_one_sample() -> None:
    net = tiny_net("dkl_convnet")
    x, y = batch()
    single = torch.randint(3, (1, 4, NUM_TASKS), generator=torch.Generator().manual_seed(1))
    eight = single.expand(8, -1, -1)
    engine, literal = BatchedEngine(), LiteralEngine()

    assert count_flops(lambda: engine.evaluate(net, x, y, eight)) == count_flops(
        lambda: engine.evaluate(net, x, y, single)
    )
    assert count_flops(lambda: literal.evaluate(net, x, y, eight)) == 8 * count_flops(
        lambda: literal.evaluate(net, x, y, single)
    )


def test_cost_falls_with_entropy() -> None:
    net = tiny_net("dkl_convnet")
    x, y = batch()
    generator = torch.Generator().manual_seed(2)
    uniform = AssignmentDistribution(net.num_banks, NUM_TASKS)
    prior = torch.full((4, NUM_TASKS, 3), 0.0005, dtype=torch.float64)
    prior[..., 0] = 0.999
    concentrated = AssignmentDistribution(net.num_banks, NUM_TASKS, p_min=0.0, prior=prior)
    engine = BatchedEngine()

    uniform_flops = count_flops(lambda: engine.evaluate(net, x, y, uniform.sample(8, generator)))
    concentrated_flops = count_flops(
        lambda: engine.evaluate(net, x, y, concentrated.sample(8, generator))
    )
    one_sample_flops = count_flops(
        lambda: engine.evaluate(net, x, y, concentrated.sample(1, generator))
    )
    assert concentrated_flops < 0.5 * uniform_flops
    assert concentrated_flops <= 2 * one_sample_flops


def test_always_shared_layers_run_once_per_task() -> None:
    net = tiny_net("routing_convnet")
    x, y = batch()
    rows_seen: list[int] = []
    assignments = torch.randint(3, (8, 3, NUM_TASKS), generator=torch.Generator().manual_seed(3))
    engine = BatchedEngine()
    engine.evaluate(net, x, y, assignments)  # measures activation sizes once
    net.layers[0].register_forward_hook(lambda _m, inputs, _o: rows_seen.append(len(inputs[0])))

    engine.evaluate(net, x, y, assignments)

    assert rows_seen == [NUM_TASKS * BATCH]


def test_each_bank_runs_at_most_once_per_pass() -> None:
    net = tiny_net("dkl_convnet").train()
    x, y = batch()
    engine = BatchedEngine()
    engine.evaluate(net, x, y, torch.zeros(1, 4, NUM_TASKS, dtype=torch.long))
    calls: dict[nn.Module, int] = {}
    for layer in net.layers:
        assert isinstance(layer, WeightBank)
        for bank in layer.banks:
            bank.register_forward_hook(
                lambda module, _i, _o: calls.__setitem__(module, calls.get(module, 0) + 1)
            )
    assignments = torch.randint(3, (8, 4, NUM_TASKS), generator=torch.Generator().manual_seed(4))

    engine.backward(net, x, y, assignments, torch.Tensor.backward)

    used_banks = {
        (layer, int(bank)) for layer in range(4) for bank in assignments[:, layer].unique()
    }
    assert len(calls) == len(used_banks)
    assert set(calls.values()) == {1}
