"""Categorical distributions over weight banks, one per (shareable layer, task)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

DEFAULT_P_MIN = 1e-3


class AssignmentDistribution(nn.Module):
    """Independent categorical distributions π[l, t] over the banks of each shareable layer.

    The distributions are kept in expectation parameters (the probabilities themselves), where
    the plain log-derivative ``onehot(a) - π`` of a sample ``a`` is the natural gradient. Layers
    may have different bank counts; the buffer ``probs`` has shape ``[layers, tasks, max_banks]``
    and holds zeros past each layer's bank count, so those banks are never sampled.

    Args:
        num_banks: Bank count K of each shareable layer.
        num_tasks: Number of tasks T.
        p_min: Floor that every probability keeps after an update. ``p_min * K`` must stay
            below 1 for every layer.
        prior: Optional initial probabilities of shape ``[layers, tasks, max_banks]``; the
            default is uniform, 1/K.
        frozen: Whether the distribution is fixed. A frozen distribution rejects NES updates;
            the ``full``, ``none`` and ``fixed`` sharing modes use one-hot frozen distributions.
    """

    probs: Tensor
    bank_mask: Tensor

    def __init__(
        self,
        num_banks: Sequence[int],
        num_tasks: int,
        p_min: float = DEFAULT_P_MIN,
        prior: Tensor | None = None,
        frozen: bool = False,
    ) -> None:
        super().__init__()
        num_banks = [int(k) for k in num_banks]
        if not num_banks:
            raise ValueError("num_banks is empty: a distribution needs at least one layer.")
        if min(num_banks) < 1:
            raise ValueError(f"num_banks={num_banks} is invalid: every layer needs K >= 1 banks.")
        if num_tasks < 1:
            raise ValueError(f"num_tasks={num_tasks} is invalid: it must be at least 1.")
        if p_min < 0 or p_min * max(num_banks) >= 1:
            raise ValueError(
                f"p_min={p_min} is invalid for K={max(num_banks)}: p_min * K must lie in [0, 1). "
                f"Choose p_min below {1 / max(num_banks):g}."
            )
        self.num_banks = num_banks
        self.num_tasks = num_tasks
        self.p_min = float(p_min)
        self.frozen = frozen

        max_banks = max(num_banks)
        mask = torch.zeros(len(num_banks), num_tasks, max_banks, dtype=torch.bool)
        for layer, k in enumerate(num_banks):
            mask[layer, :, :k] = True
        self.register_buffer("bank_mask", mask, persistent=False)

        if prior is None:
            counts = torch.tensor(num_banks, dtype=torch.float64).view(-1, 1, 1)
            probs = mask.to(torch.float64) / counts
        else:
            probs = self._validated_prior(prior, mask)
        self.register_buffer("probs", probs)

    @classmethod
    def from_assignment(
        cls, assignment: Tensor, num_banks: Sequence[int]
    ) -> AssignmentDistribution:
        """Build a frozen one-hot distribution that always yields ``assignment``.

        ``assignment`` holds one bank index per layer and task, shape ``[layers, tasks]``.
        """
        assignment = torch.as_tensor(assignment, dtype=torch.long)
        if assignment.dim() != 2 or assignment.shape[0] != len(num_banks):
            raise ValueError(
                f"assignment has shape {tuple(assignment.shape)}, expected "
                f"({len(num_banks)}, num_tasks): one bank index per layer and task."
            )
        for layer, k in enumerate(num_banks):
            row = assignment[layer]
            if row.min() < 0 or row.max() >= k:
                raise ValueError(
                    f"assignment {row.tolist()} of layer {layer} is invalid: "
                    f"bank indices must lie in 0..{k - 1}."
                )
        prior = nn.functional.one_hot(assignment, max(num_banks)).to(torch.float64)
        return cls(num_banks, assignment.shape[1], p_min=0.0, prior=prior, frozen=True)

    @staticmethod
    def _validated_prior(prior: Tensor, mask: Tensor) -> Tensor:
        prior = torch.as_tensor(prior, dtype=torch.float64)
        if prior.shape != mask.shape:
            raise ValueError(
                f"prior has shape {tuple(prior.shape)}, expected {tuple(mask.shape)} "
                "(layers, tasks, max banks)."
            )
        if (prior < 0).any() or (prior[~mask] != 0).any():
            raise ValueError("prior must be non-negative and zero past each layer's bank count.")
        if not torch.allclose(prior.sum(-1), torch.ones(()).double(), atol=1e-6):
            raise ValueError("every prior distribution must sum to 1.")
        return prior.clone()

    @property
    def num_layers(self) -> int:
        return len(self.num_banks)

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``num_samples`` assignments as integers of shape ``[λ, layers, tasks]``."""
        flat = self.probs.reshape(-1, self.probs.shape[-1]).to(torch.float64)
        draws = torch.multinomial(flat.cpu(), num_samples, replacement=True, generator=generator)
        return draws.T.reshape(num_samples, self.num_layers, self.num_tasks)

    def log_derivative(self, assignments: Tensor) -> Tensor:
        """Return ``onehot(a) - π`` for assignments of shape ``[λ, layers, tasks]``.

        In expectation parameters this plain gradient of ``log p(a)`` is the natural gradient.
        """
        onehot = nn.functional.one_hot(assignments.to(self.probs.device), self.probs.shape[-1])
        return (onehot.to(self.probs.dtype) - self.probs) * self.bank_mask

    @torch.no_grad()
    def nes_update(self, assignments: Tensor, utilities: Tensor, lr: float) -> None:
        """Apply π ← π + lr · mean_i u_i (onehot(a_i) − π), then restore the floor p_min.

        The update is done in place (``copy_``), so DDP's buffer handling and references held
        elsewhere see the new values.
        """
        if self.frozen:
            raise RuntimeError("This assignment distribution is frozen and takes no NES update.")
        if lr <= 0:
            raise ValueError(f"nes_lr={lr} is invalid: the NES learning rate must be positive.")
        utilities = utilities.to(device=self.probs.device, dtype=self.probs.dtype)
        grad = (utilities.view(-1, 1, 1, 1) * self.log_derivative(assignments)).mean(0)
        self.probs.copy_(clamp_to_simplex(self.probs + lr * grad, self.bank_mask, self.p_min))

    @torch.no_grad()
    def most_likely(self) -> Tensor:
        """Return the argmax bank per layer and task, shape ``[layers, tasks]``."""
        return self.probs.masked_fill(~self.bank_mask, -1.0).argmax(-1)

    @torch.no_grad()
    def entropy(self) -> Tensor:
        """Return the entropy in nats of each distribution, shape ``[layers, tasks]``."""
        p = self.probs
        terms = torch.where(p > 0, -p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))
        return terms.sum(-1)

    def extra_repr(self) -> str:
        return (
            f"num_banks={self.num_banks}, num_tasks={self.num_tasks}, p_min={self.p_min}, "
            f"frozen={self.frozen}"
        )


