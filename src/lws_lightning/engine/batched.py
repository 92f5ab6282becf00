"""The batched engine: the literal engine's losses and gradients with few, large kernel calls.

The literal engine runs one forward pass per (sample, task) pair. This engine runs all pairs
of a pass together, layer by layer:

- Pairs of one task that picked the same banks in every shareable layer so far have the same
  activations, so each such prefix group is computed once. An always-shared layer therefore
  runs once per task and distinct prefix, not once per sample, and the work shrinks as π
  concentrates.
- A shareable layer runs each bank once per pass (or per chunk, see below), on the stacked
  inputs of every group that picked it.
- Batch norm in training mode normalizes each group with that group's own statistics, as the
  literal engine's separate passes do, and running statistics are updated afterwards in closed
  form (see :mod:`lws_lightning.engine._group_norm`).
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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lws_lightning.engine._group_norm import GroupedBatchNorm, is_channels_last, to_channels_last
from lws_lightning.engine._plan import (
    Pair,
    activation_sizes,
    literal_graph_cost,
    make_pairs,
    plan_chunks,
    position_depths,
)
from lws_lightning.nets.multitask import MultiTaskNet
from lws_lightning.sharing.bank import WeightBank

DEFAULT_MEMORY_RATIO = 1.5
DEFAULT_MIN_CHUNK_BYTES = 256 * 2**20


@dataclass
class _Group:
    """Pairs of one task that share their activations at the current position."""

    task: int
    pairs: list[Pair]


class BatchedEngine:
    """Evaluate sampled assignments with one call per bank and layer and shared prefixes.

    Args:
        channels_last: Run 4-D activations in the channels-last memory format.
        memory_ratio: Split a pass into chunks so that its estimated activation memory stays
            below this multiple of what the literal engine keeps for backward; None never
            splits.
        min_chunk_bytes: Never split a pass whose estimated activation memory is below this
            many bytes: splitting costs speed, and the memory it would save is small.
    """

    name = "batched"

    def __init__(
        self,
        channels_last: bool = True,
        memory_ratio: float | None = DEFAULT_MEMORY_RATIO,
        min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES,
    ) -> None:
        if memory_ratio is not None and memory_ratio <= 0:
            raise ValueError(f"memory_ratio={memory_ratio} is invalid: it must be positive.")
        if min_chunk_bytes < 0:
            raise ValueError(f"min_chunk_bytes={min_chunk_bytes} is invalid: it must be >= 0.")
        self.channels_last = channels_last
        self.memory_ratio = memory_ratio
        self.min_chunk_bytes = min_chunk_bytes

    def predict(self, net: MultiTaskNet, x: Tensor, task: int, path: Tensor) -> Tensor:
        """Return task ``task``'s logits for ``x`` under one path of banks ([layers])."""
        path_list = [int(bank) for bank in torch.as_tensor(path).tolist()]
        if len(path_list) != len(net.shareable_positions):
            raise ValueError(
                f"path has {len(path_list)} bank indices, expected one per shareable layer "
                f"({len(net.shareable_positions)})."
            )
        pair = Pair(order=0, task=task, path=tuple(path_list))
        norm = GroupedBatchNorm()
        with norm.patch(net):
            outputs = self._forward(net, x.unsqueeze(0), [task], [pair], norm)
        norm.update_running_stats()
        return outputs[0][2]

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
        scale = 1.0 / (num_samples * num_tasks)
        orders, losses = [], []
        norm = GroupedBatchNorm()
        with norm.patch(net):
            for chunk in chunks:
                tasks = sorted({pair.task for pair in chunk})
                inputs = x if len(tasks) == num_tasks else x[tasks]
                outputs = self._forward(net, inputs, tasks, chunk, norm)
                chunk_orders, chunk_losses = _pair_losses(outputs, y)
                if backward is not None:
                    backward(chunk_losses.sum() * scale)
                orders.append(chunk_orders)
                losses.append(chunk_losses.detach())
        norm.update_running_stats()
        pair_losses = losses[0].new_empty(num_samples * num_tasks)
        pair_losses[torch.cat(orders)] = torch.cat(losses)
        return pair_losses.view(num_samples, num_tasks).mean(1)

    def _plan(
        self, net: MultiTaskNet, x: Tensor, pairs: list[Pair], keep_graph: bool
    ) -> list[list[Pair]]:
        if self.memory_ratio is None:
            return plan_chunks(pairs, [], [], None, keep_graph)
        # A prefix-tree node is one task batch, so each element of one example's activations
        # costs batch size × item size bytes per node.
        node_scale = x.shape[1] * x.element_size()
        node_bytes = [size * node_scale for size in activation_sizes(net, x[0, 0])]
        budget = max(
            self.memory_ratio * literal_graph_cost(net.num_tasks, node_bytes),
            self.min_chunk_bytes,
        )
        return plan_chunks(pairs, position_depths(net), node_bytes, budget, keep_graph)

    def _forward(
        self,
        net: MultiTaskNet,
        inputs: Tensor,
        tasks: Sequence[int],
        pairs: Sequence[Pair],
        norm: GroupedBatchNorm,
    ) -> list[tuple[int, list[_Group], Tensor]]:
        """Run ``pairs`` through the net; ``inputs[i]`` ([batch, ...]) is task ``tasks[i]``'s batch.

        Returns, per task, the leaf groups (one per distinct path) and their stacked logits.
        """
        groups = [_Group(task, [pair for pair in pairs if pair.task == task]) for task in tasks]
        h = inputs.reshape(-1, *inputs.shape[2:])
        if self.channels_last and h.dim() == 4:
            h = to_channels_last(h)
        depth = 0
        for layer in net.layers:
            if isinstance(layer, WeightBank):
                h, groups = _run_banks(layer, h, groups, depth, norm)
                depth += 1
            else:
                h = _call(layer, h, groups, norm)

        outputs = []
        for task in tasks:
            leaves = [index for index, group in enumerate(groups) if group.task == task]
            task_groups = [groups[index] for index in leaves]
            logits = _call(net.heads[task], _select(h, leaves, len(groups)), task_groups, norm)
            outputs.append((task, task_groups, logits))
        return outputs


