"""LightningModule that trains a multi-task net with learned weight sharing."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor

from lws_lightning.engine import StepConfig, build_engine, lws_step
from lws_lightning.lit.distributed import average_across_processes, reducer_paused
from lws_lightning.lit.loggers import WANDB_RUN_ID_KEY, wandb_run_id
from lws_lightning.lit.metrics import TaskErrors
from lws_lightning.nets import build_net
from lws_lightning.sharing import SharingMode, bank_count, build_distribution

log = logging.getLogger(__name__)

GENERATOR_STATE_KEY = "lws_sampling_generator_state"


class LWSModule(LightningModule):
    """Learned weight sharing with manual optimization.

    Each ``training_step`` is one LWS iteration (:func:`lws_step`): an NES update of π on the
    first half of the batch, then one Adam step on the weights on the second half. Lightning's
    ``global_step`` counts optimizer steps, and there is exactly one per iteration, so
    ``trainer.max_steps`` counts LWS iterations. Validation and test use the most likely
    assignment.

    The module builds its own net from plain arguments, so a checkpoint restores without
    Hydra: ``LWSModule.load_from_checkpoint(path)``.

    Args:
        architecture: Name in :data:`lws_lightning.nets.ARCHITECTURES`.
        num_classes: Class count of each task.
        input_shape: ``(C, H, W)`` of one example.
        sharing: ``learned``, ``full``, ``none`` or ``fixed``.
        num_banks: K, banks per shareable layer for ``learned`` and ``fixed``.
        nes_samples: λπ.
        sgd_samples: λθ.
        nes_lr: ηπ.
        lr: Adam learning rate.
        p_min: Floor of every probability in π.
        engine: ``literal`` or ``batched``.
        seed: Seed of the assignment-sampling generator, identical on every DDP rank.
        task_names: Names used in logs and results.
        architecture_options: Extra keyword arguments of the architecture builder.
        assignment: Bank per layer and task for ``sharing=fixed``.
        grad_clip: Clip the gradient norm to this value before each Adam step.
    """

    def __init__(
        self,
        architecture: str,
        num_classes: Sequence[int],
        input_shape: Sequence[int],
        sharing: str = "learned",
        num_banks: int = 3,
        nes_samples: int = 8,
        sgd_samples: int = 8,
        nes_lr: float = 0.01,
        lr: float = 1e-3,
        p_min: float = 1e-3,
        engine: str = "batched",
        seed: int = 0,
        task_names: Sequence[str] | None = None,
        architecture_options: dict[str, Any] | None = None,
        assignment: list[list[int]] | None = None,
        grad_clip: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False

        mode = SharingMode.parse(sharing)
        num_tasks = len(num_classes)
        self.task_names = list(task_names or [f"task_{t}" for t in range(num_tasks)])
        self.net = build_net(
            architecture,
            bank_count(mode, num_tasks, num_banks),
            num_classes,
            input_shape,
            **(architecture_options or {}),
        )
        self.distribution = build_distribution(
            mode,
            self.net.num_banks,
            num_tasks,
            p_min,
            None if assignment is None else torch.as_tensor(assignment),
        )
        self.step_config = StepConfig(nes_samples, sgd_samples, nes_lr)
        self.engine = build_engine(engine)
        self.generator = torch.Generator().manual_seed(seed)
        self.val_errors = TaskErrors(num_classes)
        self.test_errors = TaskErrors(num_classes)
        self.history: list[dict[str, float]] = []
        self._resumed_wandb_run_id: str | None = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)

    def on_train_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_start_step"):
            datamodule.set_start_step(self.global_step)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        optimizer = self.optimizers()
        # Under DDP, gradients are averaged once per iteration, before the optimizer step
        # (lws_lightning.lit.distributed). Under 16-mixed the averaged gradients are still
        # scaled, so an inf or NaN reaches every process and all of them skip the step.
        with reducer_paused(self.trainer.strategy):
            result = lws_step(
                self.net,
                self.distribution,
                optimizer,
                (x[0], y[0]),
                (x[1], y[1]),
                self.step_config,
                self.generator,
                engine=self.engine,
                backward=self.manual_backward,
                reduce_losses=self._mean_across_processes,
                before_optimizer_step=lambda: average_across_processes(self.net),
            )
        loss = result.loss
        self._log_step()
        self.log("train/loss", loss, prog_bar=True)
        self._log_entropy()
        if result.nes_losses is not None:
            self.log("nes/loss_mean", result.nes_losses.mean())
            self.log("nes/loss_std", result.nes_losses.std())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning's precision plugin calls this inside optimizer.step(), after the gradient
        # scaler of 16-mixed has unscaled the gradients, so the clip applies to true values.
        grad_clip = self.hparams.grad_clip
        if grad_clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=grad_clip)

    def _log_step(self) -> None:
        """Log the number of finished iterations as the step of this hook's metrics.

        Lightning would otherwise label training metrics by the 0-based batch index: the loss
        of iteration 1 at step 0 and the evaluation after iteration 2 at step 1.
        """
        self.log("step", float(self.global_step), logger=True, prog_bar=False)

    def _mean_across_processes(self, values: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(values, reduce_op="mean")

    def _log_entropy(self) -> None:
        entropy = self.distribution.entropy().to(torch.float32)
        self.log("routing/entropy", entropy.mean(), prog_bar=True)
        for layer, value in enumerate(entropy.mean(1)):
            self.log(f"routing/entropy/layer_{layer}", value)

    def most_likely_assignment(self) -> Tensor:
        return self.distribution.most_likely()

    def _evaluate_batch(self, metrics: TaskErrors, batch: tuple[Tensor, Tensor], task: int) -> None:
        x, y = batch
        path = self.most_likely_assignment()[:, task]
        logits = self.engine.predict(self.net, x, task, path)
        metrics.update(task, logits, y)

    def validation_step(
        self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._evaluate_batch(self.val_errors, batch, dataloader_idx)

    def test_step(
        self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._evaluate_batch(self.test_errors, batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        errors = self._log_errors("val", self.val_errors)
        entropy = float(self.distribution.entropy().mean())
        self.history.append({"step": int(self.global_step), "entropy": entropy, **errors})

    def on_test_epoch_end(self) -> None:
        self._log_errors("test", self.test_errors)

    def _log_errors(self, stage: str, metrics: TaskErrors) -> dict[str, float]:
        """Log ``stage/error``, ``stage/error_task_mean`` and ``stage/error/<task name>``."""
        values = metrics.compute()
        metrics.reset()
        self._log_step()
        logged: dict[str, float] = {}
        for key, value in values.items():
            if key.startswith("task_"):
                name = f"error/{self.task_names[int(key.removeprefix('task_'))]}"
            else:
                name = key
            # TaskErrors.compute() already summed over DDP processes, so every process has the
            # same value and sync_dist averages equal numbers. Without it Lightning warns.
            self.log(
                f"{stage}/{name}",
                value,
                prog_bar=name == "error",
                add_dataloader_idx=False,
                sync_dist=True,
            )
            logged[name] = float(value)
        return logged

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[GENERATOR_STATE_KEY] = self.generator.get_state()
        checkpoint["lws_history"] = list(self.history)
        run_id = wandb_run_id(self.trainer.loggers) if self._trainer is not None else None
        # A run without W&B passes on the id of the checkpoint it resumed from, so that a
        # later resume with W&B continues that run.
        run_id = run_id or self._resumed_wandb_run_id
        if run_id is not None:
            checkpoint[WANDB_RUN_ID_KEY] = run_id

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if GENERATOR_STATE_KEY not in checkpoint:
            raise KeyError(
                f"The checkpoint has no {GENERATOR_STATE_KEY!r}; it was not written by LWSModule."
            )
        self.generator.set_state(checkpoint[GENERATOR_STATE_KEY])
        self.history = list(checkpoint.get("lws_history", []))
        self._resumed_wandb_run_id = checkpoint.get(WANDB_RUN_ID_KEY)