def clamp_to_simplex(probs: Tensor, mask: Tensor, p_min: float) -> Tensor:
    """Clamp every allowed entry to at least ``p_min`` and renormalise each row to sum 1.

    Plain clamping followed by division by the row sum would push clamped entries back under
    ``p_min``. Instead, entries at the floor are fixed at ``p_min`` and only the remaining
    entries are rescaled to carry the rest of the mass. That repeats until no rescaled entry
    falls under the floor, which takes at most K rounds. Entries outside ``mask`` stay 0.
    """
    probs = torch.where(mask, probs, torch.zeros_like(probs))
    at_floor = mask & (probs < p_min)
    for _ in range(probs.shape[-1]):
        free = mask & ~at_floor
        free_mass = torch.where(free, probs.clamp_min(0), torch.zeros_like(probs)).sum(-1, True)
        # Cast the count: an integer tensor times a float gives the default dtype (float32).
        budget = 1.0 - p_min * at_floor.sum(-1, keepdim=True).to(probs.dtype)
        scale = budget / free_mass.clamp_min(1e-300)
        rescaled = torch.where(free, probs.clamp_min(0) * scale, torch.zeros_like(probs))
        result = torch.where(at_floor, torch.full_like(probs, p_min), rescaled)
        newly_low = free & (result < p_min)
        if not newly_low.any():
            return result
        at_floor = at_floor | newly_low
    return result
