"""A checkpoint callback that writes ``last.ckpt`` after every evaluation during training."""

from __future__ import annotations

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class EvaluationCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves ``last.ckpt`` after each evaluation with ``save_top_k=0``.

    Saved after the evaluation, the checkpoint's evaluation history includes it, so a run
    resumed from it keeps that entry. ModelCheckpoint's step trigger (``every_n_train_steps``)
    saves before the evaluation of the same step, and its evaluation trigger writes
    ``last.ckpt`` only when it also saved a top-k checkpoint, which ``save_top_k=0`` never
    does. Configure it with ``save_on_train_epoch_end=False`` and no step or time trigger.

    When training ends, it saves ``last.ckpt`` once more unless the last step was just saved.
    Otherwise a run whose step count is not a multiple of the evaluation interval, or that
    never evaluates, would leave a checkpoint older than its results, and export would export
    that one.
    """

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_unless_saved(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_unless_saved(trainer)

    def _save_last_unless_saved(self, trainer: Trainer) -> None:
        # NOTE: the skip test and the save are ModelCheckpoint's private methods (Lightning
        # 2.6), used so that logger uploads and last_model_path work as for its own saves.
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
