"""Cifar100TasksDataModule on fake CIFAR-100 pickles with a shuffled coarse grouping."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from lws_lightning.data import Cifar100TasksDataModule
from lws_lightning.errors import CorruptDataError, DataNotFoundError

from .conftest import decode_id


def loaded(root) -> Cifar100TasksDataModule:
    datamodule = Cifar100TasksDataModule(str(root), download=False)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_twenty_tasks_of_five_classes(fake_cifar):
    datamodule = loaded(fake_cifar.root)
    assert datamodule.num_tasks == 20
    assert datamodule.num_classes == [5] * 20
    assert datamodule.input_shape == (3, 32, 32)
    assert datamodule.task_names == [f"coarse_{i:02d}" for i in range(20)]


def test_split_sizes(fake_cifar):
    datamodule = loaded(fake_cifar.root)
    for task in datamodule.tasks:
        # 5 fine classes × 2 training and × 1 test images in the fake files.
        assert len(task.train_labels) == 10
        assert len(task.test_labels) == 5
        assert np.bincount(task.train_labels.numpy()).tolist() == [2] * 5


def test_coarse_grouping_matches_pickle(fake_cifar):
    datamodule = loaded(fake_cifar.root)
    num_train = len(fake_cifar.train["fine_labels"])
    seen = 0
    for task_index, task in enumerate(datamodule.tasks):
        fine_of_task = sorted(np.flatnonzero(fake_cifar.coarse_of_fine == task_index).tolist())
        for images, labels, content, first_id in (
            (task.train_images, task.train_labels, fake_cifar.train, 0),
            (task.test_images, task.test_labels, fake_cifar.test, num_train),
        ):
            for image, label in zip(images.float() / 255, labels, strict=True):
                index = decode_id(image) - first_id
                assert content["coarse_labels"][index] == task_index
                # Fine classes map to 0..4 in ascending fine-label order.
                assert fine_of_task[int(label)] == content["fine_labels"][index]
                seen += 1
    assert seen == num_train + len(fake_cifar.test["fine_labels"])


def test_pixels_keep_channel_order(fake_cifar):
    datamodule = loaded(fake_cifar.root)
    task = datamodule.tasks[0]
    index = decode_id(task.train_images[0].float() / 255)
    raw = np.asarray(fake_cifar.train["data"][index]).reshape(3, 32, 32)
    assert torch.equal(task.train_images[0], torch.from_numpy(raw))


def test_batches_hold_every_task(fake_cifar):
    datamodule = loaded(fake_cifar.root)
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (2, 20, 16, 3, 32, 32)
    assert y.shape == (2, 20, 16)
    assert y.max() <= 4


def test_truncated_pickle(fake_cifar):
    path = fake_cifar.root / "cifar-100-python" / "train"
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(CorruptDataError, match="cifar-100-python/train"):
        loaded(fake_cifar.root)


def test_label_count_mismatch(fake_cifar):
    path = fake_cifar.root / "cifar-100-python" / "test"
    content = dict(fake_cifar.test, coarse_labels=fake_cifar.test["coarse_labels"][:-1])
    path.write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(CorruptDataError, match="cifar-100-python/test.*coarse labels"):
        loaded(fake_cifar.root)


def test_missing_files_offline(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataNotFoundError) as error:
        loaded(root)
    message = str(error.value)
    assert "cifar100_tasks" in message
    assert str(root / "cifar-100-python") in message
    assert "download=true" in message
    assert list(root.iterdir()) == []
