"""A system of task networks built from shared modules, weight banks and per-task heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lws_lightning.sharing.bank import WeightBank


class MultiTaskNet(nn.Module):
    """Task networks that run the same layer sequence, then a head per task.

    ``layers`` is the trunk, in order. A :class:`WeightBank` in it is a shareable layer: each task
    runs the bank its assignment picks. Any other module is always shared by every task. Task t's
    network is therefore ``heads[t] ∘ layer_L ∘ … ∘ layer_1`` with its own bank per shareable
    layer.

    Args:
        layers: Trunk modules in order, shareable layers as ``WeightBank``.
        heads: One output module per task.
        input_shape: Shape ``(C, H, W)`` of one input example, used by tests and benchmarks.
        num_classes: Class count of each task.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        input_shape: Sequence[int],
        num_classes: Sequence[int],
    ) -> None:
        super().__init__()
        if len(heads) != len(num_classes):
            raise ValueError(f"Got {len(heads)} heads for {len(num_classes)} tasks.")
        self.layers = nn.ModuleList(layers)
        self.heads = nn.ModuleList(heads)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = [int(c) for c in num_classes]
        self.shareable_positions = [
            i for i, layer in enumerate(self.layers) if isinstance(layer, WeightBank)
        ]
        if not self.shareable_positions:
            raise ValueError("A MultiTaskNet needs at least one shareable layer (WeightBank).")

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    @property
    def shareable_layers(self) -> list[WeightBank]:
        return [self.layers[i] for i in self.shareable_positions]

    @property
    def num_banks(self) -> list[int]:
        """Bank count of each shareable layer."""
        return [bank.num_banks for bank in self.shareable_layers]

    def forward_task(self, x: Tensor, task: int, path: Sequence[int] | Tensor) -> Tensor:
        """Return task ``task``'s logits for a batch ``x``, using bank ``path[l]`` in layer l."""
        path = [int(b) for b in (path.tolist() if isinstance(path, Tensor) else path)]
        if len(path) != len(self.shareable_positions):
            raise ValueError(
                f"path has {len(path)} bank indices, expected one per shareable layer "
                f"({len(self.shareable_positions)})."
            )
        banks = iter(path)
        h = x
        for layer in self.layers:
            h = layer.banks[next(banks)](h) if isinstance(layer, WeightBank) else layer(h)
        return self.heads[task](h)

    def forward(self, inputs: Sequence[Tensor] | Tensor, assignment: Tensor) -> list[Tensor]:
        """Return each task's logits; ``inputs[t]`` is task t's batch.

        ``assignment`` holds bank indices of shape ``[layers, tasks]``.
        """
        return [self.forward_task(x, task, assignment[:, task]) for task, x in enumerate(inputs)]

    def weight_count(self, assignment: Tensor) -> int:
        """Count the weights of the task networks under ``assignment`` ([layers, tasks]).

        Every module that some task uses counts once: the always-shared layers, the distinct
        banks picked in each shareable layer, and all heads. The copies in a bank are equal in
        size, so a layer counts its distinct picks times one copy's size; that also prices
        assignments that need more banks than this net holds, such as no sharing on a
        full-sharing net.
        """
        total = 0
        shareable = iter(torch.as_tensor(assignment).tolist())
        for layer in self.layers:
            if isinstance(layer, WeightBank):
                total += len(set(next(shareable))) * layer.bank_parameter_count(0)
            else:
                total += _parameter_count(layer)
        return total + sum(_parameter_count(head) for head in self.heads)

    def weight_counts(self, assignment: Tensor) -> dict[str, int]:
        """Weight counts under ``assignment``, under full sharing and under no sharing."""
        num_layers = len(self.shareable_positions)
        full = torch.zeros(num_layers, self.num_tasks, dtype=torch.long)
        none = torch.arange(self.num_tasks).expand(num_layers, -1)
        return {
            "assignment": self.weight_count(assignment),
            "full_sharing": self.weight_count(full),
            "no_sharing": self.weight_count(none),
        }


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
