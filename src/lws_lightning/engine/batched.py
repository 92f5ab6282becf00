"""The batched engine: the literal engine's losses and gradients with few, large kernel calls.

The literal engine runs one forward pass per (sample, task) pair. This engine runs all pairs
of a pass together, layer by layer:

- Pairs of one task that picked the same banks in every shareable layer so far have the same
  activations, so each such prefix group is computed once. An always-shared layer therefore
  runs once per task and distinct prefix, not once per sample, and the work shrinks as π
  concentrates.
- A shareable layer runs each bank once per pass on the stacked inputs of every group that
  picked it. Two limits split such calls: a call whose largest output would exceed
  ``max_call_bytes`` runs as several calls of fewer groups, and a pass whose autograd graph
  would exceed its memory budget runs in chunks of pairs (see below).
- Batch norm in training mode normalizes each group with that group's own statistics, as the
  literal engine's separate passes do, and running statistics are updated afterwards in closed
  form (see :mod:`lws_lightning.engine._group_norm`).
- Layers prepare their weights once per pass (see :mod:`lws_lightning.engine._layer_weights`).
  2-D convolutions reuse one channels-last copy. In passes without gradients, eval-mode batch
  norm is folded into the convolution or linear layer before it. Training-mode batch norm
  after a convolution with few inputs per output value, such as a first layer on grayscale
  images, is folded into it too, with each group's statistics from its input patches. A task's
  batch reaches the first layer once per bank its pairs picked, and its patch moments are
  computed once per pass.
- ReLU followed by max-pooling runs as max-pooling followed by ReLU, which gives the same
  values and gradients with ReLU on the pooled map (see
  :mod:`lws_lightning.engine._pool_first`). On CPU, training-mode batch norm before them
  runs after the pooling too, where its groups are large and its scale is positive (see
  :mod:`lws_lightning.engine._pool_norm`).
- 4-D activations use the channels-last memory format, where CPU max-pooling and batch norm
  are several times faster (2×2 max-pooling of [16, 32, 28, 28] about 7.6 times on two AMD
  EPYC cores, PyTorch 2.14). Only the memory layout changes, not the values.

Gradients are exact: a group that stands for several pairs receives the sum of their
gradients. The results agree with the literal engine up to floating-point rounding, because
sums run in a different order.

A pass is split into chunks of pairs when its autograd graph would grow past
``memory_ratio`` times the graph the literal engine keeps (one sample's forward passes over
all tasks), since the batched graph spans every sample.

NOTE: modules that draw random numbers, such as dropout, draw them in a different order than
in the literal engine, so their outputs differ from it (with the same distribution).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lws_lightning.engine._group_norm import GroupedBatchNorm, to_channels_last
from lws_lightning.engine._layer_weights import PatchMoments, prepared_layers
from lws_lightning.engine._plan import (
    Pair,
    activation_sizes,
    literal_graph_cost,
    make_pairs,
    plan_chunks,
    position_depths,
)
from lws_lightning.engine._pool_first import pool_before_relu
from lws_lightning.engine._routing import Block, Group, gather
from lws_lightning.nets.multitask import MultiTaskNet
from lws_lightning.sharing.bank import WeightBank

DEFAULT_MEMORY_RATIO = 1.5
DEFAULT_MIN_CHUNK_BYTES = 256 * 2**20
DEFAULT_MAX_CALL_BYTES = 2 * 2**20


class BatchedEngine:
    """Evaluate sampled assignments with shared prefixes computed once and stacked bank calls.

    Args:
        channels_last: Run 4-D activations in the channels-last memory format.
        memory_ratio: Split a pass into chunks so that its estimated activation memory stays
            below this multiple of what the literal engine keeps for backward; None never
            splits.
        min_chunk_bytes: Never split a pass whose estimated activation memory is below this
            many bytes: splitting costs speed, and the memory it would save is small.
        max_call_bytes: Split a module call into calls of fewer groups where its largest
            output would exceed this many bytes. Larger tensors are slower per element on
            CPU, because they miss the caches and glibc's allocator maps and faults in fresh
            pages for them on every call. A group that alone exceeds it still runs whole.
    """

    name = "batched"

    def __init__(
        self,
        channels_last: bool = True,
        memory_ratio: float | None = DEFAULT_MEMORY_RATIO,
        min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES,
        max_call_bytes: int = DEFAULT_MAX_CALL_BYTES,
    ) -> None:
        if memory_ratio is not None and memory_ratio <= 0:
            raise ValueError(f"memory_ratio={memory_ratio} is invalid: it must be positive.")
        if min_chunk_bytes < 0:
            raise ValueError(f"min_chunk_bytes={min_chunk_bytes} is invalid: it must be >= 0.")
        if max_call_bytes <= 0:
            raise ValueError(f"max_call_bytes={max_call_bytes} is invalid: it must be positive.")
        self.channels_last = channels_last
        self.memory_ratio = memory_ratio
        self.min_chunk_bytes = min_chunk_bytes
        self.max_call_bytes = max_call_bytes

    def predict(self, net: MultiTaskNet, x: Tensor, task: int, path: Tensor) -> Tensor:
        """Return task ``task``'s logits for ``x`` under one path of banks ([layers])."""
        path_list = [int(bank) for bank in torch.as_tensor(path).tolist()]
        if len(path_list) != len(net.shareable_positions):
            raise ValueError(
                f"path has {len(path_list)} bank indices, expected one per shareable layer "
                f"({len(net.shareable_positions)})."
            )
        pair = Pair(order=0, task=task, path=tuple(path_list))
        inputs = x.unsqueeze(0)
        limits = self._call_limits(net, inputs)
        norm = GroupedBatchNorm()
        with self._patched(net, norm, fold=not torch.is_grad_enabled()):
            outputs = self._forward(net, inputs, [task], [pair], limits, norm)
        norm.update_running_stats()
        return torch.cat([logits for _, _, logits in outputs])

    @torch.no_grad()
    def evaluate(self, net: MultiTaskNet, x: Tensor, y: Tensor, assignments: Tensor) -> Tensor:
        """Return the loss of each assignment in ``assignments`` ([λ, layers, tasks])."""
        return self._run(net, x, y, assignments, backward=None)

    def backward(
        self,
        net: MultiTaskNet,
        x: Tensor,
        y: Tensor,
        assignments: Tensor,
        backward: Callable[[Tensor], None],
    ) -> Tensor:
        """Accumulate the gradient of the mean loss over ``assignments``; return their losses.

        ``backward`` runs once per chunk of pairs, on that chunk's share of the mean loss.
        """
        return self._run(net, x, y, assignments, backward=backward)

    def _run(
        self,
        net: MultiTaskNet,
        x: Tensor,
        y: Tensor,
        assignments: Tensor,
        backward: Callable[[Tensor], None] | None,
    ) -> Tensor:
        num_samples, num_layers, num_tasks = assignments.shape
        if num_layers != len(net.shareable_positions) or num_tasks != net.num_tasks:
            raise ValueError(
                f"assignments have shape {tuple(assignments.shape)}, expected "
                f"(samples, {len(net.shareable_positions)}, {net.num_tasks})."
            )
        pairs = make_pairs(assignments)
        chunks = self._plan(net, x, pairs, keep_graph=backward is not None)
        limits = self._call_limits(net, x)
        scale = 1.0 / (num_samples * num_tasks)
        orders, losses = [], []
        norm = GroupedBatchNorm()
        moments = PatchMoments()
        for chunk in chunks:
            tasks = sorted({pair.task for pair in chunk})
            inputs = x if len(tasks) == num_tasks else x[tasks]
            with self._patched(net, norm, fold=backward is None, moments=moments):
                outputs = self._forward(net, inputs, tasks, chunk, limits, norm)
            chunk_orders, chunk_losses = _pair_losses(outputs, y)
            if backward is not None:
                backward(chunk_losses.sum() * scale)
            orders.append(chunk_orders)
            losses.append(chunk_losses.detach())
        norm.update_running_stats()
        pair_losses = losses[0].new_empty(num_samples * num_tasks)
        pair_losses[torch.cat(orders)] = torch.cat(losses)
        return pair_losses.view(num_samples, num_tasks).mean(1)

    @contextmanager
    def _patched(
        self,
        net: MultiTaskNet,
        norm: GroupedBatchNorm,
        fold: bool,
        moments: PatchMoments | None = None,
    ) -> Iterator[None]:
        """Patch ``net``'s modules for one batched forward pass (see the module docstring).

        ``moments`` shares first-layer patch moments among the chunks of a pass.
        """
        with (
            norm.patch(net),
            prepared_layers(net, fold, norm, moments),
            pool_before_relu(net, norm),
        ):
            yield

    def _plan(
        self, net: MultiTaskNet, x: Tensor, pairs: list[Pair], keep_graph: bool
    ) -> list[list[Pair]]:
        if self.memory_ratio is None:
            return plan_chunks(pairs, [], [], None, keep_graph)
        # A prefix-tree node is one task batch, so each element of one example's activations
        # costs batch size × item size bytes per node.
        node_scale = x.shape[1] * x.element_size()
        node_bytes = [size * node_scale for size in activation_sizes(net, x[0, 0]).kept]
        budget = max(
            self.memory_ratio * literal_graph_cost(net.num_tasks, node_bytes),
            self.min_chunk_bytes,
        )
        return plan_chunks(pairs, position_depths(net), node_bytes, budget, keep_graph)

    def _call_limits(self, net: MultiTaskNet, inputs: Tensor) -> list[int]:
        """Return the groups per module call at each trunk position and at the heads.

        Measuring the activation sizes runs the net, so call this outside ``norm.patch``.
        """
        group_bytes = inputs.shape[1] * inputs.element_size()
        largest = activation_sizes(net, inputs[0, 0]).largest
        return [max(1, self.max_call_bytes // (size * group_bytes)) for size in largest]

    def _forward(
        self,
        net: MultiTaskNet,
        inputs: Tensor,
        tasks: Sequence[int],
        pairs: Sequence[Pair],
        limits: list[int],
        norm: GroupedBatchNorm,
    ) -> list[tuple[int, list[Group], Tensor]]:
        """Run ``pairs`` through the net; ``inputs[i]`` ([batch, ...]) is task ``tasks[i]``'s batch.

        Returns (task, leaf groups, stacked logits) per head call. A leaf group is one distinct
        path; a task's leaves may take several head calls.
        """
        batch = inputs.shape[1]
        h = inputs.reshape(-1, *inputs.shape[2:])
        if self.channels_last and h.dim() == 4:
            h = to_channels_last(h)
        groups = [Group(task, [pair for pair in pairs if pair.task == task]) for task in tasks]
        blocks = [Block(h, groups)]
        depth = 0
        for layer, limit in zip(net.layers, limits[:-1], strict=True):
            if isinstance(layer, WeightBank):
                blocks = _run_banks(layer, blocks, depth, limit, batch, norm)
                depth += 1
            else:
                blocks = _run_shared(layer, blocks, limit, batch, norm)
        return _run_heads(net, blocks, tasks, limits[-1], batch, norm)


def _run_shared(
    layer: nn.Module, blocks: list[Block], limit: int, batch: int, norm: GroupedBatchNorm
) -> list[Block]:
    """Run an always-shared layer on every group, at most ``limit`` groups per call."""
    requests = []
    start = 0
    for block in blocks:
        for first in range(0, len(block.groups), limit):
            count = min(limit, len(block.groups) - first)
            requests.append(list(range(start + first, start + first + count)))
        start += len(block.groups)
    groups = [group for block in blocks for group in block.groups]
    return _call_requests(layer, blocks, requests, groups, batch, norm)


def _run_banks(
    layer: WeightBank,
    blocks: list[Block],
    depth: int,
    limit: int,
    batch: int,
    norm: GroupedBatchNorm,
) -> list[Block]:
    """Split each group by the bank its pairs pick in this layer; run each bank on its groups."""
    by_bank: dict[int, tuple[list[int], list[Group]]] = {}
    index = 0
    for block in blocks:
        for group in block.groups:
            split: dict[int, list[Pair]] = {}
            for pair in group.pairs:
                split.setdefault(pair.path[depth], []).append(pair)
            for bank, pairs in split.items():
                parents, children = by_bank.setdefault(bank, ([], []))
                parents.append(index)
                children.append(Group(group.task, pairs))
            index += 1

    # One gather for all banks, so that it counts every bank that reads a group.
    requests, calls = [], []
    for bank in sorted(by_bank):
        parents, children = by_bank[bank]
        for start in range(0, len(parents), limit):
            requests.append(parents[start : start + limit])
            calls.append((layer.banks[bank], children[start : start + limit]))
    new_blocks = []
    for (module, groups), module_input in zip(calls, gather(blocks, requests, batch), strict=True):
        new_blocks.append(Block(_call(module, module_input, groups, norm), groups))
    return new_blocks


def _run_heads(
    net: MultiTaskNet,
    blocks: list[Block],
    tasks: Sequence[int],
    limit: int,
    batch: int,
    norm: GroupedBatchNorm,
) -> list[tuple[int, list[Group], Tensor]]:
    """Run each task's head on its leaf groups, at most ``limit`` groups per call."""
    groups = [group for block in blocks for group in block.groups]
    requests, request_tasks = [], []
    for task in tasks:
        leaves = [index for index, group in enumerate(groups) if group.task == task]
        for start in range(0, len(leaves), limit):
            requests.append(leaves[start : start + limit])
            request_tasks.append(task)
    outputs = []
    for task, request, head_input in zip(
        request_tasks, requests, gather(blocks, requests, batch), strict=True
    ):
        leaf_groups = [groups[index] for index in request]
        outputs.append((task, leaf_groups, _call(net.heads[task], head_input, leaf_groups, norm)))
    return outputs


def _call_requests(
    module: nn.Module,
    blocks: list[Block],
    requests: list[list[int]],
    groups: list[Group],
    batch: int,
    norm: GroupedBatchNorm,
) -> list[Block]:
    new_blocks = []
    for request, module_input in zip(requests, gather(blocks, requests, batch), strict=True):
        request_groups = [groups[index] for index in request]
        new_blocks.append(Block(_call(module, module_input, request_groups, norm), request_groups))
    return new_blocks


def _call(module: nn.Module, h: Tensor, groups: list[Group], norm: GroupedBatchNorm) -> Tensor:
    if norm.active:
        norm.groups = [[pair.order for pair in group.pairs] for group in groups]
    return module(h)


def _pair_losses(
    outputs: list[tuple[int, list[Group], Tensor]], y: Tensor
) -> tuple[Tensor, Tensor]:
    """Return the literal-order index and the loss of every pair of a chunk.

    A pair's loss is its task's mean cross-entropy over the batch, as in the literal engine.
    """
    leaf_losses = []
    orders: list[int] = []
    leaf_of_pair: list[int] = []
    leaf = 0
    for task, groups, logits in outputs:
        targets = y[task]
        repeats = [len(groups)] + [1] * (targets.dim() - 1)
        losses = F.cross_entropy(logits, targets.repeat(*repeats), reduction="none")
        leaf_losses.append(losses.view(len(groups), -1).sum(1) / _target_count(targets))
        for group in groups:
            leaf_of_pair.extend([leaf] * len(group.pairs))
            orders.extend(pair.order for pair in group.pairs)
            leaf += 1
    device = leaf_losses[0].device
    index = torch.tensor(leaf_of_pair, device=device)
    return torch.tensor(orders, device=device), torch.cat(leaf_losses)[index]


def _target_count(targets: Tensor) -> Tensor | int:
    """Count the targets that ``F.cross_entropy``'s mean reduction divides by."""
    if targets.is_floating_point():
        return targets.shape[0]
    return (targets != -100).sum()
