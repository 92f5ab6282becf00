"""OmniglotAlphabetsDataModule on fake images_background and images_evaluation folders."""

from __future__ import annotations

import shutil

import pytest
import torch

from lws_lightning.data import OmniglotAlphabetsDataModule
from lws_lightning.data.splits import seeded_order
from lws_lightning.errors import CorruptDataError, DataNotFoundError

from .conftest import OMNIGLOT_ALPHABETS, OMNIGLOT_IMAGES_PER_CHARACTER

CHARACTERS = {name: count for group in OMNIGLOT_ALPHABETS.values() for name, count in group.items()}


def loaded(root, **options) -> OmniglotAlphabetsDataModule:
    datamodule = OmniglotAlphabetsDataModule(str(root), download=False, **options)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_all_alphabets_in_seeded_order(fake_omniglot):
    datamodule = loaded(fake_omniglot)
    assert datamodule.num_tasks == len(CHARACTERS)
    assert datamodule.task_names == seeded_order(list(CHARACTERS), 0)
    assert datamodule.num_classes == [CHARACTERS[name] for name in datamodule.task_names]
    assert datamodule.input_shape == (1, 105, 105)


def test_labels_and_split_per_character(fake_omniglot):
    datamodule = loaded(fake_omniglot)
    for task in datamodule.tasks:
        classes = torch.arange(task.num_classes)
        # 5 images per character: 4 train and 1 test.
        assert torch.equal(task.train_labels.bincount(), torch.full_like(classes, 4))
        assert torch.equal(task.test_labels.bincount(), torch.ones_like(classes))
        assert set(task.train_images.unique().tolist()) <= {0, 255}


def test_num_tasks_keeps_first_alphabets(fake_omniglot):
    full = loaded(fake_omniglot)
    short = loaded(fake_omniglot, num_tasks=2)
    assert short.task_names == full.task_names[:2]


def test_split_independent_of_num_tasks(fake_omniglot):
    full = loaded(fake_omniglot)
    short = loaded(fake_omniglot, num_tasks=1)
    name = short.task_names[0]
    task = short.tasks[0]
    same = full.tasks[full.task_names.index(name)]
    assert torch.equal(task.train_images, same.train_images)
    assert torch.equal(task.test_images, same.test_images)
    assert torch.equal(task.train_labels, same.train_labels)


def test_image_size_resizes(fake_omniglot):
    datamodule = loaded(fake_omniglot, image_size=28)
    assert datamodule.input_shape == (1, 28, 28)
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (2, len(CHARACTERS), 16, 1, 28, 28)
    assert 0 <= x.min() <= x.max() <= 1


def test_too_many_tasks(fake_omniglot):
    with pytest.raises(ValueError, match="num_tasks=9"):
        loaded(fake_omniglot, num_tasks=9)


def test_corrupt_png_named(fake_omniglot):
    path = next((fake_omniglot / "omniglot-py" / "images_evaluation").rglob("*.png"))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CorruptDataError, match=path.name):
        loaded(fake_omniglot)


def test_character_with_one_image(fake_omniglot):
    folder = next((fake_omniglot / "omniglot-py" / "images_background").glob("*/character01"))
    for path in sorted(folder.glob("*.png"))[1:]:
        path.unlink()
    assert OMNIGLOT_IMAGES_PER_CHARACTER > 1
    with pytest.raises(CorruptDataError, match="character01.*1 images"):
        loaded(fake_omniglot)


def test_missing_evaluation_folder(fake_omniglot):
    shutil.rmtree(fake_omniglot / "omniglot-py" / "images_evaluation")
    with pytest.raises(DataNotFoundError, match="images_evaluation") as error:
        loaded(fake_omniglot)
    assert "omniglot_alphabets" in str(error.value)
    assert not (fake_omniglot / "omniglot-py" / "images_evaluation").exists()


@pytest.mark.parametrize("option", [{"num_tasks": 0}, {"image_size": 0}])
def test_rejects_invalid_options(tmp_path, option):
    with pytest.raises(ValueError, match=f"{next(iter(option))}=0"):
        OmniglotAlphabetsDataModule(str(tmp_path), **option)
