"""Synthetic data and a gradient-scaler probe for ``benchmarks/gpu_check.py``.

The check runs ``python -m lws_lightning`` with this folder on PYTHONPATH and
``hydra.searchpath`` pointing at ``benchmarks/conf``, so ``data=synthetic`` selects
:class:`SyntheticTasksDataModule` and ``_target_: gpu_check_support.ScalerProbe`` imports in
every DDP process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lws_lightning.data.multitask import MultiTaskDataModule
from lws_lightning.data.tasks import TaskData


class SyntheticTasksDataModule(MultiTaskDataModule):
    """Tasks of random 1×28×28 uint8 images whose brightness pattern encodes the class.

    Every class has its own fixed pattern plus noise, so the tasks are learnable and the
    training loss falls within a few dozen iterations.

    Args:
        num_tasks: Number of tasks.
        num_classes: Classes of every task.
        train_per_task: Training examples per task.
        test_per_task: Test examples per task.
        **kwargs: Arguments of :class:`MultiTaskDataModule`.
    """

    dataset_name = "synthetic tasks"

    def __init__(
        self,
        root: str,
        num_tasks: int = 3,
        num_classes: int = 10,
        train_per_task: int = 512,
        test_per_task: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        self.num_tasks_requested = num_tasks
        self.classes_per_task = num_classes
        self.train_per_task = train_per_task
        self.test_per_task = test_per_task

    def ensure_files(self, download: bool) -> None:
        """Do nothing: the examples are generated in memory."""

    def load_tasks(self) -> list[TaskData]:
        generator = torch.Generator().manual_seed(12345)
        tasks = []
        for task in range(self.num_tasks_requested):
            patterns = torch.rand(self.classes_per_task, 1, 28, 28, generator=generator) * 160
            splits = []
            for size in (self.train_per_task, self.test_per_task):
                labels = torch.randint(self.classes_per_task, (size,), generator=generator)
                noise = torch.rand(size, 1, 28, 28, generator=generator) * 95
                images = (patterns[labels] + noise).to(torch.uint8)
                splits.append((images, labels))
            (train_images, train_labels), (test_images, test_labels) = splits
            tasks.append(
                TaskData(
                    f"synthetic_{task}",
                    self.classes_per_task,
                    train_images,
                    train_labels,
                    test_images,
                    test_labels,
                )
            )
        return tasks


class ScalerProbe(L.Callback):
    """Write the precision plugin, its gradient scaler and the device to ``out_dir/scaler.json``.

    The file also lists the loss scale after each iteration. The scaler halves the scale after
    every iteration whose optimizer step it skipped because of inf or NaN gradients.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.scales: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.scales.append(float(scaler.get_scale()))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        record = {
            "precision": trainer.precision,
            "plugin": type(trainer.precision_plugin).__name__,
            "scaler": None if scaler is None else type(scaler).__name__,
            "scales": self.scales,
            "device": str(pl_module.device),
            "global_rank": trainer.global_rank,
        }
        if trainer.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "scaler.json").write_text(json.dumps(record, indent=2))
