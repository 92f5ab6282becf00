"""Every conf/data file composes and builds its data module."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from lws_lightning.data import (
    Cifar100TasksDataModule,
    DklMnistDataModule,
    MnistTrioDataModule,
    OmniglotAlphabetsDataModule,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist_trio", MnistTrioDataModule),
        ("dkl_mnist", DklMnistDataModule),
        ("cifar100_tasks", Cifar100TasksDataModule),
        ("omniglot_alphabets", OmniglotAlphabetsDataModule),
    ],
)
def test_data_config_builds(compose_config, tmp_path, name, expected):
    cfg = compose_config(f"data={name}", f"paths.data_dir={tmp_path}", "seed=7")
    datamodule = instantiate(cfg.data)
    assert type(datamodule) is expected
    assert datamodule.root == tmp_path
    assert datamodule.download is True
    assert datamodule.batch_size == 16
    assert datamodule.num_workers == 0
    assert datamodule.pin_memory is False
    assert datamodule.seed == 7
