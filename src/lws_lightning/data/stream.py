"""Endless, seeded multi-task training stream with random access by LWS iteration.

Task ``t`` of a rank reads its shard of the training set pass after pass, each pass in a fresh
seeded order. LWS iteration ``i`` takes stream positions ``2iB .. 2iB + 2B - 1`` of every task:
the first ``B`` feed the NES update, the next ``B`` the SGD step. A pass may end inside a batch,
and then the batch continues with the first examples of the next pass. Because every position
maps to an example by formula, any iteration can be computed without replaying the ones
before it, which makes resuming and splitting iterations among DataLoader workers exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lws_lightning.data.splits import EPOCH_ORDER, seed_sequence, shard_indices
from lws_lightning.data.tasks import to_unit_float


@dataclass(frozen=True)
class StreamPosition:
    """Start step and shard of one iterator of the stream."""

    start_step: int = 0
    rank: int = 0
    world_size: int = 1


class TrainStream(IterableDataset):
    """Iterable of ``(x [2, T, B, C, H, W] float32, y [2, T, B] int64)``, one per LWS iteration.

    Args:
        images: Per task, ``[N_t, C, H, W]`` uint8 training images.
        labels: Per task, ``[N_t]`` int64 training labels.
        batch_size: Examples per task in each half of an item (B).
        seed: Seed of the shards and of the order of every pass.
    """

    def __init__(
        self, images: list[Tensor], labels: list[Tensor], batch_size: int, seed: int
    ) -> None:
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.seed = seed
        # StreamLoader sets this just before each iter(), and worker processes get a copy.
        self.position = StreamPosition()

    def shard(self, task: int, position: StreamPosition | None = None) -> np.ndarray:
        """Return the indices of the training examples of ``task`` that a rank reads."""
        position = position or self.position
        return shard_indices(
            len(self.labels[task]), self.seed, task, position.rank, position.world_size
        )

    def example_indices(
        self, task: int, step: int, position: StreamPosition | None = None
    ) -> np.ndarray:
        """Return the ``2B`` training-set indices of ``task`` used by LWS iteration ``step``."""
        position = position or self.position
        return self._example_indices(task, step, self.shard(task, position), position)

    def batch(self, step: int, position: StreamPosition | None = None) -> tuple[Tensor, Tensor]:
        """Build the item of LWS iteration ``step``."""
        position = position or self.position
        shards = [self.shard(task, position) for task in range(len(self.labels))]
        return self._batch(step, shards, position)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        position = self.position
        worker = get_worker_info()
        # Worker w of W builds iterations start + w, start + w + W, and so on. The DataLoader
        # takes one item from each worker in turn, so the merged order is start, start + 1, ...
        offset, stride = (0, 1) if worker is None else (worker.id, worker.num_workers)
        shards = [self.shard(task, position) for task in range(len(self.labels))]
        for step in itertools.count(position.start_step + offset, stride):
            yield self._batch(step, shards, position)

    def _batch(
        self, step: int, shards: list[np.ndarray], position: StreamPosition
    ) -> tuple[Tensor, Tensor]:
        num_tasks = len(self.labels)
        batch = self.batch_size
        channels, height, width = self.images[0].shape[1:]
        x = torch.empty(2, num_tasks, batch, channels, height, width, dtype=torch.float32)
        y = torch.empty(2, num_tasks, batch, dtype=torch.int64)
        for task in range(num_tasks):
            indices = self._example_indices(task, step, shards[task], position)
            # NumPy gathers on one thread. On a 2-core machine shared with other jobs, a torch
            # gather of this size took 30 to 50 times longer, waiting for its thread pool.
            images = self.images[task].numpy().take(indices, axis=0)
            labels = self.labels[task].numpy().take(indices)
            x[:, task] = to_unit_float(torch.from_numpy(images)).view(
                2, batch, channels, height, width
            )
            y[:, task] = torch.from_numpy(labels).view(2, batch)
        return x, y

    def _example_indices(
        self, task: int, step: int, shard: np.ndarray, position: StreamPosition
    ) -> np.ndarray:
        shard_size = len(shard)
        first = 2 * step * self.batch_size
        positions = np.arange(first, first + 2 * self.batch_size)
        passes = positions // shard_size
        offsets = positions % shard_size
        indices = np.empty(len(positions), dtype=np.int64)
        for pass_index in np.unique(passes):
            order = self._pass_order(task, int(pass_index), shard_size, position)
            in_pass = passes == pass_index
            indices[in_pass] = shard[order[offsets[in_pass]]]
        return indices

    def _pass_order(
        self, task: int, pass_index: int, shard_size: int, position: StreamPosition
    ) -> np.ndarray:
        sequence = seed_sequence(
            self.seed, EPOCH_ORDER, task, position.rank, position.world_size, pass_index
        )
        return np.random.default_rng(sequence).permutation(shard_size)


class StreamLoader(DataLoader):
    """DataLoader of a TrainStream that calls ``locate`` for the start position at every ``iter()``.

    Args:
        stream: The training stream, whose items are already batched.
        locate: Returns the start step, rank and world size; called at each ``iter()``.
        num_workers: DataLoader worker processes.
        pin_memory: Copy items into pinned memory.
    """

    def __init__(
        self,
        stream: TrainStream,
        locate: Callable[[], StreamPosition],
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        self.locate = locate

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # Workers get a copy of the dataset when the iterator starts, so set the position first.
        self.dataset.position = self.locate()
        return super().__iter__()
