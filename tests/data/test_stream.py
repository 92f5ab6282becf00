"""Training stream, resume and sharding, run through DklMnistDataModule on fake files."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lws_lightning.data import DklMnistDataModule
from lws_lightning.data.stream import StreamPosition

TRAIN_PER_TASK = 30


def loaded(root, **options) -> DklMnistDataModule:
    options.setdefault("train_per_task", TRAIN_PER_TASK)
    datamodule = DklMnistDataModule(str(root), download=False, **options)
    datamodule.setup("fit")
    return datamodule


def take(loader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(iter(loader), count))


def test_batch_shapes(fake_dkl):
    datamodule = loaded(fake_dkl.root)
    x, y = take(datamodule.train_dataloader(), 1)[0]
    assert x.shape == (2, 3, 16, 1, 28, 28)
    assert y.shape == (2, 3, 16)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert x.min() >= 0
    assert x.max() <= 1


def test_every_batch_holds_each_task(fake_dkl):
    datamodule = loaded(fake_dkl.root)
    tasks = datamodule.tasks
    for x, y in take(datamodule.train_dataloader(), 5):
        for half in range(2):
            for task_index, task in enumerate(tasks):
                labels = y[half, task_index]
                assert len(labels) == 16
                assert labels.max() < task.num_classes
                # Every image is one of this task's training images, with its label.
                for image, label in zip(x[half, task_index], labels, strict=True):
                    matches = (task.train_images.float() / 255 == image).flatten(1).all(1)
                    assert matches.any()
                    assert label in task.train_labels[matches]


def test_each_pass_covers_all_examples(fake_dkl):
    datamodule = loaded(fake_dkl.root, batch_size=5)
    stream = datamodule.train_dataloader().dataset
    # 2 × 5 examples per task and step, 30 examples: steps 0-2 are pass 0, 3-5 pass 1.
    passes = [
        np.concatenate([stream.example_indices(2, step) for step in range(first, first + 3)])
        for first in (0, 3)
    ]
    assert sorted(passes[0]) == list(range(TRAIN_PER_TASK))
    assert sorted(passes[1]) == list(range(TRAIN_PER_TASK))
    assert not np.array_equal(passes[0], passes[1])


def test_tasks_reshuffle_independently(fake_dkl):
    datamodule = loaded(fake_dkl.root, batch_size=5)
    stream = datamodule.train_dataloader().dataset
    orders = [np.concatenate([stream.example_indices(t, s) for s in range(3)]) for t in range(3)]
    assert not np.array_equal(orders[0], orders[2])


def test_pass_may_end_inside_a_batch(fake_dkl):
    datamodule = loaded(fake_dkl.root, batch_size=4)
    stream = datamodule.train_dataloader().dataset
    # 8 examples per step: positions 24..31 span the end of pass 0 (30 examples).
    first_pass = np.concatenate([stream.example_indices(0, step) for step in range(3)])
    crossing = stream.example_indices(0, 3)
    assert sorted(np.concatenate([first_pass, crossing[:6]])) == list(range(TRAIN_PER_TASK))


def test_stream_is_deterministic(fake_dkl):
    first = take(loaded(fake_dkl.root).train_dataloader(), 3)
    again = take(loaded(fake_dkl.root).train_dataloader(), 3)
    other = take(loaded(fake_dkl.root, seed=1).train_dataloader(), 3)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2)
        assert torch.equal(y1, y2)
    assert not torch.equal(first[0][0], other[0][0])


def test_set_start_step_resumes(fake_dkl):
    datamodule = loaded(fake_dkl.root)
    loader = datamodule.train_dataloader()
    full = take(loader, 8)
    datamodule.set_start_step(5)
    resumed = take(loader, 3)
    for (x1, y1), (x2, y2) in zip(full[5:], resumed, strict=True):
        assert torch.equal(x1, x2)
        assert torch.equal(y1, y2)
    # The start step applies to one iter() only, and the next starts at 0 again.
    assert torch.equal(take(loader, 1)[0][0], full[0][0])


def test_start_follows_trainer_global_step(fake_dkl):
    datamodule = loaded(fake_dkl.root)
    loader = datamodule.train_dataloader()
    full = take(loader, 6)
    trainer = SimpleNamespace(global_step=4, global_rank=0, world_size=1)
    datamodule.trainer = trainer
    # Lightning calls this after it started the iterator. With the same step it changes nothing.
    datamodule.set_start_step(4)
    assert torch.equal(take(loader, 1)[0][1], full[4][1])
    trainer.global_step = 2
    assert torch.equal(take(loader, 1)[0][0], full[2][0])


def test_shards_disjoint_across_ranks(fake_dkl):
    datamodule = loaded(fake_dkl.root, batch_size=4)
    stream = datamodule.train_dataloader().dataset
    for task in range(3):
        seen = []
        for rank in range(2):
            position = StreamPosition(0, rank, 2)
            # 15 examples per shard, 8 per step: 4 steps cover the shard.
            indices = np.concatenate([stream.example_indices(task, s, position) for s in range(4)])
            assert set(indices) == set(stream.shard(task, position))
            seen.append(set(indices))
        assert seen[0].isdisjoint(seen[1])
        assert seen[0] | seen[1] == set(range(TRAIN_PER_TASK))


def test_rank_comes_from_trainer(fake_dkl):
    datamodule = loaded(fake_dkl.root)
    datamodule.trainer = SimpleNamespace(global_step=0, global_rank=1, world_size=2)
    labels_rank1 = take(datamodule.train_dataloader(), 1)[0][1]
    stream = datamodule.train_dataloader().dataset
    expected = stream.batch(0, StreamPosition(0, 1, 2))[1]
    assert torch.equal(labels_rank1, expected)
    assert not torch.equal(labels_rank1, stream.batch(0, StreamPosition(0, 0, 2))[1])


def test_too_many_ranks(fake_dkl):
    datamodule = loaded(fake_dkl.root)
    datamodule.trainer = SimpleNamespace(global_step=0, global_rank=0, world_size=64)
    with pytest.raises(ValueError, match="64 processes"):
        datamodule.train_dataloader()


def test_workers_give_same_stream(fake_dkl):
    serial = take(loaded(fake_dkl.root).train_dataloader(), 5)
    parallel = take(loaded(fake_dkl.root, num_workers=2).train_dataloader(), 5)
    for (x1, y1), (x2, y2) in zip(serial, parallel, strict=True):
        assert torch.equal(x1, x2)
        assert torch.equal(y1, y2)


def test_test_loaders_cover_test_sets(fake_dkl):
    datamodule = loaded(fake_dkl.root, eval_batch_size=7)
    for stage_loaders in (datamodule.val_dataloader(), datamodule.test_dataloader()):
        assert len(stage_loaders) == 3
        for loader, task in zip(stage_loaders, datamodule.tasks, strict=True):
            batches = list(loader)
            x = torch.cat([batch[0] for batch in batches])
            y = torch.cat([batch[1] for batch in batches])
            assert batches[0][0].shape == (7, 1, 28, 28)
            assert torch.equal(y, task.test_labels)
            assert torch.equal(x, task.test_images.float() / 255)


def test_setup_is_idempotent(fake_dkl):
    datamodule = loaded(fake_dkl.root)
    tasks = datamodule.tasks
    datamodule.setup("fit")
    datamodule.setup("test")
    assert datamodule.tasks is tasks


def test_metadata_needs_setup(fake_dkl):
    datamodule = DklMnistDataModule(str(fake_dkl.root), download=False)
    with pytest.raises(RuntimeError, match="setup"):
        datamodule.num_tasks  # noqa: B018 (property access is the test)
