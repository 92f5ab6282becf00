"""Prefix groups and memory-bounded chunks of a batched pass."""

from __future__ import annotations

import torch

from lws_lightning.engine._plan import (
    Pair,
    activation_sizes,
    literal_graph_cost,
    make_pairs,
    plan_chunks,
    position_depths,
)
from lws_lightning.nets import build_net


def test_make_pairs_lists_literal_order() -> None:
    # [samples=2, layers=2, tasks=3]
    assignments = torch.tensor([[[0, 1, 2], [1, 1, 0]], [[2, 2, 2], [0, 0, 1]]])
    pairs = make_pairs(assignments)
    assert [pair.order for pair in pairs] == list(range(6))
    assert [pair.task for pair in pairs] == [0, 1, 2, 0, 1, 2]
    assert pairs[1].path == (1, 1)
    assert pairs[5].path == (2, 1)


def test_position_depths_count_preceding_shareable_layers() -> None:
    net = build_net("routing_convnet", 2, [3, 3], (3, 16, 16), width=4, hidden=8)
    # Four always-shared conv blocks, three shareable dense layers, then the heads.
    assert position_depths(net) == [0, 0, 0, 0, 1, 2, 3, 3]


def test_activation_sizes_per_position() -> None:
    net = build_net("dkl_convnet", 2, [3, 3], (1, 16, 16), width=4, hidden=8).train()
    sizes = activation_sizes(net, torch.randn(1, 16, 16))
    assert len(sizes.kept) == len(sizes.largest) == len(net.layers) + 1
    assert all(size > 0 for size in sizes.kept)
    # The first conv block keeps conv, batch-norm and ReLU outputs of 4×16×16 and a pooled map.
    assert sizes.kept[0] == 3 * 4 * 16 * 16 + 4 * 8 * 8
    assert sizes.largest[0] == 4 * 16 * 16
    # The heads are linear layers with 3 outputs.
    assert sizes.kept[-1] == sizes.largest[-1] == 3
    assert all(module.training for module in net.modules())
    assert activation_sizes(net, torch.randn(1, 16, 16)) is sizes


def pairs_of_task(task: int, paths: list[tuple[int, ...]], tasks: int = 2) -> list[Pair]:
    return [Pair(sample * tasks + task, task, path) for sample, path in enumerate(paths)]


def test_plan_without_budget_sorts_one_chunk() -> None:
    pairs = pairs_of_task(1, [(1, 0), (0, 1)]) + pairs_of_task(0, [(1, 1), (0, 0)])
    (chunk,) = plan_chunks(pairs, [1, 2, 2], [1, 1, 1], None, keep_graph=True)
    assert [(pair.task, pair.path) for pair in chunk] == [
        (0, (0, 0)),
        (0, (1, 1)),
        (1, (0, 1)),
        (1, (1, 0)),
    ]


def test_plan_counts_shared_prefixes_once() -> None:
    # Two shareable layers and a head, with node sizes 4, 2 and 1.
    depths, sizes = [1, 2, 2], [4.0, 2.0, 1.0]
    pairs = pairs_of_task(0, [(0, 0), (0, 1), (0, 1), (1, 0)], tasks=1)
    # Train cost: layer 1 has 2 nodes (8), layer 2 and head 3 leaves (9): 17 in total.
    assert len(plan_chunks(pairs, depths, sizes, 17.0, keep_graph=True)) == 1
    assert len(plan_chunks(pairs, depths, sizes, 16.0, keep_graph=True)) == 2
    # Eval cost is the largest position: layer 1 with 2 nodes of size 4.
    assert len(plan_chunks(pairs, depths, sizes, 8.0, keep_graph=False)) == 1
    assert len(plan_chunks(pairs, depths, sizes, 7.0, keep_graph=False)) == 2


def test_plan_covers_every_pair_once_within_budget() -> None:
    generator = torch.Generator().manual_seed(0)
    assignments = torch.randint(3, (8, 4, 5), generator=generator)
    pairs = make_pairs(assignments)
    depths, sizes = [1, 2, 3, 4, 4], [50.0, 20.0, 5.0, 1.0, 0.1]
    budget = 2 * literal_graph_cost(1, sizes)
    chunks = plan_chunks(pairs, depths, sizes, budget, keep_graph=True)
    assert sorted(pair.order for chunk in chunks for pair in chunk) == list(range(40))
    assert len(chunks) > 1
    for chunk in chunks:
        nodes = [len({(pair.task, pair.path[:depth]) for pair in chunk}) for depth in depths]
        cost = sum(n * s for n, s in zip(nodes, sizes, strict=True))
        assert cost <= budget or len(chunk) == 1


def test_plan_gives_oversized_pair_its_own_chunk() -> None:
    pairs = pairs_of_task(0, [(0,), (1,)], tasks=1)
    chunks = plan_chunks(pairs, [1, 1], [10.0, 1.0], 1.0, keep_graph=True)
    assert [len(chunk) for chunk in chunks] == [1, 1]
