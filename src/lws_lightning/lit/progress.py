"""Progress bar that counts LWS iterations instead of epochs."""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class IterationProgressBar(TQDMProgressBar):
    """TQDM bar over ``trainer.max_steps`` iterations of the endless training stream.

    The postfix shows the train loss, the latest test error and the entropy of π, which the
    module logs with ``prog_bar=True``.
    """

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else math.inf

    def on_train_epoch_start(self, trainer: L.Trainer, *args: object) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("LWS iteration")