def _run_banks(
    layer: WeightBank, h: Tensor, groups: list[_Group], depth: int, norm: GroupedBatchNorm
) -> tuple[Tensor, list[_Group]]:
    """Split each group by the bank its pairs pick in this layer; run each bank once."""
    by_bank: dict[int, tuple[list[int], list[_Group]]] = {}
    for index, group in enumerate(groups):
        split: dict[int, list[Pair]] = {}
        for pair in group.pairs:
            split.setdefault(pair.path[depth], []).append(pair)
        for bank, pairs in split.items():
            parents, children = by_bank.setdefault(bank, ([], []))
            parents.append(index)
            children.append(_Group(group.task, pairs))

    # A bank may modify its input in place, for example with a leading in-place ReLU. So a bank
    # gets a view of h only where no other bank reads the same rows, and a copy elsewhere.
    readers = [0] * len(groups)
    for parents, _ in by_bank.values():
        for index in parents:
            readers[index] += 1

    outputs = []
    new_groups: list[_Group] = []
    for bank in sorted(by_bank):
        parents, children = by_bank[bank]
        exclusive = all(readers[index] == 1 for index in parents)
        bank_input = _select(h, parents, len(groups), allow_view=exclusive)
        outputs.append(_call(layer.banks[bank], bank_input, children, norm))
        new_groups.extend(children)
    return _concat(outputs), new_groups


def _call(module: nn.Module, h: Tensor, groups: list[_Group], norm: GroupedBatchNorm) -> Tensor:
    if norm.active:
        norm.groups = [[pair.order for pair in group.pairs] for group in groups]
    return module(h)


def _pair_losses(
    outputs: list[tuple[int, list[_Group], Tensor]], y: Tensor
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


def _select(h: Tensor, indices: list[int], num_groups: int, allow_view: bool = True) -> Tensor:
    """Return the rows of the groups ``indices`` of ``h``, whose rows form ``num_groups`` groups.

    The result is a view of ``h`` where the groups are consecutive and ``allow_view`` is set,
    and a copy otherwise.
    """
    rows = h.shape[0] // num_groups
    consecutive = indices == list(range(indices[0], indices[0] + len(indices)))
    if allow_view and consecutive:
        if len(indices) == num_groups:
            return h
        return h.narrow(0, indices[0] * rows, len(indices) * rows)
    flat, restore = _flat_groups(h, num_groups)
    index = torch.tensor(indices, device=h.device)
    return restore(flat.index_select(0, index))


def _flat_groups(h: Tensor, num_groups: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """View ``h`` as ``[num_groups, -1]`` in memory order; return it and the inverse reshape."""
    if is_channels_last(h):
        moved = h.movedim(1, -1)
        row_shape = moved.shape[1:]
        return moved.reshape(num_groups, -1), lambda f: f.view(-1, *row_shape).movedim(-1, 1)
    h = h.contiguous()
    row_shape = h.shape[1:]
    return h.view(num_groups, -1), lambda f: f.view(-1, *row_shape)


def _concat(outputs: list[Tensor]) -> Tensor:
    if len(outputs) == 1:
        return outputs[0]
    if all(is_channels_last(out) for out in outputs):
        return torch.cat([out.movedim(1, -1) for out in outputs]).movedim(-1, 1)
    return torch.cat(outputs)
