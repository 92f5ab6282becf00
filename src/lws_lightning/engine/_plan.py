"""Prefix groups of (sample, task) pairs, and the split of a pass into memory-bounded chunks.

Two pairs of the same task whose assignments pick the same banks in every shareable layer up
to trunk position p have identical activations up to p, so the batched engine computes them
once. The pairs then form a prefix tree per task. Its node count per position measures both
the work and the memory of a batched pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lws_lightning.nets.multitask import MultiTaskNet
from lws_lightning.sharing.bank import WeightBank


@dataclass(frozen=True)
class Pair:
    """One (sample, task) pair of a batched pass.

    Attributes:
        order: Position of the pair in the literal engine's order, ``sample * tasks + task``.
        task: Task index.
        path: Bank index of each shareable layer.
    """

    order: int
    task: int
    path: tuple[int, ...]


def make_pairs(assignments: Tensor) -> list[Pair]:
    """Return the pairs of ``assignments`` ([samples, layers, tasks]) in literal order."""
    samples, _, tasks = assignments.shape
    paths = assignments.permute(0, 2, 1).tolist()
    return [
        Pair(sample * tasks + task, task, tuple(paths[sample][task]))
        for sample in range(samples)
        for task in range(tasks)
    ]


def position_depths(net: MultiTaskNet) -> list[int]:
    """Return, per trunk position and then for the heads, how many shareable layers precede it.

    A position's activations are identical for all pairs that agree on that many banks.
    """
    depths = []
    depth = 0
    for layer in net.layers:
        depth += isinstance(layer, WeightBank)
        depths.append(depth)
    return [*depths, depth]


@dataclass(frozen=True)
class ActivationSizes:
    """Elements per example of the activations at each trunk position and at the heads.

    Attributes:
        kept: Sum of the output sizes of every leaf module of the position, an estimate of
            what autograd keeps for the backward pass.
        largest: Largest output of one leaf module of the position, the largest tensor that
            one call of the position allocates.
    """

    kept: list[int]
    largest: list[int]


_SIZE_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, ActivationSizes]] = (
    weakref.WeakKeyDictionary()
)


def activation_sizes(net: MultiTaskNet, example: Tensor) -> ActivationSizes:
    """Measure the activation sizes of each trunk position and of the heads for one example.

    The sizes are measured on bank 0 of each shareable layer and on head 0, in eval mode
    without gradients, and cached per net, example shape, dtype and device.
    """
    key = (tuple(example.shape), example.dtype, example.device)
    cached = _SIZE_CACHE.setdefault(net, {})
    if key not in cached:
        cached[key] = _measure_sizes(net, example.unsqueeze(0))
    return cached[key]


@torch.no_grad()
def _measure_sizes(net: MultiTaskNet, x: Tensor) -> ActivationSizes:
    modules = [layer.banks[0] if isinstance(layer, WeightBank) else layer for layer in net.layers]
    modules.append(net.heads[0])
    modes = {module: module.training for module in net.modules()}
    kept: list[int] = []
    largest: list[int] = []
    try:
        net.eval()
        for module in modules:
            outputs: list[int] = []
            leaves = [m for m in module.modules() if next(m.children(), None) is None]

            def record(_module: nn.Module, _inputs: object, output: object, acc=outputs) -> None:
                if isinstance(output, Tensor):
                    acc.append(output.numel())

            handles = [leaf.register_forward_hook(record) for leaf in leaves]
            try:
                x = module(x)
            finally:
                for handle in handles:
                    handle.remove()
            kept.append(max(sum(outputs), x.numel()))
            largest.append(max([*outputs, x.numel()]))
    finally:
        for module, training in modes.items():
            module.training = training
    return ActivationSizes(kept, largest)


def plan_chunks(
    pairs: Sequence[Pair],
    depths: Sequence[int],
    sizes: Sequence[float],
    budget: float | None,
    keep_graph: bool,
) -> list[list[Pair]]:
    """Split ``pairs`` into chunks whose estimated memory stays within ``budget``.

    Pairs are ordered by task and then by path, so pairs that share prefixes are adjacent and
    a chunk loses little deduplication. ``sizes`` is the memory of one prefix-tree node at each
    trunk position and at the heads. With ``keep_graph`` (a training pass) a chunk's cost is
    the summed size of its nodes, which autograd keeps until the backward pass. Without it (no
    gradients) a position's activations are freed once the next one is computed, so the cost
    is that of the largest position. Each chunk contains at least one pair, and
    ``budget=None`` gives one chunk.
    """
    ordered = sorted(pairs, key=lambda pair: (pair.task, pair.path, pair.order))
    if budget is None:
        return [ordered]
    chunks: list[list[Pair]] = []
    chunk: list[Pair] = []
    nodes = [0] * len(sizes)
    for pair in ordered:
        previous = chunk[-1] if chunk and chunk[-1].task == pair.task else None
        shared = 0 if previous is None else _common_prefix(previous.path, pair.path)
        new_nodes = list(nodes)
        for position, depth in enumerate(depths):
            if previous is None or depth > shared:
                new_nodes[position] += 1
        if chunk and _cost(new_nodes, sizes, keep_graph) > budget:
            chunks.append(chunk)
            chunk, nodes = [], [0] * len(sizes)
            new_nodes = [1] * len(sizes)
        chunk.append(pair)
        nodes = new_nodes
    chunks.append(chunk)
    return chunks


def literal_graph_cost(num_tasks: int, sizes: Sequence[float]) -> float:
    """Cost, in :func:`plan_chunks` units, of the graph the literal engine keeps: one sample."""
    return float(num_tasks * sum(sizes))


def _cost(nodes: Sequence[int], sizes: Sequence[float], keep_graph: bool) -> float:
    if keep_graph:
        return float(sum(n * s for n, s in zip(nodes, sizes, strict=True)))
    return float(max(n * s for n, s in zip(nodes, sizes, strict=True)))


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    length = 0
    for left, right in zip(a, b, strict=True):
        if left != right:
            break
        length += 1
    return length
