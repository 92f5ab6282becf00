"""DklMnistDataModule on fake EMNIST and KMNIST IDX files in torchvision's raw layout."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lws_lightning.data import DklMnistDataModule
from lws_lightning.errors import CorruptDataError, DataNotFoundError

from .conftest import DKL_CLASSES, DKL_TEST_PER_CLASS, EMNIST_MARK, decode_id

TRAIN_PER_TASK = 30


def make(root, **options) -> DklMnistDataModule:
    options.setdefault("train_per_task", TRAIN_PER_TASK)
    return DklMnistDataModule(str(root), download=False, **options)


def loaded(root, **options) -> DklMnistDataModule:
    datamodule = make(root, **options)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_tasks_and_classes(fake_dkl):
    datamodule = loaded(fake_dkl.root)
    assert datamodule.num_tasks == 3
    assert datamodule.task_names == ["emnist_digits", "emnist_letters", "kmnist"]
    assert datamodule.num_classes == [10, 26, 10]
    assert datamodule.input_shape == (1, 28, 28)


def test_label_ranges(fake_dkl):
    datamodule = loaded(fake_dkl.root)
    for task, classes in zip(datamodule.tasks, (10, 26, 10), strict=True):
        for labels in (task.train_labels, task.test_labels):
            assert labels.dtype == torch.int64
            assert labels.min() == 0
            assert labels.max() == classes - 1


def test_letters_map_to_zero_based(fake_dkl):
    datamodule = loaded(fake_dkl.root)
    raw = fake_dkl.splits[("letters", "test")].labels
    assert raw.min() == 1
    assert np.array_equal(datamodule.tasks[1].test_labels.numpy(), raw - 1)


def test_split_sizes_and_stratification(fake_dkl):
    datamodule = loaded(fake_dkl.root)
    for task, key in zip(datamodule.tasks, ("digits", "letters", "kmnist"), strict=True):
        assert len(task.train_labels) == TRAIN_PER_TASK
        assert len(task.test_labels) == DKL_CLASSES[key] * DKL_TEST_PER_CLASS[key]
        counts = np.bincount(task.train_labels.numpy(), minlength=task.num_classes)
        assert counts.max() - counts.min() <= 1
    digits = datamodule.tasks[0].train_labels.numpy()
    assert np.bincount(digits).tolist() == [3] * 10


def test_train_subset_is_seeded(fake_dkl):
    first = loaded(fake_dkl.root).tasks[2].train_images
    again = loaded(fake_dkl.root).tasks[2].train_images
    other = loaded(fake_dkl.root, split_seed=1).tasks[2].train_images
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_train_images_from_train_file(fake_dkl):
    datamodule = loaded(fake_dkl.root)
    raw = fake_dkl.splits[("kmnist", "train")]
    task = datamodule.tasks[2]
    first_id = decode_id(torch.from_numpy(raw.images[:1]).float() / 255)
    for image, label in zip(task.train_images.float() / 255, task.train_labels, strict=True):
        index = decode_id(image) - first_id
        assert label == raw.labels[index]
        assert torch.equal(image.mul(255).round().byte()[0], torch.from_numpy(raw.images[index]))


def test_emnist_images_stand_upright(fake_dkl):
    datamodule = loaded(fake_dkl.root)
    row, column = EMNIST_MARK
    for task in datamodule.tasks[:2]:
        for images in (task.train_images, task.test_images):
            assert (images[:, 0, column, row] == 255).all()
            assert (images[:, 0, row, column] == 0).all()


def test_pixels_in_unit_range(fake_dkl):
    datamodule = loaded(fake_dkl.root)
    x, _ = datamodule.test_dataloader()[0].dataset[0]
    assert x.dtype == torch.float32
    assert x.min() >= 0
    assert x.max() <= 1


def test_missing_files_offline(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    datamodule = make(root)
    with pytest.raises(DataNotFoundError) as error:
        datamodule.prepare_data()
    message = str(error.value)
    assert "dkl_mnist" in message
    assert str(root) in message
    assert "emnist-digits-train-images-idx3-ubyte" in message
    assert "t10k-labels-idx1-ubyte" in message
    assert "download=true" in message
    assert list(root.iterdir()) == []


def test_setup_before_prepare_data(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataNotFoundError, match="prepare_data"):
        DklMnistDataModule(str(root), download=True).setup("fit")
    assert list(root.iterdir()) == []


def test_missing_root(tmp_path):
    root = tmp_path / "no_such_folder"
    with pytest.raises(DataNotFoundError, match="does not exist") as error:
        DklMnistDataModule(str(root), download=True).prepare_data()
    assert str(root) in str(error.value)
    assert not root.exists()


def test_root_that_is_a_file(tmp_path):
    root = tmp_path / "file"
    root.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        make(root).prepare_data()


@pytest.mark.parametrize(
    "name", ["emnist-letters-test-images-idx3-ubyte", "emnist-digits-train-labels-idx1-ubyte"]
)
def test_truncated_idx_file(fake_dkl, name):
    path = fake_dkl.root / "EMNIST" / "raw" / name
    os.truncate(path, path.stat().st_size - 7)
    with pytest.raises(CorruptDataError, match=name):
        loaded(fake_dkl.root)


def test_idx_header_garbage(fake_dkl):
    path = fake_dkl.root / "KMNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(b"not an idx file")
    with pytest.raises(CorruptDataError, match="train-images-idx3-ubyte"):
        loaded(fake_dkl.root)


def test_label_outside_range(fake_dkl):
    path = fake_dkl.root / "KMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[-1] = 12
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match="kmnist.*outside 0..9"):
        loaded(fake_dkl.root)


def test_train_per_task_too_large(fake_dkl):
    with pytest.raises(ValueError, match="train_per_task=200"):
        loaded(fake_dkl.root, train_per_task=200)


@pytest.mark.parametrize("option", ["batch_size", "eval_batch_size", "seed", "num_workers"])
def test_rejects_negative_options(tmp_path, option):
    with pytest.raises(ValueError, match=f"{option}=-1"):
        DklMnistDataModule(str(tmp_path), **{option: -1})
