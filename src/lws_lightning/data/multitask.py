"""LightningDataModule base shared by the multi-task datasets."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist
from lightning import LightningDataModule
from torch.utils.data import DataLoader

from lws_lightning.data.stream import StreamLoader, StreamPosition, TrainStream
from lws_lightning.data.tasks import TaskData, TestSet
from lws_lightning.errors import DataNotFoundError, UserInputError

log = logging.getLogger(__name__)


def _check_count(name: str, value: int, minimum: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserInputError(
            f"{name}={value!r} is invalid: it must be an integer >= {minimum} ({meaning})."
        )


class MultiTaskDataModule(LightningDataModule):
    """Tasks held in memory, an endless training stream and one test loader per task.

    Subclasses implement :meth:`ensure_files` and :meth:`load_tasks`.

    ``train_dataloader()`` yields ``(x [2, T, B, C, H, W], y [2, T, B])``, one item per LWS
    iteration: index 0 feeds the NES update, index 1 the SGD step. Each ``iter()`` starts at
    the step given to :meth:`set_start_step`, else at ``trainer.global_step`` when a trainer is
    attached, else at 0. ``val_dataloader()`` and ``test_dataloader()`` both return one loader
    per task over its test set, because LWS reports test error during training.

    Args:
        root: Existing folder that contains the dataset files.
        download: Allow downloading missing files in ``prepare_data()``.
        batch_size: Training examples per task in each half of an item (B).
        eval_batch_size: Examples per batch of the test loaders.
        num_workers: DataLoader worker processes of every loader.
        pin_memory: Copy batches into pinned memory.
        seed: Seed of the DDP shards and of the order of every pass over a training set.
    """

    #: Dataset name used in log lines and error messages.
    dataset_name = "multi-task dataset"

    def __init__(
        self,
        root: str,
        download: bool = True,
        batch_size: int = 16,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_count("batch_size", batch_size, 1, "training examples per task and half-batch")
        _check_count("eval_batch_size", eval_batch_size, 1, "test examples per batch")
        _check_count("num_workers", num_workers, 0, "DataLoader worker processes")
        _check_count("seed", seed, 0, "seed of the training stream")
        self.root = Path(root).expanduser()
        self.download = bool(download)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)
        self.seed = seed
        self._tasks: list[TaskData] | None = None
        self._stream: TrainStream | None = None
        self._pending_start_step: int | None = None

    # Subclass hooks.

    def ensure_files(self, download: bool) -> None:
        """Check that the dataset files exist under ``root``, and download missing ones if allowed.

        Raises:
            DataNotFoundError: Files are missing and ``download`` is false, or the download
                failed.
        """
        raise NotImplementedError

    def load_tasks(self) -> list[TaskData]:
        """Read the files under ``root`` and return the examples of every task, in task order."""
        raise NotImplementedError

    # Lightning hooks.

    def prepare_data(self) -> None:
        """Check the files and download missing ones. Lightning runs this once per node."""
        self.check_root()
        self.ensure_files(self.download)

    def setup(self, stage: str | None = None) -> None:
        """Load every task into memory. Later calls return at once."""
        if self._tasks is not None:
            return
        self.check_root()
        self.ensure_files(False)
        tasks = self.load_tasks()
        shapes = {tuple(task.train_images.shape[1:]) for task in tasks}
        shapes |= {tuple(task.test_images.shape[1:]) for task in tasks}
        if len(shapes) != 1:
            raise UserInputError(
                f"The tasks of {self.dataset_name} under {self.root} have different image "
                f"shapes {sorted(shapes)}, but every task must have the same (C, H, W)."
            )
        self._tasks = tasks
        self._stream = TrainStream(
            [task.train_images for task in tasks],
            [task.train_labels for task in tasks],
            self.batch_size,
            self.seed,
        )
        for task in tasks:
            log.info(
                "%s task %s: %d classes, %d training and %d test examples",
                self.dataset_name,
                task.name,
                task.num_classes,
                len(task.train_labels),
                len(task.test_labels),
            )

    def train_dataloader(self) -> DataLoader:
        """Return the endless training loader."""
        stream = self._require_stream()
        _, world_size = self.rank_and_world_size()
        smallest = min(len(labels) for labels in stream.labels)
        if world_size > smallest:
            raise UserInputError(
                f"{self.dataset_name} has a task with only {smallest} training examples, too few "
                f"to give each of the {world_size} processes its own shard. Use at most "
                f"{smallest} processes."
            )
        return StreamLoader(
            stream, self._next_position, num_workers=self.num_workers, pin_memory=self.pin_memory
        )

    def val_dataloader(self) -> list[DataLoader]:
        """Return one loader per task over its test set."""
        return self._test_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        """Return one loader per task over its test set."""
        return self._test_loaders()

    # Task metadata, available after setup().

    @property
    def tasks(self) -> list[TaskData]:
        """Examples of every task, in task order."""
        if self._tasks is None:
            raise RuntimeError(f"Call setup() on the {type(self).__name__} before using its tasks.")
        return self._tasks

    @property
    def task_names(self) -> list[str]:
        """Name of each task."""
        return [task.name for task in self.tasks]

    @property
    def num_classes(self) -> list[int]:
        """Class count of each task."""
        return [task.num_classes for task in self.tasks]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one example."""
        channels, height, width = self.tasks[0].train_images.shape[1:]
        return int(channels), int(height), int(width)

    @property
    def num_tasks(self) -> int:
        """Number of tasks (T)."""
        return len(self.tasks)

    # Position of the training stream.

    def set_start_step(self, step: int) -> None:
        """Make the next ``iter()`` of the training loader start at LWS iteration ``step``.

        With a trainer attached, every ``iter()`` already starts at ``trainer.global_step``
        (one optimizer step per LWS iteration), so a call with that value changes nothing.
        Lightning 2.6 starts the training iterator, and prefetches one item, before
        ``on_train_start``, so a resumed fit relies on ``trainer.global_step``.
        """
        _check_count("step", step, 0, "LWS iteration to start the training stream at")
        if self.trainer is not None and step == self.trainer.global_step:
            return
        self._pending_start_step = step

    def rank_and_world_size(self) -> tuple[int, int]:
        """Return the rank and process count from the trainer, else from torch.distributed."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def check_root(self) -> None:
        """Raise DataNotFoundError unless ``root`` is an existing folder."""
        if not self.root.exists():
            raise DataNotFoundError(
                f"The data root {self.root} does not exist. Create it (mkdir -p {self.root}) "
                "or set root (data.root on the command line) to the folder that holds the "
                "datasets."
            )
        if not self.root.is_dir():
            raise UserInputError(
                f"The data root {self.root} is a file, not a folder. Set root (data.root on the "
                "command line) to the folder that holds the datasets."
            )

    def missing_files_message(self, missing: str, where: str | Path, fetch_hint: str) -> str:
        """Build the message for files that are missing while downloading is off."""
        if self.download:
            action = "Call prepare_data() before setup() to download them."
        else:
            action = "Set download=true (data.download=true on the command line) to download them."
        return f"{self.dataset_name}: {missing} not found under {where}. {action} {fetch_hint}"

    def _next_position(self) -> StreamPosition:
        rank, world_size = self.rank_and_world_size()
        if self._pending_start_step is not None:
            step = self._pending_start_step
            self._pending_start_step = None
        elif self.trainer is not None:
            step = self.trainer.global_step
        else:
            step = 0
        log.debug("Training stream starts at step %d on rank %d of %d", step, rank, world_size)
        return StreamPosition(step, rank, world_size)

    def _require_stream(self) -> TrainStream:
        if self._stream is None:
            raise RuntimeError(
                f"Call setup() on the {type(self).__name__} before asking for dataloaders."
            )
        return self._stream

    def _test_loaders(self) -> list[DataLoader]:
        return [
            DataLoader(
                TestSet(task.test_images, task.test_labels),
                batch_size=self.eval_batch_size,
                shuffle=False,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
            )
            for task in self.tasks
        ]
