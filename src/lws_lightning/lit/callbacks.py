"""Callback that sends pictures of π and the most likely assignment to W&B and TensorBoard."""

from __future__ import annotations

import logging
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from lws_lightning.report.assignment import figure_to_rgb, probs_figure

log = logging.getLogger(__name__)

PROBS_KEY = "routing/probs"
ASSIGNMENT_KEY = "routing/assignment"


class RoutingFigureLogger(Callback):
    """After every validation run, log a heatmap of π and the most likely assignment.

    With a :class:`WandbLogger` the heatmap goes in as an image under ``routing/probs`` and the
    assignment as a table under ``routing/assignment`` (one row per task, one column per
    shareable layer). With a :class:`TensorBoardLogger` the heatmap goes in as an image and the
    assignment as a Markdown text. Other loggers, Lightning's dummy logger under
    ``fast_dev_run`` and runs without a logger get nothing, and the callback then draws
    nothing either. Only global rank 0 logs.
    """

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        tensorboard_loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not wandb_loggers and not tensorboard_loggers:
            return

        step = int(trainer.global_step)
        distribution = pl_module.distribution
        task_names = [str(name) for name in pl_module.task_names]
        probs = [
            [row[:num_banks] for row in layer]
            for layer, num_banks in zip(
                distribution.probs.tolist(), distribution.num_banks, strict=True
            )
        ]
        assignment = distribution.most_likely().cpu().tolist()  # [layers][tasks]
        image = figure_to_rgb(probs_figure(probs, task_names, title=f"π at iteration {step}"))
        columns = ["task", *(f"layer_{layer}" for layer in range(len(assignment)))]
        rows: list[list[Any]] = [
            [name, *(layer[task] for layer in assignment)] for task, name in enumerate(task_names)
        ]

        for logger in wandb_loggers:
            logger.log_image(key=PROBS_KEY, images=[image], step=step)
            logger.log_table(key=ASSIGNMENT_KEY, columns=columns, data=rows, step=step)
        for logger in tensorboard_loggers:
            logger.experiment.add_image(PROBS_KEY, image, step, dataformats="HWC")
            logger.experiment.add_text(ASSIGNMENT_KEY, _markdown_table(columns, rows), step)


def _markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
