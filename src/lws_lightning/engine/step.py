"""One LWS iteration: StepNES on one batch, then StepSGD on another (Algorithm 1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lws_lightning.nets.multitask import MultiTaskNet
from lws_lightning.sharing.distribution import AssignmentDistribution
from lws_lightning.sharing.fitness import rank_utilities

Batch = tuple[Tensor, Tensor]


class Engine(Protocol):
    """Computes the losses of sampled assignments for :func:`lws_step`."""

    name: str

    def predict(self, net: MultiTaskNet, x: Tensor, task: int, path: Tensor) -> Tensor:
        """Return one task's logits under one path of banks."""
        ...

    def evaluate(self, net: MultiTaskNet, x: Tensor, y: Tensor, assignments: Tensor) -> Tensor:
        """Return each assignment's loss, without gradients."""
        ...

    def backward(
        self,
        net: MultiTaskNet,
        x: Tensor,
        y: Tensor,
        assignments: Tensor,
        backward: Callable[[Tensor], None],
    ) -> Tensor:
        """Accumulate the gradient of the mean loss over assignments; return each loss."""
        ...


class Optimizer(Protocol):
    def zero_grad(self) -> None: ...

    def step(self) -> object: ...


@dataclass(frozen=True)
class StepConfig:
    """Sample counts and NES learning rate of one LWS iteration.

    Attributes:
        nes_samples: λπ, assignments evaluated for the NES update of π.
        sgd_samples: λθ, assignments whose mean loss the optimizer step descends.
        nes_lr: ηπ, the NES learning rate.
    """

    nes_samples: int = 8
    sgd_samples: int = 8
    nes_lr: float = 0.01

    def __post_init__(self) -> None:
        if self.nes_samples < 2:
            raise ValueError(
                f"model.nes_samples={self.nes_samples} is invalid: rank-based NES needs at least "
                "2 samples."
            )
        if self.sgd_samples < 1:
            raise ValueError(f"model.sgd_samples={self.sgd_samples} is invalid: use at least 1.")
        if self.nes_lr <= 0:
            raise ValueError(f"model.nes_lr={self.nes_lr} is invalid: it must be positive.")


@dataclass
class StepResult:
    """What one LWS iteration computed; NES fields are None when π is frozen."""

    sgd_assignments: Tensor
    sgd_losses: Tensor
    nes_assignments: Tensor | None = None
    nes_losses: Tensor | None = None
    utilities: Tensor | None = None

    @property
    def loss(self) -> Tensor:
        """Mean training loss over the SGD samples."""
        return self.sgd_losses.mean()


def lws_step(
    net: MultiTaskNet,
    distribution: AssignmentDistribution,
    optimizer: Optimizer,
    nes_batch: Batch,
    sgd_batch: Batch,
    config: StepConfig,
    generator: torch.Generator,
    engine: Engine | None = None,
    backward: Callable[[Tensor], None] | None = None,
    reduce_losses: Callable[[Tensor], Tensor] | None = None,
    before_optimizer_step: Callable[[], None] | None = None,
) -> StepResult:
    """Run one LWS iteration (Algorithm 1 of Prellberg & Kramer, IJCNN 2020).

    StepNES: draw λπ assignments, evaluate each on ``nes_batch`` with BatchNorm in eval mode,
    rank the losses into utilities and update π. StepSGD: draw λθ assignments from the updated
    π, accumulate the gradient of their mean loss on ``sgd_batch`` in train mode (BatchNorm uses
    each task batch's own statistics), and take one optimizer step.

    A frozen π (sharing modes ``full``, ``none`` and ``fixed``) skips StepNES and uses one
    SGD sample, since every sample would be the same assignment.

    Args:
        net: The multi-task net.
        distribution: π, updated in place.
        optimizer: Steps the bank, shared-layer and head weights.
        nes_batch: ``(x, y)`` with x of shape ``[tasks, batch, C, H, W]``, y ``[tasks, batch]``.
        sgd_batch: A second batch of the same form.
        config: Sample counts and NES learning rate.
        generator: Draws the assignments; seed it identically on every DDP rank.
        engine: Computes sample losses; the default is :class:`LiteralEngine`.
        backward: Runs a backward pass (Lightning's ``manual_backward``); default
            ``Tensor.backward``.
        reduce_losses: Averages the NES losses across processes (DDP) before ranking.
        before_optimizer_step: Called between the backward passes and the optimizer step,
            for gradient clipping.
    """
    if engine is None:
        from lws_lightning.engine.literal import LiteralEngine

        engine = LiteralEngine()
    backward = backward or Tensor.backward
    was_training = net.training
    result_nes: dict[str, Tensor] = {}

    if not distribution.frozen:
        net.eval()
        nes_assignments = distribution.sample(config.nes_samples, generator)
        nes_losses = engine.evaluate(net, *nes_batch, nes_assignments)
        if reduce_losses is not None:
            nes_losses = reduce_losses(nes_losses)
        utilities = rank_utilities(nes_losses)
        distribution.nes_update(nes_assignments, utilities, config.nes_lr)
        result_nes = {
            "nes_assignments": nes_assignments,
            "nes_losses": nes_losses.detach(),
            "utilities": utilities,
        }

    net.train()
    sgd_samples = 1 if distribution.frozen else config.sgd_samples
    sgd_assignments = distribution.sample(sgd_samples, generator)
    optimizer.zero_grad()
    sgd_losses = engine.backward(net, *sgd_batch, sgd_assignments, backward)
    if before_optimizer_step is not None:
        before_optimizer_step()
    optimizer.step()
    net.train(was_training)
    return StepResult(sgd_assignments=sgd_assignments, sgd_losses=sgd_losses, **result_nes)
