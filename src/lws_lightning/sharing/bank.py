"""Shareable layers: K independent copies of a module, picked per task."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn


class WeightBank(nn.Module):
    """K independent copies ("banks") of one layer; each task's copy of the layer picks one.

    The layer can be any module: a conv block, a dense layer or a residual block. Every copy is
    built by calling ``factory`` again, so each starts from its own random initialisation.

    Args:
        factory: Builds one copy of the layer.
        num_banks: Number of copies K.
    """

    def __init__(self, factory: Callable[[], nn.Module], num_banks: int) -> None:
        super().__init__()
        if num_banks < 1:
            raise ValueError(f"num_banks={num_banks} is invalid: a WeightBank needs K >= 1.")
        self.banks = nn.ModuleList(factory() for _ in range(num_banks))

    @property
    def num_banks(self) -> int:
        return len(self.banks)

    def forward(self, inputs: Sequence[Tensor], assignment: Sequence[int] | Tensor) -> list[Tensor]:
        """Run task t's input through bank ``assignment[t]``, one call per task."""
        assignment = _as_index_list(assignment)
        if len(assignment) != len(inputs):
            raise ValueError(f"Got {len(inputs)} task inputs but {len(assignment)} bank indices.")
        return [self.banks[bank](x) for bank, x in zip(assignment, inputs, strict=True)]

    def bank_parameter_count(self, bank: int = 0) -> int:
        return sum(p.numel() for p in self.banks[bank].parameters())


def _as_index_list(assignment: Sequence[int] | Tensor) -> list[int]:
    if isinstance(assignment, Tensor):
        return [int(i) for i in assignment.tolist()]
    return [int(i) for i in assignment]


def init_he_uniform(module: nn.Module) -> None:
    """Re-initialise every conv and linear weight with uniform He initialisation.

    Biases are set to zero. Other layers (BatchNorm) keep PyTorch's defaults.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


__all__ = ["WeightBank", "init_he_uniform"]
