"""The literal engine: one forward pass per (sample, task) pair, as Algorithm 1 states it.

It is slow but plain, and it is the reference that faster engines are tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from lws_lightning.nets.multitask import MultiTaskNet


def assignment_loss(net: MultiTaskNet, x: Tensor, y: Tensor, assignment: Tensor) -> Tensor:
    """Return the mean over tasks of each task's mean cross-entropy under one assignment.

    Args:
        net: The multi-task net.
        x: Inputs of shape ``[tasks, batch, C, H, W]``.
        y: Labels of shape ``[tasks, batch]``.
        assignment: Bank indices of shape ``[layers, tasks]``.
    """
    task_losses = [
        F.cross_entropy(net.forward_task(x[task], task, assignment[:, task]), y[task])
        for task in range(net.num_tasks)
    ]
    return torch.stack(task_losses).mean()


class LiteralEngine:
    """Evaluate each sampled assignment with its own forward pass per task."""

    name = "literal"

    def predict(self, net: MultiTaskNet, x: Tensor, task: int, path: Tensor) -> Tensor:
        """Return task ``task``'s logits for ``x`` under one path of banks ([layers])."""
        return net.forward_task(x, task, path)

    @torch.no_grad()
    def evaluate(self, net: MultiTaskNet, x: Tensor, y: Tensor, assignments: Tensor) -> Tensor:
        """Return the loss of each assignment in ``assignments`` ([λ, layers, tasks])."""
        return torch.stack([assignment_loss(net, x, y, a) for a in assignments])

    def backward(
        self,
        net: MultiTaskNet,
        x: Tensor,
        y: Tensor,
        assignments: Tensor,
        backward: Callable[[Tensor], None],
    ) -> Tensor:
        """Accumulate the gradient of the mean loss over ``assignments``; return their losses.

        Each sample runs its own backward pass on ``loss / λ``, so only one sample's graph is
        alive at a time.
        """
        losses = []
        for assignment in assignments:
            loss = assignment_loss(net, x, y, assignment)
            backward(loss / len(assignments))
            losses.append(loss.detach())
        return torch.stack(losses)
