"""Lightning callbacks that the scaling tests attach with ``+callbacks.NAME._target_=...``.

The tests put this folder on PYTHONPATH (subprocess runs) or sys.path (in-process runs), so
the callbacks import as ``scale_callbacks.<Class>`` in every DDP process.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn


class RankStateRecorder(L.Callback):
    """Save the state of each DDP rank to ``out_dir/rank<global rank>.pt`` when training ends.

    The file contains π after every step, the sum of every training batch (to show that the
    ranks read different shards), and at the end the module's state dict, the optimizer state
    and the state of the assignment-sampling generator.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.probs: list[torch.Tensor] = []
        self.batch_sums: list[float] = []

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.probs.append(pl_module.distribution.probs.detach().cpu().clone())
        self.batch_sums.append(float(batch[0].double().sum()))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "global_step": trainer.global_step,
            "probs": self.probs,
            "batch_sums": self.batch_sums,
            "state_dict": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": trainer.optimizers[0].state_dict(),
            "generator": pl_module.generator.get_state(),
        }
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")


class ActivationRecorder(L.Callback):
    """Count the modes that convolutions ran in during training; write them to a JSON file.

    Each forward pass of a ``Conv2d`` counts under the key ``"<mode>/<grad>/<dtype>"``, such as
    ``"eval/no_grad/torch.bfloat16"``. The NES evaluations run with the net in eval mode, the
    SGD passes in train mode. The counts go to ``out_dir/activations.json`` when training ends.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.counts: Counter[str] = Counter()
        self._handles: list[Any] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for module in pl_module.modules():
            if isinstance(module, nn.Conv2d):
                self._handles.append(module.register_forward_hook(self._count))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "activations.json").write_text(json.dumps(dict(self.counts)))

    def _count(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        mode = "train" if module.training else "eval"
        grad = "grad" if torch.is_grad_enabled() else "no_grad"
        self.counts[f"{mode}/{grad}/{output.dtype}"] += 1
