"""Progress bar that counts LWS iterations instead of epochs."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class IterationProgressBar(TQDMProgressBar):
    """TQDM bar over ``trainer.max_steps`` iterations of the endless training stream.

    The bar counts ``trainer.global_step``, so a resumed run continues from the checkpoint's
    iteration. The postfix shows the train loss, the latest test error and the entropy of π,
    which the module logs with ``prog_bar=True``.
    """

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else math.inf

    def on_train_start(self, trainer: L.Trainer, *args: object) -> None:
        super().on_train_start(trainer, *args)
        # A run resumed in the middle of an epoch gets no on_train_epoch_start call.
        self._start_bar(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: object) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._start_bar(trainer)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def _start_bar(self, trainer: L.Trainer) -> None:
        bar = self.train_progress_bar
        bar.reset(total=None if math.isinf(self.total_train_batches) else self.total_train_batches)
        bar.initial = trainer.global_step
        bar.n = trainer.global_step
        bar.set_description("LWS iteration")
